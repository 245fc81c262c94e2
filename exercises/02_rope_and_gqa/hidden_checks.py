"""Hidden checks of exercise 02 — instructor only: `release` never ships this file.

Their failure messages are what a learner sees: the property checked and a hint, never these inputs, their
expected values or this source.
"""

from __future__ import annotations

from glmkit.grading import Check, load_sibling

public = load_sibling(__file__, "checks.py")  # reuse the public input generators and comparisons


@Check(
    hidden=True,
    points=2,
    timeout=40,
    message=(
        "Every grouping must work: multi-head (H_kv = H), multi-query (H_kv = 1) and other ratios, with a "
        "single new token and with RoPE over the whole head (rotary_dim = D)."
    ),
)
def head_groupings(ctx):
    public.compare_prefill(ctx, 1, 5, 16, 4, 4, 4, 4)
    public.compare_prefill(ctx, 2, 6, 40, 8, 1, 8, 8)
    public.compare_decode(ctx, 1, 4, [1, 2], 36, 6, 3, 6, 2)


@Check(
    hidden=True,
    points=2,
    timeout=40,
    message=(
        "Use the theta you are given (GLM-4.5 uses 1e6) and the head dim of the weights; a longer cache and "
        "positions far from 0 must work too."
    ),
)
def theta_and_long_cache(ctx):
    public.compare_prefill(ctx, 2, 8, 48, 4, 2, 16, 8, theta=1e6, start=[300, 1000])
    public.compare_decode(ctx, 1, 40, [5, 1], 32, 4, 2, 8, 4, theta=5e5)


@Check(
    hidden=True,
    points=2,
    timeout=30,
    message=(
        "Porting must work for any grouping and rotary width: multi-query layers, RoPE over the whole head, "
        "and the smallest rotary_dim (a single plane)."
    ),
)
def port_shapes(ctx):
    public.compare_port(ctx, 16, 4, 1, 8, 8)
    public.compare_port(ctx, 16, 2, 2, 6, 2)
