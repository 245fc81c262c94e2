"""DSA's lightning indexer (lesson 06): the fused causal index logits of ``glmkit.ops.lightning_indexer``, whose
``lightning_indexer_reference`` is the definition this kernel is tested against.

What it computes, for every query token t (absolute position offset + t) and every key token s < L:

    I[b, t, s] = Σ_h  w[b, t, h] · ReLU( scale · q[b, t, h, :] · k[b, s, :] )      if s is visible to t
               = −inf                                                             otherwise

with "visible" the decoder's causal rule: s ≤ offset + t and key s is a real token (``key_mask``), or s is the
query's own position (a query always sees itself, so no row is empty). ``scale`` > 0 moves out of the ReLU
(ReLU(c·x) = c·ReLU(x)), so the kernel folds it into the head weights once per row.

How. One program owns a BLOCK_T × BLOCK_L tile of I for one sample. It loads the tile's BLOCK_L keys once
([BLOCK_L, D]: the indexer has ONE key per token, shared by all heads — multi-query) and loops over the H index
heads; per head one [BLOCK_T, D] × [D, BLOCK_L] tensor-core dot, then a ReLU and a fused multiply-add with the
head's weight column into the fp32 tile accumulator. Nothing but the [T, L] logits ever reaches memory: the
[B, T, H, L] per-head scores of the reference are never formed. A tile entirely above the causal diagonal
(every key later than every query of the tile) loads nothing and stores −inf.

Cost per visible (t, s) pair: 2·H·D FLOPs on tensor cores (8192 for GLM-5's 32 heads × 128) plus H ReLU+FMA
on the CUDA cores — about 1/64 of the dot work per head at D = 128, which is why the head loop stays inside
the program instead of being another dot dimension. The logits are written in fp32: top-k needs an exact
order, and ties from bf16 rounding would make the selection depend on the path.

Launcher: ``indexer_logits`` (no backward: the indexer trains through ``glmkit.ops.lightning_indexer``'s torch
path, see there). On CUDA, bf16/fp16 inputs run autotuned tiles; fp32 (the checking dtype) one fixed tile with
exact fp32 dots; under the Triton interpreter 16 × 16 tiles, so small tests cross every tile boundary.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from glmkit.backend import require_kernel_device


@triton.jit
def _indexer_logits_kernel(
    Q,  # [B, T, H, D]
    K,  # [B, L, D]
    W,  # [B, T, H]
    KEY_MASK,  # [B, L] uint8 (1 = real token), read only when HAS_KEY_MASK
    OUT,  # [B, T, L] fp32
    scale,
    offset,
    stride_qb,
    stride_qt,
    stride_qh,
    stride_kb,
    stride_kl,
    stride_wb,
    stride_wt,
    stride_wh,
    stride_mb,
    stride_ob,
    stride_ot,
    T,
    L,
    H,
    D,
    HAS_KEY_MASK: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_L: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    pid_t = tl.program_id(0)
    pid_l = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    t0, s0 = pid_t * BLOCK_T, pid_l * BLOCK_L
    # block pointers: a base and strides per tile, not a [rows, cols] tensor of addresses held across the head loop
    out_blk = tl.make_block_ptr(OUT + b * stride_ob, (T, L), (stride_ot, 1), (t0, s0), (BLOCK_T, BLOCK_L), (1, 0))
    last_pos = offset + tl.minimum(t0 + BLOCK_T, T) - 1  # position of the tile's last query
    if s0 > last_pos:  # every key after every query: nothing visible
        tl.store(out_blk, tl.full([BLOCK_T, BLOCK_L], float("-inf"), tl.float32), boundary_check=(0, 1))
    else:
        # the tile's keys, loaded once for all heads, transposed by the addressing: [BLOCK_D, BLOCK_L]
        kt_blk = tl.make_block_ptr(K + b * stride_kb, (D, L), (1, stride_kl), (0, s0), (BLOCK_D, BLOCK_L), (0, 1))
        kt = tl.load(kt_blk, boundary_check=(0, 1), padding_option="zero")
        offs_t = t0 + tl.arange(0, BLOCK_T)
        w_ptrs = W + b * stride_wb + offs_t * stride_wt
        acc = tl.zeros([BLOCK_T, BLOCK_L], dtype=tl.float32)
        for h in range(H):
            q_blk = tl.make_block_ptr(
                Q + b * stride_qb + h * stride_qh, (T, D), (stride_qt, 1), (t0, 0), (BLOCK_T, BLOCK_D), (1, 0)
            )
            q = tl.load(q_blk, boundary_check=(0, 1), padding_option="zero")
            w = tl.load(w_ptrs + h * stride_wh, mask=offs_t < T, other=0.0).to(tl.float32) * scale
            s = tl.dot(q, kt, input_precision=DOT_PRECISION)  # [BLOCK_T, BLOCK_L] fp32
            acc += w[:, None] * tl.maximum(s, 0.0)
        offs_s = s0 + tl.arange(0, BLOCK_L)
        pos = offset + offs_t
        visible = offs_s[None, :] <= pos[:, None]
        if HAS_KEY_MASK:
            real = tl.load(KEY_MASK + b * stride_mb + offs_s, mask=offs_s < L, other=0) != 0
            visible = visible & real[None, :]
        visible = visible | (offs_s[None, :] == pos[:, None])
        tl.store(out_blk, tl.where(visible, acc, float("-inf")), boundary_check=(0, 1))


# CUDA tiles (bf16/fp16), autotuned per (H, D, dtype). Not yet measured on an H200: candidates whose registers and
# shared memory fit sm_90 without spills at D = 128 (ptxas report: benchmarks/compile_report_dsa.py).
_CONFIGS = [(64, 128, 8, 3), (64, 128, 8, 2), (128, 64, 8, 2), (64, 64, 4, 3)]  # (BLOCK_T, BLOCK_L, warps, stages)

_logits_tuned = triton.autotune(
    configs=[triton.Config({"BLOCK_T": bt, "BLOCK_L": bl}, num_warps=w, num_stages=s) for bt, bl, w, s in _CONFIGS],
    key=["H", "BLOCK_D", "DOT_PRECISION"],
)(_indexer_logits_kernel)


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"  # fp32: exact fp32 dots, not TF32


def indexer_logits(q, k, w, scale: float, offset: int = 0, key_mask: torch.Tensor | None = None) -> torch.Tensor:
    """q [B, T, H, D], k [B, L, D] (same dtype), w [B, T, H] any float dtype, scale > 0, offset = absolute
    position of query 0, key_mask [B, L] bool or None → logits [B, T, L] fp32 (−inf where not visible).
    Arguments as validated by ``glmkit.ops.lightning_indexer``; last dims must be contiguous (copied if not)."""
    require_kernel_device(q)
    B, T, H, D = q.shape
    L = k.shape[1]
    q, k = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k))
    mask = key_mask.contiguous().view(torch.uint8) if key_mask is not None else q  # q: a dummy pointer
    out = torch.empty((B, T, L), dtype=torch.float32, device=q.device)
    args = (q, k, w, mask, out, float(scale), int(offset))
    args += (q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), w.stride(0), w.stride(1), w.stride(2))
    args += (mask.stride(0) if key_mask is not None else 0, out.stride(0), out.stride(1), T, L, H, D)
    consts = dict(HAS_KEY_MASK=key_mask is not None, BLOCK_D=max(16, triton.next_power_of_2(D)))
    consts["DOT_PRECISION"] = _precision(q.dtype)
    if q.device.type == "cuda" and q.dtype != torch.float32:
        grid = lambda meta: (triton.cdiv(T, meta["BLOCK_T"]), triton.cdiv(L, meta["BLOCK_L"]), B)  # noqa: E731
        _logits_tuned[grid](*args, **consts)
    elif q.device.type == "cuda":  # fp32: one small fixed tile
        _indexer_logits_kernel[(triton.cdiv(T, 32), triton.cdiv(L, 32), B)](
            *args, BLOCK_T=32, BLOCK_L=32, num_warps=4, num_stages=1, **consts
        )
    else:  # interpreter
        _indexer_logits_kernel[(triton.cdiv(T, 16), triton.cdiv(L, 16), B)](*args, BLOCK_T=16, BLOCK_L=16, **consts)
    return out
