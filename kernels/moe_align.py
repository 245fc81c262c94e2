"""Token permutation for the grouped MoE GEMMs (lesson 04): sort routed slots by expert, pad each expert's
run of slots to a multiple of the GEMM's row block.

What it computes (the contract of vLLM's ``moe_align_block_size``, re-derived here): the router picks k
experts per token, ``topk_idx [N, k]``. Flattened, that is S = N·k *slots*; slot ``s = token·k + j`` is
"token s // k, its j-th expert". The grouped GEMM wants each row block of BLOCK_M rows to belong to ONE
expert, so the slots are listed expert by expert, each expert's list padded with a sentinel (S, one past
the last slot) up to a multiple of BLOCK_M:

    topk_idx (N=4, k=2, E=3)     slots: 0:e2 1:e0  2:e1 3:e2  4:e0 5:e0  6:e2 7:e1
    block_m = 4

    sorted_token_ids   [ 1  4  5  S | 2  7  S  S | 0  3  6  S | S  S ... S ]   S = 8 (sentinel)
                         ----e0----   ----e1----   ----e2----   empty tail
    expert_ids         [ 0          | 1          | 2          | -1 ... -1  ]   one entry per block
    num_tokens_post_pad = 12 (blocks that hold work), counts = [3, 2, 3]

Within an expert the slots appear in increasing slot id (deterministic, unlike vLLM's atomic scatter).
The buffers have a fixed size S_pad = S + min(E, S)·(BLOCK_M − 1) rounded up to BLOCK_M (the worst
case: every used expert wastes BLOCK_M − 1 rows), so nothing here syncs with the host: the GEMM grids
cover S_pad / BLOCK_M blocks and blocks at or past ``num_tokens_post_pad`` exit at once.

How (three launches, no host sync, no sort):
  1. ``_count_kernel`` — programs of CHUNK slots: histogram with atomics, into ``counts [E]`` and into
     ``chunk_counts [C, E]`` (one row per chunk; integer atomics, so the result is deterministic).
  2. ``_offsets_kernel`` — one program per expert: padded sizes and their exclusive prefix sum give the
     expert's first row ``start_e``; a scan down its column of ``chunk_counts`` gives where each chunk's
     slots of that expert begin; it writes its ``expert_ids`` blocks and its padding sentinels (program
     0 also the empty tail and ``num_tokens_post_pad``).
  3. ``_scatter_kernel`` — programs of CHUNK slots: a slot's rank among the earlier slots of its chunk
     with the same expert (a CHUNK×CHUNK comparison), plus its chunk's base, is its row. Every position
     of ``sorted_token_ids`` is written exactly once (tests pass NaN-poisoned-style buffers).

``glmkit.ops.moe_align.moe_align_reference`` is the same contract in plain torch (a stable argsort).
Runs natively on CUDA and under the Triton interpreter on CPU tensors.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from glmkit.backend import require_kernel_device
from glmkit.ops.moe_align import padded_size


@triton.jit
def _count_kernel(
    TOPK,
    COUNTS,
    CHUNK_COUNTS,
    S,
    E,
    CHUNK: tl.constexpr,
):
    c = tl.program_id(0)
    offs = c * CHUNK + tl.arange(0, CHUNK)
    in_range = offs < S
    e = tl.load(TOPK + offs, mask=in_range, other=-1).to(tl.int32)
    ok = in_range & (e >= 0) & (e < E)  # ids outside [0, E) are dropped (the wrapper can check)
    ones = tl.full([CHUNK], 1, dtype=tl.int32)
    tl.atomic_add(COUNTS + e, ones, mask=ok)
    tl.atomic_add(CHUNK_COUNTS + c.to(tl.int64) * E + e, ones, mask=ok)


@triton.jit
def _offsets_kernel(
    COUNTS,
    CHUNK_COUNTS,
    CHUNK_BASE,
    SORTED,
    EXPERT_IDS,
    NTPP,
    S,
    E,
    NUM_CHUNKS,
    S_PAD,
    BLOCK_M: tl.constexpr,
    E_P2: tl.constexpr,  # next power of two >= E
    SCAN: tl.constexpr,  # chunks per step of the column scan
    FILL: tl.constexpr,  # elements per step of the tail fills
):
    e = tl.program_id(0)
    offs_e = tl.arange(0, E_P2)
    counts = tl.load(COUNTS + offs_e, mask=offs_e < E, other=0)
    padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    start = tl.sum(tl.where(offs_e < e, padded, 0), axis=0)  # exclusive prefix sum at e
    total = tl.sum(padded, axis=0)  # = num_tokens_post_pad
    my_count = tl.sum(tl.where(offs_e == e, counts, 0), axis=0)
    my_padded = tl.sum(tl.where(offs_e == e, padded, 0), axis=0)

    # Where this expert's slots from chunk c begin: start + (its slots in chunks before c).
    carry = start
    for c0 in range(0, NUM_CHUNKS, SCAN):
        rows = c0 + tl.arange(0, SCAN)
        m = rows < NUM_CHUNKS
        v = tl.load(CHUNK_COUNTS + rows.to(tl.int64) * E + e, mask=m, other=0)
        incl = tl.cumsum(v, axis=0)
        tl.store(CHUNK_BASE + rows.to(tl.int64) * E + e, carry + incl - v, mask=m)
        carry += tl.sum(v, axis=0)

    # This expert's blocks and the sentinels that pad its last block.
    for b0 in range(0, my_padded // BLOCK_M, FILL):
        blocks = start // BLOCK_M + b0 + tl.arange(0, FILL)
        tl.store(
            EXPERT_IDS + blocks, tl.full([FILL], 0, tl.int32) + e, mask=b0 + tl.arange(0, FILL) < my_padded // BLOCK_M
        )
    pad = start + my_count + tl.arange(0, BLOCK_M)
    tl.store(SORTED + pad, tl.full([BLOCK_M], 0, tl.int32) + S, mask=pad < start + my_padded)

    if e == 0:
        tl.store(NTPP, total)
        for p0 in range(total, S_PAD, FILL):  # empty tail: sentinels ...
            p = p0 + tl.arange(0, FILL)
            tl.store(SORTED + p, tl.full([FILL], 0, tl.int32) + S, mask=p < S_PAD)
        for b0 in range(total // BLOCK_M, S_PAD // BLOCK_M, FILL):  # ... and expert -1
            b = b0 + tl.arange(0, FILL)
            tl.store(EXPERT_IDS + b, tl.full([FILL], -1, tl.int32), mask=b < S_PAD // BLOCK_M)


@triton.jit
def _scatter_kernel(
    TOPK,
    CHUNK_BASE,
    SORTED,
    S,
    E,
    CHUNK: tl.constexpr,
):
    c = tl.program_id(0)
    idx = tl.arange(0, CHUNK)
    offs = c * CHUNK + idx
    in_range = offs < S
    e = tl.load(TOPK + offs, mask=in_range, other=-1).to(tl.int32)
    ok = in_range & (e >= 0) & (e < E)
    e = tl.where(ok, e, -1 - idx)  # distinct negative ids: dropped slots match nothing
    # rank = number of earlier slots of this chunk routed to the same expert (deterministic order)
    same = (e[:, None] == e[None, :]) & (idx[None, :] < idx[:, None])
    rank = tl.sum(same.to(tl.int32), axis=1)
    base = tl.load(CHUNK_BASE + c.to(tl.int64) * E + e, mask=ok, other=0)
    tl.store(SORTED + base + rank, offs.to(tl.int32), mask=ok)


def moe_align(topk_idx: torch.Tensor, num_experts: int, block_m: int):
    """Sort the N·k routed slots by expert and pad each expert's run to a multiple of ``block_m``.

    topk_idx [N, k] integer expert ids in [0, num_experts) (ids outside are dropped); block_m a power of two
    (the grouped GEMM's BLOCK_M, >= 16 for the GEMM kernels). Returns

      sorted_token_ids [S_pad] int32 — slot ids s = token·k + j, expert by expert, increasing within an
                       expert, each run padded with the sentinel S = N·k up to a block_m multiple; the
                       empty tail after the last expert is sentinels too (S_pad = ``padded_size``)
      expert_ids       [S_pad / block_m] int32 — the expert of each block; -1 for the empty tail
      num_tokens_post_pad [1] int32 — rows that hold work (a block multiple); a tensor, no host sync
      counts           [E] int32 — slots per expert
    """
    dev = topk_idx.device
    require_kernel_device(dev)
    S, E = topk_idx.numel(), num_experts
    S_pad = padded_size(S, E, block_m)
    out = torch.empty(S_pad, dtype=torch.int32, device=dev)
    expert_ids = torch.empty(S_pad // block_m, dtype=torch.int32, device=dev)
    ntpp = torch.zeros(1, dtype=torch.int32, device=dev)
    counts = torch.zeros(E, dtype=torch.int32, device=dev)
    if S == 0:
        return out, expert_ids, ntpp, counts
    flat = topk_idx.reshape(-1)
    if not flat.is_contiguous():
        flat = flat.contiguous()
    interp = dev.type != "cuda"
    chunk = 32 if interp else 64  # the scatter's CHUNK×CHUNK comparison: 4K elements on the GPU
    num_chunks = triton.cdiv(S, chunk)
    chunk_counts = torch.zeros((num_chunks, E), dtype=torch.int32, device=dev)
    chunk_base = torch.empty((num_chunks, E), dtype=torch.int32, device=dev)
    _count_kernel[(num_chunks,)](flat, counts, chunk_counts, S, E, CHUNK=chunk)
    _offsets_kernel[(E,)](
        counts,
        chunk_counts,
        chunk_base,
        out,
        expert_ids,
        ntpp,
        S,
        E,
        num_chunks,
        S_pad,
        BLOCK_M=block_m,
        E_P2=triton.next_power_of_2(E),
        SCAN=64 if interp else 1024,
        FILL=64 if interp else 1024,
    )
    _scatter_kernel[(num_chunks,)](flat, chunk_base, out, S, E, CHUNK=chunk)
    return out, expert_ids, ntpp, counts
