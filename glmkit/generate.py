"""Generation with a GLM: filling blanks (GLM's procedure) and left-to-right generation through [gMASK].

What it implements
    * ``fill_blanks(model, tok, "The cat [MASK] on the mat.")``: GLM's inference for blank infilling.
      Part A is the text as written, one mask token per blank. The blanks are then filled one after
      the other, in order: for a blank at Part-A position p, append ``[START]`` (position p, block
      position 1) and generate token after token (position p, block positions 2, 3, ...) until the
      model says ``[END]`` or ``max_span_len`` tokens. Part B grows as it goes, so a later blank sees
      the spans already filled, exactly as a later span saw earlier ones during training.
    * ``generate(model, tok, prompt)``: left-to-right generation the way ChatGLM-6B lays it out:
      Part A = prompt + ``[gMASK]`` (one blank "at the end"), then ``[START]`` and the continuation,
      every generated token at the position of ``[gMASK]`` with block positions 1, 2, 3, ...

How it differs from GPT generation
    GPT appends tokens to a causal sequence and each new token gets the next position. Here the text
    read so far (Part A) is encoded bidirectionally, and the generated tokens do not get positions of
    their own: they all carry the position of their blank, and the block position counts inside it.
    The stopping rule is GLM's ``[END]`` token rather than an end-of-text token.

No KV cache yet: each new token re-runs the model over the whole sequence (O(T) forwards of length
up to T). Part A never changes and Part B is causal, so keys and values can be cached; that is
lesson 02-03. Fine for the short texts of lesson 01.

Sampling: ``strategy="greedy"`` (argmax) or ``"sample"`` (softmax of logits / temperature, optionally
restricted to the ``top_k`` most likely tokens), drawn from a private ``torch.Generator`` seeded with
``seed``, so the global RNG is untouched and a seed gives the same text on any device. Special tokens
other than ``[END]`` are never generated (their logits are set to -inf).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch

from glmkit.models.glm2021 import GLMModel

STRATEGIES = ("greedy", "sample")


@dataclass
class FillResult:
    """``text``: the input with every blank filled; ``fills``: one string per blank, in order."""

    text: str
    fills: list[str]
    fill_ids: list[list[int]] = field(repr=False)
    finished: list[bool] = field(default_factory=list)  # False where a span stopped without [END]
    prompt: str = ""

    def __str__(self) -> str:
        return self.text


@dataclass
class GenerationResult:
    """``text`` = prompt + ``completion``; ``finished``: the model ended with [END]."""

    text: str
    completion: str
    ids: list[int] = field(repr=False)
    finished: bool = False
    prompt: str = ""

    def __str__(self) -> str:
        return self.text


# ----------------------------------------------------------------------------------------------------
# Checks and sampling
# ----------------------------------------------------------------------------------------------------
def _check_common(model, tokenizer, strategy, temperature, top_k, seed) -> None:
    if not isinstance(model, GLMModel):
        raise TypeError(f"model must be a GLMModel, got {type(model).__name__}")
    for attr in ("encode", "decode", "sop_id", "eop_id", "vocab_size"):
        if not hasattr(tokenizer, attr):
            raise TypeError(f"tokenizer must be a glmkit tokenizer (ByteTokenizer); it has no {attr!r}")
    if tokenizer.vocab_size > model.config.vocab_size:
        raise ValueError(f"tokenizer vocab_size {tokenizer.vocab_size} is larger than the model's "
                         f"{model.config.vocab_size}: they do not belong together")
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) \
            or not math.isfinite(temperature) or temperature <= 0:
        raise ValueError(f"temperature must be a positive finite number, got {temperature!r} "
                         f"(for argmax decoding use strategy='greedy')")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be a positive int or None (no restriction), got {top_k!r}")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise TypeError(f"seed must be an int or None, got {type(seed).__name__}")


def _check_text(name: str, text: Any) -> None:
    if not isinstance(text, str):
        raise TypeError(f"{name} must be a str, got {type(text).__name__}")
    if not text.strip():
        raise ValueError(f"{name} is empty: give some text{' with [MASK] blanks' if name == 'text' else ''}")


def _banned_ids(tokenizer, vocab: int) -> list[int]:
    """Every special id except [END], plus rows of the model's table the tokenizer never uses."""
    specials = set(getattr(tokenizer, "special_tokens", {}).values())
    specials |= {getattr(tokenizer, a) for a in ("pad_id", "mask_id", "smask_id", "gmask_id", "sop_id")
                 if hasattr(tokenizer, a)}
    specials.discard(tokenizer.eop_id)
    used = getattr(tokenizer, "n_ids", tokenizer.vocab_size)  # WordTokenizer rounds its table up past its ids
    return sorted(specials | set(range(used, vocab)))


def _pick(logits: torch.Tensor, banned: torch.Tensor, strategy: str, temperature: float, top_k: int | None,
          generator: torch.Generator | None) -> int:
    """One token id from logits [V] (on CPU, fp32)."""
    logits = logits.float().cpu()
    logits[banned] = float("-inf")
    if strategy == "greedy":
        return int(torch.argmax(logits))
    logits = logits / temperature
    if top_k is not None and top_k < logits.numel():
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))


class _Sequence:
    """Part A + the growing Part B, with both position rows, as lists; ``logits()`` runs the model."""

    def __init__(self, model: GLMModel, part_a: list[int]):
        self.model = model
        self.ids = list(part_a)
        self.pos = list(range(len(part_a)))
        self.block = [0] * len(part_a)
        self.sep = len(part_a)

    def __len__(self) -> int:
        return len(self.ids)

    def append(self, token: int, position: int, block_position: int) -> None:
        self.ids.append(token)
        self.pos.append(position)
        self.block.append(block_position)

    def last_logits(self) -> torch.Tensor:
        dev = self.model.device
        ids = torch.tensor([self.ids], dtype=torch.long, device=dev)                 # [1, T]
        pos = torch.tensor([[self.pos, self.block]], dtype=torch.long, device=dev)    # [1, 2, T]
        sep = torch.tensor([self.sep], dtype=torch.long, device=dev)                  # [1]
        return self.model(ids, pos, sep)[0, -1]                                        # [V]


class _EvalMode:
    def __init__(self, model):
        self.model = model

    def __enter__(self):
        self.was_training = self.model.training
        self.model.eval()

    def __exit__(self, *exc):
        self.model.train(self.was_training)


# ----------------------------------------------------------------------------------------------------
# Blank filling
# ----------------------------------------------------------------------------------------------------
def fill_blanks(
    model: GLMModel,
    tokenizer,
    text: str,
    strategy: str = "greedy",
    temperature: float = 1.0,
    top_k: int | None = None,
    max_span_len: int = 32,
    seed: int | None = None,
) -> FillResult:
    """Fill every ``[MASK]`` (also ``[sMASK]``/``[gMASK]``) in ``text``, in order, GLM's way.

    A span ends at ``[END]`` or after ``max_span_len`` tokens (then ``finished`` is False for it).
    """
    _check_common(model, tokenizer, strategy, temperature, top_k, seed)
    _check_text("text", text)
    if isinstance(max_span_len, bool) or not isinstance(max_span_len, int) or max_span_len < 1:
        raise ValueError(f"max_span_len must be a positive int, got {max_span_len!r}")
    part_a = tokenizer.encode(text, parse_special=True)
    mask_ids = set(getattr(tokenizer, "mask_ids", (tokenizer.mask_id,)))
    blanks = [i for i, t in enumerate(part_a) if t in mask_ids]
    if not blanks:
        raise ValueError(f"text contains no [MASK] (nor [sMASK]/[gMASK]) to fill: {text[:60]!r}")
    limit = model.config.max_seq_len
    if len(part_a) + len(blanks) > limit:
        raise ValueError(
            f"text is too long for the model: {len(part_a)} tokens + {len(blanks)} [START] tokens "
            f"(one per blank) > max_seq_len = {limit}"
        )

    banned = torch.tensor(_banned_ids(tokenizer, model.config.vocab_size), dtype=torch.long)
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    seq = _Sequence(model, part_a)
    fills: list[list[int]] = []
    finished: list[bool] = []
    truncated = False
    with _EvalMode(model), torch.inference_mode():
        for n, p in enumerate(blanks):
            seq.append(tokenizer.sop_id, p, 1)        # [START]: position of the blank, block position 1
            reserve = len(blanks) - n - 1               # one [START] for each blank still to come
            span: list[int] = []
            done = False
            while True:
                token = _pick(seq.last_logits(), banned, strategy, temperature, top_k, generator)
                if token == tokenizer.eop_id:
                    done = True
                    break
                span.append(token)
                if len(seq) + 1 + reserve > limit:      # no room to feed this token back in
                    truncated = True
                    break
                seq.append(token, p, len(span) + 1)     # block positions 2, 3, ... inside the span
                if len(span) >= max_span_len:
                    break
            fills.append(span)
            finished.append(done)
    if truncated:
        warnings.warn(f"fill_blanks reached max_seq_len={limit}; some fills are cut short", stacklevel=2)

    # Put the fills back in place of their mask tokens.
    out: list[int] = []
    k = 0
    for i, t in enumerate(part_a):
        if k < len(blanks) and i == blanks[k]:
            out.extend(fills[k])
            k += 1
        else:
            out.append(t)
    return FillResult(text=tokenizer.decode(out), fills=[tokenizer.decode(f) for f in fills], fill_ids=fills,
                      finished=finished, prompt=text)


# ----------------------------------------------------------------------------------------------------
# Left-to-right generation through [gMASK]
# ----------------------------------------------------------------------------------------------------
def generate(
    model: GLMModel,
    tokenizer,
    prompt: str,
    max_new_tokens: int = 64,
    strategy: str = "greedy",
    temperature: float = 1.0,
    top_k: int | None = None,
    seed: int | None = None,
) -> GenerationResult:
    """Continue ``prompt`` left to right: Part A = prompt + [gMASK], Part B = [START] + the new tokens.

    Stops at [END], after ``max_new_tokens``, or when the sequence reaches ``max_seq_len`` (warns).
    """
    _check_common(model, tokenizer, strategy, temperature, top_k, seed)
    _check_text("prompt", prompt)
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
    part_a = tokenizer.encode(prompt, parse_special=True) + [tokenizer.gmask_id]
    limit = model.config.max_seq_len
    if len(part_a) + 1 > limit:
        raise ValueError(
            f"prompt is too long for the model: {len(part_a) - 1} tokens + [gMASK] + [START] = "
            f"{len(part_a) + 1} > max_seq_len = {limit}"
        )
    room = limit - len(part_a)  # inputs: Part A + [START] + all generated tokens but the last
    if max_new_tokens > room:
        warnings.warn(f"max_new_tokens={max_new_tokens} does not fit: prompt ({len(part_a)} tokens with "
                      f"[gMASK]) leaves room for {room} new tokens under max_seq_len={limit}", stacklevel=2)
        max_new_tokens = room

    banned = torch.tensor(_banned_ids(tokenizer, model.config.vocab_size), dtype=torch.long)
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    g = len(part_a) - 1                                  # position of [gMASK]
    seq = _Sequence(model, part_a)
    seq.append(tokenizer.sop_id, g, 1)
    new: list[int] = []
    finished = False
    with _EvalMode(model), torch.inference_mode():
        while len(new) < max_new_tokens:
            token = _pick(seq.last_logits(), banned, strategy, temperature, top_k, generator)
            if token == tokenizer.eop_id:
                finished = True
                break
            new.append(token)
            if len(new) < max_new_tokens:
                seq.append(token, g, len(new) + 1)
    completion = tokenizer.decode(new)
    return GenerationResult(text=prompt + completion, completion=completion, ids=new, finished=finished,
                            prompt=prompt)


# ----------------------------------------------------------------------------------------------------
# A fill-accuracy metric
# ----------------------------------------------------------------------------------------------------
def masked_word_examples(text: str, n: int = 50, seed: int = 0, max_chars: int = 200) -> list[tuple[str, str]]:
    """``n`` (prompt, answer) pairs from ``text``: a random line (at most ``max_chars`` characters) with one
    random whole word replaced by ``[MASK]``. Tokenizer-agnostic, so byte and word models compare."""
    import re

    import numpy as np

    if not isinstance(text, str) or not text.strip():
        raise ValueError("text is empty: nothing to build masked-word examples from")
    lines = [ln for ln in text.split("\n") if 0 < len(ln) <= max_chars and re.search(r"\w", ln)]
    if not lines:
        raise ValueError(f"text has no line of 1..{max_chars} characters with a word in it")
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        line = lines[int(rng.integers(len(lines)))]
        words = list(re.finditer(r"\w+", line))
        m = words[int(rng.integers(len(words)))]
        out.append((line[: m.start()] + "[MASK]" + line[m.end():], m.group()))
    return out


def fill_accuracy(model: GLMModel, tokenizer, text: str, n: int = 50, seed: int = 0,
                  max_span_len: int = 8) -> dict[str, Any]:
    """Exact-match accuracy of greedy single-word fills on ``masked_word_examples(text, n, seed)``.

    Returns ``accuracy`` (the stripped fill equals the word), ``finished`` (share of fills that ended with
    [END]), ``baseline`` (always answering the most common answer of these examples: what a model that
    ignores the context could reach at best with one fixed word) and ``examples`` (prompt, answer, fill).
    """
    examples = masked_word_examples(text, n, seed)
    rows, hits, done = [], 0, 0
    for prompt, answer in examples:
        r = fill_blanks(model, tokenizer, prompt, strategy="greedy", max_span_len=max_span_len)
        fill = r.fills[0]
        hits += fill.strip() == answer
        done += r.finished[0]
        rows.append((prompt, answer, fill))
    answers = [a for _, a in examples]
    baseline = max(answers.count(a) for a in set(answers)) / len(answers)
    return {"accuracy": hits / len(examples), "finished": done / len(examples), "baseline": baseline,
            "n": len(examples), "examples": rows}
