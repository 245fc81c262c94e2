"""Public checks of exercise 01 (shipped to learners; the hidden ones stay with the instructor).

Each check is declared with its points, time limit (seconds) and the message a learner sees when it
fails. Inputs are random (fresh each run, reproducible with the run's seed); the expected answers are
computed here, in the grading process, by glmkit's references (glmkit.data.blank_infilling) — never stored.
Span sampling is random by nature, so its checks test the rules every draw must obey and, over a few hundred
draws, the law of the lengths and the spread of the positions (with margins that the reference passes easily).
``ctx.call`` runs your function in a separate process and brings its result back as plain data.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

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


# -- span sampling ------------------------------------------------------------------------------------
def draw(ctx, n, seed, ratio=0.15, lam=3.0, max_len=39) -> list[tuple[int, int]]:
    """One call of sample_spans, its answer checked against the rules every draw obeys."""
    got = ctx.call("sample_spans", n, seed, ratio, lam, max_len)
    what = f"sample_spans(n={n}, seed={seed}, ratio={ratio}, lam={lam}, max_len={max_len})"
    if not isinstance(got, (list, tuple)) or not got:
        ctx.fail(f"{what} should return a non-empty list of (start, end) pairs", f"got {got!r}"[:200])
    spans = []
    for sp in got:
        if not isinstance(sp, (list, tuple)) or len(sp) != 2 or not all(type(v) is int for v in sp):
            ctx.fail(f"{what}: every span should be a pair of Python ints (start, end)", f"got {sp!r}"[:200])
        spans.append((sp[0], sp[1]))
    for (s, e), nxt in zip(spans, spans[1:] + [None]):
        if not 0 <= s < e <= n or e - s > max_len:
            ctx.fail(f"{what}: span {(s, e)} is not a half-open range of 1..max_len tokens inside 0..n", str(spans))
        if nxt is not None and nxt[0] <= e:
            ctx.fail(
                f"{what}: spans must be sorted and must neither overlap nor touch",
                f"{(s, e)} is followed by {nxt}: {spans}",
            )
    lengths = [e - s for s, e in spans]
    if sum(lengths) < ratio * n:
        ctx.fail(f"{what}: the spans cover {sum(lengths)} tokens, less than ratio·n = {ratio * n:g}", str(spans))
    if sum(lengths) - max(lengths) >= ratio * n:
        ctx.fail(
            f"{what}: the spans cover {sum(lengths)} tokens: drawing should have stopped earlier",
            f"without its longest span the total is still >= ratio·n = {ratio * n:g}: {spans}",
        )
    return spans


def length_law_distance(lengths: list[int], lam: float, max_len: int, kmax: int = 10) -> float:
    """Total-variation distance between the lengths' frequencies and Poisson(lam) truncated to 1..max_len
    (lengths above kmax pooled): 0.02-0.03 for a right answer over ~3000 spans."""
    from glmkit.data.blank_infilling import span_length_distribution

    law = span_length_distribution(lam, max_len).tolist()
    kmax = min(kmax, max_len)
    freq = [lengths.count(k) / len(lengths) for k in range(1, kmax + 1)]
    rest = sum(x > kmax for x in lengths) / len(lengths)
    return 0.5 * (sum(abs(f - p) for f, p in zip(freq, law[:kmax])) + abs(rest - sum(law[kmax:])))


def check_length_law(ctx, n, draws, lam, max_len, ratio=0.15, tol=0.06):
    lengths = []
    for _ in range(draws):
        lengths += [e - s for s, e in draw(ctx, n, ctx.rng.randrange(10**9), ratio, lam, max_len)]
    tv = length_law_distance(lengths, lam, max_len)
    if tv > tol:
        from glmkit.data.blank_infilling import span_length_distribution

        law = span_length_distribution(lam, max_len)
        ctx.fail(
            f"over {len(lengths)} spans the lengths do not follow Poisson({lam:g}) truncated to 1..{max_len}",
            f"total-variation distance {tv:.3f} (a right answer: ~0.02); share of lengths 1..5: "
            f"{[round(lengths.count(k) / len(lengths), 3) for k in range(1, 6)]}, expected "
            f"{[round(float(p), 3) for p in law[:5]]}",
        )


@Check(
    points=2,
    timeout=40,
    title="spans: the rules of every draw",
    message=(
        "Every draw must return sorted (start, end) pairs of Python ints inside 0..n, of 1..max_len tokens, with "
        "at least one unmasked token between two spans; the total must reach ratio·n, and drawing stops as soon "
        "as it does. The same seed must give the same spans."
    ),
)
def spans_follow_the_rules(ctx):
    for _ in range(30):
        n, seed = ctx.rng.randint(20, 200), ctx.rng.randrange(10**9)
        ratio, lam = ctx.rng.choice([0.15, 0.3]), ctx.rng.choice([1.0, 3.0])
        ctx.note_inputs(f"n={n}, seed={seed}, ratio={ratio}, lam={lam}")
        first = draw(ctx, n, seed, ratio, lam)
        if draw(ctx, n, seed, ratio, lam) != first:
            ctx.fail("sample_spans gave other spans for the same seed", "seed the generator with `seed` only")


@Check(
    points=3,
    timeout=60,
    title="spans: the law of the lengths",
    message=(
        "Span lengths follow the Poisson(lam) law TRUNCATED to 1..max_len: P(k) proportional to lam^k / k! for "
        "k = 1..max_len only, renormalised (no length 0, and not a Poisson shifted by one)."
    ),
)
def span_lengths_follow_the_law(ctx):
    ctx.note_inputs("300 draws, n=200, ratio=0.15, lam=3, max_len=39")
    check_length_law(ctx, 200, 300, 3.0, 39)


@Check(
    points=2,
    timeout=60,
    title="spans: placed at random",
    message=(
        "Spans must be placed at random among all arrangements that fit: every part of the text is blanked about "
        "equally often over many draws, the first span does not always start at 0, and different seeds give "
        "different spans."
    ),
)
def spans_are_placed_at_random(ctx):
    n, draws = 100, 300
    ctx.note_inputs(f"{draws} draws, n={n}, ratio=0.15, lam=3")
    covered, at_zero, seen = [0] * n, 0, set()
    for _ in range(draws):
        spans = draw(ctx, n, ctx.rng.randrange(10**9))
        at_zero += spans[0][0] == 0
        seen.add(tuple(spans))
        for start, end in spans:
            for i in range(start, end):
                covered[i] += 1
    fifths = [sum(covered[k * n // 5 : (k + 1) * n // 5]) for k in range(5)]
    mean = sum(fifths) / 5
    if not all(0.6 * mean <= f <= 1.4 * mean for f in fifths):
        ctx.fail("some parts of the text are blanked far more often than others", f"tokens blanked per fifth: {fifths}")
    if at_zero > 0.3 * draws:
        ctx.fail("the first span starts at position 0 far too often", f"{at_zero} of {draws} draws")
    if len(seen) < 0.95 * draws:
        ctx.fail("different seeds give the same spans", f"{len(seen)} distinct answers in {draws} draws")


# -- the Part-B loss ----------------------------------------------------------------------------------
def loss_case(ctx, cases, V=None, ids=None, pad_to=None):
    """A padded batch of ``cases`` (tokens, spans, order) -> (logits, input_ids, sep) and glmkit's loss."""
    from glmkit.data.blank_infilling import build_example, collate

    ids = ids or dict(mask_id=300, sop_id=301, eop_id=302, pad_id=303)
    V = V or 320
    exs = [
        build_example(t, [tuple(x) for x in sp], o, mask_id=ids["mask_id"], sop_id=ids["sop_id"], eop_id=ids["eop_id"])
        for t, sp, o in cases
    ]
    batch = collate(exs, pad_id=ids["pad_id"], pad_to=pad_to)
    logits = 3 * torch.randn(*batch.input_ids.shape, V, generator=ctx.gen)
    keep = batch.targets != IGNORE
    want = F.cross_entropy(logits[keep], batch.targets[keep])
    return logits, batch.input_ids, batch.sep, want, ids


def compare_loss(ctx, cases, **kw):
    logits, input_ids, sep, want, ids = loss_case(ctx, cases, **kw)
    ctx.note_inputs(
        f"{len(cases)} example(s): spans {[c[1] for c in cases]}, orders {[c[2] for c in cases]}; sep={sep.tolist()}, "
        f"input_ids {list(input_ids.shape)}, logits {list(logits.shape)}, ids {ids}"
    )
    got = ctx.call(
        "part_b_loss", logits, input_ids, sep, sop_id=ids["sop_id"], eop_id=ids["eop_id"], pad_id=ids["pad_id"]
    )
    ctx.expect_tensor("part_b_loss(...)", got, want)


@Check(
    points=2,
    timeout=20,
    title="loss: the worked example",
    message=(
        "Score only Part B: at [START] the target is the span's first token, inside a span the next token, and "
        "at a span's last token [END] (not the next span's [START]). Return the mean cross entropy, a 0-d "
        "float32 tensor."
    ),
)
def loss_worked_example(ctx):
    tokens = [ctx.rng.randrange(256) for _ in range(6)]
    compare_loss(ctx, [(tokens, WORKED["spans"], WORKED["order"])])


@Check(
    points=3,
    timeout=20,
    title="loss: padded batches",
    message=(
        "In a batch each example has its own sep and its own Part-B length, and padding follows Part B: padding "
        "is never scored, and the mean is over every scored token of the batch (not a mean of per-example means)."
    ),
)
def loss_padded_batches(ctx):
    for _ in range(3):
        cases = [random_case(ctx.rng, n=(8, 30)) for _ in range(ctx.rng.randint(2, 5))]
        compare_loss(ctx, cases)
