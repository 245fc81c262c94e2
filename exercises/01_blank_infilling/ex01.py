"""Exercise 01 — GLM's blank-infilling objective, by hand: the spans, the input, and the loss.

GLM (Du et al. 2021, arXiv:2103.10360) trains on a text x_1..x_n with some spans blanked out. Lesson 01
explained each step and used glmkit for it; here you write them, in rising order of difficulty:

1. ``part_a_b`` and ``position_rows`` — one training example: Part A is the text with every span replaced
   by ONE mask token; Part B holds the spans in a given (shuffled) order, each fed as [START] + span and
   predicted as span + [END]; two rows of position ids (row 0: the position in Part A, and inside Part B
   the position of the span's mask token; row 1: 0 in Part A, 1..len+1 along each span).
2. ``sample_spans`` — where the blanks go: span lengths drawn from a Poisson(λ) law truncated to
   1..max_len until they cover ``ratio`` of the text, then placed at random, never overlapping or touching.
3. ``part_b_loss`` — the objective: the cross entropy of the model's predictions over Part B only, with
   the targets worked out from the input itself (no ``targets`` tensor is given).

The notebook ex01.ipynb walks through each part; write the functions below, then run ``self_check()``
there (or ``python -m glmkit.grading check`` in this folder). Do not import glmkit here: the grader refuses
``import glmkit`` in a submission (the references you are re-implementing are not available to graded code,
and such a submission scores zero). torch, numpy and plain Python are fine.
"""

from __future__ import annotations

import math
import random

import torch
import torch.nn.functional as F

IGNORE = -100  # target value where no loss is computed (torch.nn.functional.cross_entropy's ignore_index)


def part_a_b(
    tokens: list[int], spans: list[tuple[int, int]], order: list[int], *, mask_id: int, sop_id: int, eop_id: int
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Part A followed by Part B.

    tokens: the text, n token ids.
    spans:  [(start, end), ...] half-open, 0-indexed, sorted and non-overlapping (they may touch).
    order:  a permutation of range(len(spans)); Part B holds spans[order[0]], spans[order[1]], ...
    Returns (input_ids, targets, sep):
      input_ids [L] int64: Part A (each span -> mask_id), then for each span in order: sop_id, span tokens;
      targets   [L] int64: IGNORE on all of Part A, then for each span in order: span tokens, eop_id;
      sep       int:       the length of Part A.
    With m spans, L = n + 2m.
    """
    # BEGIN SOLUTION
    part_a, starts_at = [], {}
    cursor = 0
    for k, (s, e) in enumerate(spans):
        part_a += tokens[cursor:s]
        starts_at[k] = len(part_a)
        part_a.append(mask_id)
        cursor = e
    part_a += tokens[cursor:]
    inputs, targets = list(part_a), [IGNORE] * len(part_a)
    for k in order:
        s, e = spans[k]
        inputs += [sop_id] + list(tokens[s:e])
        targets += list(tokens[s:e]) + [eop_id]
    return (torch.tensor(inputs, dtype=torch.int64), torch.tensor(targets, dtype=torch.int64), len(part_a))
    # END SOLUTION


def position_rows(n: int, spans: list[tuple[int, int]], order: list[int]) -> torch.Tensor:
    """The two rows of position ids for ``part_a_b(tokens, spans, order, ...)`` with len(tokens) == n.

    Returns [2, L] int64:
      row 0: 0, 1, ..., len(Part A) - 1 on Part A; on Part B, every token of a span (its [START] too)
             gets the Part-A position of that span's mask token;
      row 1: 0 on Part A; 1, 2, ..., len(span) + 1 along each span of Part B.
    """
    # BEGIN SOLUTION
    mask_pos, shift = [], 0
    for s, e in spans:
        mask_pos.append(s - shift)  # every earlier span shrank to one token
        shift += (e - s) - 1
    len_a = n - shift
    row0, row1 = list(range(len_a)), [0] * len_a
    for k in order:
        s, e = spans[k]
        row0 += [mask_pos[k]] * (e - s + 1)
        row1 += list(range(1, e - s + 2))
    return torch.tensor([row0, row1], dtype=torch.int64)
    # END SOLUTION


def sample_spans(n: int, seed: int, ratio: float = 0.15, lam: float = 3.0, max_len: int = 39) -> list[tuple[int, int]]:
    """GLM's [MASK] spans over a text of ``n`` tokens (n >= 20), drawn with ``random.Random(seed)``.

    1. Lengths: draw span lengths one after another, i.i.d. from the Poisson(lam) law TRUNCATED to
       1..max_len (P(k) proportional to lam**k / k!, k = 1..max_len, renormalised: no 0-length span),
       and stop as soon as their total is >= ratio * n.
    2. Placement: put the spans at random positions, sorted by start, never overlapping and never
       touching (at least one unmasked token between two spans, so each becomes its own mask token).
       Every arrangement that fits must be possible: not always at the start, not evenly spaced.
    The lengths always fit for n >= 20 and ratio <= 0.3 (you may redraw them if not).

    Returns [(start, end), ...]: half-open, 0 <= start < end <= n, sorted by start. The same seed gives the
    same spans; other seeds give other spans. Which generator you use for the draws is up to you, as long
    as it is seeded by ``seed`` (random.Random(seed), numpy.random.default_rng(seed), torch.Generator).
    """
    # BEGIN SOLUTION
    rng = random.Random(seed)
    ks = list(range(1, max_len + 1))
    weights = [math.exp(k * math.log(lam) - lam - math.lgamma(k + 1)) for k in ks]
    while True:
        lengths = []
        while sum(lengths) < ratio * n:
            lengths.append(rng.choices(ks, weights)[0])
        if sum(lengths) + len(lengths) - 1 <= n:
            break
    spare = n - sum(lengths) - (len(lengths) - 1)  # tokens left over once every span has its gap
    offsets = sorted(rng.randint(0, spare) for _ in lengths)
    rng.shuffle(lengths)
    spans, cursor = [], 0
    for offset, length in zip(offsets, lengths):
        start = cursor + offset
        spans.append((start, start + length))
        cursor += length + 1
    return spans
    # END SOLUTION


def part_b_loss(
    logits: torch.Tensor, input_ids: torch.Tensor, sep: torch.Tensor, *, sop_id: int, eop_id: int, pad_id: int
) -> torch.Tensor:
    """GLM's training loss for a batch of examples laid out as ``part_a_b`` lays them out.

    logits:    [B, L, V] float32, the model's output at every position.
    input_ids: [B, L] int64: Part A (sep[b] tokens), then Part B ([START] span, [START] span, ...), then
               padding (pad_id) up to L. A span's tokens are never sop_id, eop_id or pad_id.
    sep:       [B] int64, each example's Part-A length.

    The prediction at position t is scored only where t is in Part B (t >= sep[b], not padding). Its target
    is the next input token, except at the end of a span, where it is eop_id: the next token is then a
    [START] (the next span begins), padding, or nothing (t = L - 1).
    Returns the MEAN cross entropy over all scored positions of the batch (every scored token counts the
    same, whichever example it is in), a 0-d float32 tensor. Nothing is scored in Part A.
    """
    # BEGIN SOLUTION
    B, L, V = logits.shape
    t = torch.arange(L)
    nxt = torch.cat([input_ids[:, 1:], torch.full((B, 1), pad_id, dtype=input_ids.dtype)], dim=1)
    ends = (nxt == sop_id) | (nxt == pad_id)  # the last token of a span
    targets = torch.where(ends, torch.full_like(nxt, eop_id), nxt)
    scored = (t[None, :] >= sep[:, None]) & (input_ids != pad_id)
    return F.cross_entropy(logits[scored].float(), targets[scored])
    # END SOLUTION
