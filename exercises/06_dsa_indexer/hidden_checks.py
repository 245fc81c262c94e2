"""Hidden checks of exercise 06 — instructor only: `release` never ships this file.

Their failure messages are what a learner sees: the property checked and a hint, never these inputs,
their expected values or this source.
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
        "Edge cases of the scores: a single index head; a single token (T = L = 1); GLM-5's indexer width "
        "(32 heads × 128 dims); weights w that are all negative (the scores are then ≤ 0 — the ReLU belongs to "
        "each head's q·k, not to the sum); a chunk in the middle of a sequence (0 < offset < L − T)."
    ),
)
def scores_edges(ctx):
    public.compare_scores(ctx, 2, 13, 13, 1, 16)
    public.compare_scores(ctx, 1, 1, 1, 4, 16)
    public.compare_scores(ctx, 1, 6, 6, 32, 128)
    public.compare_scores(ctx, 2, 17, 17, 4, 16, w_sign=-1)
    public.compare_scores(ctx, 1, 4, 20, 4, 16, offset=9)


@Check(
    hidden=True,
    points=2,
    timeout=30,
    message=(
        "Top-k when every visible score is negative (all weights w < 0): a visible key is one whose score is "
        "not −inf, whatever its sign; topk = 1; and topk larger than the number of keys."
    ),
)
def topk_negative_and_edges(ctx):
    public.compare_topk(ctx, 2, 5, 30, 8, 16, topk=6, offset=25, w_sign=-1)
    public.compare_topk(ctx, 1, 12, 12, 8, 16, topk=1, offset=0)
    public.compare_topk(ctx, 1, 3, 9, 8, 16, topk=32, offset=6)


@Check(
    hidden=True,
    points=2,
    timeout=30,
    message=(
        "The target with a per-sample visibility [B, T, L] (left padding: some keys of one sample are not "
        "real tokens), including queries that see NO key at all: their row of p is all zeros, not NaN."
    ),
)
def target_padding(ctx):
    B, T, H, D = 2, 12, 4, 16
    q, kv, scale = public.mqa_inputs(ctx, B, T, T, H, D)
    vis = public.causal(T, T).expand(B, T, T).clone()
    pad = ctx.rng.randint(2, 5)
    vis[1, :, :pad] = False  # sample 1: the first `pad` tokens are padding
    vis[1, :pad, :] = False  # ... and the padding queries see nothing
    public.compare_target(ctx, q, kv, scale, vis)


@Check(
    hidden=True,
    points=2,
    timeout=30,
    message=(
        "The sparse stage's loss: logits over each query's selected slots only (−inf in its empty slots), a "
        "target with exact zeros inside the set (their terms are 0), and rows with no slot at all (they "
        "contribute 0 but still count in the mean over all B·T rows)."
    ),
)
def kl_sparse_and_zeros(ctx):
    B, T, N = 2, 9, 6
    logits = torch.randn(B, T, N, generator=ctx.gen) * 2
    empty = torch.rand(B, T, N, generator=ctx.gen) < 0.3
    logits = logits.masked_fill(empty, public.NEG_INF)
    logits[0, 0] = public.NEG_INF  # a row with nothing selected
    target = torch.rand(B, T, N, generator=ctx.gen).masked_fill(empty, 0.0)
    target = target.masked_fill(torch.rand(B, T, N, generator=ctx.gen) < 0.2, 0.0)  # zeros inside the sets
    target = target / target.sum(-1, keepdim=True).clamp_min(1e-30)
    public.compare_kl(ctx, logits, target, "sparse stage")


@Check(
    hidden=True,
    points=2,
    timeout=90,
    message=(
        "The kernel at other shapes: three samples, a head dimension that is not a power of two (D = 24: the "
        "lanes past D must load 0), more keys than queries (offset > 0) over several tiles, and a single head."
    ),
)
def kernel_odd_shapes(ctx):
    public.compare_scores(ctx, 3, 18, 18, 2, 24, fn="index_scores_triton")
    public.compare_scores(ctx, 1, 9, 70, 1, 16, offset=61, fn="index_scores_triton")


@Check(
    hidden=True,
    points=1,
    timeout=60,
    message="The kernel with float16 q and k (the result stays float32) and an explicit scale.",
)
def kernel_fp16(ctx):
    public.compare_scores(ctx, 2, 20, 20, 4, 16, scale=0.3, dtype=torch.float16, fn="index_scores_triton")
