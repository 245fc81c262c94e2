"""Exercise 08 — speculative decoding: the acceptance rule (greedy, and rejection sampling with its residual
distribution), the rollback of a recurrent layer's state after a verify, and the greedy acceptance as a Triton
kernel.

Lesson 08 ran speculative decoding with glmkit and derived its rules. Here you write them for a batch of B rows at
once, as a library needs them. One round: the drafter proposed n tokens per row, ``drafts`` [B, n] (int64); the main
model's verify forward over [x, d_1, …, d_n] gave its output at n + 1 positions: position i (0 ≤ i < n) is its
choice for the place where draft i + 1 stands, and position n is the token after the last draft.

1. ``greedy_accept(drafts, logits)`` — logits [B, n + 1, V]. Returns ``(accepted, next_token)``, both [B] int64:

       accepted[b]   = the length of the longest prefix of drafts[b] that equals argmax(logits[b, :n], -1)
       next_token[b] = argmax(logits[b, accepted[b]])  the main model's own token after the accepted drafts: its
                       correction at the first rejection, or the bonus token when all n drafts were accepted

   The round commits drafts[b, :accepted[b]] followed by next_token[b]: accepted[b] + 1 tokens.

2. ``residual_distribution(p, q)`` — p, q [..., V] (each row sums to 1). Returns norm(max(0, p − q)): the positive
   part of p − q, divided by its sum, row by row. Where that sum is 0 (p and q are the same distribution) the row
   is p itself.

3. ``rejection_accept(drafts, p, q, u)`` — p [B, n + 1, V]: the main model's distributions; q [B, n, V]: the
   drafter's (draft i + 1 was drawn from q[:, i]); u [B, n]: uniform numbers in [0, 1), one per draft. Draft i + 1 is
   accepted when

       u[b, i] · q[b, i, d] < p[b, i, d]        (d = drafts[b, i]: probability min(1, p(d) / q(d)))

   and every draft before it was accepted. Returns ``accepted`` [B] int64, the number of leading accepted drafts.

4. ``speculative_sample(drafts, p, q, u, r)`` — r [B] uniform in [0, 1). Returns ``(accepted, next_token)`` [B]
   int64: ``accepted`` as in part 3, and the token after the accepted drafts drawn with the given
   ``sample_from(dist, r)`` from

       dist = residual_distribution(p[b, a], q[b, a])    if a = accepted[b] < n   (the first rejected position)
       dist = p[b, n]                                    if a = n                 (all accepted: the bonus token)

   Every committed token then follows the main model's distribution exactly (lesson 08, section 3).

5. ``verify_with_rollback(state, q, k, v, g, beta, accepted)`` — a Gated DeltaNet layer in the verify forward.
   state [B, H, K, V] float32: the layer's state before the round; q, k [B, T, H, K], v [B, T, H, V], g and beta
   [B, T, H]: the T = n + 1 verified tokens; accepted [B] int64. Run the given ``gated_delta_step`` over the T tokens
   (the verify needs every token's output) and return ``(o [B, T, H, V], kept [B, H, K, V])``: kept[b] is the state
   after row b's first accepted[b] + 1 tokens — x and the accepted drafts — as if the rejected drafts had never been
   fed. The update cannot be undone, so keep the states as you go; do not run the recurrence a second time. Do not
   change ``state`` in place.

6. The greedy rule in Triton: ``greedy_accept_kernel`` does part 1 for one row per program (argmax over the
   vocabulary of each of the n + 1 positions, compared with the drafts as it goes), and ``greedy_accept_triton``
   launches it. V need not be a power of two (mask it).

The notebook ex08.ipynb walks through the parts; write them here, then run ``self_check()`` there (or
``python -m glmkit.grading check`` in this folder). Do not import ``glmkit.speculative``, ``glmkit.generate``,
``glmkit.cache`` or the delta-rule code (``glmkit.ops.delta_rule``, ``glmkit.mixers.gdn``): they are the references,
and the grader does not make them importable (such a submission scores zero). torch, triton and plain Python are
fine.

Without a GPU the kernel runs under the Triton interpreter (exact, slow: keep test shapes small). The lines below
select it before triton is imported; on a CUDA machine the same code compiles natively.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must be set before triton is imported

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

# ----------------------------------------------------------------------------------------------------
# Given: an inverse-CDF draw and one token of Gated DeltaNet
# ----------------------------------------------------------------------------------------------------


def sample_from(dist: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """One token per row: dist [B, V] (rows sum to 1), r [B] uniform in [0, 1) → [B] int64, the first token whose
    cumulative probability exceeds r (a draw from dist when r is uniform)."""
    cdf = dist.cumsum(-1)
    token = torch.searchsorted(cdf, r[:, None].to(cdf.dtype), right=True).squeeze(-1)
    return token.clamp_max(dist.shape[-1] - 1)  # r just below 1 against a cdf that rounds below 1


def gated_delta_step(
    state: torch.Tensor, q_t: torch.Tensor, k_t: torch.Tensor, v_t: torch.Tensor, g_t: torch.Tensor, beta_t
) -> tuple[torch.Tensor, torch.Tensor]:
    """One token of Gated DeltaNet for every row and head (lesson 07): state [B, H, K, V]; q_t, k_t [B, H, K];
    v_t [B, H, V]; g_t, beta_t [B, H] → (o_t [B, H, V], the new state). Decay, write the error, read."""
    state = state * g_t.exp()[..., None, None]
    error = v_t - torch.einsum("bhkv,bhk->bhv", state, k_t)
    state = state + k_t[..., :, None] * (beta_t[..., None] * error)[..., None, :]
    return torch.einsum("bhkv,bhk->bhv", state, q_t), state


# ----------------------------------------------------------------------------------------------------
# Part 1 — greedy acceptance
# ----------------------------------------------------------------------------------------------------


def greedy_accept(drafts: torch.Tensor, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The greedy rule (see the module docstring, part 1).

    drafts: [B, n] int64; logits: [B, n + 1, V] float. Returns ``(accepted [B], next_token [B])``, int64.
    """
    # BEGIN SOLUTION
    choice = logits.argmax(-1)  # [B, n + 1]: the main model's token at every position
    n = drafts.shape[1]
    agree = (drafts == choice[:, :n]).long()
    accepted = agree.cumprod(-1).sum(-1)  # leading agreements only
    return accepted, choice.gather(1, accepted[:, None]).squeeze(1)  # the token after the accepted drafts
    # END SOLUTION


# ----------------------------------------------------------------------------------------------------
# Part 2 — the residual distribution
# ----------------------------------------------------------------------------------------------------


def residual_distribution(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """norm(max(0, p − q)) over the last dim, p where that is all zeros (see the module docstring, part 2).

    p, q: [..., V] float, rows summing to 1. Returns [..., V], the dtype of p.
    """
    # BEGIN SOLUTION
    excess = (p - q).clamp_min(0)
    total = excess.sum(-1, keepdim=True)
    return torch.where(total > 0, excess / total.clamp_min(torch.finfo(p.dtype).tiny), p)
    # END SOLUTION


# ----------------------------------------------------------------------------------------------------
# Part 3 — the rejection-sampling acceptance
# ----------------------------------------------------------------------------------------------------


def rejection_accept(drafts: torch.Tensor, p: torch.Tensor, q: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """How many leading drafts the rejection rule accepts (see the module docstring, part 3).

    drafts [B, n] int64; p [B, n + 1, V]; q [B, n, V]; u [B, n]. Returns ``accepted`` [B] int64.
    """
    # BEGIN SOLUTION
    n = drafts.shape[1]
    p_draft = p[:, :n].gather(-1, drafts[..., None]).squeeze(-1)  # p(d_i) at its own position
    q_draft = q.gather(-1, drafts[..., None]).squeeze(-1)
    keep = (u * q_draft < p_draft).long()
    return keep.cumprod(-1).sum(-1)
    # END SOLUTION


# ----------------------------------------------------------------------------------------------------
# Part 4 — one sampled round
# ----------------------------------------------------------------------------------------------------


def speculative_sample(
    drafts: torch.Tensor, p: torch.Tensor, q: torch.Tensor, u: torch.Tensor, r: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The accepted count and the token after the accepted drafts (see the module docstring, part 4).

    drafts [B, n] int64; p [B, n + 1, V]; q [B, n, V]; u [B, n]; r [B]. Returns ``(accepted, next_token)``, [B]
    int64 each. Use your ``rejection_accept``, ``residual_distribution`` and the given ``sample_from``.
    """
    # BEGIN SOLUTION
    accepted = rejection_accept(drafts, p, q, u)
    rows = torch.arange(drafts.shape[0], device=drafts.device)
    p_at = p[rows, accepted]  # [B, V]: the main model at the first rejected position (or after the last draft)
    q_ext = torch.cat([q, torch.zeros_like(q[:, :1])], 1)  # no draft after position n: q = 0 there
    rejected = (accepted < drafts.shape[1])[:, None]  # a < n: replace the first rejected draft
    dist = torch.where(rejected, residual_distribution(p_at, q_ext[rows, accepted]), p_at)
    return accepted, sample_from(dist, r)
    # END SOLUTION


# ----------------------------------------------------------------------------------------------------
# Part 5 — the rollback of a recurrent layer
# ----------------------------------------------------------------------------------------------------


def verify_with_rollback(
    state: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    accepted: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Every verified token's output, and each row's state after its kept tokens (see the module docstring, part 5).

    state [B, H, K, V] float32; q, k [B, T, H, K]; v [B, T, H, V]; g, beta [B, T, H]; accepted [B] int64 in
    [0, T − 1]. Returns ``(o [B, T, H, V], kept [B, H, K, V])``, float32.
    """
    # BEGIN SOLUTION
    outputs, states = [], []
    for t in range(q.shape[1]):
        o_t, state = gated_delta_step(state, q[:, t], k[:, t], v[:, t], g[:, t], beta[:, t])
        outputs.append(o_t)
        states.append(state)  # a snapshot after every token: the rollback picks one
    snapshots = torch.stack(states, 1)  # [B, T, H, K, V]
    kept = snapshots[torch.arange(q.shape[0], device=q.device), accepted]  # after accepted + 1 tokens
    return torch.stack(outputs, 1), kept
    # END SOLUTION


# ----------------------------------------------------------------------------------------------------
# Part 6 — greedy acceptance in Triton
# ----------------------------------------------------------------------------------------------------


@triton.jit
def greedy_accept_kernel(
    LOGITS,  # pointer: logits [B, n + 1, V] float32, contiguous
    DRAFTS,  # pointer: drafts [B, n] int64, contiguous
    ACCEPTED,  # pointer: out [B] int64 (arbitrary values on entry)
    NEXT,  # pointer: out [B] int64 (arbitrary values on entry)
    n,  # drafts per row (>= 1)
    V,  # vocabulary size
    BV: tl.constexpr,  # a power of two >= V
):
    """Program b handles row b: for positions i = 0 .. n, in order, load logits[b, i] (masked: columns >= V are
    padding, read as -inf), take its argmax, and compare it with drafts[b, i] (i < n). Count the leading agreements;
    at the first disagreement, or at position n when every draft agreed, that position's argmax is the next token.
    Store both. Element (b, i, j) of logits is at (b·(n + 1) + i)·V + j."""
    # BEGIN SOLUTION
    b = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BV)
    accepted = tl.zeros((), dtype=tl.int64)
    nxt = tl.zeros((), dtype=tl.int64)
    alive = tl.full((), 1, dtype=tl.int64)  # 1 while every draft so far was accepted
    for i in range(0, n + 1):
        row = tl.load(LOGITS + (b * (n + 1) + i) * V + cols, mask=cols < V, other=float("-inf"))
        choice = tl.argmax(row, axis=0).to(tl.int64)
        draft = tl.load(DRAFTS + b * n + tl.minimum(i, n - 1))
        draft = tl.where(i < n, draft, -1)  # after the last draft nothing can agree: the bonus token
        agree = (choice == draft).to(tl.int64) * alive
        nxt = tl.where((alive == 1) & (agree == 0), choice, nxt)
        accepted += agree
        alive = agree
    tl.store(ACCEPTED + b, accepted)
    tl.store(NEXT + b, nxt)
    # END SOLUTION


def greedy_accept_triton(drafts: torch.Tensor, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Part 1 on the kernel: drafts [B, n] int64, logits [B, n + 1, V] float32 → (accepted, next_token) [B] int64.

    Given: the checks of the arguments and the output buffers. Yours: the launch, one program per row.
    """
    if drafts.dtype != torch.int64 or logits.dtype != torch.float32 or logits.shape[1] != drafts.shape[1] + 1:
        raise ValueError("greedy_accept_triton takes drafts [B, n] int64 and logits [B, n + 1, V] float32")
    drafts, logits = drafts.contiguous(), logits.contiguous()
    B, n = drafts.shape
    V = logits.shape[-1]
    accepted = torch.empty(B, dtype=torch.int64, device=logits.device)
    next_token = torch.empty(B, dtype=torch.int64, device=logits.device)
    # BEGIN SOLUTION
    greedy_accept_kernel[(B,)](logits, drafts, accepted, next_token, n, V, BV=triton.next_power_of_2(V))
    # END SOLUTION
    return accepted, next_token
