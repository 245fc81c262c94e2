"""Public checks of exercise 07 (shipped to learners; the hidden ones stay with the instructor).

Each check is declared with its points, time limit (seconds) and the message a learner sees when it fails. Inputs
are random (fresh each run, reproducible with the run's seed); the expected answers are computed here, in the
grading process, by glmkit's recurrent reference ``glmkit.ops.delta_rule.gated_delta_rule_reference`` (in float64)
— never stored. ``ctx.call`` runs your function in a separate process (your kernel runs there, under the Triton
interpreter on a CPU) and brings its result back as plain data.

The UT transform is checked against what the recurrence itself writes: run from a start state H₀, token r of a
chunk writes u_r = β_r (v_r − Hᵀk_r), H being the decayed state just before it, and those writes are U − W H₀ for
every H₀. So U is what the recurrence writes from H₀ = 0, and −W is how the writes move when H₀ moves (read off
from H₀ = the identity, in extra value columns). No formula of this file computes A or T.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from glmkit.grading import Check

TOL = 1e-4  # relative error: your float32 against the float64 reference (measured ~1e-7 for correct code)


# -- inputs ---------------------------------------------------------------------------------------------------
def inputs(ctx, B, T, H, K, V, gate="scalar", decay=1.0, state=True):
    """q, k (L2-normalised, as the layers feed them), v, beta in (0, 1), the log-decay g ≤ 0 (None, [B, T, H] or
    [B, T, H, K]; ``decay`` scales it) and an initial state (or None), float32."""
    gen = ctx.gen
    q = torch.randn(B, T, H, K, generator=gen)
    k = F.normalize(torch.randn(B, T, H, K, generator=gen), dim=-1)
    v = torch.randn(B, T, H, V, generator=gen)
    beta = torch.rand(B, T, H, generator=gen)
    g = None
    if gate != "none":
        shape = (B, T, H) if gate == "scalar" else (B, T, H, K)
        g = decay * F.logsigmoid(torch.randn(shape, generator=gen) + 2.0)
    h0 = torch.randn(B, H, K, V, generator=gen) if state else None
    return q, k, v, g, beta, h0


def describe(q, v, g, h0, scale, **extra):
    B, T, H, K = tuple(q.shape)
    gate = "None (DeltaNet)" if g is None else f"{list(g.shape)} ({'KDA' if g.dim() == 4 else 'Gated DeltaNet'})"
    more = "".join(f", {k}={v}" for k, v in extra.items())
    return (
        f"B={B}, T={T}, H={H}, K={K}, V={v.shape[-1]}; g {gate}"
        + (f" (down to {float(g.min()):.3g} per token)" if g is not None else "")
        + f"; scale={scale}; initial_state {'given' if h0 is not None else 'None'}{more}"
    )


def reference(q, k, v, g, beta, scale, h0):
    """(o, final state) of the recurrence in float64, returned as float32."""
    from glmkit.ops.delta_rule import gated_delta_rule_reference

    g = torch.zeros(q.shape[:3]) if g is None else g
    args = [t.double() for t in (q, k, v, g, beta)]
    o, s = gated_delta_rule_reference(
        *args, scale=scale, initial_state=None if h0 is None else h0.double(), output_final_state=True
    )
    return o.float(), s.float()


def compare_outputs(ctx, what, got, q, k, v, g, beta, scale, h0):
    o, s = ctx.expect_tuple(f"{what}(...)", got, 2)
    want_o, want_s = reference(q, k, v, g, beta, scale, h0)
    ctx.expect_tensor("o (the outputs, [B, T, H, V])", o, want_o, tol=TOL)
    ctx.expect_tensor("the final state ([B, H, K, V])", s, want_s, tol=TOL)


# -- part 1: the recurrence -------------------------------------------------------------------------------------
def compare_recurrence(ctx, B, T, H, K, V, gate, scale, state=True, decay=1.0):
    q, k, v, g, beta, h0 = inputs(ctx, B, T, H, K, V, gate, decay, state)
    ctx.note_inputs(describe(q, v, g, h0, scale))
    got = ctx.call("gated_delta_rule_recurrent", q, k, v, g, beta, scale, h0)
    compare_outputs(ctx, "gated_delta_rule_recurrent", got, q, k, v, g, beta, scale, h0)


# -- part 2: the UT transform -----------------------------------------------------------------------------------
def ut_oracle(k, v, beta, g):
    """(W, U) of chunks, from the recurrence: k [..., C, K], v [..., C, V], beta [..., C], g [..., C] (the per-token
    log-decay, not its cumulative sum). The state carries V value columns and K more, started at [0 | I]: the
    writes' first V columns are U, the last K are −W."""
    from glmkit.ops.delta_rule import gated_delta_rule_reference

    lead, (C, K), V = k.shape[:-2], k.shape[-2:], v.shape[-1]
    n = int(torch.tensor(lead).prod()) if lead else 1
    k2, b2, g2 = k.reshape(n, C, 1, K).double(), beta.reshape(n, C, 1).double(), g.reshape(n, C, 1).double()
    v2 = torch.cat([v.reshape(n, C, 1, V).double(), torch.zeros(n, C, 1, K, dtype=torch.float64)], -1)
    h0 = torch.cat([torch.zeros(n, 1, K, V), torch.eye(K).expand(n, 1, K, K)], -1).double()
    writes = []
    for r in range(C):  # the state just before token r, from the recurrence over tokens 0 .. r−1
        if r == 0:
            state = h0
        else:
            _, state = gated_delta_rule_reference(
                k2[:, :r], k2[:, :r], v2[:, :r], g2[:, :r], b2[:, :r], initial_state=h0, output_final_state=True
            )
        state = state * g2[:, r, :, None, None].exp()  # token r's decay comes first
        u = b2[:, r, :, None] * (v2[:, r] - torch.einsum("nhkv,nhk->nhv", state, k2[:, r]))
        writes.append(u[:, 0])
    u = torch.stack(writes, 1)  # [n, C, V + K]
    U, W = u[..., :V], -u[..., V:]
    return W.reshape(*lead, C, K).float(), U.reshape(*lead, C, V).float()


def chunk_inputs(ctx, lead, C, K, V, decay=1.0, beta_zero=False):
    gen = ctx.gen
    k = F.normalize(torch.randn(*lead, C, K, generator=gen), dim=-1)
    v = torch.randn(*lead, C, V, generator=gen)
    beta = torch.rand(*lead, C, generator=gen)
    if beta_zero:
        beta[..., ::3] = 0.0  # every third token writes nothing
    g = decay * F.logsigmoid(torch.randn(*lead, C, generator=gen) + 2.0)
    return k, v, beta, g


def compare_ut(ctx, lead, C, K, V, decay=1.0, beta_zero=False):
    k, v, beta, g = chunk_inputs(ctx, lead, C, K, V, decay, beta_zero)
    G = g.cumsum(-1)
    ctx.note_inputs(
        f"k [{', '.join(map(str, [*lead, C, K]))}], v [..., {C}, {V}], beta [..., {C}], G [..., {C}] "
        f"(the cumulative log-decay: G[..., -1] down to {float(G[..., -1].min()):.3g})"
    )
    W, U = ctx.expect_tuple("ut_transform(...)", ctx.call("ut_transform", k, v, beta, G), 2)
    want_W, want_U = ut_oracle(k, v, beta, g)
    ctx.expect_tensor("W = T diag(β) (K ⊙ exp(G))", W, want_W, tol=TOL)
    ctx.expect_tensor("U = T diag(β) V", U, want_U, tol=TOL)


def compare_ut_no_gate(ctx, lead, C, K, V):
    k, v, beta, _ = chunk_inputs(ctx, lead, C, K, V)
    zero = torch.zeros(beta.shape)
    ctx.note_inputs(f"k [{', '.join(map(str, [*lead, C, K]))}], v [..., {C}, {V}], G = 0 (DeltaNet)")
    W, U = ctx.expect_tuple("ut_transform(...)", ctx.call("ut_transform", k, v, beta, zero), 2)
    want_W, want_U = ut_oracle(k, v, beta, zero)
    ctx.expect_tensor("W = T diag(β) K", W, want_W, tol=TOL)
    ctx.expect_tensor("U = T diag(β) V", U, want_U, tol=TOL)


# -- part 3: the chunked forward --------------------------------------------------------------------------------
def compare_chunked(ctx, B, T, H, K, V, chunk, scale, state=True, decay=1.0, gate="scalar"):
    q, k, v, g, beta, h0 = inputs(ctx, B, T, H, K, V, gate, decay, state)
    g = torch.zeros(B, T, H) if g is None else g  # DeltaNet is the zero gate here
    ctx.note_inputs(describe(q, v, g, h0, scale, chunk_size=chunk))
    got = ctx.call("chunk_gated_delta_rule", q, k, v, g, beta, chunk, scale, h0)
    compare_outputs(ctx, "chunk_gated_delta_rule", got, q, k, v, g, beta, scale, h0)


# -- part 4: the decode kernel ----------------------------------------------------------------------------------
def compare_kernel(ctx, B, T, H, K, V, gate, scale):
    q, k, v, g, beta, h0 = inputs(ctx, B, T, H, K, V, gate)
    ctx.note_inputs(describe(q, v, g, h0, scale))
    got = ctx.call("recurrent_step", q, k, v, g, beta, h0.clone(), scale)
    compare_outputs(ctx, "recurrent_step", got, q, k, v, g, beta, scale, h0)


# -- public checks ----------------------------------------------------------------------------------------------
@Check(
    points=2,
    timeout=30,
    title="recurrence: DeltaNet (no gate)",
    message=(
        "With g = None: for each token, u = β (v − Hᵀk), then H += k uᵀ, then o = Hᵀ (q · scale), for every batch "
        "row and head at once. H starts at zeros when initial_state is None and is [B, H, K, V]; read the memory "
        "with the key BEFORE writing, and the output AFTER writing."
    ),
)
def recurrence_deltanet(ctx):
    compare_recurrence(ctx, 2, ctx.rng.randint(9, 24), 2, 16, 8, "none", 0.5, state=False)


@Check(
    points=2,
    timeout=30,
    title="recurrence: Gated DeltaNet (g [B, T, H]), initial state, default scale",
    message=(
        "Gated DeltaNet multiplies the whole state of a head by exp(g_t) BEFORE the token's read and write (the "
        "prediction Hᵀk uses the decayed state). Start from initial_state (a copy: do not change the caller's "
        "tensor), and use scale = K ** -0.5 when scale is None."
    ),
)
def recurrence_gated(ctx):
    compare_recurrence(ctx, 2, ctx.rng.randint(9, 24), 3, 16, 12, "scalar", None)


@Check(
    points=2,
    timeout=30,
    title="recurrence: KDA (g [B, T, H, K])",
    message=(
        "KDA's gate has one log-decay per key channel: row c of each head's state (the K × V matrix) is multiplied "
        "by exp(g_t[c]), before the read and the write. Tell the two gates apart by g's number of dimensions."
    ),
)
def recurrence_kda(ctx):
    compare_recurrence(ctx, 2, ctx.rng.randint(9, 24), 2, 16, 8, "channel", 0.3)


@Check(
    points=2,
    timeout=60,
    title="UT transform: DeltaNet (G = 0)",
    message=(
        "Without a gate: A_rj = β_r (k_r · k_j) for j < r (0 on and above the diagonal), T = (I + A)⁻¹, "
        "W = T diag(β) K and U = T diag(β) V. T is unit lower triangular: forward substitution builds row r from "
        "the rows before it. Leading dimensions are batch dimensions (here none, then [2, 3])."
    ),
)
def ut_deltanet(ctx):
    compare_ut_no_gate(ctx, [], 8, 16, 8)
    compare_ut_no_gate(ctx, [2, 3], 12, 16, 8)


@Check(
    points=3,
    timeout=60,
    title="UT transform: Gated DeltaNet, several chunks",
    message=(
        "With a gate, every product between tokens r and j picks up the decay between them: "
        "A_rj = β_r (k_r · k_j) exp(G_r − G_j) for j < r, and W = T diag(β) (K ⊙ exp(G)), the keys scaled by the "
        "decay from the chunk's start (G is already the cumulative sum: do not sum it again)."
    ),
)
def ut_gated(ctx):
    compare_ut(ctx, [2, 3, 2], 16, 16, 8)


@Check(
    points=2,
    timeout=60,
    title="chunked forward: whole chunks",
    message=(
        "For each chunk in order: V' = U − W H, O = scale·(Q ⊙ exp(G)) H + (scale·Q Kᵀ ⊙ Γ) V' with Γ_rj = "
        "exp(G_r − G_j) on and below the diagonal (0 above), then H ← exp(G_last) H + (K ⊙ exp(G_last − G))ᵀ V'. "
        "G is the cumulative sum of g INSIDE each chunk (it restarts at every chunk)."
    ),
)
def chunked_whole_chunks(ctx):
    compare_chunked(ctx, 2, 32, 2, 16, 8, 8, None, state=False)


@Check(
    points=3,
    timeout=60,
    title="chunked forward: a partial last chunk, an initial state",
    message=(
        "T need not be a multiple of chunk_size: pad the last chunk with tokens that change nothing (k = v = 0, "
        "β = 0, g = 0) and drop their outputs. Start from initial_state when it is given, and return the state "
        "after the last REAL token (padding with g = 0 and β = 0 leaves it as it was)."
    ),
)
def chunked_ragged_with_state(ctx):
    compare_chunked(ctx, 2, ctx.rng.choice([21, 27, 37]), 2, 16, 12, 8, 0.4)


@Check(
    points=2,
    timeout=90,
    title="kernel: Gated DeltaNet decode step",
    message=(
        "One program per (batch, head): load the [K, V] state tile, then per token: tile *= exp(g), "
        "u = β (v − Σ_c tile[c, :] k[c]), tile += k[:, None] u[None, :], o = Σ_c tile[c, :] q[c] · scale; "
        "store the tile back into the state at the end (recurrent_step returns that same tensor). Launch B·H "
        "programs."
    ),
)
def kernel_gated(ctx):
    compare_kernel(ctx, 2, 3, 2, 16, 16, "scalar", 0.5)


@Check(
    points=3,
    timeout=90,
    title="kernel: KDA, K and V not powers of two",
    message=(
        "tl.arange needs a power of two, so the tile is BK × BV with BK ≥ K, BV ≥ V: mask every load and store "
        "with c < K and j < V (loads of padding give 0, so padded channels never reach the sums). KDA's decay "
        "is a vector over the key channels: it multiplies the tile's rows."
    ),
)
def kernel_kda_odd_sizes(ctx):
    compare_kernel(ctx, 1, 4, 2, 20, 12, "channel", 0.25)
