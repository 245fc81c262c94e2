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


@Check(
    hidden=True,
    points=2,
    timeout=60,
    message=(
        "Use the ratio, lam and max_len you are given: with another rate, another mean length and a short "
        "max_len the lengths must follow that truncated law (no span longer than max_len)."
    ),
)
def spans_other_settings(ctx):
    public.check_length_law(ctx, 120, 200, 1.0, 39, ratio=0.3)
    public.check_length_law(ctx, 150, 200, 4.0, 4, ratio=0.2)


@Check(
    hidden=True,
    points=1,
    timeout=30,
    message="Short texts (20-25 tokens) must work too, at the highest ratio, whatever the seed.",
)
def spans_short_texts(ctx):
    for _ in range(40):
        public.draw(ctx, ctx.rng.randint(20, 25), ctx.rng.randrange(10**9), 0.3, 3.0)


@Check(
    hidden=True,
    points=2,
    timeout=30,
    message=(
        "The loss must be right when a span ends the text, when the longest example has no padding, for a "
        "single span covering most of the text, and for a larger vocabulary."
    ),
)
def loss_edges(ctx):
    rng = ctx.rng
    n = rng.randint(10, 20)
    tok = [rng.randrange(256) for _ in range(n)]
    public.compare_loss(ctx, [(tok, [(n - 3, n)], [0]), (tok[:8], [(0, 2), (4, 6)], [1, 0])], V=1000)
    public.compare_loss(ctx, [(tok, [(1, n)], [0])])
    public.compare_loss(ctx, [public.random_case(rng, n=(20, 40)) for _ in range(3)], pad_to=90)


@Check(
    hidden=True,
    points=1,
    timeout=20,
    message="Use the sop_id, eop_id and pad_id arguments you are given; do not hard-code a tokenizer's ids.",
)
def loss_ids_are_arguments(ctx):
    ids = dict(mask_id=260, sop_id=262, eop_id=261, pad_id=0)
    cases = [([ctx.rng.randrange(1, 256) for _ in range(12)], [(2, 4), (7, 9)], [1, 0]) for _ in range(2)]
    public.compare_loss(ctx, cases, ids=ids)
