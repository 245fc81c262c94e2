"""Tuning sweeps (GPU only): fixed launch configurations of the attention backward kernels, the RoPE kernel,
RMSNorm, SwiGLU and the MoE grouped GEMMs, each checked for correctness and timed beside its baseline in the same run.

Not a benchmark table of record: it is what the autotune lists and launch defaults in kernels/ were
chosen from (the chosen figures are in benchmarks/results/*_h200.md; the raw sweeps of 2026-11-23 in
benchmarks/results/kernel_sweeps_h200.md). The launchers in kernels/ take no tuning knobs, so every fixed
configuration here launches the raw ``@triton.jit`` kernel itself with the arguments its launcher passes (the
``*_fixed`` helpers below mirror the launchers; the autotuner does the same with each of its candidates), and the
launcher's own choice is timed beside it. Sections:

* bwd: the dk/dv kernel and the dq kernel of kernels/attention.py timed separately, causal,
  bf16, T = 8K, B·T = 32K, H = 2048/D, D = 128 and 64; gradients checked against SDPA-cuDNN's.
* rope: kernels/rope.py at (block_t, num_warps, heads per program), both pairings, GLM-4-9B / GLM-4.5
  shapes, out of place; a copy of an earlier kernels/rope.py (``--old-rope PATH``) timed in the same run.
* norm, swiglu: RMSNorm (num_warps; programs of the backward) and SwiGLU (column block, num_warps)
  launch options, forward and backward timed alone; outputs must equal the launcher's.
* moe: the grouped GEMM of kernels/moe_experts.py (64 experts, 131072 slots, K = N = 2048) at fixed
  (BLOCK_N, BLOCK_K, warps, stages) and alignment block vs torch._grouped_mm.
* moe_bwd: the backward of the routed experts (N = 16384, H = 2048, I = 1024, E = 64, k = 8, bf16, uniform
  routing) piece by piece — the dgrad GEMM with the SwiGLU-backward epilogue, the dx grouped GEMM, the dx
  combine, the two weight gradients — for the current kernels/moe_experts.py and a copy of an earlier one
  (``--old-moe PATH``, same launcher API) in the same run, the whole layer fwd / fwd+bwd of both and of the
  composite, then fixed launch configurations of each piece. moe_bwd_pieces: the pieces of the current module alone.

    python benchmarks/sweep_kernels.py --sections bwd rope moe --out /tmp/sweep.md
    python benchmarks/sweep_kernels.py --smoke     # every section, tiny shapes, 1-2 configs, any device, no file
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
import sys
import traceback

import common  # benchmarks/common.py (before triton: it switches the interpreter on without CUDA)
import torch
import torch.nn.functional as F
import triton
from common import bench, matmul_ceiling
from torch.nn.attention import SDPBackend, sdpa_kernel

import glmkit.kernels  # noqa: F401
from glmkit.testing import rel_err

LOG = []
DEV = "cuda"  # --smoke without CUDA: CPU, kernels under the interpreter, fp32 where a kernel uses tl.dot


def log(msg):
    print(msg, flush=True)
    LOG.append(msg)


def _dot_dtype():
    """bf16 on the GPU; fp32 under the interpreter (its bf16 tl.dot is wrong in triton 3.6)."""
    return torch.bfloat16 if DEV == "cuda" else torch.float32


def _err_msg(e):
    return f"{type(e).__name__}: {str(e).splitlines()[0][:100] if str(e) else ''}"


# ---------------------------------------------------------------- attention backward

DKDV = {  # D -> (BLOCK_M streamed, BLOCK_N resident, warps, stages)
    128: [(64, 128, 8, 3), (64, 128, 8, 2), (64, 128, 8, 4), (32, 128, 4, 3), (32, 128, 8, 3), (64, 128, 4, 3),
          (128, 128, 8, 2), (128, 128, 8, 3), (64, 64, 4, 3), (32, 64, 4, 3)],
    64: [(32, 64, 4, 4), (64, 64, 4, 3), (64, 128, 8, 3), (32, 128, 4, 3), (64, 128, 4, 3), (128, 128, 8, 3),
         (64, 64, 4, 4), (32, 64, 4, 3), (64, 128, 8, 4), (128, 128, 8, 2)],
}  # fmt: skip
DQ = {  # D -> (BLOCK_M resident, BLOCK_N streamed, warps, stages)
    128: [(128, 64, 8, 3), (128, 64, 8, 2), (128, 64, 8, 4), (128, 128, 8, 2), (128, 128, 8, 3), (128, 32, 4, 3),
          (64, 64, 4, 3), (64, 128, 4, 3), (128, 64, 4, 3), (64, 32, 4, 3)],
    64: [(64, 64, 4, 3), (128, 32, 4, 3), (128, 64, 8, 3), (128, 64, 4, 3), (64, 64, 4, 4), (128, 128, 8, 3),
         (64, 128, 4, 3), (128, 64, 8, 4), (64, 32, 4, 4), (128, 128, 8, 2)],
}  # fmt: skip


def attention_bwd_fixed(do, q, k, v, o, lse, sep):
    """The pieces of ``glmkit.kernels.attention.attention_bwd`` with the arguments it passes: runs the preprocess
    (Δ) once and returns (dq, dk, dv, dkdv(cfg), dq_fn(cfg)); dkdv(cfg) / dq_fn(cfg) launch the raw dk/dv or dq
    kernel at cfg = (BLOCK_M, BLOCK_N, warps, stages) into dk, dv / dq."""
    from glmkit.kernels import attention as kmod

    B, H, T, D = q.shape
    H_kv = k.shape[1]
    scale = 1.0 / math.sqrt(D)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    delta = torch.empty((B, H, T), dtype=torch.float32, device=q.device)
    cuda = q.device.type == "cuda"
    pre_bm = 128 if cuda else 16
    kmod._bwd_preprocess[(triton.cdiv(T, pre_bm), B * H)](
        o, do, delta, o.stride(0), o.stride(1), o.stride(2), do.stride(0), do.stride(1), do.stride(2),
        H, T, HEAD_DIM=D, BLOCK_M=pre_bm, **(dict(num_warps=4) if cuda else {}),
    )  # fmt: skip
    strides = (scale, scale * kmod.LOG2E, q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
               v.stride(0), v.stride(1), v.stride(2), do.stride(0), do.stride(1), do.stride(2))  # fmt: skip
    dkdv_args = (q, k, v, do, lse, delta, sep, dk, dv, *strides, dk.stride(0), dk.stride(1), dk.stride(2),
                 dv.stride(0), dv.stride(1), dv.stride(2), H, H_kv, T, H // H_kv, kmod._t_bucket(T))  # fmt: skip
    dq_args = (q, k, v, do, lse, delta, sep, dq, *strides, dq.stride(0), dq.stride(1), dq.stride(2),
               H, T, H // H_kv, kmod._t_bucket(T))  # fmt: skip
    consts = dict(HEAD_DIM=D, HEAD_DIM_V=D, DOT_PRECISION=kmod._precision(q.dtype))

    def run_dkdv(cfg):
        bm, bn, w, s = cfg
        kmod._attn_bwd_dkdv_kernel[(triton.cdiv(T, bn), B * H_kv)](
            *dkdv_args, BLOCK_M=bm, BLOCK_N=bn, num_warps=w, num_stages=s, **consts
        )

    def run_dq(cfg):
        bm, bn, w, s = cfg
        kmod._attn_bwd_dq_kernel[(triton.cdiv(T, bm), B * H)](
            *dq_args, BLOCK_M=bm, BLOCK_N=bn, num_warps=w, num_stages=s, **consts
        )

    return dq, dk, dv, run_dkdv, run_dq


def bwd_section(lines, smoke=False):
    from glmkit.kernels import attention as kmod
    from glmkit.kernels.attention import attention_bwd, attention_fwd, bwd_flops

    T, Ds, tokens, model_dim = (64, (16,), 128, 32) if smoke else (8192, (128, 64), 32768, 2048)
    ref_backend = SDPBackend.CUDNN_ATTENTION if DEV == "cuda" else SDPBackend.MATH  # no cuDNN on a CPU
    ref_name = "cuDNN" if DEV == "cuda" else "SDPA math"
    dt = _dot_dtype()
    for D in Ds:
        B, H = tokens // T, model_dim // D
        g = torch.Generator(device=DEV).manual_seed(11 + D)
        q, k, v, do = (torch.randn(B, H, T, D, device=DEV, dtype=dt, generator=g) for _ in range(4))
        causal = torch.zeros(B, dtype=torch.int64, device=DEV)
        o, lse = attention_fwd(q, k, v, causal, return_lse=True)
        qq, kk, vv = (t.clone().requires_grad_() for t in (q, k, v))
        with sdpa_kernel([ref_backend]):
            out = F.scaled_dot_product_attention(qq, kk, vv, is_causal=True)
        ref = torch.autograd.grad(out, (qq, kk, vv), do, retain_graph=True)
        with sdpa_kernel([ref_backend]):
            t_cudnn = bench(lambda: torch.autograd.grad(out, (qq, kk, vv), do, retain_graph=True), rep=150)  # noqa: B023, F821
        flops = bwd_flops(T, D, 0, B, H)
        auto = lambda: attention_bwd(do, q, k, v, o, lse, causal)  # noqa: E731, B023, F821 (del below)
        err_auto = max(rel_err(r, x) for r, x in zip(ref, auto()))
        t_auto = bench(auto, rep=150)
        dq, dk, dv, run_dkdv, run_dq = attention_bwd_fixed(do, q, k, v, o, lse, causal)
        picked = (
            f"dkdv {getattr(kmod._dkdv_tuned, 'best_config', None)}, dq {getattr(kmod._dq_tuned, 'best_config', None)}"
        )
        lines += [
            "",
            f"### Attention backward, causal, T={T}, D={D}, B×H={B}×{H}",
            "",
            f"{ref_name} bwd {flops / t_cudnn / 1e9:.0f} TFLOP/s ({t_cudnn:.3f} ms); ours autotuned (all "
            f"three kernels) {flops / t_auto / 1e9:.0f} TFLOP/s ({t_auto:.3f} ms, err {err_auto:.1e}) = "
            f"{t_cudnn / t_auto:.2f}× {ref_name}; autotuner picked {picked}",
            "",
            "| kernel | config (BM×BN w s) | ms | err | share of charged FLOPs/s |",
            "|---|---|---|---|---|",
        ]
        best = {}
        for kind, table in (("dkdv", DKDV), ("dq", DQ)):
            for cfg in table[128][:1] if smoke else table[D]:
                name = "{}x{} w{} s{}".format(*cfg)
                try:
                    if kind == "dkdv":
                        fn = lambda: run_dkdv(cfg)  # noqa: E731, B023
                        dk.fill_(float("nan"))
                        dv.fill_(float("nan"))
                        fn()
                        err = max(rel_err(ref[1], dk), rel_err(ref[2], dv))
                    else:
                        fn = lambda: run_dq(cfg)  # noqa: E731, B023
                        dq.fill_(float("nan"))
                        fn()
                        err = rel_err(ref[0], dq)
                    ms = bench(fn, rep=100) if err < 2e-2 else float("nan")
                except Exception as e:  # noqa: BLE001
                    common.reraise_if_smoke()
                    ms, err = float("nan"), float("nan")
                    log(f"  {kind} {name}: {_err_msg(e)}")
                if ms == ms and (kind not in best or ms < best[kind][1]):
                    best[kind] = (name, ms)
                share = flops / ms / 1e9 if ms == ms else float("nan")
                lines.append(f"| {kind} | {name} | {ms:.3f} | {err:.1e} | {share:.0f} |")
                log(f"  bwd D={D} {kind} {name}: {ms:.3f} ms err {err:.1e}")
        if len(best) == 2:
            tot = best["dkdv"][1] + best["dq"][1]
            lines += [
                "",
                f"best dkdv {best['dkdv'][0]} + best dq {best['dq'][0]} = {tot:.3f} ms (+ preprocess) → "
                f"{flops / tot / 1e9:.0f} TFLOP/s, {t_cudnn / tot:.2f}× {ref_name}",
            ]
        del q, k, v, do, o, lse, qq, kk, vv, out, ref
        if DEV == "cuda":
            torch.cuda.empty_cache()


# ---------------------------------------------------------------- RoPE

ROPE_CFGS = [  # (block_t, warps, heads per program)
    (64, 4, 1), (32, 4, 1), (128, 4, 1), (128, 8, 1), (256, 8, 1), (64, 8, 1), (32, 4, 2), (64, 4, 2),
    (32, 4, 4), (16, 4, 4), (64, 4, 4), (32, 2, 1),
]  # fmt: skip


def rope_fixed(q, k, cos, sin, rotary_dim, pairing, block_t, num_warps, heads):
    """``glmkit.kernels.rope.rope_fwd`` out of place at a fixed (block_t, num_warps, heads per program): the raw
    ``_rope_kernel`` with the arguments the launcher passes. Returns (q', k')."""
    from glmkit.kernels import rope as rmod

    B, H, T, D = q.shape
    H_kv, R = k.shape[1], rotary_dim
    cos, sin = cos.float().contiguous(), sin.float().contiguous()
    sc_b = cos.stride(0) if cos.dim() == 3 else 0
    qo = torch.empty_like(q, memory_format=torch.contiguous_format)
    ko = torch.empty_like(k, memory_format=torch.contiguous_format)
    half = R // 2
    rmod._rope_kernel[(triton.cdiv(T, block_t), B, triton.cdiv(H + H_kv, heads))](
        q, k, qo, ko, cos, sin,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        qo.stride(0), qo.stride(1), qo.stride(2), ko.stride(0), ko.stride(1), ko.stride(2),
        sc_b, cos.stride(-2), T, H, H_kv, D,
        HALF=half, BLOCK_HALF=triton.next_power_of_2(half), BLOCK_T=block_t,
        BLOCK_PASS=triton.next_power_of_2(D - R) if R < D else 1, HEADS=heads,
        INTERLEAVED=(pairing == "interleaved"), COPY_PASS=R < D, INVERSE=False, num_warps=num_warps,
    )  # fmt: skip
    return qo, ko


def rope_section(lines, old_path, smoke=False):
    from glmkit.kernels import rope as rmod
    from glmkit.ops.rope import rope_cos_sin, rope_reference

    old = None
    if old_path and os.path.exists(old_path):
        spec = importlib.util.spec_from_file_location("rope_old", old_path)
        old = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(old)
    x = torch.empty(1 << (20 if smoke else 28), dtype=torch.uint8, device=DEV)
    y = torch.empty_like(x)
    copy_gbs = 2 * x.numel() / bench(lambda: y.copy_(x), rep=100) / 1e6  # noqa: F821 (del below)
    del x, y
    lines += [
        "",
        "### RoPE, out of place, bf16 (GB/s = read + write of q and k)",
        "",
        f"copy ceiling in this run ({'1' if smoke else '256'} MiB): {copy_gbs:.0f} GB/s",
        "",
        "| shape | impl | block_t | warps | heads/prog | GB/s | err |",
        "|---|---|---|---|---|---|---|",
    ]
    shapes = [("GLM-4-9B", 2, 32, 2, 8192, 128, 64, "interleaved"), ("GLM-4.5", 1, 96, 8, 8192, 128, 64, "half")]
    if smoke:
        shapes = [("tiny", 1, 4, 2, 32, 32, 16, "interleaved"), ("tiny", 1, 4, 2, 32, 32, 16, "half")]
    for name, B, H, Hkv, T, D, R, pairing in shapes:
        g = torch.Generator(device=DEV).manual_seed(0)
        q = torch.randn(B, H, T, D, device=DEV, dtype=torch.bfloat16, generator=g)
        k = torch.randn(B, Hkv, T, D, device=DEV, dtype=torch.bfloat16, generator=g)
        cos, sin = rope_cos_sin(torch.arange(T, device=DEV).expand(B, T), R, 1e6)
        ref = rope_reference(q.float(), cos, sin, R, pairing)
        nbytes = 2 * (H + Hkv) * B * T * D * 2
        runs = []
        if old is not None:
            runs.append(("old", lambda: old.rope_fwd(q, k, cos, sin, R, pairing), "-", "-", "-"))  # noqa: B023
        for bt, w, hp in ROPE_CFGS[:2] if smoke else ROPE_CFGS:
            runs.append(("new", lambda bt=bt, w=w, hp=hp: rope_fixed(q, k, cos, sin, R, pairing, bt, w, hp), bt, w, hp))  # noqa: B023
        runs.append(("new default", lambda: rmod.rope_fwd(q, k, cos, sin, R, pairing), "", "", ""))  # noqa: B023
        for impl, fn, bt, w, hp in runs:
            try:
                err = rel_err(ref, fn()[0])
                gbs = nbytes / bench(fn, rep=100) / 1e6
            except Exception as e:  # noqa: BLE001
                common.reraise_if_smoke()
                err, gbs = float("nan"), float("nan")
                log(f"  rope {impl} {bt} {w} {hp}: {e!r}")
            lines.append(f"| {name} {pairing} | {impl} | {bt} | {w} | {hp} | {gbs:.0f} | {err:.1e} |")
            log(f"  rope {name} {impl} bt={bt} w={w} hp={hp}: {gbs:.0f} GB/s err {err:.1e}")


# ---------------------------------------------------------------- MoE grouped GEMM, fixed configurations


def _gemm_fixed(
    a,
    w,
    c,
    sorted_ids,
    expert_ids,
    ntpp,
    topw,
    pre,
    dwp,
    n_out,
    K,
    S,
    a_div,
    block_m,
    epilogue,
    cfg,
    aw=None,
    dw_sub=64,
):
    """``glmkit.kernels.moe_experts._launch_gemm`` at a fixed cfg (dict of BLOCK_N, BLOCK_K, num_warps, num_stages):
    the raw ``_moe_gemm_kernel`` with the arguments and grid the launcher uses."""
    from glmkit.kernels import moe_experts as mg

    num_pid_m = sorted_ids.numel() // block_m
    dummy = c
    args = (
        a, w, c, sorted_ids, expert_ids, ntpp,
        topw if topw is not None else dummy, pre if pre is not None else dummy, dwp if dwp is not None else dummy,
        aw if aw is not None else dummy,
        n_out, K, S, a_div, num_pid_m,
        a.stride(0), a.stride(1), w.stride(0), w.stride(1), w.stride(2), c.stride(0), c.stride(1),
        pre.stride(0) if pre is not None else 0, pre.stride(1) if pre is not None else 0,
        dwp.stride(0) if dwp is not None else 0, aw.stride(0) if aw is not None else 0,
    )  # fmt: skip
    consts = dict(BLOCK_M=block_m, EPILOGUE=epilogue, MUL_W=epilogue == mg.PLAIN and topw is not None,
                  STORE_PRE=epilogue == mg.SWIGLU and pre is not None, DOT_PRECISION=mg._precision(a.dtype),
                  DW_SUB=dw_sub, STORE_AW=aw is not None)  # fmt: skip
    mg._moe_gemm_kernel[(num_pid_m * triton.cdiv(n_out, cfg["BLOCK_N"]),)](*args, GROUP_M=8, **consts, **cfg)


def moe_gemm_fixed(a, w, sorted_ids, expert_ids, ntpp, *, top_k, block_m, cfg):
    """``moe_gemm(a, w, ..., top_k=, block_m=)`` (plain epilogue, no weights) at a fixed cfg."""
    E, n_out, K = w.shape
    S = a.shape[0] * top_k
    out = torch.empty((S, n_out), dtype=a.dtype, device=a.device)
    _gemm_fixed(a, w, out, sorted_ids, expert_ids, ntpp, None, None, None, n_out, K, S, top_k, block_m, 0, cfg)
    return out


def dgrad_fixed(dy, w_down, h, topw, sorted_ids, expert_ids, ntpp, top_k, block_m, I, cfg):
    """``moe_experts._moe_swiglu_dgrad(..., store_aw=True)`` at a fixed cfg: (dh, dw, aw)."""
    from glmkit.kernels import moe_experts as mg

    S = dy.shape[0] * top_k
    dh = torch.empty((S, 2 * I), dtype=h.dtype, device=h.device)
    aw = torch.empty((S, I), dtype=h.dtype, device=h.device)
    sub = 32 if dy.device.type != "cuda" else 64
    dwp = torch.zeros((S, triton.cdiv(I, sub)), dtype=torch.float32, device=dy.device)
    _gemm_fixed(
        dy,
        w_down.transpose(1, 2),
        dh,
        sorted_ids,
        expert_ids,
        ntpp,
        topw,
        h,
        dwp,
        I,
        dy.shape[1],
        S,
        top_k,
        block_m,
        mg.SWIGLU_BWD,
        cfg,
        aw=aw,
        dw_sub=sub,
    )
    return dh, dwp.sum(1), aw


def wgrad_fixed(left, right, sorted_ids, counts, *, block_m, left_div, right_div, cfg, topk_weight=None):
    """``moe_weight_grad`` at a fixed cfg (dict of BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages)."""
    from glmkit.kernels import moe_experts as mg

    E = counts.numel()
    M, N = left.shape[1], right.shape[1]
    out = torch.empty((E, M, N), dtype=left.dtype, device=left.device)
    topw = topk_weight.reshape(-1).contiguous() if topk_weight is not None else None
    mg._moe_wgrad_kernel[(triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"]), E)](
        left, right, out, sorted_ids, counts, topw if topw is not None else left,
        M, N, E, left_div, right_div,
        left.stride(0), left.stride(1), right.stride(0), right.stride(1), out.stride(0), out.stride(1), out.stride(2),
        ALIGN_M=block_m, E_P2=triton.next_power_of_2(E), MUL_W=topw is not None,
        DOT_PRECISION=mg._precision(left.dtype), **cfg,
    )  # fmt: skip
    return out


MOE_CFGS = {  # alignment block_m -> (BLOCK_N, BLOCK_K, warps, stages)
    128: [(256, 64, 8, 3), (256, 64, 8, 4), (128, 64, 8, 3), (128, 64, 8, 4), (128, 128, 8, 3), (256, 128, 8, 2),
          (256, 32, 8, 5), (128, 64, 4, 4), (128, 128, 4, 3)],
    256: [(128, 64, 8, 3), (128, 64, 8, 4), (128, 32, 8, 4), (64, 64, 8, 4), (128, 128, 8, 2), (256, 64, 8, 3),
          (128, 64, 16, 3)],
}  # fmt: skip


def moe_section(lines, smoke=False):
    from glmkit.kernels import moe_experts as mg
    from glmkit.kernels.moe_align import moe_align

    E, S, K, N, k = (4, 256, 64, 64, 2) if smoke else (64, 131072, 2048, 2048, 8)
    dt = _dot_dtype()
    g = torch.Generator(device=DEV).manual_seed(1)
    w = (torch.randn(E, N, K, device=DEV, generator=g) / math.sqrt(K)).to(dt)
    x_tok = torch.randn(S // k, K, device=DEV, generator=g).to(dt)
    t = torch.arange(S // k, device=DEV)[:, None]
    idx = (t + torch.arange(k, device=DEV)[None, :] * (E // k)) % E
    flat = idx.reshape(-1)
    perm = torch.sort(flat, stable=True).indices
    x_sorted = x_tok[perm // k].contiguous()
    offs = torch.bincount(flat, minlength=E).cumsum(0).to(torch.int32)
    wt = w.transpose(-2, -1)
    ref = torch._grouped_mm(x_sorted, wt, offs=offs)
    flops = 2 * S * K * N
    t_ref = bench(lambda: torch._grouped_mm(x_sorted, wt, offs=offs))
    bm0 = mg.default_block_m(S, E, DEV)
    al0 = moe_align(flat[perm].reshape(-1, 1), E, bm0)
    t_auto = bench(lambda: mg.moe_gemm(x_sorted, w, *al0[:3], top_k=1, block_m=bm0))
    lines += [
        "",
        f"### MoE grouped GEMM, E={E}, S={S}, K=N={K}",
        "",
        f"torch._grouped_mm {flops / t_ref / 1e9:.0f} TFLOP/s ({t_ref:.3f} ms); ours autotuned (rows by slot, "
        f"block_m={bm0}) {flops / t_auto / 1e9:.0f} TFLOP/s = {t_ref / t_auto:.2f}×, picked "
        f"{getattr(mg._moe_gemm_tuned, 'best_config', None)}",
        "",
        "| block_m | config (BN BK w s) | by slot TFLOP/s | vs grouped_mm | gathering TFLOP/s | vs grouped_mm | err |",
        "|---|---|---|---|---|---|---|",
    ]
    for bm, cfgs in {16: MOE_CFGS[128][:1]}.items() if smoke else MOE_CFGS.items():
        al_sorted = moe_align(flat[perm].reshape(-1, 1), E, bm)
        al_tok = moe_align(idx, E, bm)
        for bn, bk, wp, st in cfgs:
            cfg = dict(BLOCK_N=bn, BLOCK_K=bk, num_warps=wp, num_stages=st)
            try:
                f1 = lambda: moe_gemm_fixed(x_sorted, w, *al_sorted[:3], top_k=1, block_m=bm, cfg=cfg)  # noqa: E731, B023
                f2 = lambda: moe_gemm_fixed(x_tok, w, *al_tok[:3], top_k=k, block_m=bm, cfg=cfg)  # noqa: E731, B023
                err = max(rel_err(ref, f1()), rel_err(ref, f2()[perm]))
                t1, t2 = bench(f1, rep=100), bench(f2, rep=100)
            except Exception as e:  # noqa: BLE001
                common.reraise_if_smoke()
                t1 = t2 = err = float("nan")
                log(f"  moe {bm} {cfg}: {_err_msg(e)}")
            lines.append(
                f"| {bm} | {bn} {bk} w{wp} s{st} | {flops / t1 / 1e9:.0f} | {t_ref / t1:.2f} | "
                f"{flops / t2 / 1e9:.0f} | {t_ref / t2:.2f} | {err:.1e} |"
            )
            log(
                f"  moe bm={bm} {bn} {bk} w{wp} s{st}: slot {flops / t1 / 1e9:.0f} gather {flops / t2 / 1e9:.0f} "
                f"TFLOP/s (ref {flops / t_ref / 1e9:.0f}) err {err:.1e}"
            )


# ---------------------------------------------------------------- MoE backward, piece by piece

WGRAD_SWEEP = [  # (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages)
    (128, 128, 64, 8, 3), (128, 128, 32, 8, 4), (128, 64, 64, 4, 4), (64, 128, 64, 4, 4),
    (128, 256, 64, 8, 3), (128, 256, 64, 8, 4), (256, 128, 64, 8, 3), (256, 128, 64, 8, 4),
    (128, 256, 32, 8, 5), (256, 128, 32, 8, 5), (128, 128, 64, 8, 4), (128, 128, 128, 8, 2),
]  # fmt: skip
DGRAD_SWEEP = [  # (BLOCK_N, BLOCK_K, warps, stages)
    (128, 64, 8, 3), (128, 64, 8, 4), (128, 32, 8, 5), (128, 128, 8, 2), (64, 64, 4, 4), (128, 64, 4, 4),
    (64, 128, 4, 3), (256, 64, 8, 3), (256, 32, 8, 4),
]  # fmt: skip
DX_SWEEP = [(256, 64, 8, 3), (256, 64, 8, 4), (128, 64, 8, 3), (128, 128, 8, 3), (256, 32, 8, 5), (256, 128, 8, 2)]


def _load_module(path, name):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


class _KernelExperts(torch.autograd.Function):
    """The routed experts on one kernel module's ``experts_fwd`` / ``experts_bwd`` (the wiring of
    ``glmkit.ops.moe_experts.MoEExpertsFunction``), so that two copies of kernels/moe_experts.py time alike."""

    @staticmethod
    def forward(ctx, mod, x, topk_idx, topk_weight, w_gate_up, w_down, block_m):
        y, saved = mod.experts_fwd(x, topk_idx, topk_weight, w_gate_up, w_down, block_m, keep=True)
        ctx.save_for_backward(*saved)
        ctx.meta = (mod, topk_idx.shape[1], block_m, topk_weight.dtype, topk_weight.shape)
        return y

    @staticmethod
    def backward(ctx, dy):
        mod, k, block_m, w_dtype, w_shape = ctx.meta
        dx, dtopw, dwgu, dwd = mod.experts_bwd(dy, ctx.saved_tensors, k, block_m)
        return None, dx, None, dtopw.to(w_dtype).reshape(w_shape), dwgu, dwd, None


def moe_bwd_section(lines, old_path, full=True, smoke=False):
    """full=False (section moe_bwd_pieces): the pieces of the current module only, no layer, no sweep."""
    from glmkit import moe as gmoe
    from glmkit.kernels import moe_experts as mg
    from glmkit.kernels.moe_align import moe_align
    from glmkit.ops.moe_experts import moe_experts_sorted

    # loaded inside glmkit.kernels so that its relative import of moe_align resolves
    old = (
        _load_module(old_path, "glmkit.kernels._moe_experts_old")
        if full and old_path and os.path.exists(old_path)
        else None
    )
    N, H, I, E, k = (32, 64, 32, 4, 2) if smoke else (16384, 2048, 1024, 64, 8)
    S = N * k
    dt = _dot_dtype()
    torch.manual_seed(0)
    experts = gmoe.Experts(E, H, I).to(DEV, dt)
    wgu, wd = experts.gate_up_proj, experts.down_proj
    x = torch.randn(N, H, device=DEV).to(dt).requires_grad_()
    dy = torch.randn(N, H, device=DEV).to(dt)
    g = torch.Generator(device=DEV).manual_seed(7)
    gumbel = -torch.log(-torch.log(torch.rand(N, E, device=DEV, generator=g).clamp(1e-20, 1 - 1e-7)))
    idx = torch.topk(gumbel, k, dim=-1).indices
    w = torch.softmax(torch.randn(N, k, device=DEV), -1).requires_grad_()
    topw = w.detach().reshape(-1).float().contiguous()
    bm = mg.default_block_m(S, E, DEV)
    sorted_ids, expert_ids, ntpp, counts = moe_align(idx, E, bm)
    al = (sorted_ids, expert_ids, ntpp)
    xd, wgud, wdd = x.detach(), wgu.detach(), wd.detach()
    h = torch.empty(S, 2 * I, device=DEV, dtype=dt)
    a = mg.moe_gemm(xd, wgud, *al, top_k=k, block_m=bm, swiglu=True, pre_out=h)
    gf = 2 * S * H * I  # FLOPs of one [S, H] x [H, I] product
    rep = dict(rep=100, warmup=25)
    lines += [
        "",
        f"### MoE backward pieces, N={N}, H={H}, I={I}, E={E}, k={k}, {str(dt)[6:]}, uniform routing, block_m={bm}",
        "",
        "| piece | impl | ms | TFLOP/s | err vs old |",
        "|---|---|---|---|---|",
    ]

    def row(piece, impl, fn, flops, ref=None, got=None):
        ms = bench(fn, **rep)
        err = f"{rel_err(ref.float(), got.float()):.1e}" if ref is not None else "—"
        lines.append(f"| {piece} | {impl} | {ms:.3f} | {flops / ms / 1e9 if flops else float('nan'):.0f} | {err} |")
        log(lines[-1])
        return ms

    def pick(tuned):
        return getattr(tuned, "best_config", None)

    new_dh, new_dw, new_aw = mg._moe_swiglu_dgrad(dy, wdd, h, topw, *al, k, bm, I, store_aw=True)
    res = {}
    if old is not None:
        old_dh, old_dw = old._moe_swiglu_dgrad(dy, wdd, h, topw, *al, k, bm, I)[:2]
        res["dgrad old"] = row(
            "dgrad + SwiGLU bwd", "old", lambda: old._moe_swiglu_dgrad(dy, wdd, h, topw, *al, k, bm, I), gf
        )
    else:
        old_dh, old_dw = new_dh, new_dw
    res["dgrad new"] = row(
        "dgrad + SwiGLU bwd",
        "new (autotuned, stores w·a)",
        lambda: mg._moe_swiglu_dgrad(dy, wdd, h, topw, *al, k, bm, I, store_aw=True),
        gf,
        old_dh,
        new_dh,
    )
    lines.append(f"| dgrad autotuned pick | {pick(mg._moe_gemm_tuned)} | | | |")
    row("dgrad + SwiGLU bwd", "new, no w·a store", lambda: mg._moe_swiglu_dgrad(dy, wdd, h, topw, *al, k, bm, I), gf)
    lines.append(f"| d topk_weight | err new vs old | | | {rel_err(old_dw, new_dw):.1e} |")
    wgt = wgud.transpose(1, 2)
    dx_new = mg.moe_gemm(new_dh, wgt, *al, top_k=1, block_m=bm)
    if old is not None:
        dx_old = old.moe_gemm(new_dh, wgt, *al, top_k=1, block_m=bm)
        res["dx old"] = row(
            "dx grouped GEMM", "old autotune", lambda: old.moe_gemm(new_dh, wgt, *al, top_k=1, block_m=bm), 2 * gf
        )
    res["dx new"] = row(
        "dx grouped GEMM",
        "new autotune",
        lambda: mg.moe_gemm(new_dh, wgt, *al, top_k=1, block_m=bm),
        2 * gf,
        dx_old if old is not None else None,
        dx_new,
    )
    lines.append(f"| dx autotuned pick | {pick(mg._moe_gemm_tuned)} | | | |")
    res["combine"] = row("dx combine", "current", lambda: mg.moe_combine(dx_new, k), 0)
    wgu_args = (new_dh, xd, sorted_ids, counts)
    wgu_kw = dict(block_m=bm, left_div=1, right_div=k)
    g_new = mg.moe_weight_grad(*wgu_args, **wgu_kw)
    if old is not None:
        g_old = old.moe_weight_grad(*wgu_args, **wgu_kw)
        res["wgu old"] = row("dW_gate_up", "old autotune", lambda: old.moe_weight_grad(*wgu_args, **wgu_kw), 2 * gf)
        lines.append(f"| dW_gate_up old pick | {pick(old._moe_wgrad_tuned)} | | | |")
    res["wgu new"] = row(
        "dW_gate_up",
        "new autotune",
        lambda: mg.moe_weight_grad(*wgu_args, **wgu_kw),
        2 * gf,
        g_old if old is not None else None,
        g_new,
    )
    lines.append(f"| dW_gate_up new pick | {pick(mg._moe_wgrad_tuned)} | | | |")
    wd_kw = dict(block_m=bm, left_div=k, right_div=1)
    d_new = mg.moe_weight_grad(dy, new_aw, sorted_ids, counts, **wd_kw)
    if old is not None:
        d_old = old.moe_weight_grad(dy, a, sorted_ids, counts, topk_weight=topw, **wd_kw)
        res["wd old"] = row(
            "dW_down",
            "old autotune, w in the K loop",
            lambda: old.moe_weight_grad(dy, a, sorted_ids, counts, topk_weight=topw, **wd_kw),
            gf,
        )
        lines.append(f"| dW_down old pick | {pick(old._moe_wgrad_tuned)} | | | |")
    row(
        "dW_down",
        "new autotune, w in the K loop",
        lambda: mg.moe_weight_grad(dy, a, sorted_ids, counts, topk_weight=topw, **wd_kw),
        gf,
    )
    res["wd new"] = row(
        "dW_down",
        "new autotune, from w·a",
        lambda: mg.moe_weight_grad(dy, new_aw, sorted_ids, counts, **wd_kw),
        gf,
        d_old if old is not None else None,
        d_new,
    )
    lines.append(f"| dW_down new pick | {pick(mg._moe_wgrad_tuned)} | | | |")
    for tag in ("old", "new"):
        keys = [f"dgrad {tag}", f"dx {tag}", "combine", f"wgu {tag}", f"wd {tag}"]
        if all(kk in res for kk in keys):
            tot = sum(res[kk] for kk in keys)
            lines.append(f"| sum of backward pieces | {tag} | {tot:.3f} | {6 * gf / tot / 1e9:.0f} | |")
            log(lines[-1])

    if not full:
        return
    # the whole layer, fwd (no grad), fwd with autograd (saving), fwd+bwd
    inputs = [x, w, wgu, wd]
    impls = {
        "composite": lambda: moe_experts_sorted(x, idx, w, wgu, wd),
        "new": lambda: _KernelExperts.apply(mg, x, idx, w, wgu, wd, bm),
    }
    if old is not None:
        impls["old"] = lambda: _KernelExperts.apply(old, x, idx, w, wgu, wd, bm)
    lines += [
        "",
        "| layer | fwd ms (no grad) | fwd ms (autograd) | fwd+bwd ms | bwd ≈ ms | fwd+bwd TFLOP/s |",
        "|---|---|---|---|---|---|",
    ]
    ref = None
    for name, f in impls.items():
        gr = torch.autograd.grad(f(), inputs, dy)
        if ref is None:
            ref = gr
        errs = " / ".join(f"{rel_err(r.float(), q.float()):.1e}" for r, q in zip(ref, gr))

        def fwd_ng(f=f):
            with torch.no_grad():
                return f()

        t0 = bench(fwd_ng, **rep)
        t1 = bench(f, **rep)
        t2 = bench(lambda f=f: torch.autograd.grad(f(), inputs, dy), rep=200, warmup=50)
        lines.append(
            f"| {name} (grads vs composite {errs}) | {t0:.2f} | {t1:.2f} | {t2:.2f} | {t2 - t1:.2f} | "
            f"{18 * N * k * H * I / t2 / 1e9:.0f} |"
        )
        log(lines[-1])

    # fixed configurations of each piece, launched raw
    lines += ["", "| piece | config | ms | TFLOP/s | err vs autotuned |", "|---|---|---|---|---|"]
    rep_fixed = dict(rep=60, warmup=20)
    for bmm, bn, bk, wp, st in WGRAD_SWEEP[:1] if smoke else WGRAD_SWEEP:
        cfg = dict(BLOCK_M=bmm, BLOCK_N=bn, BLOCK_K=bk, num_warps=wp, num_stages=st)
        name = f"{bmm}×{bn}×{bk} w{wp} s{st}"
        for piece, fn, flops, want in (
            ("dW_gate_up", lambda: wgrad_fixed(*wgu_args, **wgu_kw, cfg=cfg), 2 * gf, g_new),  # noqa: B023
            ("dW_down from w·a", lambda: wgrad_fixed(dy, new_aw, sorted_ids, counts, **wd_kw, cfg=cfg), gf, d_new),  # noqa: B023
            (
                "dW_down w in loop",
                lambda: wgrad_fixed(dy, a, sorted_ids, counts, topk_weight=topw, **wd_kw, cfg=cfg),  # noqa: B023
                gf,
                d_new,
            ),
        ):
            if piece == "dW_down w in loop" and bmm == 64:
                continue
            try:
                err = rel_err(want.float(), fn().float())
                ms = bench(fn, **rep_fixed)
            except Exception as e:  # noqa: BLE001
                common.reraise_if_smoke()
                ms, err = float("nan"), float("nan")
                log(f"  {piece} {name}: {_err_msg(e)}")
            lines.append(f"| {piece} | {name} | {ms:.3f} | {flops / ms / 1e9:.0f} | {err:.1e} |")
            log(lines[-1])
    for bn, bk, wp, st in DGRAD_SWEEP[:1] if smoke else DGRAD_SWEEP:
        cfg = dict(BLOCK_N=bn, BLOCK_K=bk, num_warps=wp, num_stages=st)
        fn = lambda: dgrad_fixed(dy, wdd, h, topw, *al, k, bm, I, cfg)  # noqa: E731, B023
        try:
            dh_c, dw_c, aw_c = fn()
            err = max(
                rel_err(new_dh.float(), dh_c.float()), rel_err(new_dw, dw_c), rel_err(new_aw.float(), aw_c.float())
            )
            ms = bench(fn, **rep_fixed)
        except Exception as e:  # noqa: BLE001
            common.reraise_if_smoke()
            ms, err = float("nan"), float("nan")
            log(f"  dgrad {cfg}: {_err_msg(e)}")
        lines.append(f"| dgrad + SwiGLU bwd | {bn}×{bk} w{wp} s{st} | {ms:.3f} | {gf / ms / 1e9:.0f} | {err:.1e} |")
        log(lines[-1])
    for bn, bk, wp, st in DX_SWEEP[:1] if smoke else DX_SWEEP:
        cfg = dict(BLOCK_N=bn, BLOCK_K=bk, num_warps=wp, num_stages=st)
        fn = lambda: moe_gemm_fixed(new_dh, wgt, *al, top_k=1, block_m=bm, cfg=cfg)  # noqa: E731, B023
        try:
            err = rel_err(dx_new.float(), fn().float())
            ms = bench(fn, **rep_fixed)
        except Exception as e:  # noqa: BLE001
            common.reraise_if_smoke()
            ms, err = float("nan"), float("nan")
            log(f"  dx {cfg}: {_err_msg(e)}")
        lines.append(f"| dx grouped GEMM | {bn}×{bk} w{wp} s{st} | {ms:.3f} | {2 * gf / ms / 1e9:.0f} | {err:.1e} |")
        log(lines[-1])
    out = torch.empty(N, H, device=DEV, dtype=dt)
    for blk, wp in ((1024, 4),) if smoke else ((1024, 4), (1024, 8), (2048, 8), (512, 4), (256, 2)):
        fn = lambda blk=blk, wp=wp: mg._moe_combine_kernel[(N, triton.cdiv(H, blk))](  # noqa: E731
            dx_new, dx_new, out, H, dx_new.stride(0), out.stride(0), TOP_K=k, BLOCK=blk, HAS_W=False, num_warps=wp
        )
        fn()
        ms = bench(fn, **rep_fixed)
        lines.append(f"| dx combine | BLOCK {blk} w{wp} | {ms:.3f} | {(S + N) * H * 2 / ms / 1e6:.0f} GB/s | — |")
        log(lines[-1])


# ---------------------------------------------------------------- RMSNorm and SwiGLU launch options


def rmsnorm_fixed(x, w, eps, num_warps):
    """``rmsnorm_fwd`` on x [M, N] with num_warps given (None: the launcher's choice): the raw forward kernel."""
    from glmkit.kernels import rmsnorm as rn

    M, N = x.shape
    y = torch.empty_like(x)
    rstd = torch.empty(M, dtype=torch.float32, device=x.device)
    block_n = triton.next_power_of_2(N)
    opts = rn._fwd_launch_opts(block_n, x.device) if num_warps is None else dict(num_warps=num_warps)
    rn._rmsnorm_fwd_kernel[(M,)](x, w, y, rstd, x.stride(0), y.stride(0), N, float(eps), BLOCK_N=block_n, **opts)
    return y, rstd


def rmsnorm_bwd_fixed(dy, x, w, rstd, num_warps, programs):
    """``rmsnorm_bwd`` (dx and dw) on [M, N] with num_warps (None: the launcher's) and the number of programs."""
    from glmkit.kernels import rmsnorm as rn

    M, N = x.shape
    block_n = triton.next_power_of_2(N)
    rows_per_program = triton.cdiv(M, programs)
    P = triton.cdiv(M, rows_per_program)
    dw_part = torch.empty((P, N), dtype=torch.float32, device=x.device)
    dx = torch.empty_like(x)
    opts = rn._launch_opts(block_n, x.device) if num_warps is None else dict(num_warps=num_warps)
    rn._rmsnorm_bwd_kernel[(P,)](
        dy, x, w, rstd, dx, dw_part, dy.stride(0), x.stride(0), dx.stride(0), M, N, rows_per_program,
        BLOCK_N=block_n, COMPUTE_DW=True, **opts,
    )  # fmt: skip
    return dx, dw_part.sum(0).to(w.dtype)


def norm_section(lines, smoke=False):
    from glmkit.kernels import rmsnorm as rn

    lines += [
        "",
        "### RMSNorm, bf16 (GB/s: fwd 2·M·N·2 bytes, bwd 3·M·N·2)",
        "",
        "| shape | pass | warps | programs | GB/s |",
        "|---|---|---|---|---|",
    ]
    sms = torch.cuda.get_device_properties(0).multi_processor_count if DEV == "cuda" else 4
    shapes = [(64, 96)] if smoke else [(16384, 8192), (16384, 5120), (16384, 4096)]
    for M, N in shapes:
        g = torch.Generator(device=DEV).manual_seed(0)
        x = torch.randn(M, N, device=DEV, dtype=torch.bfloat16, generator=g)
        w = (1 + 0.1 * torch.randn(N, device=DEV, generator=g)).to(torch.bfloat16)
        dy = torch.randn_like(x)
        y, rstd = rn.rmsnorm_fwd(x, w, 1e-5)
        dx_ref, dw_ref = rn.rmsnorm_bwd(dy, x, w, rstd)
        for warps in (None, 4) if smoke else (None, 4, 8, 16, 32):
            try:
                yy = rmsnorm_fixed(x, w, 1e-5, warps)[0]
                assert rel_err(y.float(), yy.float()) < 1e-2
                gbs = 2 * M * N * 2 / bench(lambda: rmsnorm_fixed(x, w, 1e-5, warps), rep=100) / 1e6  # noqa: B023
                lines.append(f"| {M}×{N} | fwd | {warps or 'default'} | {M} | {gbs:.0f} |")
                log(lines[-1])
                for P in (sms,) if smoke else (sms, 2 * sms, 4 * sms, 8 * sms):
                    dx, dw = rmsnorm_bwd_fixed(dy, x, w, rstd, warps, P)
                    assert rel_err(dx_ref.float(), dx.float()) < 1e-2 and rel_err(dw_ref.float(), dw.float()) < 1e-2
                    fn = lambda P=P: rmsnorm_bwd_fixed(dy, x, w, rstd, warps, P)  # noqa: E731, B023
                    gbs = 3 * M * N * 2 / bench(fn, rep=100) / 1e6
                    lines.append(f"| {M}×{N} | bwd | {warps or 'default'} | {P} | {gbs:.0f} |")
                    log(lines[-1])
            except Exception as e:  # noqa: BLE001
                common.reraise_if_smoke()
                log(f"  rmsnorm {M}x{N} warps {warps}: {type(e).__name__}: {str(e)[:100]}")


def swiglu_fixed(gu, dy, block, num_warps):
    """``swiglu_fwd`` (dy None) or ``swiglu_bwd`` on [M, 2I] at a column block and num_warps (None, None: the
    launcher's choice): the raw kernels."""
    from glmkit.kernels import swiglu as sw

    M, I = gu.shape[0], gu.shape[1] // 2
    if block is None:
        block, opts = sw._block(I, gu.device)
    else:
        block, opts = min(block, triton.next_power_of_2(I)), dict(num_warps=num_warps)
    grid = (M, triton.cdiv(I, block))
    if dy is None:
        y = torch.empty((M, I), dtype=gu.dtype, device=gu.device)
        sw._swiglu_fwd_kernel[grid](gu, y, gu.stride(0), y.stride(0), I, BLOCK=block, **opts)
        return y
    dgu = torch.empty_like(gu)
    sw._swiglu_bwd_kernel[grid](dy, gu, dgu, dy.stride(0), gu.stride(0), dgu.stride(0), I, BLOCK=block, **opts)
    return dgu


def swiglu_section(lines, smoke=False):
    from glmkit.kernels import swiglu as sw

    lines += [
        "",
        "### SwiGLU, bf16 (GB/s: fwd 3·M·I·2 bytes, bwd 5·M·I·2)",
        "",
        "| shape | pass | BLOCK | warps | GB/s |",
        "|---|---|---|---|---|",
    ]
    shapes = [(64, 80)] if smoke else [(16384, 13696), (16384, 10944), (16384, 1536)]
    configs = [(None, None), (1024, 4), (1024, 8), (2048, 4), (2048, 8), (4096, 8), (4096, 16), (512, 4)]
    for M, I in shapes:
        g = torch.Generator(device=DEV).manual_seed(0)
        gu = torch.randn(M, 2 * I, device=DEV, dtype=torch.bfloat16, generator=g)
        dy = torch.randn(M, I, device=DEV, dtype=torch.bfloat16, generator=g)
        y_ref, d_ref = sw.swiglu_fwd(gu), sw.swiglu_bwd(dy, gu)
        for blk, warps in configs[:2] if smoke else configs:
            try:
                assert torch.equal(swiglu_fixed(gu, None, blk, warps), y_ref)
                assert torch.equal(swiglu_fixed(gu, dy, blk, warps), d_ref)
                f = 3 * M * I * 2 / bench(lambda: swiglu_fixed(gu, None, blk, warps), rep=100) / 1e6  # noqa: B023
                b = 5 * M * I * 2 / bench(lambda: swiglu_fixed(gu, dy, blk, warps), rep=100) / 1e6  # noqa: B023
                lines.append(f"| {M}×{I} | fwd | {blk or 'default'} | {warps or 'default'} | {f:.0f} |")
                lines.append(f"| {M}×{I} | bwd | {blk or 'default'} | {warps or 'default'} | {b:.0f} |")
                log(lines[-2])
                log(lines[-1])
            except Exception as e:  # noqa: BLE001
                common.reraise_if_smoke()
                log(f"  swiglu {M}x{I} {blk} {warps}: {type(e).__name__}: {str(e)[:100]}")


SECTIONS = ("bwd", "rope", "moe", "moe_bwd", "moe_bwd_pieces", "norm", "swiglu")


def main():
    global DEV
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sections", nargs="*", default=["bwd", "rope", "moe"], choices=SECTIONS)
    ap.add_argument("--old-rope", default=".perf/rope_old.py", help="an earlier kernels/rope.py to time beside")
    ap.add_argument(
        "--old-moe",
        default=".perf/moe_experts_base.py",
        help="an earlier kernels/moe_experts.py (same launcher API) to time beside",
    )
    ap.add_argument("--out", default="/tmp/sweep_kernels.md")
    ap.add_argument(
        "--smoke",
        action="store_true",
        help="check the script: every section at tiny shapes with 1-2 configurations, one timed call "
        "each, any device (CPU: interpreter, fp32 for tl.dot kernels), no old modules, nothing written",
    )
    args = ap.parse_args()
    smoke = args.smoke
    if smoke:
        common.SMOKE = True
        DEV = common.device()
        args.sections = [s for s in SECTIONS if s != "moe_bwd_pieces"]  # moe_bwd runs the pieces too
        args.old_rope = args.old_moe = None
    elif not torch.cuda.is_available():
        sys.exit("needs CUDA (--smoke checks the script on CPU)")
    machine = torch.cuda.get_device_name() if DEV == "cuda" else "CPU (Triton interpreter)"
    lines = [
        f"# Kernel tuning sweeps on {machine}; torch {torch.__version__}, triton {triton.__version__}",
        f"bf16 matmul {256 if smoke else 8192}³ = {matmul_ceiling():.0f} TFLOP/s in this run",
    ]
    if smoke:
        lines.append("SMOKE RUN: tiny shapes, 1-2 configurations per table, one timed call, numbers meaningless")
    log("\n".join(lines))
    failed = []
    for sec in args.sections:
        try:
            {
                "bwd": lambda: bwd_section(lines, smoke),
                "rope": lambda: rope_section(lines, args.old_rope, smoke),
                "moe": lambda: moe_section(lines, smoke),
                "moe_bwd": lambda: moe_bwd_section(lines, args.old_moe, True, smoke),
                "moe_bwd_pieces": lambda: moe_bwd_section(lines, None, False, smoke),
                "norm": lambda: norm_section(lines, smoke),
                "swiglu": lambda: swiglu_section(lines, smoke),
            }[sec]()
        except Exception:  # noqa: BLE001
            traceback.print_exc()
            lines.append(f"section {sec} failed: see the log")
            failed.append(sec)
        if not smoke:
            with open(args.out, "w") as f:
                f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    if smoke and failed:
        sys.exit(f"smoke: sections failed: {' '.join(failed)}")


if __name__ == "__main__":
    main()
