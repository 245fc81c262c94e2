"""Public checks of exercise 06 (shipped to learners; the hidden ones stay with the instructor).

Each check is declared with its points, time limit (seconds) and the message a learner sees when it
fails. Inputs are random (fresh each run, reproducible with the run's seed); the expected answers are
computed here, in the grading process, by glmkit's references (``glmkit.ops.lightning_indexer``:
``lightning_indexer_reference``, ``indexer_topk``, ``attention_target``, ``indexer_kl_loss``) — never stored.
``ctx.call`` runs your function in a separate process (your kernel runs there, under the Triton interpreter on
a CPU) and brings its result back as plain data.

What is compared is what the contracts fix, nothing more: the index scores exactly where they are −inf and
to a relative error elsewhere; the SET of keys each query selects (any order within a row); p and the KL
to a relative error.
"""

from __future__ import annotations

import torch

from glmkit.grading import Check

GAP = 1e-4  # inputs are redrawn until the k-th and (k+1)-th largest score of every row are this far apart
TOL = 1e-5  # relative error of fp32 results computed in another order
KERNEL_TOL = 1e-4  # the kernel: another summation order (and TF32-free fp32 dots on a GPU)
NEG_INF = float("-inf")


# -- inputs ---------------------------------------------------------------------------------------------
def indexer_inputs(ctx, B, T, L, H, D, dtype=torch.float32, w_sign=0):
    """q [B, T, H, D], k [B, L, D] (dtype), w [B, T, H] float32. w_sign: 0 = either sign (GLM-5's weights_proj),
    −1 = all negative."""
    q = torch.randn(B, T, H, D, generator=ctx.gen).to(dtype)
    k = torch.randn(B, L, D, generator=ctx.gen).to(dtype)
    w = torch.randn(B, T, H, generator=ctx.gen)
    if w_sign < 0:
        w = -w.abs() - 0.05
    return q, k, w


def reference_scores(q, k, w, offset=0, scale=None):
    from glmkit.ops.lightning_indexer import lightning_indexer_reference

    return lightning_indexer_reference(q, k, w, offset, None, scale)


def unambiguous(logits: torch.Tensor, topk: int) -> bool:
    """No near-tie between the last kept and the first dropped visible key of any row (the set is unique)."""
    vals = logits.sort(dim=-1, descending=True).values
    if topk >= vals.shape[-1]:
        return True
    kth, nxt = vals[..., topk - 1], vals[..., topk]
    choosing = nxt > NEG_INF  # rows that see more than topk keys
    return bool(((kth - nxt)[choosing] > GAP).all())


def topk_inputs(ctx, B, T, L, H, D, topk, offset, w_sign=0):
    for _ in range(50):
        q, k, w = indexer_inputs(ctx, B, T, L, H, D, w_sign=w_sign)
        if unambiguous(reference_scores(q, k, w, offset), topk):
            return q, k, w
    raise RuntimeError("could not draw index scores without a near-tie at the top-k boundary")


# -- comparisons ----------------------------------------------------------------------------------------
def expect_scores(ctx, what, got, want, tol=TOL):
    """The −inf entries (invisible keys) exactly, then the finite ones to a relative error."""
    if not isinstance(got, torch.Tensor):
        ctx.fail(f"{what} should be a torch tensor", f"got {got!r}"[:200])
    if got.dtype != torch.float32 or tuple(got.shape) != tuple(want.shape):
        ctx.fail(
            f"{what} should be float32 of shape [B, T, L]",
            f"expected {list(want.shape)} float32, got {list(got.shape)} {str(got.dtype)[6:]}",
        )
    hidden_want, hidden_got = want == NEG_INF, got == NEG_INF
    if not torch.equal(hidden_want, hidden_got):
        b, t, s = (int(i) for i in (hidden_want != hidden_got).nonzero()[0])
        ctx.fail(
            f"{what}: the −inf entries (keys a query may not see) are in the wrong places",
            f"first at [b={b}, t={t}, s={s}]: expected {want[b, t, s].item()}, got {got[b, t, s].item()}",
        )
    ctx.expect_tensor(f"{what} at the visible keys", got[~hidden_want], want[~hidden_want], tol=tol)


def compare_scores(ctx, B, T, L, H, D, offset=0, scale=None, dtype=torch.float32, w_sign=0, fn="index_scores"):
    q, k, w = indexer_inputs(ctx, B, T, L, H, D, dtype, w_sign)
    ctx.note_inputs(
        f"q [{B}, {T}, {H}, {D}], k [{B}, {L}, {D}] ({str(dtype)[6:]}), w [{B}, {T}, {H}], offset={offset}, "
        f"scale={scale}" + (" (w all negative)" if w_sign < 0 else "")
    )
    want = reference_scores(q, k, w, offset, scale)
    got = ctx.call(fn, q, k, w, offset, scale)
    expect_scores(ctx, f"{fn}(...)", got, want, KERNEL_TOL if fn.endswith("triton") else TOL)


def compare_topk(ctx, B, T, L, H, D, topk, offset, w_sign=0):
    from glmkit.ops.lightning_indexer import indexer_topk

    q, k, w = topk_inputs(ctx, B, T, L, H, D, topk, offset, w_sign)
    logits = reference_scores(q, k, w, offset)
    visible = (logits > NEG_INF).sum(-1)
    ctx.note_inputs(
        f"logits [{B}, {T}, {L}] (queries at positions {offset}..{offset + T - 1}; they see "
        f"{int(visible.min())}..{int(visible.max())} keys), topk={topk}"
    )
    want = indexer_topk(q, k, w, topk, offset).long().sort(dim=-1).values
    got = ctx.call("select_topk", logits, topk)
    if isinstance(got, torch.Tensor) and got.dtype == torch.int64 and got.shape == want.shape:
        got = got.sort(dim=-1).values
    ctx.expect_tensor("the keys selected by each query (select_topk, each row sorted; −1 = empty slot)", got, want)


def mqa_inputs(ctx, B, T, L, H, D):
    q = torch.randn(B, T, H, D, generator=ctx.gen) * 1.5
    kv = torch.randn(B, L, D, generator=ctx.gen)
    return q, kv, D**-0.5


def causal(T, L, offset=0):
    from glmkit.ops.lightning_indexer import visibility

    return visibility(T, L, offset, None, "cpu")


def compare_target(ctx, q, kv, scale, visible):
    from glmkit.ops.lightning_indexer import attention_target

    B, T, H, D = q.shape
    ctx.note_inputs(
        f"q [{B}, {T}, {H}, {D}], kv [{B}, {kv.shape[1]}, {D}], scale={scale:.4g}, visible {list(visible.shape)} "
        f"(queries seeing no key: {int((visible.sum(-1) == 0).sum())})"
    )
    want = attention_target(q, kv, scale, visible=visible)
    ctx.expect_tensor("attention_target(...)", ctx.call("attention_target", q, kv, scale, visible), want, tol=TOL)


def compare_kl(ctx, logits, target, what):
    from glmkit.ops.lightning_indexer import indexer_kl_loss

    ctx.note_inputs(
        f"{what}: logits {list(logits.shape)} ({int((logits == NEG_INF).sum())} entries −inf), target with "
        f"{int(((target == 0) & (logits > NEG_INF)).sum())} zeros inside the sets"
    )
    want = indexer_kl_loss(logits, target).float()
    ctx.expect_tensor("indexer_kl(logits, target)", ctx.call("indexer_kl", logits, target), want, tol=TOL)


def warmup_case(ctx, B, T, H_I, D_I, H, D):
    """The dense warm-up's pair: the indexer's logits over every visible key and the main attention's target."""
    from glmkit.ops.lightning_indexer import attention_target

    qi, ki, wi = indexer_inputs(ctx, B, T, T, H_I, D_I)
    logits = reference_scores(qi, ki, wi)
    q, kv, scale = mqa_inputs(ctx, B, T, T, H, D)
    return logits, attention_target(q, kv, scale, visible=causal(T, T))


# -- public checks --------------------------------------------------------------------------------------
@Check(
    points=3,
    timeout=20,
    title="scores: a prefill",
    message=(
        "I[b, t, s] = Σ_h w[b, t, h] · ReLU(scale · q[b, t, h] · k[b, s]) with scale = D ** -0.5 by default, in "
        "float32: the ReLU acts on EACH head's score before the weighted sum (w can be negative, so ReLU after "
        "the sum is not the same). Key s is visible to query t iff s <= t (offset 0): the query sees itself; "
        "everything later is −inf."
    ),
)
def scores_prefill(ctx):
    compare_scores(ctx, 2, 23, 23, 4, 16)
    compare_scores(ctx, 1, 40, 40, 8, 32)


@Check(
    points=2,
    timeout=20,
    title="scores: decoding (offset > 0)",
    message=(
        "With a cache, query t sits at absolute position offset + t: it sees the keys s <= offset + t of the L "
        "keys (L = offset + T). One decoding step is T = 1, offset = L − 1: that query sees every key."
    ),
)
def scores_decode(ctx):
    compare_scores(ctx, 2, 1, 30, 4, 16, offset=29)
    compare_scores(ctx, 2, 7, 35, 4, 16, offset=28)


@Check(
    points=1,
    timeout=20,
    title="scores: an explicit scale, float16 inputs",
    message=(
        "Use the scale you are given (only None means D ** -0.5), and compute in float32 whatever the inputs' "
        "dtype: the result is float32."
    ),
)
def scores_scale_and_fp16(ctx):
    compare_scores(ctx, 2, 19, 19, 4, 16, scale=0.37)
    compare_scores(ctx, 1, 21, 21, 4, 16, dtype=torch.float16)


@Check(
    points=3,
    timeout=20,
    title="top-k: the selected keys",
    message=(
        "Each query keeps the min(topk, L) keys with the LARGEST scores (torch.topk over the last dimension); "
        "any order within a row is fine. Return int64 indices of shape [B, T, min(topk, L)]. Here every query "
        "sees more than topk keys (a later chunk of a sequence)."
    ),
)
def topk_selected(ctx):
    compare_topk(ctx, 2, 6, 40, 8, 16, topk=8, offset=34)
    compare_topk(ctx, 1, 9, 60, 8, 16, topk=16, offset=51)


@Check(
    points=2,
    timeout=20,
    title="top-k: queries that see fewer keys than k",
    message=(
        "In a prefill, query t sees only t + 1 keys: the slots it cannot fill hold −1 (a key with score −inf "
        "is not visible and must never be selected). The row still has min(topk, L) entries; when topk >= L "
        "that is L."
    ),
)
def topk_fewer_keys(ctx):
    compare_topk(ctx, 2, 24, 24, 8, 16, topk=8, offset=0)
    compare_topk(ctx, 1, 10, 10, 8, 16, topk=16, offset=0)


@Check(
    points=3,
    timeout=20,
    title="target: the main attention summed over heads",
    message=(
        "p = Σ_h softmax_s(scale · q[b, t, h] · kv[b, s]) / H: one softmax per head over the VISIBLE keys only "
        "(the others get 0), then the mean over the H heads so that each row sums to 1 (the L1 normalisation). "
        "Every head scores the same kv row of a key (MQA mode)."
    ),
)
def target_dense(ctx):
    q, kv, scale = mqa_inputs(ctx, 2, 17, 17, 4, 24)
    compare_target(ctx, q, kv, scale, causal(17, 17))
    q, kv, scale = mqa_inputs(ctx, 1, 5, 21, 8, 16)
    compare_target(ctx, q, kv, scale, causal(5, 21, offset=16))


@Check(
    points=3,
    timeout=20,
    title="KL: the dense warm-up's loss",
    message=(
        "KL(p ‖ softmax(I)) per query row, averaged over all B·T rows: Σ_s p_s (log p_s − log softmax(I)_s), "
        "the softmax over the row's visible keys (I > −inf). Invisible keys have p = 0 and I = −inf: their terms "
        "are 0 — compute p·log p only where p > 0 (0 · log 0 is NaN in floating point), and mind the direction: "
        "p, the attention, is the target."
    ),
)
def kl_warmup(ctx):
    logits, target = warmup_case(ctx, 2, 15, 4, 16, 4, 16)
    compare_kl(ctx, logits, target, "dense warm-up")
    logits, target = warmup_case(ctx, 1, 26, 2, 8, 8, 24)
    compare_kl(ctx, logits, target, "dense warm-up")


@Check(
    points=3,
    timeout=60,
    title="kernel: a prefill",
    message=(
        "index_scores_kernel must give index_scores' result: per program a BLOCK_T × BLOCK_L tile, the keys "
        "loaded once, a loop over the H heads accumulating w · ReLU(scale · q·kᵀ) in fp32, −inf where s > "
        "offset + t, and stores masked to t < T, s < L. The launch needs a 3-D grid: tiles of queries, tiles of "
        "keys, samples. T and L are not multiples of the tile here, so masks matter."
    ),
)
def kernel_prefill(ctx):
    compare_scores(ctx, 2, 23, 23, 4, 16, fn="index_scores_triton")
    compare_scores(ctx, 1, 37, 37, 3, 32, fn="index_scores_triton")


@Check(
    points=2,
    timeout=60,
    title="kernel: decoding (offset > 0)",
    message=(
        "The kernel with a cache: query row t is at absolute position offset + t. A decoding step (T = 1) still "
        "writes all L keys of its one row, across several key tiles."
    ),
)
def kernel_decode(ctx):
    compare_scores(ctx, 2, 1, 45, 4, 16, offset=44, fn="index_scores_triton")
    compare_scores(ctx, 1, 5, 33, 4, 16, offset=28, fn="index_scores_triton")
