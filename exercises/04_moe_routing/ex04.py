"""Exercise 04 — GLM-4.5's router, its load balancing, and the token permutation kernel.

Part 1: routing (GLM-4.5 = DeepSeek-V3's router; HF ``Glm4MoeTopkRouter``). From the router logits
``logits = W_r x`` of N tokens over E experts:

    s = sigmoid(logits)                              fp32 scores, each expert on its own, in (0, 1)
    choice = s + b                                   b = e_score_correction_bias [E]: SELECTION ONLY
    (groups) split the E experts into n_group equal groups; a group's score is the sum of the two
             largest ``choice`` values in it; only the topk_group best groups stay eligible
    topk_idx = the top_k eligible experts by ``choice``
    w = s[topk_idx] / (Σ s[topk_idx] + 1e-20) · routed_scaling_factor     ← s, never s + b

Part 2: balancing without an auxiliary loss (DeepSeek-V3 §2.1.2): after a training step, each
expert's bias moves by ``γ · sign(mean_load − load_i)``: underloaded experts become more attractive,
overloaded ones less, and because b never enters the weights the model's output is not distorted.

Part 3: the token permutation kernel, in Triton (what vLLM's ``moe_align_block_size`` computes). The
router's ``topk_idx [N, k]`` is S = N·k *slots*; slot ``s = token·k + j`` is "token s // k, its j-th
expert". A grouped GEMM wants every block of ``block_m`` rows to belong to ONE expert, so the slots are
listed expert by expert, each expert's run padded with the sentinel S up to a multiple of block_m:

    topk_idx (N=4, k=2, E=3)     slots: 0:e2 1:e0  2:e1 3:e2  4:e0 5:e0  6:e2 7:e1
    block_m = 4

    sorted_token_ids   [ 1  4  5  S | 2  7  S  S | 0  3  6  S | S  S ... S ]   S = 8 (the sentinel)
                         ----e0----   ----e1----   ----e2----   empty tail
    expert_ids         [ 0          | 1          | 2          | -1 ... -1  ]   one entry per block
    num_tokens_post_pad = [12] (rows that hold work), counts = [3, 2, 3]

The buffers have the fixed length S_pad = ``padded_size(S, E, block_m)`` (the worst case: every used
expert wastes block_m − 1 rows), so no one has to wait for the counts before allocating them.

Part 4: the routed experts' forward on that layout, in plain torch — what the grouped GEMM does, block by
block (lesson 04 wrote the loop over experts; this is the other way round: a loop over blocks of rows, each
block one expert's). For block b with expert e = expert_ids[b] (−1: an empty block, skip it): its rows are the
slots sorted_token_ids[b·block_m : (b+1)·block_m] (the sentinel S marks padding), slot s is token s // k with
weight topk_weight.flatten()[s]; gather those tokens' rows of x, apply expert e (SwiGLU:
``down_e(silu(gate) · up)``, gate = the FIRST half of ``gate_up_e(x)``), weight each row, add it to its token.

The notebook ex04.ipynb walks through each part; write the functions here, then run ``self_check()``
there (or ``python -m glmkit.grading check`` in this folder). Do not import ``glmkit.moe``,
``glmkit.ops.moe_align`` or ``glmkit.kernels.moe_align``: they are the references you are re-implementing, and
the grader does not make them importable (such a submission scores zero). torch, triton and plain Python are fine.

Without a GPU the kernels run under the Triton interpreter (exact, slow: keep test shapes small). The
lines below select it before triton is imported; on a CUDA machine the same code compiles natively.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must be set before triton is imported

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

NORM_EPS = 1e-20  # added to the sum of the chosen scores (a token whose scores all underflow gets 0, not NaN)
GROUP_TOPK = 2  # a group's score is the sum of its GROUP_TOPK largest biased scores


# ----------------------------------------------------------------------------------------------------
# Part 1 — routing
# ----------------------------------------------------------------------------------------------------


def sigmoid_route(
    logits: torch.Tensor,
    bias: torch.Tensor,
    top_k: int,
    n_group: int = 1,
    topk_group: int = 1,
    routed_scaling_factor: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """GLM-4.5 / DeepSeek-V3 routing of N tokens over E experts.

    logits: [N, E] float32 router logits.
    bias:   [E] float32 ``e_score_correction_bias`` — added to the scores for choosing experts only.
    top_k:  experts per token, 1 <= top_k <= topk_group · E / n_group.
    n_group, topk_group: n_group divides E (each group has >= 2 experts when n_group > 1);
            1 <= topk_group <= n_group. n_group = 1 (or topk_group = n_group) means no group limit.
    routed_scaling_factor: multiplies the normalised weights (GLM-4.5: 2.5, GLM-4.5-Air: 1.0).

    Returns ``(topk_idx [N, top_k] int64, topk_weight [N, top_k] float32)``: the chosen experts of every
    token, in any order within a row, and their weights ALIGNED with them (topk_weight[t, j] belongs to
    expert topk_idx[t, j]).

    Steps: s = sigmoid(logits) (fp32); choice = s + bias; when groups limit the choice, score each group
    by the sum of its 2 largest ``choice`` values, keep the topk_group best groups and make every expert
    of the other groups unchoosable (it must rank below EVERY eligible expert, whatever the sign of
    s + b); topk_idx = the top_k of ``choice``; w = s at topk_idx (the unbiased scores), divided by
    (their sum + NORM_EPS), times routed_scaling_factor.
    """
    # BEGIN SOLUTION
    scores = logits.float().sigmoid()  # s: the weights come from these
    choice = scores + bias.float()  # s + b: for choosing only
    N, E = scores.shape
    if n_group > 1 and topk_group < n_group:
        size = E // n_group
        group_scores = choice.view(N, n_group, size).topk(GROUP_TOPK, dim=-1).values.sum(dim=-1)  # [N, G]
        best = group_scores.topk(topk_group, dim=-1).indices  # [N, tg]
        keep = torch.zeros(N, n_group, dtype=torch.bool).scatter_(1, best, True)
        choice = choice.masked_fill(~keep.repeat_interleave(size, dim=1), float("-inf"))
    topk_idx = choice.topk(top_k, dim=-1).indices
    w = scores.gather(1, topk_idx)
    topk_weight = w / (w.sum(dim=-1, keepdim=True) + NORM_EPS) * routed_scaling_factor
    return topk_idx, topk_weight
    # END SOLUTION


# ----------------------------------------------------------------------------------------------------
# Part 2 — aux-loss-free balancing
# ----------------------------------------------------------------------------------------------------


def balance_bias(bias: torch.Tensor, load: torch.Tensor, gamma: float) -> torch.Tensor:
    """One aux-loss-free balancing step: ``b_i += γ · sign(mean(load) − load_i)``.

    bias:  [E] float32 — the router's ``e_score_correction_bias`` buffer. It is updated IN PLACE and
           returned (the contract of ``glmkit.moe.update_bias``: a training loop passes the module's
           buffer and keeps using it).
    load:  [E] slots per expert since the last step — integer counts or float fractions (only the sign of
           mean − load_i matters; compute the mean in float32).
    gamma: the step size γ (DeepSeek-V3: 0.001), a float >= 0.
    An expert exactly at the mean load keeps its bias (sign(0) = 0); so does every expert when the loads
    are all equal.
    """
    # BEGIN SOLUTION
    load = load.to(torch.float32)
    bias += gamma * torch.sign(load.mean() - load)
    return bias
    # END SOLUTION


# ----------------------------------------------------------------------------------------------------
# Part 3 — the token permutation, in Triton
# ----------------------------------------------------------------------------------------------------


def padded_size(num_slots: int, num_experts: int, block_m: int) -> int:
    """S_pad: the length of ``sorted_token_ids`` — enough for any routing of ``num_slots`` slots over
    ``num_experts`` experts when each used expert pads its run up to a multiple of ``block_m``."""
    worst = num_slots + min(num_experts, num_slots) * (block_m - 1)
    return triton.cdiv(worst, block_m) * block_m


@triton.jit
def count_kernel(
    TOPK,  # pointer: the S expert ids, flattened topk_idx (int64 or int32)
    COUNTS,  # pointer: counts [E] int32, zero on entry
    S,  # number of slots, N·k
    BLOCK: tl.constexpr,  # slots per program
):
    """Program p counts the slots p·BLOCK .. p·BLOCK + BLOCK − 1 (those < S): for each, add 1 to
    COUNTS[its expert]. Several programs — and several lanes of one program — hit the same expert, so
    the additions must be atomic (``tl.atomic_add``, masked to the slots that exist)."""
    # BEGIN SOLUTION
    slots = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    live = slots < S
    e = tl.load(TOPK + slots, mask=live, other=0).to(tl.int32)
    tl.atomic_add(COUNTS + e, tl.full([BLOCK], 1, tl.int32), mask=live)
    # END SOLUTION


@triton.jit
def align_kernel(
    TOPK,  # pointer: the S expert ids (as in count_kernel)
    COUNTS,  # pointer: counts [E] int32, complete (count_kernel has run)
    SORTED,  # pointer: sorted_token_ids [S_PAD] int32 (arbitrary values on entry)
    EXPERT_IDS,  # pointer: expert_ids [S_PAD // BLOCK_M] int32 (arbitrary values on entry)
    NTPP,  # pointer: num_tokens_post_pad [1] int32
    S,
    E,
    S_PAD,  # slots, experts, the buffers' length
    BLOCK_M: tl.constexpr,  # the GEMM's row block (a power of two)
    E_P2: tl.constexpr,  # a power of two >= E (to load all the counts at once)
    BLOCK: tl.constexpr,  # slots per step when scanning the slots
):
    """Program e lays out expert e's run; every position of SORTED and EXPERT_IDS must be written by
    some program (the checks pre-fill them with garbage).

    1. Load all E counts; padded = counts rounded UP to a multiple of BLOCK_M (0 stays 0). Expert e's
       run starts at start_e = Σ_{i<e} padded_i (an exclusive prefix sum); the total Σ padded_i is
       num_tokens_post_pad.
    2. Scan the slots in steps of BLOCK, in order; the slots of expert e go to SORTED[start_e],
       SORTED[start_e + 1], ... (a slot's place: how many slots of expert e came before it —
       ``tl.cumsum`` inside the step, plus a running count carried between steps). Store the slot id.
    3. The padded_e − counts_e positions after them get the sentinel S.
    4. The padded_e / BLOCK_M blocks of the run get expert id e in EXPERT_IDS (block b covers rows
       b·BLOCK_M .. b·BLOCK_M + BLOCK_M − 1).
    5. Program 0 also writes NTPP[0] = total, the sentinel S at every row from total to S_PAD − 1 and
       −1 in every block from total / BLOCK_M on (the empty tail).
    """
    # BEGIN SOLUTION
    e = tl.program_id(0)
    experts = tl.arange(0, E_P2)
    counts = tl.load(COUNTS + experts, mask=experts < E, other=0)
    padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    start = tl.sum(tl.where(experts < e, padded, 0), axis=0)
    total = tl.sum(padded, axis=0)
    my_count = tl.sum(tl.where(experts == e, counts, 0), axis=0)
    my_padded = tl.sum(tl.where(experts == e, padded, 0), axis=0)

    row = start  # where expert e's next slot goes
    for s0 in range(0, S, BLOCK):
        slots = s0 + tl.arange(0, BLOCK)
        ids = tl.load(TOPK + slots, mask=slots < S, other=-1).to(tl.int32)
        mine = (ids == e).to(tl.int32)
        place = row + tl.cumsum(mine, axis=0) - mine  # earlier slots of e, this step included
        tl.store(SORTED + place, slots.to(tl.int32), mask=mine != 0)
        row += tl.sum(mine, axis=0)

    pad_rows = start + my_count + tl.arange(0, BLOCK_M)  # fewer than BLOCK_M sentinels per run
    tl.store(SORTED + pad_rows, tl.full([BLOCK_M], 0, tl.int32) + S, mask=pad_rows < start + my_padded)
    for b in range(start // BLOCK_M, (start + my_padded) // BLOCK_M):
        tl.store(EXPERT_IDS + b, e)

    if e == 0:
        tl.store(NTPP, total)
        for r0 in range(total, S_PAD, BLOCK):
            rows = r0 + tl.arange(0, BLOCK)
            tl.store(SORTED + rows, tl.full([BLOCK], 0, tl.int32) + S, mask=rows < S_PAD)
        for b0 in range(total // BLOCK_M, S_PAD // BLOCK_M, BLOCK):
            blocks = b0 + tl.arange(0, BLOCK)
            tl.store(EXPERT_IDS + blocks, tl.full([BLOCK], -1, tl.int32), mask=blocks < S_PAD // BLOCK_M)
    # END SOLUTION


def moe_align(
    topk_idx: torch.Tensor,
    num_experts: int,
    block_m: int,
    out: torch.Tensor | None = None,
    out_expert_ids: torch.Tensor | None = None,
):
    """Sort the N·k routed slots by expert and pad each expert's run to a multiple of ``block_m``.

    topk_idx:    [N, k] int64 or int32 expert ids in [0, num_experts), N·k >= 1.
    num_experts: E; block_m: a power of two (the grouped GEMM's BLOCK_M).
    out, out_expert_ids: optional int32 buffers of the two outputs' shapes to write into (the checks pass
                 buffers full of garbage: every element must be written); None = allocate.
    Returns ``(sorted_token_ids [S_pad] int32, expert_ids [S_pad // block_m] int32,
    num_tokens_post_pad [1] int32, counts [E] int32)`` — see the module docstring. Within an expert's
    run, any order of its slots is accepted (the reference keeps them increasing).

    Given: the checks of the arguments and the buffers. Yours: launch ``count_kernel`` over the slots
    (how many programs?), then ``align_kernel`` with one program per expert, passing ``E_P2`` =
    ``triton.next_power_of_2(E)`` and the block sizes.
    """
    if not isinstance(topk_idx, torch.Tensor) or topk_idx.dim() != 2 or topk_idx.numel() == 0:
        raise ValueError(f"topk_idx must be a non-empty [N, k] tensor, got {getattr(topk_idx, 'shape', topk_idx)}")
    if topk_idx.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"topk_idx must be int64 or int32, got {topk_idx.dtype}")
    if block_m < 1 or block_m & (block_m - 1):
        raise ValueError(f"block_m must be a power of two, got {block_m}")
    dev = topk_idx.device
    S, E = topk_idx.numel(), num_experts
    S_pad = padded_size(S, E, block_m)
    flat = topk_idx.reshape(-1).contiguous()  # [S]: slot s → its expert
    sorted_ids = torch.empty(S_pad, dtype=torch.int32, device=dev) if out is None else out
    expert_ids = (
        torch.empty(S_pad // block_m, dtype=torch.int32, device=dev) if out_expert_ids is None else out_expert_ids
    )
    if sorted_ids.shape != (S_pad,) or expert_ids.shape != (S_pad // block_m,):
        raise ValueError(f"out must be [{S_pad}] and out_expert_ids [{S_pad // block_m}] (int32)")
    num_tokens_post_pad = torch.zeros(1, dtype=torch.int32, device=dev)
    counts = torch.zeros(E, dtype=torch.int32, device=dev)  # zeros: count_kernel adds into it
    BLOCK = 64  # slots per program / per scan step
    # BEGIN SOLUTION
    count_kernel[(triton.cdiv(S, BLOCK),)](flat, counts, S, BLOCK=BLOCK)
    align_kernel[(E,)](
        flat,
        counts,
        sorted_ids,
        expert_ids,
        num_tokens_post_pad,
        S,
        E,
        S_pad,
        BLOCK_M=block_m,
        E_P2=triton.next_power_of_2(E),
        BLOCK=BLOCK,
    )
    # END SOLUTION
    return sorted_ids, expert_ids, num_tokens_post_pad, counts


# ----------------------------------------------------------------------------------------------------
# Part 4 — the routed experts on the permutation's blocks (plain torch)
# ----------------------------------------------------------------------------------------------------


def grouped_experts(
    x: torch.Tensor,
    topk_weight: torch.Tensor,
    w_gate_up: torch.Tensor,
    w_down: torch.Tensor,
    sorted_token_ids: torch.Tensor,
    expert_ids: torch.Tensor,
    block_m: int,
) -> torch.Tensor:
    """y [N, H] = Σ over each token's k slots of weight · expert(x[token]), computed block by block.

    x:           [N, H] float32; topk_weight [N, k] float32 (slot s = token·k + j has weight topk_weight[s // k, j]).
    w_gate_up:   [E, 2I, H] (rows 0..I−1 the gate, I..2I−1 the up projection); w_down [E, H, I].
    sorted_token_ids [S_pad] int32, expert_ids [S_pad // block_m] int32: ``moe_align``'s layout (S = N·k is the
                 sentinel: a padding row that carries no slot; expert −1: a block past the used ones).
    Returns y [N, H] float32. A token nobody routes anywhere (k = 0 never happens) would get 0.
    """
    # BEGIN SOLUTION
    N, k = topk_weight.shape
    S = N * k
    flat_w = topk_weight.reshape(-1)
    y = torch.zeros(N, x.shape[1], dtype=torch.float32)
    for b in range(expert_ids.numel()):
        e = int(expert_ids[b])
        if e < 0:
            continue
        rows = sorted_token_ids[b * block_m : (b + 1) * block_m].long()
        rows = rows[rows < S]  # drop the padding
        tokens = rows // k
        gate, up = (x[tokens] @ w_gate_up[e].T).chunk(2, dim=-1)
        out = (torch.nn.functional.silu(gate) * up) @ w_down[e].T
        y.index_add_(0, tokens, out * flat_w[rows, None])
    return y
    # END SOLUTION
