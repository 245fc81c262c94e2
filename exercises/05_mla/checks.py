"""Public checks of exercise 05 (shipped to learners; the hidden ones stay with the instructor).

Each check is declared with its points, time limit (seconds) and the message a learner sees when it fails. Inputs
are random (fresh each run, reproducible with the run's seed); the expected answers are computed here, in the grading
process, by glmkit: an MLA layer of ``glmkit.mixers.mla`` (its naive path, its ``absorbed_weights``, its projections)
and ``glmkit.ops.mla_decode.mla_decode_reference`` — never stored. ``ctx.call`` runs your function in a separate
process (your kernel runs there, under the Triton interpreter on a CPU) and brings its result back as plain data.

The folded weights are judged by what they do (the query latents and the layer output they produce), not entry by
entry.
"""

from __future__ import annotations

import math

import torch

from glmkit.grading import Check

TOL = 1e-5  # fp32, one contraction in another order
PATH_TOL = 1e-4  # fp32, a whole attention computed another way (naive vs absorbed)
BLOCK_N = 16  # the kernel's key block (ex05.BLOCK_N)


# -- inputs ------------------------------------------------------------------------------------------------------
def mla_layer(ctx, heads, nope, rope, v_dim, rank, q_lora=24, hidden=32):
    """A glmkit MLA layer with these sizes, weights redrawn at unit fan-in scale from the check's generator (so
    scores are not flat and every part of the head matters)."""
    from glmkit.mixers.mla import MLA
    from glmkit.models.presets import get_config

    extra = dict(q_lora_rank=q_lora, kv_lora_rank=rank, qk_nope_head_dim=nope, qk_rope_head_dim=rope, v_head_dim=v_dim)
    cfg = get_config(
        "cpu-mla",
        hidden_size=hidden,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        num_hidden_layers=1,
        extra=extra,
    )
    layer = MLA(cfg, 0).eval()
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=ctx.gen) * p.shape[1] ** -0.5)
            elif "bias" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=ctx.gen))
    return layer


def layer_inputs(ctx, layer, B, T, L):
    """The layer's own queries for the newest T of L tokens and its latent rows for all L: q_nope, q_rot [B, H, T, ·]
    (rotated), c_kv [B, L, R], k_rot [B, L, P] (rotated), and the decode Step of those T queries."""
    from glmkit.mixers import Step

    x = torch.randn(B, L, layer.o_proj.out_features, generator=ctx.gen)
    pos = torch.arange(L)[None].expand(B, L)
    full = Step(position_ids=pos, sep=torch.zeros(B, dtype=torch.long))
    with torch.no_grad():
        q_nope, q_rot, _ = layer.query(x, full)
        c_kv, k_rot = layer.latent_kv(x, full)
    j, t = torch.arange(L), torch.arange(T)
    visible = (j[None, :] <= L - T + t[:, None])[None].expand(B, T, L)
    step = Step(position_ids=pos[:, L - T :], sep=torch.zeros(B, dtype=torch.long), offset=L - T, visible=visible)
    return q_nope[:, :, L - T :].contiguous(), q_rot[:, :, L - T :].contiguous(), c_kv, k_rot, step


def naive_output(layer, q_nope, q_rot, c_kv, k_rot, step):
    """glmkit's naive path: expand every head's keys and values, then attention (before o_proj) [B, H, T, v]."""
    with torch.no_grad():
        return layer.attend(q_nope, q_rot, c_kv, k_rot, step, absorb=False)


def latent_inputs(ctx, B, H, T, L, R, P, sharp=1.0):
    g = ctx.gen
    return (
        sharp * torch.randn(B, H, T, R, generator=g),
        sharp * torch.randn(B, H, T, P, generator=g),
        torch.randn(B, L, R, generator=g),
        torch.randn(B, L, P, generator=g),
    )


def reference_latent(q_lat, q_rot, c_kv, k_rot, scale, lengths=None):
    """glmkit's absorbed attention (its layout is [B, T, H, ·]) → [B, H, T, R]."""
    from glmkit.ops.mla_decode import mla_decode_reference

    out = mla_decode_reference(q_lat.transpose(1, 2), q_rot.transpose(1, 2), c_kv, k_rot, scale, lengths)
    return out.transpose(1, 2).contiguous()


def ragged(ctx, B, L, low=1):
    """lengths [B] int64 in [low, L], the last row full."""
    n = [ctx.rng.randint(low, L) for _ in range(B - 1)] + [L]
    ctx.rng.shuffle(n)
    return torch.tensor(n, dtype=torch.int64)


def compare_latent(ctx, B, H, T, L, R, P, lengths=None, sharp=1.0):
    q_lat, q_rot, c_kv, k_rot = latent_inputs(ctx, B, H, T, L, R, P, sharp)
    scale = 1.0 / math.sqrt(R)
    ctx.note_inputs(
        f"q_lat [{B}, {H}, {T}, {R}], q_rot [{B}, {H}, {T}, {P}], c_kv [{B}, {L}, {R}], k_rot [{B}, {L}, {P}], "
        f"scale {scale:.4g}, lengths {None if lengths is None else lengths.tolist()}"
    )
    want = reference_latent(q_lat, q_rot, c_kv, k_rot, scale, lengths)
    got = ctx.call("latent_attention", q_lat, q_rot, c_kv, k_rot, scale, lengths)
    ctx.expect_tensor("latent_attention(...)", got, want, tol=TOL)


def compare_absorbed_layer(ctx, B, T, L, heads, nope, rope, v_dim, rank, **sizes):
    """The learner's four pieces in a row against glmkit's naive path on a real MLA layer."""
    layer = mla_layer(ctx, heads, nope, rope, v_dim, rank, **sizes)
    q_nope, q_rot, c_kv, k_rot, step = layer_inputs(ctx, layer, B, T, L)
    ctx.note_inputs(
        f"an MLA layer with H = {heads}, nope {nope}, rope {rope}, v {v_dim}, R = {rank}; B = {B}, the newest T = {T} "
        f"of L = {L} tokens; scale {layer.scale:.4g}"
    )
    want = naive_output(layer, q_nope, q_rot, c_kv, k_rot, step)
    w = layer.kv_b_proj.weight.detach()
    w_uk, w_uv = ctx.expect_tuple("split_kv_b(...)", ctx.call("split_kv_b", w, heads, nope, v_dim), 2)
    q_lat = ctx.call("absorb_query", q_nope, w_uk)
    o_lat = ctx.call("latent_attention", q_lat, q_rot, c_kv, k_rot, layer.scale, None)
    got = ctx.call("absorbed_output", o_lat, w_uv)
    ctx.expect_tensor("absorbed_output(latent_attention(absorb_query(...)))", got, want, tol=PATH_TOL)


def fold_case(ctx, heads, nope, rope, v_dim, rank, q_lora=24, hidden=32, q_proj=False):
    """(layer, the learner's folded weights, c_Q [N, Q], o_lat [N, H, R]) for checks of fold_weights."""
    layer = mla_layer(ctx, heads, nope, rope, v_dim, rank, q_lora=None if q_proj else q_lora, hidden=hidden)
    q_w = (layer.q_proj if q_proj else layer.q_b_proj).weight.detach()
    ctx.note_inputs(
        f"H = {heads}, nope {nope}, rope {rope}, v {v_dim}, R = {rank}, "
        f"{'q_proj.weight' if q_proj else 'q_b_proj.weight'} {list(q_w.shape)}, kv_b_proj.weight "
        f"{list(layer.kv_b_proj.weight.shape)}, o_proj.weight {list(layer.o_proj.weight.shape)}"
    )
    got = ctx.call(
        "fold_weights",
        q_w,
        layer.kv_b_proj.weight.detach(),
        layer.o_proj.weight.detach(),
        heads,
        nope,
        rope,
        v_dim,
    )
    w_q_lat, w_q_rot, w_o_lat = ctx.expect_tuple("fold_weights(...)", got, 3)
    Q, d = q_w.shape[1], layer.o_proj.out_features
    for name, t, shape in (
        ("W_Q_lat", w_q_lat, (heads, rank, Q)),
        ("W_Q_rot", w_q_rot, (heads, rope, Q)),
        ("W_O_lat", w_o_lat, (d, heads, rank)),
    ):
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != shape:
            ctx.fail(f"{name} has the wrong shape", f"expected {list(shape)}, got {list(getattr(t, 'shape', []))}")
    c_q = torch.randn(5, Q, generator=ctx.gen)
    o_lat = torch.randn(5, heads, rank, generator=ctx.gen)
    return layer, (w_q_lat.float(), w_q_rot.float(), w_o_lat.float()), c_q, o_lat


def expect_fold_query(ctx, layer, folded, c_q):
    """q_lat and the pre-RoPE q_rot from the folded weights = those from q_b_proj (or q_proj) and W_UK."""
    w_q_lat, w_q_rot, _ = folded
    H, nope = layer.H, layer.nope
    proj = layer.q_proj if layer.q_lora_rank is None else layer.q_b_proj
    with torch.no_grad():
        q = proj(c_q).view(-1, H, nope + layer.rope_dim)  # [N, H, nope + rope]
        w_uk, _ = layer.absorbed_weights()
        want_lat = torch.einsum("nhd,hdr->nhr", q[..., :nope], w_uk)
    ctx.expect_tensor("q_lat = W_Q_lat[h] @ c_Q", torch.einsum("hrq,nq->nhr", w_q_lat, c_q), want_lat, tol=TOL)
    ctx.expect_tensor("q_rot = W_Q_rot[h] @ c_Q", torch.einsum("hpq,nq->nhp", w_q_rot, c_q), q[..., nope:], tol=TOL)


def expect_fold_output(ctx, layer, folded, o_lat):
    """Σ_h W_O_lat[:, h] o_lat[h] = o_proj of the heads' W_UV[h] o_lat[h] (without o_proj's bias)."""
    _, _, w_o_lat = folded
    with torch.no_grad():
        _, w_uv = layer.absorbed_weights()
        heads_out = torch.einsum("nhr,hvr->nhv", o_lat, w_uv).reshape(o_lat.shape[0], -1)
        want = heads_out @ layer.o_proj.weight.T
    ctx.expect_tensor("out = Σ_h W_O_lat[:, h] @ o_lat[h]", torch.einsum("dhr,nhr->nd", w_o_lat, o_lat), want, tol=TOL)


def compare_decode(ctx, B, H, L, R, P, lengths, num_splits, sharp=1.0, ramp=False):
    """latent_decode (the learner's kernel, with their combine_splits when num_splits > 1) against glmkit's
    reference for one new token per sequence. ramp: latent rows that grow along the cache, so that the running max
    of almost every head rises from block to block (a kernel that never rescales is then wrong)."""
    from glmkit.ops.mla_decode import mla_decode_reference

    g = ctx.gen
    q_lat, q_rot = sharp * torch.randn(B, H, R, generator=g), sharp * torch.randn(B, H, P, generator=g)
    c_kv, k_rot = torch.randn(B, L, R, generator=g), torch.randn(B, L, P, generator=g)
    if ramp:
        c_kv = c_kv * torch.linspace(0.25, 2.0, L)[:, None]
    scale = 1.0 / math.sqrt(R)
    ctx.note_inputs(
        f"q_lat [{B}, {H}, {R}], q_rot [{B}, {H}, {P}], c_kv [{B}, {L}, {R}], k_rot [{B}, {L}, {P}], "
        f"scale {scale:.4g}, lengths {lengths.tolist()}, num_splits {num_splits} "
        f"(chunks of {math.ceil(math.ceil(L / num_splits) / BLOCK_N) * BLOCK_N} keys)"
    )
    want = mla_decode_reference(q_lat[:, None], q_rot[:, None], c_kv, k_rot, scale, lengths)[:, 0]
    got = ctx.call("latent_decode", q_lat, q_rot, c_kv, k_rot, scale, lengths, num_splits)
    if isinstance(got, torch.Tensor) and got.shape == want.shape and torch.isnan(got).any():
        ctx.fail(
            "latent_decode's output has NaN: a position of the partial outputs or log-sum-exps was never written "
            "(they start as NaN), or a 0/0",
            f"{int(torch.isnan(got).sum())} NaN of {got.numel()}",
        )
    ctx.expect_tensor("latent_decode(...)", got, want, tol=PATH_TOL)


def split_partials(q_lat, q_rot, c_kv, k_rot, scale, lengths, splits, chunk):
    """What the kernel's programs write, computed with torch: per split, the normalised output over its keys and the
    natural log-sum-exp of its scaled scores (0 and −inf for a split without keys). [B, S, H, R], [B, S, H]."""
    B, H, R = q_lat.shape
    s = (torch.einsum("bhr,blr->bhl", q_lat, c_kv) + torch.einsum("bhp,blp->bhl", q_rot, k_rot)) * scale
    o_part, lse = torch.zeros(B, splits, H, R), torch.full((B, splits, H), float("-inf"))
    for b in range(B):
        for sp in range(splits):
            lo, hi = sp * chunk, min(sp * chunk + chunk, int(lengths[b]))
            if hi > lo:
                lse[b, sp] = s[b, :, lo:hi].logsumexp(-1)
                o_part[b, sp] = s[b, :, lo:hi].softmax(-1) @ c_kv[b, lo:hi]
    return o_part, lse


def compare_combine(ctx, o_part, lse, want):
    B, S, H, R = o_part.shape
    empty = (lse == float("-inf")).sum().item()
    ctx.note_inputs(f"o_part [{B}, {S}, {H}, {R}], lse [{B}, {S}, {H}] ({empty} empty (row, split, head) entries)")
    got = ctx.call("combine_splits", o_part, lse)
    ctx.expect_tensor("combine_splits(o_part, lse)", got, want, tol=TOL)


# -- public checks: part 1 --------------------------------------------------------------------------------------
@Check(
    points=2,
    timeout=20,
    title="split_kv_b: one head's key rows, then its value rows",
    message=(
        "kv_b_proj.weight has H·(nope + v) rows in blocks of one head each: head h's nope key rows, then its v value "
        "rows. View it as [H, nope + v, R] and split the middle axis — taking the first H·nope rows as all the keys "
        "is the classic mistake."
    ),
)
def split_layout(ctx):
    for H, nope, v, R in ((3, 8, 12, 16), (5, 16, 8, 24)):
        layer = mla_layer(ctx, H, nope, 4, v, R)
        w = layer.kv_b_proj.weight.detach()
        ctx.note_inputs(f"kv_b_weight [{H * (nope + v)}, {R}], H = {H}, nope = {nope}, v = {v}")
        w_uk, w_uv = ctx.expect_tuple("split_kv_b(...)", ctx.call("split_kv_b", w, H, nope, v), 2)
        want_uk, want_uv = layer.absorbed_weights()
        ctx.expect_tensor("W_UK", w_uk, want_uk.detach().contiguous())
        ctx.expect_tensor("W_UV", w_uv, want_uv.detach().contiguous())


@Check(
    points=2,
    timeout=20,
    title="absorb_query: q_lat = W_UKᵀ q_nope, head by head",
    message=(
        "For each head h, q_lat[h] = W_UK[h]ᵀ q_nope[h]: contract the nope axis of q_nope [B, H, T, nope] with the "
        "nope axis of W_UK [H, nope, R], head with head (no sum over heads). Then q_lat · c = q_nope · (W_UK[h] c)."
    ),
)
def absorb_query_per_head(ctx):
    for B, H, T, nope, R in ((2, 3, 4, 8, 16), (1, 5, 1, 12, 20)):
        q_nope = torch.randn(B, H, T, nope, generator=ctx.gen)
        w_uk = torch.randn(H, nope, R, generator=ctx.gen)
        ctx.note_inputs(f"q_nope [{B}, {H}, {T}, {nope}], W_UK [{H}, {nope}, {R}]")
        c = torch.randn(7, R, generator=ctx.gen)  # latents: the scores must come out the same both ways
        want = torch.einsum("bhtn,hnl->bhtl", q_nope, torch.einsum("hnr,lr->hnl", w_uk, c))  # q_nope · (W_UK c)
        q_lat = ctx.call("absorb_query", q_nope, w_uk)
        ctx.expect_tensor("absorb_query(...)", q_lat, torch.einsum("bhtn,hnr->bhtr", q_nope, w_uk), tol=TOL)
        ctx.expect_tensor("q_lat · c (the scores)", torch.einsum("bhtr,lr->bhtl", q_lat, c), want, tol=TOL)


@Check(
    points=2,
    timeout=20,
    title="latent_attention: one new token over the whole cache",
    message=(
        "Scores over the shared rows: scale · (q_lat · c_kv[j] + q_rot · k_rot[j]) — the RoPE part is a separate "
        "dot product with the one shared k_rot, added before the softmax; the output is the softmax-weighted sum of "
        "the latent rows c_kv (not of k_rot, not yet W_UV). With T = 1 and no lengths, the one query sees every key."
    ),
)
def latent_decode_token(ctx):
    compare_latent(ctx, 2, 4, 1, 13, 16, 8)
    compare_latent(ctx, 1, 3, 1, 29, 24, 4, sharp=2.0)


@Check(
    points=3,
    timeout=20,
    title="latent_attention: several new tokens, ragged lengths",
    message=(
        "The T queries are the newest T tokens of each row: with n = lengths[b] (None: L), query t sees the keys "
        "j < n − T + 1 + t (causal at the END of the row, not from position 0), and never a key j >= n. Mask the "
        "others with -inf before the softmax; a query that sees no key gets zeros."
    ),
)
def latent_chunk_ragged(ctx):
    compare_latent(ctx, 2, 3, 4, 17, 16, 8)
    compare_latent(ctx, 3, 2, 3, 21, 8, 8, lengths=ragged(ctx, 3, 21, low=4))


@Check(
    points=3,
    timeout=30,
    title="the absorbed layer equals the naive one",
    message=(
        "split_kv_b, absorb_query, latent_attention and absorbed_output in a row must reproduce the naive path "
        "(expand k_nope and v per head, ordinary attention) of a real MLA layer, up to float rounding: "
        "o[h] = W_UV[h] o_lat[h], a contraction over R, head by head."
    ),
)
def absorbed_layer(ctx):
    compare_absorbed_layer(ctx, 2, 1, 11, heads=4, nope=12, rope=4, v_dim=8, rank=16)
    compare_absorbed_layer(ctx, 1, 5, 9, heads=3, nope=8, rope=8, v_dim=16, rank=24)


# -- public checks: part 2 --------------------------------------------------------------------------------------
@Check(
    points=2,
    timeout=20,
    title="fold_weights: the query side",
    message=(
        "q_b_proj's rows come head by head, each head's nope rows then its rope rows: view it as [H, nope + rope, Q]. "
        "W_Q_lat[h] = W_UK[h]ᵀ @ (head h's nope rows) is [R, Q]; W_Q_rot[h] is head h's rope rows as they are "
        "(RoPE comes after them, so they cannot be folded)."
    ),
)
def fold_query(ctx):
    for sizes in (dict(heads=3, nope=8, rope=4, v_dim=12, rank=16), dict(heads=2, nope=12, rope=8, v_dim=8, rank=8)):
        layer, folded, c_q, _ = fold_case(ctx, **sizes)
        expect_fold_query(ctx, layer, folded, c_q)


@Check(
    points=2,
    timeout=20,
    title="fold_weights: the output side",
    message=(
        "o_proj.weight [d, H·v] has head h's columns at h·v .. h·v + v − 1: view it as [d, H, v]. "
        "W_O_lat[:, h] = (head h's columns) @ W_UV[h] is [d, R], so that Σ_h W_O_lat[:, h] @ o_lat[h] equals o_proj "
        "applied to the concatenated W_UV[h] o_lat[h]."
    ),
)
def fold_output(ctx):
    for sizes in (dict(heads=3, nope=8, rope=4, v_dim=12, rank=16), dict(heads=4, nope=4, rope=4, v_dim=8, rank=8)):
        layer, folded, _, o_lat = fold_case(ctx, **sizes)
        expect_fold_output(ctx, layer, folded, o_lat)


# -- public checks: part 3 --------------------------------------------------------------------------------------
@Check(
    points=3,
    timeout=60,
    title="kernel: one split, every row full",
    message=(
        "latent_decode_kernel with one split: load the H query rows once, walk the keys in blocks of BLOCK_N with "
        "an online softmax (running max m, running sum l, accumulator acc), and RESCALE l and acc by exp(m − m_new) "
        "before adding each block; store acc / l. Without the rescale the result is right only while the keys fit "
        "in one block — here they do not."
    ),
)
def kernel_one_split(ctx):
    L = ctx.rng.randint(40, 60)
    compare_decode(ctx, 2, 4, L, 16, 16, torch.full((2,), L, dtype=torch.int64), 1, ramp=True)
    L = ctx.rng.randint(20, 34)
    compare_decode(ctx, 1, 3, L, 32, 8, torch.full((1,), L, dtype=torch.int64), 1, sharp=2.0)


@Check(
    points=3,
    timeout=60,
    title="kernel: ragged lengths",
    message=(
        "Row b has LENS[b] cached keys, fewer than L: the split's keys end at min(s·CHUNK + CHUNK, LENS[b]); mask "
        "the keys of the last block past that end (load them as 0 and give them a score of -inf). A row shorter "
        "than one block still works."
    ),
)
def kernel_ragged(ctx):
    L = ctx.rng.randint(40, 64)
    lengths = torch.tensor([L, ctx.rng.randint(17, L - 1), ctx.rng.randint(2, 15)], dtype=torch.int64)
    compare_decode(ctx, 3, 4, L, 16, 16, lengths[torch.randperm(3, generator=ctx.gen)], 1, ramp=True)


@Check(
    points=2,
    timeout=20,
    title="combine_splits: the log-sum-exp merge",
    message=(
        "Each split's output is normalised over its own keys; weigh split s by exp(lse_s − M) with M the max lse "
        "of that row and head, and divide by the sum of the weights. A split without keys has lse = -inf and weight "
        "0. Averaging the splits, or weighting by lse itself, is wrong."
    ),
)
def combine(ctx):
    from glmkit.ops.mla_decode import mla_decode_reference

    for B, H, L, R, P, splits, chunk in ((2, 3, 40, 16, 8, 3, 16), (3, 2, 50, 8, 4, 4, 16)):
        q_lat, q_rot = 2 * torch.randn(B, H, R, generator=ctx.gen), 2 * torch.randn(B, H, P, generator=ctx.gen)
        c_kv, k_rot = torch.randn(B, L, R, generator=ctx.gen), torch.randn(B, L, P, generator=ctx.gen)
        lengths = ragged(ctx, B, L, low=3)
        o_part, lse = split_partials(q_lat, q_rot, c_kv, k_rot, 0.3, lengths, splits, chunk)
        want = mla_decode_reference(q_lat[:, None], q_rot[:, None], c_kv, k_rot, 0.3, lengths)[:, 0]
        compare_combine(ctx, o_part, lse, want)


@Check(
    points=2,
    timeout=60,
    title="kernel + combine: split-K over ragged rows",
    message=(
        "With several splits each program writes its partial output and its log-sum-exp LSE = m + log(l) (natural "
        "log; m is the running max of the SCALED scores); a split past its row's length writes zeros and -inf. "
        "combine_splits then merges them. Check that both are written for every (row, split, head)."
    ),
)
def kernel_split_k(ctx):
    L = ctx.rng.randint(60, 90)
    lengths = torch.tensor([L, ctx.rng.randint(20, 40), ctx.rng.randint(1, 10)], dtype=torch.int64)
    compare_decode(ctx, 3, 4, L, 16, 16, lengths, 3)
