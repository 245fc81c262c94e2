"""Autoregressive generation for the dense GLM models: sampling rules, stop tokens, batched prompts, a KV cache.

What it implements
    ``generate(model, prompts, max_new_tokens, ...)`` for a ``glmkit.models.glm_dense.GLMDenseModel``:
    prompts of different lengths are **left-padded** into one batch (padding keys are masked out, each row
    gets its own positions 0..n-1, so a padded row computes exactly what it would alone), the prompt goes
    through the model once (prefill), then one token per step. With ``use_cache=True`` each step feeds only
    the new token and attends to the ``glmkit.kv_cache.KVCache``; with ``use_cache=False`` it re-runs the
    whole sequence. Both see the same logits (up to float rounding), so they pick the same tokens — the
    test that the cache is right. ``sample_next`` turns logits into tokens: greedy (temperature 0),
    temperature, top-k, top-p (nucleus), in that order.

How generation changed along the lineage
    * GLM-2021 generated Part B (the blanks) after a bidirectional Part A: ``sep`` = the prompt length,
      2D positions (the generated span keeps the position of its mask and counts block positions 1, 2, ...);
      ``glmkit.generate.fill_blanks`` does this for the GLM-2021 model.
    * ChatGLM-6B kept that layout for chat: ``prompt [gMASK] <sop>`` with the prompt bidirectional.
    * ChatGLM2/3 and GLM-4 are plain causal LMs with 1D positions; ``[gMASK]<sop>`` survives only as the
      first two tokens of every prompt, and generation stops on the eos ids of the config
      (GLM-4: ``<|endoftext|>``, ``<|user|>``, ``<|observation|>``).
    Here ``sep`` (per row, in prompt tokens) selects the bidirectional prefix and 2D-position models get
    GLM's Part-B positions for the generated tokens: position = last prompt position, block = 1, 2, ...
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch


@dataclass
class GenerationOutput:
    """``tokens[b]``: the ids generated for prompt b (without the stop token); ``stop_reasons[b]``: "stop"
    (a stop token came) or "length" (max_new_tokens reached); ``sequences`` [B, P + n]: the left-padded
    prompts followed by what was generated (``pad_id`` after a row stopped)."""

    tokens: list[list[int]]
    stop_reasons: list[str]
    sequences: torch.Tensor


def sample_next(logits: torch.Tensor, temperature: float = 0.0, top_k: int | None = None,
                top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Pick one token per row from logits [B, V] → [B] int64.

    temperature 0: greedy (argmax; top-k/top-p ignored). Otherwise softmax(logits / temperature) restricted
    to the top_k most likely tokens and then to the smallest set whose probability reaches top_p (the most
    likely token always stays), renormalised and sampled with ``generator``.
    """
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
        raise ValueError(f"logits must be a [B, V] tensor, got {getattr(logits, 'shape', type(logits).__name__)}")
    if not (isinstance(temperature, (int, float)) and temperature >= 0):
        raise ValueError(f"temperature must be a number >= 0 (0 = greedy), got {temperature!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be None or an int >= 1, got {top_k!r}")
    if top_p is not None and not (isinstance(top_p, (int, float)) and 0 < top_p <= 1):
        raise ValueError(f"top_p must be None or in (0, 1], got {top_p!r}")
    logits = logits.float()
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]                     # [B, 1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        before = probs.cumsum(dim=-1) - probs          # probability mass of the strictly better tokens
        drop_sorted = before >= top_p                  # the nucleus is complete before this token
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _as_prompt_lists(prompts) -> list[list[int]]:
    if isinstance(prompts, torch.Tensor):
        if prompts.dim() == 1:
            prompts = prompts[None]
        if prompts.dim() != 2:
            raise ValueError(f"prompts tensor must be [B, T] (or [T]), got {tuple(prompts.shape)}")
        return [[int(t) for t in row] for row in prompts.tolist()]
    if not isinstance(prompts, Sequence) or len(prompts) == 0:
        raise ValueError("prompts must be a non-empty list of token-id lists (or a [B, T] tensor)")
    if all(isinstance(t, int) for t in prompts):   # a single prompt
        prompts = [prompts]
    out = []
    for b, p in enumerate(prompts):
        p = p.tolist() if isinstance(p, torch.Tensor) else list(p)
        if len(p) == 0:
            raise ValueError(f"prompt {b} is empty: every prompt needs at least one token")
        out.append([int(t) for t in p])
    return out


@torch.no_grad()
def generate(model, prompts, max_new_tokens: int = 32, *, temperature: float = 0.0, top_k: int | None = None,
             top_p: float | None = None, stop_tokens: Sequence[int] | None = None, pad_id: int | None = None,
             use_cache: bool = True, sep: int | Sequence[int] | None = None,
             generator: torch.Generator | None = None) -> GenerationOutput:
    """Generate up to ``max_new_tokens`` after each prompt (a list of ids, a list of lists, or [B, T]).

    stop_tokens: ids that end a row (default: ``model.config.eos_token_ids``); pad_id: the filler for left
    padding and finished rows (default: ``model.config.pad_token_id`` or 0 — it is masked out either way);
    sep: the bidirectional prefix length per prompt in its own tokens (int for all; None = causal);
    use_cache: decode with a KV cache (True) or re-run the full sequence each step (False).
    """
    cfg = model.config
    rows = _as_prompt_lists(prompts)
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
    stops = tuple(cfg.eos_token_ids if stop_tokens is None else (int(t) for t in stop_tokens))
    pad_id = int(pad_id if pad_id is not None else (cfg.pad_token_id if cfg.pad_token_id is not None else 0))
    B, device = len(rows), model.device
    lengths = torch.tensor([len(r) for r in rows], device=device)
    P = int(lengths.max())
    if P + max_new_tokens > cfg.max_seq_len and cfg.position == "learned2d":
        raise ValueError(f"prompt ({P}) + max_new_tokens ({max_new_tokens}) exceeds max_seq_len={cfg.max_seq_len}")
    pad = P - lengths                                                                  # [B] left padding
    ids = torch.full((B, P), pad_id, dtype=torch.int64, device=device)
    for b, r in enumerate(rows):
        ids[b, P - len(r):] = torch.tensor(r, dtype=torch.int64, device=device)
    col = torch.arange(P, device=device)[None]
    valid = col >= pad[:, None]                                                        # [B, P]
    pos1d = (col - pad[:, None]).clamp_min(0)                                          # 0..n-1 per row
    two_d = cfg.position in ("learned2d", "rope2d")
    pos = torch.stack([pos1d, torch.zeros_like(pos1d)], dim=1) if two_d else pos1d
    if sep is None:
        sep_t = torch.zeros(B, dtype=torch.int64, device=device)
    else:
        s = [sep] * B if isinstance(sep, int) else list(sep)
        if len(s) != B or any(not 0 <= int(v) <= n for v, n in zip(s, lengths.tolist())):
            raise ValueError(f"sep must be an int or one value per prompt in [0, prompt length], got {sep!r}")
        sep_t = torch.tensor([int(v) for v in s], dtype=torch.int64, device=device) + pad  # padded coordinates
    padded = bool((pad > 0).any())

    cache = model.new_cache(B, P + max_new_tokens) if use_cache else None
    logits = model(ids, pos, sep_t, attention_mask=valid if padded else None, cache=cache)[:, -1]
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    reasons = ["length"] * B
    out: list[list[int]] = [[] for _ in range(B)]
    stop_t = torch.tensor(stops, dtype=torch.int64, device=device) if stops else None
    for step in range(max_new_tokens):
        nxt = sample_next(logits, temperature, top_k, top_p, generator)
        nxt = torch.where(finished, torch.full_like(nxt, pad_id), nxt)
        hit = torch.isin(nxt, stop_t) & ~finished if stop_t is not None else torch.zeros_like(finished)
        for b in range(B):
            if finished[b]:
                continue
            if hit[b]:
                reasons[b] = "stop"
            else:
                out[b].append(int(nxt[b]))
        finished |= hit
        ids = torch.cat([ids, nxt[:, None]], dim=1)
        valid = torch.cat([valid, torch.ones(B, 1, dtype=torch.bool, device=device)], dim=1)
        if bool(finished.all()) or step == max_new_tokens - 1:
            break
        # Positions of the token just appended: 1D → one more than the last; 2D → Part-B layout.
        if two_d:
            step_pos = torch.stack([(lengths - 1), torch.full_like(lengths, step + 1)], dim=1)[..., None]  # [B, 2, 1]
        else:
            step_pos = (lengths + step)[:, None]                                                    # [B, 1]
        pos = torch.cat([pos, step_pos], dim=-1)
        if use_cache:
            logits = model(nxt[:, None], step_pos, sep_t, cache=cache)[:, -1]
        else:
            logits = model(ids, pos, sep_t, attention_mask=valid if padded else None)[:, -1]
    return GenerationOutput(tokens=out, stop_reasons=reasons, sequences=ids)
