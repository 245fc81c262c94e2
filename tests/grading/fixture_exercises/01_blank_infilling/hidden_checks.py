"""Hidden checks of exercise 01 — instructor only: `release` never ships this file.

Their failure messages are what a learner sees: the property checked and a hint, never these inputs,
their expected values or this source.
"""

from __future__ import annotations

from glmkit.grading import Check, load_sibling

public = load_sibling(__file__, "checks.py")  # reuse the public input generators and comparisons


@Check(
    hidden=True,
    points=2,
    timeout=20,
    message=(
        "Part B's position row should repeat the Part-A position of the span's mask token; check spans that "
        "are not in their original order, with several spans of different lengths."
    ),
)
def shuffled_order(ctx):
    for _ in range(6):
        tokens, spans, order = public.random_case(ctx.rng, n=(30, 60), max_spans=8, min_spans=4)
        while order == sorted(order):
            ctx.rng.shuffle(order)
        public.compare_part_a_b(ctx, tokens, spans, order)
        public.compare_positions(ctx, tokens, spans, order)


@Check(
    hidden=True,
    points=2,
    timeout=20,
    message=(
        "Spans can start at position 0, end at the last token, touch each other, or cover the whole text "
        "(then Part A is a single mask token). Make sure no token is lost or duplicated at the edges."
    ),
)
def spans_at_the_edges(ctx):
    rng = ctx.rng
    n = rng.randint(8, 20)
    cases = [
        (n, [(0, 2), (n - 3, n)]),  # first and last tokens masked
        (n, [(1, 3), (3, 4), (4, 7)]),  # touching spans
        (n, [(0, n)]),  # the whole text
        (1, [(0, 1)]),  # a one-token text
        (n, [(n - 1, n)]),  # only the last token
    ]
    for length, spans in cases:
        tokens = [rng.randrange(256) for _ in range(length)]
        order = list(range(len(spans)))
        rng.shuffle(order)
        public.compare_part_a_b(ctx, tokens, spans, order)
        public.compare_positions(ctx, tokens, spans, order)


@Check(
    hidden=True,
    points=1,
    timeout=20,
    message=("Use the mask_id, sop_id and eop_id arguments you are given; do not hard-code the tokenizer's ids."),
)
def ids_are_arguments(ctx):
    rng = ctx.rng
    a, b, c = rng.sample(range(300, 5000), 3)
    for _ in range(3):
        public.compare_part_a_b(ctx, *public.random_case(rng), mask_id=a, sop_id=b, eop_id=c)


@Check(
    hidden=True,
    points=2,
    timeout=20,
    message=(
        "sep = 0 must give a plain causal mask and sep = T a fully bidirectional one; T can be 1, and a "
        "batch mixes both extremes with everything in between."
    ),
)
def mask_extremes(ctx):
    rng = ctx.rng
    public.compare_mask(ctx, [0], 1)
    public.compare_mask(ctx, [1], 1)
    T = rng.randint(5, 33)
    public.compare_mask(ctx, [0, T, rng.randint(1, T - 1)], T)
    T = rng.randint(40, 70)
    public.compare_mask(ctx, [rng.randint(0, T) for _ in range(8)], T)


@Check(
    hidden=True,
    points=2,
    timeout=30,
    message=(
        "Your functions must also work for long texts with many spans (hundreds of tokens, 15% masked), "
        "not only for the small examples."
    ),
)
def long_text(ctx):
    tokens, spans, order = public.random_case(ctx.rng, n=(400, 600), max_spans=30, min_spans=20, max_len=6)
    public.compare_part_a_b(ctx, tokens, spans, order)
    public.compare_positions(ctx, tokens, spans, order)
