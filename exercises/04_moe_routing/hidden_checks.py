"""Hidden checks of exercise 04 — instructor only: `release` never ships this file.

Their failure messages are what a learner sees: the property checked and a hint, never these inputs,
their expected values or this source.
"""

from __future__ import annotations

import torch

from glmkit.grading import Check, load_sibling

public = load_sibling(__file__, "checks.py")  # reuse the public input generators and comparisons


def distinct_bias(ctx, E, scale=0.1) -> torch.Tensor:
    """A bias [E] whose values are pairwise more than GAP apart (it alone decides when scores underflow)."""
    while True:
        b = scale * torch.randn(E, generator=ctx.gen)
        if E == 1 or (b.sort().values.diff() > public.GAP).all():
            return b


@Check(
    hidden=True,
    points=2,
    timeout=30,
    message=(
        "Groups are scored with the BIASED scores s + b (the sum of the two largest s + b in the group), and "
        "the experts of dropped groups must rank below every eligible expert — even when s + b is negative "
        "for all of them (masking dropped experts with 0 instead of -inf lets them win then)."
    ),
)
def groups_with_bias(ctx):
    N, E, k, G, TG = 24, 16, 4, 4, 2
    bias = 0.4 * torch.randn(E, generator=ctx.gen)
    public.compare_route(ctx, public.route_logits(ctx, N, E, bias, k, G, TG), bias, k, G, TG, scale=1.0)
    bias = -1.5 + 0.1 * torch.randn(E, generator=ctx.gen)  # every s + b < 0
    public.compare_route(ctx, public.route_logits(ctx, N, E, bias, k, G, TG), bias, k, G, TG, scale=2.5)


@Check(
    hidden=True,
    points=2,
    timeout=30,
    message=(
        "Edge cases of routing: one token; top_k = 1; top_k = E (every expert chosen, weights proportional to "
        "the scores); a group limit of one group; and tokens whose sigmoid scores all underflow to 0 (very "
        "negative logits): the bias alone then picks the experts and the weights must be 0, not NaN — that "
        "is what the 1e-20 in the denominator is for."
    ),
)
def route_edges(ctx):
    bias = torch.zeros(8)
    public.compare_route(ctx, public.route_logits(ctx, 1, 8, bias, 3), bias, 3, scale=2.5)
    public.compare_route(ctx, public.route_logits(ctx, 7, 8, bias, 1), bias, 1)
    public.compare_route(ctx, public.route_logits(ctx, 5, 4, torch.zeros(4), 4), torch.zeros(4), 4, scale=2.5)
    public.compare_route(ctx, public.route_logits(ctx, 9, 8, bias, 2, 4, 1), bias, 2, 4, 1)
    bias = distinct_bias(ctx, 8)
    logits = public.route_logits(ctx, 6, 8, bias, 2)
    logits[::2] = -200.0  # sigmoid(-200) = 0 in float32
    public.compare_route(ctx, logits, bias, 2, scale=2.5)


@Check(
    hidden=True,
    points=2,
    timeout=30,
    message=(
        "Real router sizes: GLM-4.5 (160 experts, top 8, scaling 2.5), GLM-4.5-Air (128 experts, top 8, "
        "scaling 1.0) and DeepSeek-V3 (256 experts in 8 groups, top 4 groups, top 8, scaling 2.5), with a "
        "trained-looking bias. Nothing may be hard-coded: E, top_k, the groups and the scaling come from the "
        "arguments."
    ),
)
def real_router_sizes(ctx):
    for E, k, G, TG, scale in ((160, 8, 1, 1, 2.5), (128, 8, 1, 1, 1.0), (256, 8, 8, 4, 2.5)):
        bias = 0.05 * torch.randn(E, generator=ctx.gen)
        public.compare_route(ctx, public.route_logits(ctx, 8, E, bias, k, G, TG), bias, k, G, TG, scale=scale)


@Check(
    hidden=True,
    points=2,
    timeout=20,
    message=(
        "The load can arrive as int64 counts (torch.bincount) or as float fractions of the slots: compute the "
        "mean in float32 (torch cannot average an int64 tensor) and keep the bias float32. An expert exactly "
        "at the mean keeps its bias; gamma = 0 changes nothing; GLM-4.5 has 160 experts."
    ),
)
def bias_load_kinds(ctx):
    counts = torch.tensor([3, 5, 4, 4, 2, 6])[torch.randperm(6, generator=ctx.gen)]  # int64, mean 4
    public.compare_bias(ctx, 0.01 * torch.randn(6, generator=ctx.gen), counts, 1e-3)
    E, S = 12, 96
    frac = public.random_counts(ctx, E, S) / S  # fractions, none at the mean
    public.compare_bias(ctx, -0.02 + 0.01 * torch.randn(E, generator=ctx.gen), frac, 1e-3)
    public.compare_bias(ctx, 0.01 * torch.randn(E, generator=ctx.gen), frac, 0.0)
    public.compare_bias(
        ctx,
        0.01 * torch.randn(160, generator=ctx.gen),
        public.random_counts(ctx, 160, 1280, avoid_mean=False).long(),
        1e-3,
    )


@Check(
    hidden=True,
    points=2,
    timeout=60,
    message=(
        "Other block sizes: block_m = 1 (no padding at all), block_m larger than every expert's count (each used "
        "expert gets exactly one block), and counts that are exact multiples of block_m — those need NO "
        "padding: round up with (count + block_m - 1) // block_m, not count // block_m + 1."
    ),
)
def align_block_sizes(ctx):
    public.compare_align(ctx, public.routing(ctx, 17, 2, 5), 5, 1)
    public.compare_align(ctx, public.routing(ctx, 20, 2, 8), 8, 64)
    E, bm = 4, 4
    flat = torch.arange(E).repeat_interleave(2 * bm)  # each expert exactly 2 blocks
    public.compare_align(ctx, flat[torch.randperm(flat.numel(), generator=ctx.gen)].view(-1, 1), E, bm)


@Check(
    hidden=True,
    points=2,
    timeout=90,
    message=(
        "Larger inputs: more slots than one program or one scan step holds (a few hundred: the counts must be "
        "added atomically across programs, and the position inside an expert's run carried from one step to "
        "the next), more experts than slots (most of them empty), and GLM-4.5's 160 experts with top 8."
    ),
)
def align_many_slots_and_experts(ctx):
    public.compare_align(ctx, public.routing(ctx, ctx.rng.randint(140, 170), 2, 8, mode="zipf"), 8, 16)
    public.compare_align(ctx, public.routing(ctx, 10, 2, 64), 64, 16)
    public.compare_align(ctx, public.routing(ctx, 6, 8, 160, mode="zipf"), 160, 16)


@Check(
    hidden=True,
    points=1,
    timeout=40,
    message=(
        "topk_idx may be int32 as well as int64, a batch may hold a single token (N = 1, k = 1), and a token "
        "may use every expert (k = E)."
    ),
)
def align_int32_and_single_token(ctx):
    public.compare_align(ctx, public.routing(ctx, 9, 2, 4).int(), 4, 16)
    public.compare_align(ctx, public.routing(ctx, 1, 1, 4), 4, 16)
    public.compare_align(ctx, public.routing(ctx, 1, 4, 4), 4, 16)


@Check(
    hidden=True,
    points=2,
    timeout=60,
    message=(
        "The block forward must work for one expert per token (k = 1), many experts and tokens, and blocks of a "
        "single row; every slot's weight belongs to that slot, not to its token's first slot."
    ),
)
def grouped_shapes(ctx):
    public.compare_grouped(ctx, 7, 8, 4, 3, 1, 2)
    public.compare_grouped(ctx, 40, 16, 8, 16, 4, 16)
    public.compare_grouped(ctx, 6, 8, 4, 5, 2, 1)
