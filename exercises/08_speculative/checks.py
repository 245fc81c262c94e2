"""Public checks of exercise 08 (shipped to learners; the hidden ones stay with the instructor).

Each check is declared with its points, time limit (seconds) and the message a learner sees when it fails. Inputs
are random (fresh each run, reproducible with the run's seed); the expected answers are computed here, in the
grading process, never stored: the acceptance rules one row and one draft at a time, in float64, straight from
their definitions (the module docstring of ex08.py), and the recurrent state from glmkit's Gated DeltaNet reference
``glmkit.ops.delta_rule.gated_delta_rule_reference`` run over each row's kept tokens only — a recomputation, which
is what a correct rollback must equal. One check is statistical: many rows of the same round must emit tokens that
follow the main model's distribution (the property the rule exists for). ``ctx.call`` runs your function in a
separate process (your kernel runs there, under the Triton interpreter on a CPU) and brings its result back as
plain data.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from glmkit.grading import Check

TOL = 1e-5  # relative error of float results (float32 against float64 definitions; ~1e-7 for correct code)


# -- inputs ---------------------------------------------------------------------------------------------------
def greedy_inputs(ctx, B, n, V, prefixes=None, shift=0.0):
    """logits [B, n + 1, V] (standard normal plus ``shift``) and drafts [B, n] whose agreement with the argmax runs
    for a chosen prefix per row (``prefixes``; default random in 0..n), then disagrees."""
    logits = torch.randn(B, n + 1, V, generator=ctx.gen) + shift
    choice = logits.argmax(-1)
    prefixes = prefixes if prefixes is not None else [ctx.rng.randint(0, n) for _ in range(B)]
    drafts = torch.randint(0, V, (B, n), generator=ctx.gen)
    for b, a in enumerate(prefixes):
        drafts[b, :a] = choice[b, :a]
        if a < n and V > 1:
            drafts[b, a] = (choice[b, a] + 1 + ctx.rng.randrange(V - 1)) % V  # a draft the main model rejects
        for i in range(a + 1, n):  # after a rejection the drafts agree or not: it must not matter
            if ctx.rng.random() < 0.5:
                drafts[b, i] = choice[b, i]
    return drafts, logits, prefixes


def distributions(ctx, shape, V, temperature=1.0, zeros=0):
    """Softmax rows [*shape, V]; ``zeros`` entries per row set to probability 0 (a top-k-truncated distribution)."""
    logits = torch.randn(*shape, V, generator=ctx.gen) * 2.0 / temperature
    if zeros:
        drop = torch.rand(*shape, V, generator=ctx.gen).argsort(-1)[..., :zeros]
        logits = logits.scatter(-1, drop, float("-inf"))
    return logits.softmax(-1)


def round_inputs(ctx, B, n, V, zeros=0):
    """p [B, n + 1, V], q [B, n, V], drafts drawn from q, u [B, n], r [B]."""
    p = distributions(ctx, (B, n + 1), V, zeros=zeros)
    q = distributions(ctx, (B, n), V)
    drafts = torch.multinomial(q.reshape(-1, V), 1, generator=ctx.gen).reshape(B, n)
    u = torch.rand(B, n, generator=ctx.gen)
    r = torch.rand(B, generator=ctx.gen)
    return drafts, p, q, u, r


# -- the definitions, one row and one draft at a time (float64) -------------------------------------------------
def greedy_oracle(drafts, logits):
    acc, nxt = [], []
    for d, lg in zip(drafts.tolist(), logits.double()):
        choice = lg.argmax(-1).tolist()
        a = 0
        while a < len(d) and d[a] == choice[a]:
            a += 1
        acc.append(a)
        nxt.append(choice[a])
    return torch.tensor(acc), torch.tensor(nxt)


def residual_oracle(p, q):
    shape, V = p.shape[:-1], p.shape[-1]
    out = []
    for pr, qr in zip(p.reshape(-1, V).double(), q.reshape(-1, V).double()):
        excess = [max(0.0, a - b) for a, b in zip(pr.tolist(), qr.tolist())]
        total = sum(excess)
        out.append([e / total for e in excess] if total > 0 else pr.tolist())
    return torch.tensor(out, dtype=torch.float64).reshape(*shape, V).to(p.dtype)


def rejection_oracle(drafts, p, q, u):
    acc = []
    for b, d in enumerate(drafts.tolist()):
        a = 0
        while a < len(d) and float(u[b, a]) * float(q[b, a, d[a]]) < float(p[b, a, d[a]]):
            a += 1
        acc.append(a)
    return torch.tensor(acc)


def sample_oracle(drafts, p, q, u, r):
    acc = rejection_oracle(drafts, p, q, u)
    n, nxt = drafts.shape[1], []
    for b, a in enumerate(acc.tolist()):
        dist = residual_oracle(p[b, a], q[b, a]).double() if a < n else p[b, n].double()
        cdf = dist.cumsum(0)
        t = int((cdf <= float(r[b])).sum())  # the first token whose cumulative probability exceeds r
        nxt.append(min(t, dist.numel() - 1))
    return acc, torch.tensor(nxt)


def r_away_from_edges(r, p, q, drafts, u, margin=1e-4):
    """Move each r off the cumulative-probability boundaries of its row's distribution, so that float32 and float64
    sums cannot fall on two sides of it."""
    acc = rejection_oracle(drafts, p, q, u)
    last = q.shape[1]  # n: p has one more position than q
    r = r.clone()
    for b, a in enumerate(acc.tolist()):
        dist = residual_oracle(p[b, a], q[b, a]).double() if a < last else p[b, last].double()
        for edge in dist.cumsum(0).tolist():
            if abs(float(r[b]) - edge) < margin:
                r[b] = edge - 2 * margin if edge - 2 * margin > 0 else edge + 2 * margin
    return r


# -- comparisons ------------------------------------------------------------------------------------------------
def compare_greedy(ctx, B, n, V, prefixes=None, fn="greedy_accept", shift=0.0):
    drafts, logits, prefixes = greedy_inputs(ctx, B, n, V, prefixes, shift)
    ctx.note_inputs(
        f"B={B}, n={n}, V={V}; drafts agree with the argmax for the first {prefixes} positions"
        + (f"; logits shifted by {shift} (all negative)" if shift < -6 else "")
    )
    accepted, nxt = ctx.expect_tuple(f"{fn}(...)", ctx.call(fn, drafts, logits), 2)
    want_acc, want_next = greedy_oracle(drafts, logits)
    ctx.expect_tensor("accepted", accepted, want_acc)
    ctx.expect_tensor("next_token", nxt, want_next)


def compare_residual(ctx, shape, V, same_rows=0):
    p = distributions(ctx, shape, V)
    q = distributions(ctx, shape, V)
    if same_rows:
        q.reshape(-1, V)[:same_rows] = p.reshape(-1, V)[:same_rows]
    ctx.note_inputs(f"p, q {[*shape, V]}" + (f"; the first {same_rows} row(s) of q equal p" if same_rows else ""))
    ctx.expect_tensor("residual_distribution(p, q)", ctx.call("residual_distribution", p, q), residual_oracle(p, q),
                      tol=TOL)  # fmt: skip


def compare_rejection(ctx, B, n, V, zeros=0, zero_u=False):
    drafts, p, q, u, _ = round_inputs(ctx, B, n, V, zeros)
    if zero_u:
        u[::2] = 0.0  # u = 0 accepts any draft the main model could produce, and no other
    ctx.note_inputs(
        f"B={B}, n={n}, V={V}; drafts drawn from q"
        + (f"; {zeros} zeros in each p row" if zeros else "")
        + ("; u = 0 in every other row" if zero_u else "")
    )
    ctx.expect_tensor("accepted", ctx.call("rejection_accept", drafts, p, q, u), rejection_oracle(drafts, p, q, u))


def compare_sample(ctx, B, n, V, zeros=0):
    drafts, p, q, u, r = round_inputs(ctx, B, n, V, zeros)
    r = r_away_from_edges(r, p, q, drafts, u)
    ctx.note_inputs(f"B={B}, n={n}, V={V}; drafts drawn from q")
    got = ctx.expect_tuple("speculative_sample(...)", ctx.call("speculative_sample", drafts, p, q, u, r), 2)
    want_acc, want_next = sample_oracle(drafts, p, q, u, r)
    ctx.expect_tensor("accepted", got[0], want_acc)
    ctx.expect_tensor("next_token", got[1], want_next)


def rollback_inputs(ctx, B, T, H, K, V):
    gen = ctx.gen
    q = torch.randn(B, T, H, K, generator=gen)
    k = F.normalize(torch.randn(B, T, H, K, generator=gen), dim=-1)
    v = torch.randn(B, T, H, V, generator=gen)
    g = F.logsigmoid(torch.randn(B, T, H, generator=gen) + 2.0)
    beta = torch.rand(B, T, H, generator=gen)
    state = torch.randn(B, H, K, V, generator=gen)
    return state, q, k, v, g, beta


def compare_rollback(ctx, B, T, H, K, V, accepted):
    from glmkit.ops.delta_rule import gated_delta_rule_reference

    state, q, k, v, g, beta = rollback_inputs(ctx, B, T, H, K, V)
    accepted = torch.tensor(accepted, dtype=torch.int64)
    ctx.note_inputs(f"B={B}, T={T} verified tokens, H={H}, K={K}, V={V}; accepted={accepted.tolist()}")
    o, kept = ctx.expect_tuple("verify_with_rollback(...)", ctx.call("verify_with_rollback", state, q, k, v, g, beta,
                                                                      accepted), 2)  # fmt: skip
    d = [t.double() for t in (q, k, v, g, beta)]
    want_o, _ = gated_delta_rule_reference(*d, scale=1.0, initial_state=state.double())
    ctx.expect_tensor("o (every verified token's output)", o, want_o.float(), tol=TOL)
    rows = []
    for b, a in enumerate(accepted.tolist()):  # recompute from the kept tokens alone
        _, s = gated_delta_rule_reference(
            *(t[b : b + 1, : a + 1] for t in d), scale=1.0, initial_state=state[b : b + 1].double(),
            output_final_state=True,
        )  # fmt: skip
        rows.append(s[0])
    ctx.expect_tensor("kept (the state after x and the accepted drafts)", kept, torch.stack(rows).float(), tol=TOL)


# -- public checks ----------------------------------------------------------------------------------------------
@Check(
    points=2,
    timeout=20,
    title="greedy: accepted prefix and next token",
    message=(
        "accepted[b] counts the LEADING drafts equal to the main model's argmax (stop at the first disagreement: "
        "later drafts never count, even when they happen to agree), and next_token[b] is the argmax at position "
        "accepted[b] — the correction at the first rejection, or the bonus at position n."
    ),
)
def greedy_prefix(ctx):
    compare_greedy(ctx, 6, 4, 23, prefixes=[0, 1, 2, 3, 4, ctx.rng.randint(0, 4)])


@Check(
    points=2,
    timeout=20,
    title="residual distribution",
    message=(
        "The residual is the positive part of p − q, max(0, p − q), divided by its sum over the vocabulary (the "
        "last dimension), for every row of any leading shape."
    ),
)
def residual_random(ctx):
    compare_residual(ctx, (3, 4), 17)


@Check(
    points=3,
    timeout=20,
    title="rejection rule: accepted drafts",
    message=(
        "Draft i + 1 (drafts[:, i]) is accepted when u[:, i] · q[:, i, d] < p[:, i, d], with d the draft itself: "
        "read p at position i of the verify and q at the draft's own position. Count only the leading accepted "
        "drafts."
    ),
)
def rejection_random(ctx):
    compare_rejection(ctx, 64, 3, 11)


@Check(
    points=2,
    timeout=20,
    title="one sampled round: the token after the accepted drafts",
    message=(
        "After a accepted drafts: if a < n, draw the next token from the residual of p and q at position a (the "
        "first rejected draft's position); if a = n, from p at position n (the bonus). Draw with the given "
        "sample_from(dist, r), one r per row."
    ),
)
def sample_round(ctx):
    compare_sample(ctx, 64, 2, 9)


@Check(
    points=2,
    timeout=30,
    title="one sampled round keeps the main model's distribution",
    message=(
        "Thousands of rows of the same round: the first token each row commits (draft 1 if accepted, else the "
        "replacement) must follow p at position 0, the main model's distribution. Accepting with min(1, p/q) and "
        "replacing a rejected draft by a draw from the residual — not from p, not from q — is what makes it so."
    ),
)
def sample_keeps_distribution(ctx):
    R, n, V = 20000, 2, 6
    p1 = distributions(ctx, (1, n + 1), V)
    q1 = distributions(ctx, (1, n), V)
    p, q = p1.expand(R, -1, -1).contiguous(), q1.expand(R, -1, -1).contiguous()
    drafts = torch.multinomial(q.reshape(-1, V), 1, replacement=True, generator=ctx.gen).reshape(R, n)
    u, r = torch.rand(R, n, generator=ctx.gen), torch.rand(R, generator=ctx.gen)
    ctx.note_inputs(f"{R} rows of one round, n={n}, V={V}; p[0] = {[round(x, 3) for x in p1[0, 0].tolist()]}")
    accepted, nxt = ctx.expect_tuple("speculative_sample(...)", ctx.call("speculative_sample", drafts, p, q, u, r), 2)
    if not isinstance(accepted, torch.Tensor) or not isinstance(nxt, torch.Tensor) or accepted.shape != (R,):
        ctx.fail("speculative_sample should return two [B] int64 tensors", f"got {type(accepted).__name__}")
    first = torch.where(accepted > 0, drafts[:, 0], nxt)
    freq = torch.bincount(first.clamp(0, V - 1), minlength=V).double() / R
    chi2 = float(((freq - p1[0, 0].double()) ** 2 / p1[0, 0].double()).sum() * R)
    if chi2 > 30.0:  # 5 degrees of freedom: a correct rule exceeds it with probability ≈ 1.5e-5
        ctx.fail(
            "the first committed token does not follow p at position 0",
            f"frequencies {[round(x, 3) for x in freq.tolist()]} vs p {[round(x, 3) for x in p1[0, 0].tolist()]} "
            f"(chi-square {chi2:.1f} over {V - 1} degrees of freedom)",
        )


@Check(
    points=3,
    timeout=30,
    title="rollback: each row keeps the state after its accepted drafts",
    message=(
        "Run gated_delta_step over all T verified tokens (o needs every one), keeping the state after each token; "
        "row b keeps the state after its first accepted[b] + 1 tokens (x, then its accepted drafts). Rows kept "
        "different numbers of drafts: pick each row's own snapshot."
    ),
)
def rollback_rows(ctx):
    compare_rollback(ctx, 4, 4, 2, 8, 4, [0, 3, 1, ctx.rng.randint(0, 3)])


@Check(
    points=3,
    timeout=90,
    title="kernel: greedy acceptance, V not a power of two",
    message=(
        "One program per row: for i = 0..n, load logits[b, i] with the columns >= V masked to -inf (logits can all "
        "be negative: a padding column read as 0 would win the argmax), take "
        "tl.argmax, compare with drafts[b, i] while every earlier draft agreed; the first disagreement's argmax "
        "(or position n's) is the next token. Launch B programs with BV = next_power_of_2(V)."
    ),
)
def kernel_greedy(ctx):
    compare_greedy(ctx, 5, 3, 50, prefixes=[0, 3, 1, 2, ctx.rng.randint(0, 3)], fn="greedy_accept_triton", shift=-8.0)
