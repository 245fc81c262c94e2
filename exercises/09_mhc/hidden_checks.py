"""Hidden checks of exercise 09 — instructor only: `release` never ships this file.

Their failure messages are what a learner sees: the property checked and a hint, never these inputs, their
expected values or this source.
"""

from __future__ import annotations

import torch

from glmkit.grading import Check, load_sibling

public = load_sibling(__file__, "checks.py")  # reuse the public input generators and comparisons


@Check(
    hidden=True,
    points=2,
    timeout=20,
    message=(
        "Edge cases of Sinkhorn: a large eps passed as an argument (add it to EVERY sum: column and row sums alike), "
        "a matrix with a row and a column of zeros (they must stay zeros — eps keeps 0 / 0 away — not NaN), one "
        "stream (N = 1), seven streams, one round, and a single matrix without batch dimensions."
    ),
)
def sinkhorn_edges(ctx):
    public.compare_sinkhorn(ctx, public.positive(ctx, (2,), 4), 5, eps=0.1)
    m = public.positive(ctx, (3,), 5)
    m[:, 1, :] = 0.0
    m[:, :, 3] = 0.0
    public.compare_sinkhorn(ctx, m, 4)
    public.compare_sinkhorn(ctx, public.positive(ctx, (2, 3), 1), 20)
    public.compare_sinkhorn(ctx, public.positive(ctx, (2,), 7), 1)
    public.compare_sinkhorn(ctx, public.positive(ctx, (), 3), 6)


@Check(
    hidden=True,
    points=2,
    timeout=40,
    message=(
        "Odd stream counts (3 and 5), an odd hidden size, a large eps and norm_eps: eps is added to pre, to the "
        "softmax before Sinkhorn and inside Sinkhorn; norm_eps inside the RMSNorm. Nothing may assume N = 4."
    ),
)
def hc_odd_streams_and_eps(ctx):
    public.compare_weights(ctx, 2, 3, 3, 7, iters=4, eps=0.05, norm_eps=0.5)
    public.compare_forward(ctx, 1, 4, 5, 9, iters=6, eps=0.05, norm_eps=0.5)
    public.compare_forward(ctx, 2, 3, 3, 5, iters=20)


@Check(
    hidden=True,
    points=2,
    timeout=40,
    message=(
        "A deeper residual path: 6 layers, 3 streams and 2 streams, few Sinkhorn rounds. Expand into n streams, apply "
        "each layer's own weights in order, merge by the mean; n comes from the argument."
    ),
)
def hc_stack_deep(ctx):
    public.compare_stack(ctx, 1, 4, 3, 6, layers=6, iters=5)
    public.compare_stack(ctx, 2, 2, 2, 8, layers=2, iters=2)


@Check(
    hidden=True,
    points=2,
    timeout=120,
    message=(
        "The pre-mix kernel on float16 streams (accumulate in float32, store float16), one stream (N = 1), seven "
        "streams, a hidden size of 1 and one of several blocks, and three leading dimensions: the tokens are all "
        "the leading dimensions together."
    ),
)
def premix_kernel_shapes(ctx):
    public.compare_premix(ctx, (2, 3), 4, 40, dtype=torch.float16)
    public.compare_premix(ctx, (3,), 1, 17)
    public.compare_premix(ctx, (2,), 7, 1)
    public.compare_premix(ctx, (2, 2, 2), 3, 100)
