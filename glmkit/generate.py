"""Generation, one loop for every glmkit model: sampling rules, stop tokens, batched prompts, the cache; and GLM's
blank filling on top of it.

What it implements
    ``generate(model, prompts, max_new_tokens)``: prompts of different lengths are **left-padded** into one batch
    (padded keys are masked out and each row gets its own positions 0..n−1, so a padded row computes what it would
    alone), the prompt runs once (prefill), then one token per step. With ``use_cache=True`` each step feeds only
    the new token and every layer reads its state from the ``glmkit.cache.Cache``; with ``use_cache=False`` the
    whole sequence runs again. Both see the same logits (to rounding), so they pick the same tokens: the test that
    the cache is right. ``sample_next`` turns logits into tokens: greedy (temperature 0), temperature, top-k,
    top-p, in that order.

How generation changed along the lineage
    * GLM-2021 generated Part B after a bidirectional Part A: ``sep`` = the prompt length, 2D positions (generated
      tokens keep the position of their blank and count block positions 1, 2, ...). The next position is always
      derived from the last one: 1D ``p + 1``; 2D ``(p, b + 1)``. ``fill_blanks`` fills every [MASK] of a text
      in order, each blank a ``generate`` call from ``[START]`` at (p, 1); ``complete`` continues a text through
      [gMASK], the layout ChatGLM-6B kept for chat.
    * ChatGLM2/3, GLM-4 and later are plain causal LMs with 1D positions; ``[gMASK]<sop>`` survives only as the
      first two tokens of every prompt, and generation stops on the config's eos ids.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch


@dataclass
class GenerationOutput:
    """``tokens[b]``: the ids generated for prompt b (without the stop token); ``stop_reasons[b]``: "stop" or
    "length"; ``sequences`` [B, P + n]: the left-padded prompts followed by what was generated; ``speculation``:
    acceptance and timing (``glmkit.speculative.SpeculativeStats``) when drafted with ``draft_tokens`` > 0."""

    tokens: list[list[int]]
    stop_reasons: list[str]
    sequences: torch.Tensor
    speculation: Any = None


def _check_sampling(temperature, top_k, top_p) -> None:
    if not (isinstance(temperature, (int, float)) and temperature >= 0):
        raise ValueError(f"temperature must be a number >= 0 (0 = greedy), got {temperature!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be None or an int >= 1, got {top_k!r}")
    if top_p is not None and not (isinstance(top_p, (int, float)) and 0 < top_p <= 1):
        raise ValueError(f"top_p must be None or in (0, 1], got {top_p!r}")


def token_probs(
    logits: torch.Tensor, temperature: float, top_k: int | None = None, top_p: float | None = None
) -> torch.Tensor:
    """The distribution ``sample_next`` draws from (temperature > 0), fp32 [..., V]: softmax(logits / temperature)
    restricted to the top_k most likely tokens, then to the smallest set whose probability reaches top_p (the most
    likely token always stays), renormalised. Speculative decoding needs it whole (``glmkit.speculative``)."""
    _check_sampling(temperature, top_k, top_p)
    if temperature == 0:
        raise ValueError("token_probs needs temperature > 0 (temperature 0 is the argmax)")
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        logits = logits.masked_fill(logits < torch.topk(logits, top_k, dim=-1).values[..., -1:], float("-inf"))
    if top_p is not None and top_p < 1:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        drop = torch.zeros_like(probs, dtype=torch.bool).scatter(-1, order, probs.cumsum(-1) - probs >= top_p)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits.softmax(-1)


def sample_next(
    logits: torch.Tensor,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """One token per row from logits [B, V] → [B] int64. temperature 0: greedy (argmax). Otherwise a draw from
    ``token_probs`` (temperature, then top_k, then top_p) with ``generator``."""
    _check_sampling(temperature, top_k, top_p)
    if temperature == 0:
        return logits.float().argmax(dim=-1)
    probs = token_probs(logits, temperature, top_k, top_p)
    return torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(-1).to(logits.device)


def _prompt_rows(prompts) -> list[list[int]]:
    if isinstance(prompts, torch.Tensor):
        prompts = prompts[None] if prompts.dim() == 1 else prompts
        return [[int(t) for t in row] for row in prompts.tolist()]
    if not isinstance(prompts, Sequence) or len(prompts) == 0:
        raise ValueError("prompts must be a non-empty list of token-id lists (or a [B, T] tensor)")
    if all(isinstance(t, int) for t in prompts):
        prompts = [prompts]
    rows = [[int(t) for t in (p.tolist() if isinstance(p, torch.Tensor) else p)] for p in prompts]
    if any(len(r) == 0 for r in rows):
        raise ValueError("every prompt needs at least one token")
    return rows


@torch.no_grad()
def generate(
    model,
    prompts,
    max_new_tokens: int = 32,
    *,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    stop_tokens: Sequence[int] | None = None,
    banned_tokens=None,
    pad_id: int | None = None,
    use_cache: bool = True,
    sep: int | Sequence[int] | None = None,
    position_ids: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    draft_tokens: int = 0,
) -> GenerationOutput:
    """Generate up to ``max_new_tokens`` after each prompt (a list of ids, a list of lists, or [B, T]).

    stop_tokens: ids that end a row (default: the config's ``eos_token_id``); banned_tokens: ids never generated;
    pad_id: the filler for left padding and finished rows (masked out either way); sep: the bidirectional prefix
    length per prompt, in its own tokens (int for all; None = causal); position_ids: the prompts' positions,
    [B, P] or [B, 2, P] (GLM-2021), for prompts of equal length (default 0..n−1, block position 0);
    use_cache: decode with the cache (True) or re-run the full sequence each step (False);
    draft_tokens: n > 0 drafts n tokens per step with the model's MTP modules and verifies them in one forward
    (``glmkit.speculative.generate_speculative``: greedy gives these same tokens, sampling the same distribution);
    generator: a CPU ``torch.Generator`` (tokens are drawn on the CPU, so a seed gives the same text on any device).
    """
    if generator is not None and generator.device.type != "cpu":
        raise ValueError(
            f"generator is on {generator.device}: pass a CPU torch.Generator (tokens are drawn on the CPU, so that "
            "a seed samples the same text on every device)"
        )
    if draft_tokens:
        from glmkit.speculative import generate_speculative

        if not use_cache or sep is not None or position_ids is not None:
            raise ValueError(
                "draft_tokens > 0 decodes with the cache, causally, at positions 0..n-1: leave "
                "use_cache, sep and position_ids at their defaults"
            )
        return generate_speculative(
            model,
            prompts,
            max_new_tokens,
            draft_tokens=draft_tokens,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            stop_tokens=stop_tokens,
            banned_tokens=banned_tokens,
            pad_id=pad_id,
            generator=generator,
        )
    cfg = model.config
    rows = _prompt_rows(prompts)
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
    if any(not 0 <= t < cfg.vocab_size for r in rows for t in r):
        raise ValueError(f"a prompt holds a token id outside the vocabulary [0, {cfg.vocab_size})")
    stops = tuple(getattr(cfg, "eos_token_id", ()) if stop_tokens is None else (int(t) for t in stop_tokens))
    pad_id = int(pad_id if pad_id is not None else (getattr(cfg, "pad_token_id", None) or 0))
    B, dev = len(rows), model.device
    lengths = torch.tensor([len(r) for r in rows], device=dev)
    P = int(lengths.max())
    pad = P - lengths
    ids = torch.full((B, P), pad_id, dtype=torch.int64, device=dev)
    for b, r in enumerate(rows):
        ids[b, P - len(r) :] = torch.tensor(r, device=dev)
    col = torch.arange(P, device=dev)[None]
    valid = col >= pad[:, None]  # [B, P]
    two_d = model.two_d_positions
    if position_ids is None:
        pos = (col - pad[:, None]).clamp_min(0)  # 0..n-1 per row
        pos = torch.stack([pos, torch.zeros_like(pos)], 1) if two_d else pos
    elif bool((pad > 0).any()) or position_ids.shape[-1] != P:
        raise ValueError("position_ids needs prompts of equal length, [B, P] or [B, 2, P]")
    else:
        pos = position_ids.to(dev)
    s = [0] * B if sep is None else [sep] * B if isinstance(sep, int) else list(sep)
    if len(s) != B or any(not 0 <= int(v) <= n for v, n in zip(s, lengths.tolist())):
        raise ValueError(f"sep must be an int or one value per prompt in [0, prompt length], got {sep!r}")
    sep_t = torch.tensor([int(v) for v in s], device=dev) + pad  # padded coordinates
    mask = valid if bool((pad > 0).any()) else None
    banned = None if banned_tokens is None else torch.as_tensor(list(banned_tokens), dtype=torch.int64, device=dev)

    cache = model.new_cache(B, P + max_new_tokens) if use_cache else None
    logits = model(ids, pos, sep_t, attention_mask=mask, cache=cache)[:, -1]
    finished = torch.zeros(B, dtype=torch.bool, device=dev)
    reasons, out = ["length"] * B, [[] for _ in range(B)]
    stop_t = torch.tensor(stops, dtype=torch.int64, device=dev)
    for step in range(max_new_tokens):
        if banned is not None:
            logits = logits.index_fill(-1, banned, float("-inf"))
        nxt = torch.where(finished, pad_id, sample_next(logits, temperature, top_k, top_p, generator))
        hit = torch.isin(nxt, stop_t) & ~finished
        for b in range(B):
            if finished[b]:
                continue
            if hit[b]:
                reasons[b] = "stop"
            else:
                out[b].append(int(nxt[b]))
        finished |= hit
        ids = torch.cat([ids, nxt[:, None]], dim=1)
        if bool(finished.all()) or step == max_new_tokens - 1:
            break
        last = pos[..., -1:]  # the next position: from the last
        step_pos = torch.stack([last[:, 0], last[:, 1] + 1], 1) if two_d else last + 1
        pos = torch.cat([pos, step_pos], dim=-1)
        if mask is not None:
            mask = torch.cat([mask, torch.ones(B, 1, dtype=torch.bool, device=dev)], dim=1)
        logits = (
            model(nxt[:, None], step_pos, sep_t, cache=cache)
            if use_cache
            else model(ids, pos, sep_t, attention_mask=mask)
        )[:, -1]
    return GenerationOutput(tokens=out, stop_reasons=reasons, sequences=ids)


# ----------------------------------------------------------------------------------------------------
# GLM-2021 on text: blank filling and [gMASK] continuation
# ----------------------------------------------------------------------------------------------------
@dataclass
class FillResult:
    """``text``: the input with every blank filled; ``fills``: one string per blank, in order; ``finished``: False
    where a span stopped without [END]."""

    text: str
    fills: list[str]
    fill_ids: list[list[int]] = field(repr=False)
    finished: list[bool] = field(default_factory=list)

    def __str__(self) -> str:
        return self.text


def _banned(tokenizer, vocab: int) -> list[int]:
    """Every special id except [END], and rows of the model's table the tokenizer never uses."""
    specials = set(getattr(tokenizer, "special_tokens", {}).values()) | {
        getattr(tokenizer, a) for a in ("pad_id", "mask_id", "smask_id", "gmask_id", "sop_id") if hasattr(tokenizer, a)
    }
    specials.discard(tokenizer.eop_id)
    return sorted(specials | set(range(getattr(tokenizer, "n_ids", tokenizer.vocab_size), vocab)))


def _fill(
    model, tokenizer, ids: list[int], pos_ids: torch.Tensor, sep: int, max_len: int, temperature, top_k, generator
) -> tuple[list[int], bool]:
    """Generate one Part-B span after ``ids`` (ending in [START]) with 2D positions pos_ids [1, 2, len(ids)], until
    [END] or ``max_len`` tokens (fewer if the position tables run out): (tokens, ended with [END])."""
    limit = model.config.max_position_embeddings
    max_len = min(max_len, limit - int(pos_ids[0, 1, -1]), limit + 1 - len(ids))
    if max_len < 1:
        warnings.warn(f"the text reached max_position_embeddings={limit}: a span is cut short", stacklevel=3)
        return [], False
    out = generate(
        model,
        [ids],
        max_len,
        temperature=temperature,
        top_k=top_k,
        stop_tokens=[tokenizer.eop_id],
        banned_tokens=_banned(tokenizer, model.config.vocab_size),
        sep=sep,
        position_ids=pos_ids.to(model.device),
        generator=generator,
    )
    return out.tokens[0], out.stop_reasons[0] == "stop"


def _check_text(model, tokenizer, text) -> None:
    if not getattr(model, "two_d_positions", False):
        raise TypeError(
            f"fill_blanks and complete are for GLM-2021 models (glmkit.models.glm2021); "
            f"{type(model).__name__} generates with generate()"
        )
    if not isinstance(text, str) or not text.strip():
        raise ValueError("the text is empty")
    if tokenizer.vocab_size > model.config.vocab_size:
        raise ValueError(f"the tokenizer's {tokenizer.vocab_size} ids do not fit the model's {model.config.vocab_size}")


def fill_blanks(
    model,
    tokenizer,
    text: str,
    temperature: float = 0.0,
    top_k: int | None = None,
    max_span_len: int = 32,
    seed: int | None = None,
) -> FillResult:
    """Fill every ``[MASK]`` (also ``[sMASK]``/``[gMASK]``) in ``text``, in order, GLM's way: Part A is the text as
    written; for the blank at Part-A position p, ``[START]`` goes in at (p, 1) and the span is generated at (p, 2),
    (p, 3), ... until ``[END]`` or ``max_span_len`` tokens. Part B grows as it goes, so a later blank sees the
    spans already filled, exactly as a later span saw earlier ones in training."""
    _check_text(model, tokenizer, text)
    if isinstance(max_span_len, bool) or not isinstance(max_span_len, int) or max_span_len < 1:
        raise ValueError(f"max_span_len must be a positive int, got {max_span_len!r}")
    part_a = tokenizer.encode(text, parse_special=True)
    masks = set(getattr(tokenizer, "mask_ids", (tokenizer.mask_id,)))
    blanks = [i for i, t in enumerate(part_a) if t in masks]
    if not blanks:
        raise ValueError(f"text contains no [MASK] (nor [sMASK]/[gMASK]) to fill: {text[:60]!r}")
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    ids, pos, block = list(part_a), list(range(len(part_a))), [0] * len(part_a)
    fills, finished = [], []
    was_training = model.training
    model.eval()
    for p in blanks:
        ids, pos, block = ids + [tokenizer.sop_id], pos + [p], block + [1]
        span, done = _fill(
            model,
            tokenizer,
            ids,
            torch.tensor([[pos, block]]),
            len(part_a),
            max_span_len,
            temperature,
            top_k,
            generator,
        )
        fills.append(span)
        finished.append(done)
        ids, pos, block = ids + span, pos + [p] * len(span), block + list(range(2, 2 + len(span)))
    model.train(was_training)
    out, k = [], 0
    for i, t in enumerate(part_a):
        if k < len(blanks) and i == blanks[k]:
            out.extend(fills[k])
            k += 1
        else:
            out.append(t)
    return FillResult(
        text=tokenizer.decode(out), fills=[tokenizer.decode(f) for f in fills], fill_ids=fills, finished=finished
    )


def complete(
    model,
    tokenizer,
    prompt: str,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_k: int | None = None,
    seed: int | None = None,
) -> FillResult:
    """Continue ``prompt`` left to right through [gMASK]: Part A = prompt + [gMASK], Part B = [START] + the new
    tokens, all at the position of [gMASK] with block positions 1, 2, ... (ChatGLM-6B's chat layout)."""
    return fill_blanks(model, tokenizer, prompt + "[gMASK]", temperature, top_k, max_new_tokens, seed)


def masked_word_examples(text: str, n: int = 50, seed: int = 0, max_chars: int = 200) -> list[tuple[str, str]]:
    """``n`` (prompt, answer) pairs from ``text``: a random line (at most ``max_chars`` characters) with one random
    whole word replaced by ``[MASK]``. Tokenizer-agnostic, so byte and word models compare."""
    lines = [ln for ln in str(text).split("\n") if 0 < len(ln) <= max_chars and re.search(r"\w", ln)]
    if not lines:
        raise ValueError(f"text has no line of 1..{max_chars} characters with a word in it")
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        line = lines[int(rng.integers(len(lines)))]
        words = list(re.finditer(r"\w+", line))
        m = words[int(rng.integers(len(words)))]
        out.append((line[: m.start()] + "[MASK]" + line[m.end() :], m.group()))
    return out


def fill_accuracy(model, tokenizer, text: str, n: int = 50, seed: int = 0, max_span_len: int = 8) -> dict[str, Any]:
    """Exact-match accuracy of greedy single-word fills on ``masked_word_examples(text, n, seed)``: ``accuracy``,
    ``finished`` (share of fills that ended with [END]), ``baseline`` (always answering the commonest answer of these
    examples) and ``examples`` (prompt, answer, fill)."""
    examples = masked_word_examples(text, n, seed)
    rows, hits, done = [], 0, 0
    for prompt, answer in examples:
        r = fill_blanks(model, tokenizer, prompt, max_span_len=max_span_len)
        hits += r.fills[0].strip() == answer
        done += r.finished[0]
        rows.append((prompt, answer, r.fills[0]))
    answers = [a for _, a in examples]
    return {
        "accuracy": hits / n,
        "finished": done / n,
        "baseline": max(map(answers.count, set(answers))) / n,
        "n": n,
        "examples": rows,
    }
