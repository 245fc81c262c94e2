"""Flash attention forward under GLM's blank-infilling mask (lesson 01's kernel).

What it computes: ``glmkit.attention.attention_reference`` — softmax(scale · q kᵀ + mask) v with the GLM
mask "key j is visible to query i iff j < sep (Part A) or j <= i (causal Part B)", ``sep`` being each
sample's Part-A length. It differs from the causal flash attention of GPT-style models in one place: the
visible region of a query block is not a triangle but a triangle *plus a rectangle* (all of Part A), and
the rectangle's width changes from sample to sample, so each program loads its sample's ``sep``.

How (FlashAttention, Dao et al. 2022): one program owns BLOCK_M query rows of one (batch, head). It
walks over key/value blocks of BLOCK_N columns, keeping for each row a running max ``m``, a running
softmax denominator ``l`` and an unnormalised output ``acc``; when a new block raises the max, the old
``l`` and ``acc`` are rescaled by exp(m_old - m_new). Scores never leave the chip: memory traffic is
O(T·D) per head instead of O(T²).

Which key blocks a query block visits (the point of the lesson). Query rows [m0, m0+BM), one sample with
Part-A length sep; key blocks of width BN, left to right:

        key j →   0        sep                      T
                  |        |                        |
    rows in A     FFFFFFFFFP.........................     visit [0, sep):   full blocks, then one partial
    (m0+BM<=sep)                                          block if sep is not a multiple of BN
    rows in B     FFFFFFFFFFFFFFFFFFFFDD..............    visit [0, m0+BM): full blocks up to the
    (m0 >= sep)                       ^ diagonal          diagonal, then the diagonal blocks (masked)

    F = fully visible block: no mask computed at all (phase 1, the fast loop)
    P, D = boundary blocks (Part-A edge, diagonal, or the end of the sequence): element mask applied
    . = fully masked blocks: never loaded, never computed. Skipping them is what makes the kernel do
        only the ~(sep² + (T² - sep²)/2) / T² share of dense work the mask allows.

So for query block [m0, m0+BM): keys visible to some row = [0, hi) with hi = min(max(sep, m0+BM), T);
keys visible to every row (fully visible blocks) = [0, full) with full = max(sep, m0+1) rounded down to a
multiple of BN (and never past the last whole block of T). Phase 1 loops over [0, full) without masks;
phase 2 loops over [full, hi) with the element mask (j < sep or j <= i) and the j < T bound.

No row ever has all of its keys masked: key j = 0 satisfies j <= i for every row, and phase 1 or 2
always starts at key 0, so after the first block every row's running max is finite, and later fully
masked entries contribute exp2(-inf) = 0. There is no 0/0 to guard against.

Runs natively on CUDA, and on CPU tensors under the Triton interpreter (``glmkit.kernels`` sets
TRITON_INTERPRET=1 on machines without CUDA). Forward only; the backward (which needs the ``lse`` this
returns) comes with a later lesson.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from glmkit.backend import require_kernel_device

# exp(x) = 2^(x · log2(e)): the kernel works with exp2 (one MUFU.EX2 instruction on NVIDIA GPUs), so
# log2(e) is folded into the softmax scale once, on the host, instead of multiplying every score.
LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453  # converts the kernel's log2-domain log-sum-exp back to natural log

SUPPORTED_HEAD_DIMS = (16, 32, 64, 128)



@triton.jit
def _attend_blocks(
    acc, l_i, m_i, q,
    k_base, v_base, k_desc, v_desc, stride_kt, stride_vt,
    offs_m, offs_n, offs_d,
    sep, T, lo, hi, qk_scale,
    BLOCK_N: tl.constexpr,
    MASKED: tl.constexpr,       # False: fully visible, in-bounds blocks (phase 1); True: boundary blocks
    DOT_PRECISION: tl.constexpr,
    USE_TMA: tl.constexpr,      # CUDA (Hopper) only: load K/V tiles with the tensor-memory accelerator
    WARP_SPEC: tl.constexpr,    # CUDA only: let the compiler warp-specialize the loop (experimental)
):
    """Online-softmax update of (acc, l_i, m_i) over key blocks [lo, hi), in steps of BLOCK_N.

    Scores stay raw (q·k) until one fused multiply-add turns them into the exp2 argument:
    p = exp2(qk · qk_scale - m), with m kept in the scaled (log2) domain. The max of the raw scores times
    qk_scale is the max of the scaled ones because qk_scale > 0.
    """
    for start_n in tl.range(lo, hi, BLOCK_N, warp_specialize=WARP_SPEC):
        cols = start_n + offs_n                                          # [BN] key indices
        if USE_TMA:
            k = k_desc.load([start_n, 0])                                # rows >= T come back as zeros
        elif MASKED:
            k = tl.load(k_base + cols[:, None] * stride_kt + offs_d[None, :], mask=cols[:, None] < T, other=0.0)
        else:
            k = tl.load(k_base + cols[:, None] * stride_kt + offs_d[None, :])
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)      # [BM, BN] raw scores, fp32
        if MASKED:
            visible = ((cols[None, :] < sep) | (cols[None, :] <= offs_m[:, None])) & (cols[None, :] < T)
            s = tl.where(visible, qk * qk_scale, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))      # finite from the first block on (key 0 is visible)
            p = tl.math.exp2(s - m_new[:, None])
        else:
            m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
            p = tl.math.exp2(qk * qk_scale - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)              # rescales what was accumulated under the old max
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        if USE_TMA:
            v = v_desc.load([start_n, 0])
        elif MASKED:
            v = tl.load(v_base + cols[:, None] * stride_vt + offs_d[None, :], mask=cols[:, None] < T, other=0.0)
        else:
            v = tl.load(v_base + cols[:, None] * stride_vt + offs_d[None, :])
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _glm_attn_fwd_kernel(
    Q, K, V, SEP, O, LSE,
    qk_scale,                                   # softmax scale · log2(e)
    stride_qb, stride_qh, stride_qt,
    stride_kb, stride_kh, stride_kt,
    stride_vb, stride_vh, stride_vt,
    stride_ob, stride_oh, stride_ot,
    H, T, GROUP,                                # GROUP = H // H_kv query heads per key/value head
    T_BUCKET,                                   # only an autotune key (T rounded up to a size class)
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    STORE_LSE: tl.constexpr,
    USE_TMA: tl.constexpr = False,
    WARP_SPEC: tl.constexpr = False,
):
    # Grid: (query blocks, B·H). Query blocks are taken last-to-first: later blocks of a sample see more
    # keys (the causal part grows), so launching the heaviest programs first shortens the tail.
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    kvh = h // GROUP                            # grouped-query attention: the shared k/v head

    sep = tl.load(SEP + b).to(tl.int32)
    sep = tl.minimum(tl.maximum(sep, 0), T)     # the wrapper validates; this only keeps loads in bounds

    m0 = pid_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)

    q_ptrs = Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qt + offs_d[None, :]
    q = tl.load(q_ptrs, mask=offs_m[:, None] < T, other=0.0)
    k_base = K + b * stride_kb + kvh * stride_kh
    v_base = V + b * stride_vb + kvh * stride_vh
    if USE_TMA:
        # per-(batch, head) [T, D] views: out-of-range rows are zero-filled by the hardware
        k_desc = tl.make_tensor_descriptor(k_base, shape=[T, HEAD_DIM], strides=[stride_kt, 1],
                                           block_shape=[BLOCK_N, HEAD_DIM])
        v_desc = tl.make_tensor_descriptor(v_base, shape=[T, HEAD_DIM], strides=[stride_vt, 1],
                                           block_shape=[BLOCK_N, HEAD_DIM])
    else:
        k_desc = k_base
        v_desc = v_base

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)

    # Keys visible to SOME row of this block: [0, hi). Keys visible to EVERY row, whole blocks only: [0, full).
    hi = tl.minimum(tl.maximum(sep, m0 + BLOCK_M), T)
    full = (tl.minimum(tl.maximum(sep, m0 + 1), T) // BLOCK_N) * BLOCK_N
    # Phase 1: fully visible blocks, no mask, no bounds checks.
    acc, l_i, m_i = _attend_blocks(acc, l_i, m_i, q, k_base, v_base, k_desc, v_desc, stride_kt, stride_vt,
                                   offs_m, offs_n, offs_d, sep, T, 0, full, qk_scale,
                                   BLOCK_N, False, DOT_PRECISION, USE_TMA, WARP_SPEC)
    # Phase 2: boundary blocks (Part-A edge, diagonal, end of sequence) with the element mask.
    acc, l_i, m_i = _attend_blocks(acc, l_i, m_i, q, k_base, v_base, k_desc, v_desc, stride_kt, stride_vt,
                                   offs_m, offs_n, offs_d, sep, T, full, hi, qk_scale,
                                   BLOCK_N, True, DOT_PRECISION, USE_TMA, WARP_SPEC)
    # Blocks at [hi, T) are fully masked for every row here: skipped.

    out = acc / l_i[:, None]
    o_ptrs = O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_ot + offs_d[None, :]
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=offs_m[:, None] < T)
    if STORE_LSE:
        # natural-log log-sum-exp of the scaled scores: log Σ_j exp(scale · q_i·k_j), for the backward
        lse = (m_i + tl.math.log2(l_i)) * 0.6931471805599453  # · ln(2) (= LN2 above)
        tl.store(LSE + pid_bh.to(tl.int64) * T + offs_m, lse, mask=offs_m < T)


# ---- CUDA: autotuned over a few Hopper-friendly configurations, keyed on head dim, T size class, dtype ----

# Measured on one H200 (benchmarks/results/glm_attention_h200_sweep.md, bf16, T = 8K): for D = 128,
# 128×128 tiles with 8 warps and 3 stages led (482 TFLOP/s), 128×64 close behind (473-478); for D = 64,
# 128×64 with 8 warps and 4 stages led (428), and 64×64 with 4 warps won the autotune at T = 2K. 4 warps
# on 128-row tiles at D = 128 was far slower (218-280). D = 16/32 lists are guesses, not measured.
# The lists are kept short: each entry costs a compile per autotune key.
_CONFIGS = {  # head dim -> (BLOCK_M, BLOCK_N, num_warps, num_stages)
    128: [(128, 128, 8, 3), (128, 64, 8, 4), (128, 64, 8, 3)],
    64: [(128, 64, 8, 4), (128, 64, 8, 3), (128, 128, 4, 3), (64, 64, 4, 3)],
    32: [(128, 64, 4, 3), (64, 64, 4, 3), (128, 128, 4, 3)],
    16: [(128, 64, 4, 3), (64, 64, 4, 3), (128, 128, 4, 3)],
}


def _cuda_configs():
    cfgs = []
    for lst in _CONFIGS.values():
        for bm, bn, w, s in lst:
            cfgs.append(triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s))
    return cfgs


def _prune_configs(configs, named_args, **kwargs):
    d = kwargs.get("HEAD_DIM", named_args.get("HEAD_DIM"))
    wanted = set(_CONFIGS.get(d, _CONFIGS[64]))
    keep, seen = [], set()
    for c in configs:
        key = (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages)
        if key in wanted and key not in seen:
            seen.add(key)
            keep.append(c)
    return keep or configs[:1]


_glm_attn_fwd_tuned = triton.autotune(
    configs=_cuda_configs(),
    key=["HEAD_DIM", "T_BUCKET", "DOT_PRECISION"],  # tensor dtypes are added to the key by triton
    prune_configs_by={"early_config_prune": _prune_configs},
)(_glm_attn_fwd_kernel)


def _t_bucket(T: int) -> int:
    """Size class of T for the autotune cache: ≤1K, ≤4K, ≤16K, larger."""
    for b in (1024, 4096, 16384):
        if T <= b:
            return b
    return 1 << 20



def _check_sep(sep: torch.Tensor | None, B: int, T: int, device: torch.device, check: bool) -> torch.Tensor:
    """The per-sample Part-A lengths as a [B] integer tensor on ``device``; None = no mask (sep = T).
    ``check`` also verifies 0 <= sep <= T, which costs a device-to-host sync."""
    if sep is None:
        return torch.full((B,), T, dtype=torch.int64, device=device)  # no mask = all of it is Part A
    if not isinstance(sep, torch.Tensor) or sep.dtype not in (torch.int32, torch.int64) or sep.shape != (B,):
        raise TypeError(f"sep must be a [B] = [{B}] integer tensor, got {getattr(sep, 'dtype', type(sep))} "
                        f"{tuple(getattr(sep, 'shape', ()))}")
    if sep.device != device:
        raise ValueError(f"sep must be on q's device {device}, got {sep.device}")
    if check and (int(sep.min()) < 0 or int(sep.max()) > T):
        raise ValueError(f"sep values must lie in [0, T] = [0, {T}]")
    return sep

def glm_attention_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    sep: torch.Tensor | None,
    scale: float | None = None,
    out: torch.Tensor | None = None,
    block_m: int | None = None,
    block_n: int | None = None,
    *,
    return_lse: bool = False,
    lse: torch.Tensor | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    use_tma: bool = False,
    warp_specialize: bool = False,
    check: bool = True,
):
    """Flash attention forward under the GLM mask.

    q [B, H, T, D]; k, v [B, H_kv, T, D] with H % H_kv == 0; one dtype among fp32/fp16/bf16; D in
    {16, 32, 64, 128}; last dim contiguous (otherwise copied). sep [B] int Part-A lengths in [0, T], or
    None = no mask (bidirectional). scale defaults to 1/sqrt(D).
    out: optional [B, H, T, D] buffer of q's dtype to write into (tests pass a NaN-poisoned one).
    block_m / block_n: fixed tile sizes; default: autotuned on CUDA for fp16/bf16 (fixed 64×32 for fp32),
    16×16 under the interpreter.
    return_lse: also return lse [B, H, T] fp32 = log Σ_j exp(scale · q_i·k_j) over visible j (natural
    log), which the backward needs; ``lse=`` may pass its buffer.
    num_warps / num_stages / use_tma / warp_specialize: fixed launch options for tuning experiments on
    CUDA (the last two: Hopper tensor-memory-accelerator loads and compiler warp specialization).
    check: validate sep's range (one device→host sync); glmkit.attention.glm_attention validates itself
    and passes False.
    Returns o [B, H, T, D] in q's dtype, or (o, lse) with return_lse.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"{name} must be a 4-D tensor [B, H, T, D], got {getattr(t, 'shape', type(t))}")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"q, k, v must share one dtype among float32/float16/bfloat16, got {q.dtype}, {k.dtype}, {v.dtype}")
    B, H, T, D = q.shape
    if k.shape != v.shape or k.shape[0] != B or k.shape[2] != T or k.shape[3] != D:
        raise ValueError(f"k and v must be [B, H_kv, T, D] matching q {tuple(q.shape)}, got {tuple(k.shape)}, {tuple(v.shape)}")
    H_kv = k.shape[1]
    if H_kv == 0 or H % H_kv:
        raise ValueError(f"q's heads H={H} must be a multiple of k/v's heads H_kv={H_kv}")
    if D not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"head dim D={D} not supported by the kernel: use one of {SUPPORTED_HEAD_DIMS}")
    if not (q.device == k.device == v.device):
        raise ValueError("q, k and v must be on one device")
    if T == 0 or B == 0 or H == 0:
        raise ValueError(f"empty input: q has shape {tuple(q.shape)}")
    sep = _check_sep(sep, B, T, q.device, check)
    if scale is None:
        scale = 1.0 / math.sqrt(D)
    require_kernel_device(q)

    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    sep = sep.contiguous()
    if out is None:
        out = torch.empty((B, H, T, D), dtype=q.dtype, device=q.device)
    elif out.shape != (B, H, T, D) or out.dtype != q.dtype or out.device != q.device or out.stride(-1) != 1:
        raise ValueError(f"out must be a [B, H, T, D] = {(B, H, T, D)} tensor of {q.dtype} on {q.device} with contiguous last dim")
    want_lse = return_lse or lse is not None
    if lse is None:
        lse = torch.empty((B, H, T), dtype=torch.float32, device=q.device) if want_lse else out  # dummy ptr
    elif lse.shape != (B, H, T) or lse.dtype != torch.float32 or not lse.is_contiguous():
        raise ValueError(f"lse must be a contiguous fp32 [B, H, T] = {(B, H, T)} tensor")

    # fp32 inputs: exact fp32 dots ("ieee"), not TF32, so fp32 results match the fp32 reference.
    precision = "ieee" if q.dtype == torch.float32 else "tf32"
    args = (
        q, k, v, sep, out, lse, scale * LOG2E,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        H, T, H // H_kv, _t_bucket(T),
    )
    fixed = (block_m is not None or block_n is not None or num_warps is not None or num_stages is not None
             or use_tma or warp_specialize)
    # fp32 is the checking dtype (exact fp32 dots, no tensor cores): one fixed small config, no tuning.
    if q.device.type == "cuda" and not fixed and q.dtype != torch.float32:
        grid = lambda meta: (triton.cdiv(T, meta["BLOCK_M"]), B * H)  # noqa: E731
        _glm_attn_fwd_tuned[grid](*args, HEAD_DIM=D, DOT_PRECISION=precision, STORE_LSE=want_lse)
    else:
        interp = q.device.type != "cuda"
        bm = block_m or (16 if interp else 128)
        bn = block_n or (16 if interp else 64)
        for name, val in (("block_m", bm), ("block_n", bn)):
            if val < 16 or val & (val - 1):
                raise ValueError(f"{name} must be a power of two >= 16, got {val}")
        kw = {}
        if not interp:
            if q.dtype == torch.float32 and not fixed:
                bm, bn = 64, 32
            kw = dict(num_warps=num_warps or (8 if D >= 128 and q.dtype != torch.float32 else 4),
                      num_stages=num_stages or (2 if q.dtype == torch.float32 else 3))
            if use_tma:
                _ensure_allocator()
                kw.update(USE_TMA=True)
            if warp_specialize:
                kw.update(WARP_SPEC=True)
        _glm_attn_fwd_kernel[(triton.cdiv(T, bm), B * H)](
            *args, HEAD_DIM=D, BLOCK_M=bm, BLOCK_N=bn, DOT_PRECISION=precision, STORE_LSE=want_lse, **kw
        )
    return (out, lse) if return_lse else out


def _ensure_allocator() -> None:
    """Device-side tensor descriptors need a little global scratch memory; give Triton an allocator."""
    def alloc(size: int, alignment: int, stream):
        return torch.empty(size, dtype=torch.int8, device="cuda")

    triton.set_allocator(alloc)


def visible_pairs(T: int, sep: int) -> int:
    """Number of (query, key) pairs the GLM mask lets through for one head: rows in Part A see sep keys,
    row i >= sep sees i + 1. FLOPs of the forward = 4 · D · visible_pairs per head."""
    sep = max(0, min(sep, T))
    return sep * sep + (T * (T + 1) - sep * (sep + 1)) // 2
