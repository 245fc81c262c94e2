"""Hidden checks of exercise 03 — instructor only: `release` never ships this file.

Their failure messages are what a learner sees: the property checked and a hint, never these inputs,
their expected values or this source.
"""

from __future__ import annotations

import torch

from glmkit.grading import Check, load_sibling

public = load_sibling(__file__, "checks.py")  # reuse the public input generators and the comparison


@Check(
    hidden=True,
    points=2,
    timeout=40,
    message=(
        "fp16 inputs with values in the hundreds: x*x then exceeds fp16's largest value (65504) and becomes "
        "inf. Square and sum in fp32 (convert x with .to(tl.float32) right after loading it)."
    ),
)
def fp16_large_values(ctx):
    for _ in range(2):
        n, m = public.ragged_n(ctx, 40, 200), ctx.rng.randint(1, 4)
        x = public.randn(ctx, m, n, scale=ctx.rng.uniform(300.0, 1500.0)).clamp(-60000, 60000).half()
        public.compare(ctx, x, public.randn(ctx, n, scale=0.2) + 1.0, 1e-5)


@Check(
    hidden=True,
    points=2,
    timeout=60,
    message=(
        "Edge sizes: a row of one element (N = 1), a single row (M = 1), no rows at all (M = 0: return an "
        "empty [0, N] tensor without launching), long rows of a few thousand elements, and rows of zeros "
        "(with eps > 0 they normalise to zeros, not NaN)."
    ),
)
def edge_sizes(ctx):
    public.compare(ctx, public.randn(ctx, 5, 1), public.randn(ctx, 1), 1e-5)
    n = public.ragged_n(ctx, 3, 100)
    public.compare(ctx, public.randn(ctx, 1, n), public.randn(ctx, n), 1e-5)
    public.compare(ctx, torch.zeros(0, n), public.randn(ctx, n), 1e-5)
    n = public.ragged_n(ctx, 2100, 8000)
    public.compare(ctx, public.randn(ctx, 2, n), public.randn(ctx, n), 1e-5)
    x = public.randn(ctx, 4, 33)
    x[ctx.rng.randrange(4)] = 0.0
    public.compare(ctx, x, public.randn(ctx, 33), 1e-3)


@Check(
    hidden=True,
    points=2,
    timeout=40,
    message=(
        "eps must come from the argument, whatever its value: try eps = 0 (plain RMS) and a large eps, "
        "and rows whose mean square is comparable to eps."
    ),
)
def eps_argument(ctx):
    for eps, scale in ((0.0, 1.0), (0.5, 0.7), (1e-6, 1e-3)):
        n, m = public.ragged_n(ctx), ctx.rng.randint(1, 4)
        public.compare(ctx, public.randn(ctx, m, n, scale=scale), public.randn(ctx, n), eps)


@Check(
    hidden=True,
    points=2,
    timeout=60,
    message=(
        "Many rows of different scales, with weights of another dtype than x: each program must read its "
        "own row (offset row * stride_x) and the one weight vector, and nothing may mix between rows."
    ),
)
def many_rows_mixed_dtypes(ctx):
    n = public.ragged_n(ctx, 100, 700)
    m = ctx.rng.randint(20, 40)
    scales = torch.logspace(-2, 2, m)[torch.randperm(m, generator=ctx.gen)]
    x = public.randn(ctx, m, n) * scales[:, None]
    public.compare(ctx, x, (public.randn(ctx, n, scale=0.5) + 1.0).to(torch.bfloat16), 1e-5)
    public.compare(ctx, x.to(torch.bfloat16), public.randn(ctx, n), 1e-5)


@Check(
    hidden=True,
    points=2,
    timeout=90,
    message=(
        "The backward must handle a single element per row (N = 1), a single row, rows of a few thousand "
        "elements and rows of very different scales."
    ),
)
def backward_edges(ctx):
    public.compare_bwd(ctx, 4, 1, eps=0.5)  # N = 1 with a tiny eps: dx ≈ 0 by cancellation, ill-conditioned
    public.compare_bwd(ctx, 1, public.ragged_n(ctx, 3, 100))
    public.compare_bwd(ctx, 2, public.ragged_n(ctx, 2100, 5000))
    public.compare_bwd(ctx, 6, public.ragged_n(ctx), scale=50.0, eps=1e-3)


@Check(
    hidden=True,
    points=2,
    timeout=30,
    message=(
        "The schedule past its end stays at lr·min_lr_ratio; without warm-up (warmup = 0) it is a pure cosine; "
        "small gradients are not clipped; every hyper-parameter comes from the arguments."
    ),
)
def training_step_settings(ctx):
    for step, warmup in ((0, 0), (5, 0), (300, 20)):
        want = public.reference_lr(step, 1e-2, warmup, 200, 0.05)
        got = ctx.call("lr_at", step, 1e-2, warmup, 200, 0.05)
        if not isinstance(got, float) or abs(got - want) > 1e-12:
            ctx.fail("lr_at is wrong at the edges of the schedule", "")
    public.compare_adamw(ctx, [(7, 3), (3,)], 3, grad_scale=1e-3, betas=(0.8, 0.99), eps=1e-6, max_norm=5.0)
