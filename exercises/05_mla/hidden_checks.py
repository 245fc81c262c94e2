"""Hidden checks of exercise 05 — instructor only: `release` never ships this file.

Their failure messages are what a learner sees: the property checked and a hint, never these inputs, their expected
values or this source.
"""

from __future__ import annotations

import torch

from glmkit.grading import Check, load_sibling

public = load_sibling(__file__, "checks.py")  # reuse the public input generators and comparisons


@Check(
    hidden=True,
    points=2,
    timeout=30,
    message=(
        "Edge cases of latent_attention: a row with no cached key at all (lengths 0), rows shorter than the number "
        "of new tokens (its first queries see nothing: zeros, not NaN), a cache of one token, and a batch of one."
    ),
)
def latent_edges(ctx):
    public.compare_latent(ctx, 3, 2, 1, 9, 8, 4, lengths=torch.tensor([9, 0, 4]))
    public.compare_latent(ctx, 2, 3, 4, 12, 8, 8, lengths=torch.tensor([2, 12]))
    public.compare_latent(ctx, 1, 2, 1, 1, 16, 4)


@Check(
    hidden=True,
    points=2,
    timeout=60,
    message=(
        "The absorbed layer at GLM-4.7-Flash's head sizes (nope 192, rope 64, v 256, R = 512; a few heads), with a "
        "q·k head (256) that differs from R and a v head that differs from nope: nothing may be hard-coded, every "
        "size comes from the arguments and the tensors."
    ),
)
def absorbed_layer_real_dims(ctx):
    public.compare_absorbed_layer(ctx, 1, 2, 7, heads=4, nope=192, rope=64, v_dim=256, rank=512, q_lora=48, hidden=64)


@Check(
    hidden=True,
    points=2,
    timeout=60,
    message=(
        "fold_weights for a layer without a query latent (q_proj.weight [H·(nope + rope), hidden] takes the place of "
        "q_b_proj.weight) and at GLM-4.7-Flash's head sizes (nope 192, rope 64, v 256, R = 512): the same per-head "
        "layouts, Q taken from the weight."
    ),
)
def fold_other_layers(ctx):
    layer, folded, c_q, o_lat = public.fold_case(ctx, heads=3, nope=8, rope=6, v_dim=4, rank=12, q_proj=True)
    public.expect_fold_query(ctx, layer, folded, c_q)
    public.expect_fold_output(ctx, layer, folded, o_lat)
    layer, folded, c_q, o_lat = public.fold_case(ctx, heads=4, nope=192, rope=64, v_dim=256, rank=512, q_lora=32)
    public.expect_fold_query(ctx, layer, folded, c_q)
    public.expect_fold_output(ctx, layer, folded, o_lat)


@Check(
    hidden=True,
    points=2,
    timeout=90,
    message=(
        "The kernel with sizes that are not powers of two (H = 20 heads on a tile of 32, R = 40, P = 8: mask the "
        "padded rows and columns on load and on store), a row with no keys (zeros), and a row of one key."
    ),
)
def kernel_odd_sizes(ctx):
    L = 37
    lengths = torch.tensor([L, 0, 1, 23])[torch.randperm(4, generator=ctx.gen)]
    public.compare_decode(ctx, 4, 20, L, 40, 8, lengths, 1)
    public.compare_decode(ctx, 2, 5, L, 40, 8, torch.tensor([L, 19]), 2)


@Check(
    hidden=True,
    points=2,
    timeout=20,
    message=(
        "combine_splits when every split of a row is empty (zeros, not NaN: exp(-inf - (-inf)) is NaN, so the max "
        "needs care), with a single split, and with log-sum-exps of a few hundred (exp overflows float32 without "
        "subtracting the max)."
    ),
)
def combine_edges(ctx):
    from glmkit.ops.mla_decode import mla_decode_reference

    B, H, L, R, P = 3, 2, 30, 8, 4
    q_lat, q_rot = torch.randn(B, H, R, generator=ctx.gen), torch.randn(B, H, P, generator=ctx.gen)
    c_kv, k_rot = torch.randn(B, L, R, generator=ctx.gen), torch.randn(B, L, P, generator=ctx.gen)
    lengths = torch.tensor([L, 0, 5])
    o_part, lse = public.split_partials(q_lat, q_rot, c_kv, k_rot, 0.3, lengths, 2, 16)
    want = mla_decode_reference(q_lat[:, None], q_rot[:, None], c_kv, k_rot, 0.3, lengths)[:, 0]
    public.compare_combine(ctx, o_part, lse, want)
    o_part, lse = public.split_partials(q_lat, q_rot, c_kv, k_rot, 0.3, torch.full((B,), L), 1, 32)
    public.compare_combine(ctx, o_part, lse, o_part[:, 0])
    lse = 300.0 + 5 * torch.randn(B, 4, H, generator=ctx.gen)
    o_part = torch.randn(B, 4, H, R, generator=ctx.gen)
    want = (lse.softmax(dim=1)[..., None] * o_part).sum(dim=1)
    public.compare_combine(ctx, o_part, lse, want)


@Check(
    hidden=True,
    points=2,
    timeout=90,
    message=(
        "Split-K with more splits than the short rows need (many programs have no keys and must still write zeros "
        "and -inf), with long chunks of several key blocks each, and with sharp scores (the running max matters)."
    ),
)
def kernel_many_splits(ctx):
    public.compare_decode(ctx, 3, 4, 20, 16, 8, torch.tensor([20, 3, 17]), 8)
    L = ctx.rng.randint(150, 200)
    public.compare_decode(ctx, 2, 3, L, 16, 16, torch.tensor([L, ctx.rng.randint(60, 120)]), 3, sharp=3.0)
