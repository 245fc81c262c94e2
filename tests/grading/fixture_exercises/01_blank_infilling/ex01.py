"""Exercise 01 — GLM's blank-infilling input, built by hand.

GLM (Du et al. 2021) trains on a text x_1..x_n with some spans blanked out:

* Part A is the text with every span replaced by ONE mask token;
* Part B holds the spans in a given (shuffled) order, each fed as [START] + span and predicted as
  span + [END];
* two rows of position ids: row 0 is the position in Part A (inside Part B: the position of the span's
  mask token in Part A), row 1 the position inside the span (0 in Part A, 1..len+1 in Part B);
* the attention mask lets query i see key j iff j < len(Part A) or j <= i.

The notebook ex01.ipynb walks through the worked example; write the three functions below, then run
``self_check()`` there (or ``python -m glmkit.grading check`` in this folder). Do not import
``glmkit.data.blank_infilling`` or ``glmkit.ops.attention`` here: they are the references you are
re-implementing, and the grader does not make them importable (such a submission scores zero).
"""

from __future__ import annotations

import torch

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


def glm_mask(sep: torch.Tensor, T: int) -> torch.Tensor:
    """GLM's attention mask for a batch.

    sep: [B] int64, each sample's Part-A length (0 <= sep <= T).
    Returns [B, T, T] bool, True where query i (row) may attend key j (column): j < sep or j <= i.
    """
    # BEGIN SOLUTION
    i = torch.arange(T)
    causal = i[:, None] >= i[None, :]  # [T(query), T(key)]
    part_a = i[None, None, :] < sep[:, None, None]  # [B, 1, T(key)]
    return causal[None] | part_a
    # END SOLUTION
