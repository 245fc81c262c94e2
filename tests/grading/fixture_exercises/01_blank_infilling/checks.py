"""Public checks of exercise 01 (shipped to learners; the hidden ones stay with the instructor).

Each check is declared with its points, time limit (seconds) and the message a learner sees when it
fails. Inputs are random (fresh each run, reproducible with the run's seed); the expected answers are
computed here, in the grading process, by glmkit's references (glmkit.data.blank_infilling,
glmkit.ops.attention) — never stored.
``ctx.call`` runs your function in a separate process and brings its result back as plain data.
"""

from __future__ import annotations

import torch

from glmkit.grading import Check

IGNORE = -100


def ids():
    from glmkit.data.tokenizer import ByteTokenizer

    tok = ByteTokenizer()
    return {"mask_id": tok.mask_id, "sop_id": tok.sop_id, "eop_id": tok.eop_id}


def reference(tokens, spans, order, **ids):
    """(input_ids, targets, sep, position_ids) from glmkit's reference."""
    from glmkit.data import blank_infilling as ref

    ex = ref.build_example(list(tokens), [tuple(s) for s in spans], list(order), **ids)
    return ex.input_ids, ex.targets, int(ex.sep), ex.position_ids


def reference_mask(sep: torch.Tensor, T: int) -> torch.Tensor:
    from glmkit.ops.attention import attention_mask

    return attention_mask(sep, T)


def random_case(rng, n=(6, 40), max_spans=4, max_len=5, min_spans=1):
    """Random text, sorted disjoint spans (possibly touching) and a random order."""
    n = rng.randint(*n)
    m = rng.randint(min_spans, max_spans)
    lengths = [rng.randint(1, max_len) for _ in range(m)]
    while sum(lengths) > n:
        lengths.pop()
    free = n - sum(lengths)
    cuts = sorted(rng.randint(0, free) for _ in lengths)
    spans, pos, prev = [], 0, 0
    for cut, length in zip(cuts, lengths):
        pos += cut - prev
        prev = cut
        spans.append((pos, pos + length))
        pos += length
    order = list(range(len(spans)))
    rng.shuffle(order)
    tokens = [rng.randrange(256) for _ in range(n)]
    return tokens, spans, order


def compare_part_a_b(ctx, tokens, spans, order, **kw):
    kw = kw or ids()
    ctx.note_inputs(f"tokens={tokens}, spans={spans}, order={order}, ids={kw}")
    want_in, want_tg, want_sep, _ = reference(tokens, spans, order, **kw)
    got = ctx.call("part_a_b", tokens, spans, order, **kw)
    got_in, got_tg, got_sep = ctx.expect_tuple("part_a_b(...)", got, 3)
    ctx.expect_int("sep (the third value)", got_sep, want_sep)
    ctx.expect_tensor("input_ids (the first value)", got_in, want_in)
    ctx.expect_tensor("targets (the second value)", got_tg, want_tg)


def compare_positions(ctx, tokens, spans, order):
    ctx.note_inputs(f"n={len(tokens)}, spans={spans}, order={order}")
    want = reference(tokens, spans, order, **ids())[3]
    got = ctx.call("position_rows", len(tokens), spans, order)
    if isinstance(got, torch.Tensor) and got.shape == want.shape and got.dtype == want.dtype:
        ctx.expect_tensor("row 0 (positions)", got[0], want[0])
        ctx.expect_tensor("row 1 (block positions)", got[1], want[1])
    ctx.expect_tensor("position_rows(...)", got, want)


def compare_mask(ctx, sep: list[int], T: int):
    ctx.note_inputs(f"sep={sep}, T={T}")
    sep_t = torch.tensor(sep, dtype=torch.int64)
    ctx.expect_tensor("glm_mask(sep, T)", ctx.call("glm_mask", sep_t, T), reference_mask(sep_t, T))


# the paper's worked example: x1..x6, spans {x3} and {x5, x6}, Part B holding {x5, x6} first
WORKED = dict(spans=[(2, 3), (4, 6)], order=[1, 0])


@Check(
    points=2,
    timeout=20,
    title="worked example: Part A/B",
    message=(
        "Part A is the text with each span replaced by ONE mask token; Part B is, for each span in the given "
        "order, [START] followed by the span. Targets are -100 on all of Part A and 'span + [END]' on Part "
        "B, and sep is the length of Part A."
    ),
)
def worked_example_part_a_b(ctx):
    tokens = [ctx.rng.randrange(256) for _ in range(6)]  # x1..x6
    compare_part_a_b(ctx, tokens, **WORKED)


@Check(
    points=2,
    timeout=20,
    title="worked example: position rows",
    message=(
        "Row 0 counts 0, 1, 2, ... along Part A; every Part-B token of a span (its [START] included) repeats "
        "the Part-A position of that span's mask token. Row 1 is 0 on Part A and 1, 2, ..., len+1 along "
        "each span of Part B."
    ),
)
def worked_example_positions(ctx):
    compare_positions(ctx, list(range(6)), **WORKED)


@Check(
    points=2,
    timeout=20,
    title="worked example: mask",
    message=(
        "Query i (row) may attend key j (column) iff j < sep (all of Part A) or j <= i (causal). Return a "
        "[B, T, T] bool tensor, True meaning 'may attend', one mask per entry of sep."
    ),
)
def worked_example_mask(ctx):
    compare_mask(ctx, [5], 10)  # Part A = x1 x2 [M] x4 [M], L = 10
    compare_mask(ctx, [5, 2, 7], 10)


@Check(
    points=2,
    timeout=20,
    title="random texts: Part A/B",
    message=(
        "part_a_b is right on the worked example but not on random texts and spans: check spans that touch, "
        "that start at position 0 or end at the last token, and orders other than the original one."
    ),
)
def random_part_a_b(ctx):
    for _ in range(6):
        compare_part_a_b(ctx, *random_case(ctx.rng))


@Check(
    points=2,
    timeout=20,
    title="random texts: position rows",
    message=(
        "position_rows is wrong on random texts and spans. Each earlier span shrinks to one mask token, so a "
        "mask token's Part-A position is its span's start minus what earlier spans lost."
    ),
)
def random_positions(ctx):
    for _ in range(6):
        compare_positions(ctx, *random_case(ctx.rng))


@Check(
    points=2,
    timeout=20,
    title="random batches: mask",
    message=(
        "glm_mask is wrong for random batches: each sample uses its own sep, and T is not always the "
        "worked example's 10."
    ),
)
def random_masks(ctx):
    for _ in range(4):
        T = ctx.rng.randint(2, 40)
        compare_mask(ctx, [ctx.rng.randint(0, T) for _ in range(ctx.rng.randint(1, 4))], T)
