"""Tuning sweeps (GPU only): fixed launch configurations of the attention backward kernels, the RoPE kernel
and the MoE grouped GEMM, each checked for correctness and timed beside its baseline in the same run.

Not a benchmark table of record: it is what the autotune lists and launch defaults in kernels/ were
chosen from (the chosen figures are in benchmarks/results/*_h200.md). Sections:

* bwd: the dk/dv kernel and the dq kernel of kernels/glm_attention_bwd.py timed separately, causal,
  bf16, T = 8K, B·T = 32K, H = 2048/D, D = 128 and 64; gradients checked against SDPA-cuDNN's.
* rope: kernels/rope.py at (block_t, num_warps, heads_per_program), both pairings, GLM-4-9B / GLM-4.5
  shapes, out of place; a copy of the previous kernel (``--old-rope PATH``) timed in the same run.
* norm, swiglu: RMSNorm (num_warps, programs of the backward) and SwiGLU (column block, num_warps)
  launch options, forward and backward timed alone; outputs must equal the default launch's.
* moe: the grouped GEMM of kernels/moe_gemm.py (64 experts, 131072 slots, K = N = 2048) at fixed
  (BLOCK_N, BLOCK_K, warps, stages) vs torch._grouped_mm.
* moe_bwd: the backward of ``moe_experts`` (N = 16384, H = 2048, I = 1024, E = 64, k = 8, bf16, uniform
  routing) piece by piece — the dgrad GEMM with the SwiGLU-backward epilogue, the dx grouped GEMM, the dx
  combine, the two weight gradients — for the current module and a copy of an earlier one
  (``--old-moe PATH``) in the same run, the whole layer fwd / fwd+bwd of both and of the composite, then
  fixed launch configurations of each piece. moe_bwd_pieces: the pieces of the current module alone.

    python benchmarks/sweep_kernels.py --sections bwd rope moe --out /tmp/sweep.md
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
import sys
import traceback

import torch
import torch.nn.functional as F
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel

import glmkit.kernels  # noqa: F401
from glmkit.testing import rel_err

from common import bench, matmul_ceiling  # benchmarks/common.py

LOG = []


def log(msg):
    print(msg, flush=True)
    LOG.append(msg)


# ---------------------------------------------------------------- attention backward

DKDV = {  # D -> (BLOCK_M streamed, BLOCK_N resident, warps, stages)
    128: [(64, 128, 8, 3), (64, 128, 8, 2), (64, 128, 8, 4), (32, 128, 4, 3), (32, 128, 8, 3), (64, 128, 4, 3),
          (128, 128, 8, 2), (128, 128, 8, 3), (64, 64, 4, 3), (32, 64, 4, 3)],
    64: [(32, 64, 4, 4), (64, 64, 4, 3), (64, 128, 8, 3), (32, 128, 4, 3), (64, 128, 4, 3), (128, 128, 8, 3),
         (64, 64, 4, 4), (32, 64, 4, 3), (64, 128, 8, 4), (128, 128, 8, 2)],
}
DQ = {  # D -> (BLOCK_M resident, BLOCK_N streamed, warps, stages)
    128: [(128, 64, 8, 3), (128, 64, 8, 2), (128, 64, 8, 4), (128, 128, 8, 2), (128, 128, 8, 3), (128, 32, 4, 3),
          (64, 64, 4, 3), (64, 128, 4, 3), (128, 64, 4, 3), (64, 32, 4, 3)],
    64: [(64, 64, 4, 3), (128, 32, 4, 3), (128, 64, 8, 3), (128, 64, 4, 3), (64, 64, 4, 4), (128, 128, 8, 3),
         (64, 128, 4, 3), (128, 64, 8, 4), (64, 32, 4, 4), (128, 128, 8, 2)],
}


def bwd_section(lines, T=8192, Ds=(128, 64)):
    from glmkit.kernels import glm_attention_bwd as bmod
    from glmkit.kernels.glm_attention import LOG2E, glm_attention_fwd
    from glmkit.kernels.glm_attention_bwd import bwd_flops, glm_attention_bwd

    for D in Ds:
        B, H = 32768 // T, 2048 // D
        g = torch.Generator(device="cuda").manual_seed(11 + D)
        q, k, v, do = (torch.randn(B, H, T, D, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(4))
        causal = torch.zeros(B, dtype=torch.int64, device="cuda")
        o, lse = glm_attention_fwd(q, k, v, causal, return_lse=True, check=False)
        qq, kk, vv = (t.clone().requires_grad_() for t in (q, k, v))
        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
            out = F.scaled_dot_product_attention(qq, kk, vv, is_causal=True)
        ref = torch.autograd.grad(out, (qq, kk, vv), do, retain_graph=True)
        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
            t_cudnn = bench(lambda: torch.autograd.grad(out, (qq, kk, vv), do, retain_graph=True), rep=150)
        flops = bwd_flops(T, D, 0, B, H)
        dq, dk, dv = (torch.empty_like(t) for t in (q, k, v))
        delta = torch.empty(B, H, T, device="cuda")
        auto = lambda: glm_attention_bwd(do, q, k, v, o, lse, causal, check=False, dq=dq, dk=dk, dv=dv, delta=delta)  # noqa: E731
        auto()
        err_auto = max(rel_err(r, x) for r, x in zip(ref, (dq, dk, dv)))
        t_auto = bench(auto, rep=150)
        scale = 1.0 / math.sqrt(D)
        common = (scale, scale * LOG2E, q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
                  v.stride(0), v.stride(1), v.stride(2), do.stride(0), do.stride(1), do.stride(2))
        dkdv_args = (q, k, v, do, lse, delta, causal, dk, dv, *common, dk.stride(0), dk.stride(1), dk.stride(2),
                     dv.stride(0), dv.stride(1), dv.stride(2), H, H, T, 1, 0)
        dq_args = (q, k, v, do, lse, delta, causal, dq, *common, dq.stride(0), dq.stride(1), dq.stride(2), H, T, 1, 0)
        lines += ["", f"### Attention backward, causal, T={T}, D={D}, B×H={B}×{H}", "",
                  f"cuDNN bwd {flops / t_cudnn / 1e9:.0f} TFLOP/s ({t_cudnn:.3f} ms); ours autotuned (all three kernels) "
                  f"{flops / t_auto / 1e9:.0f} TFLOP/s ({t_auto:.3f} ms, err {err_auto:.1e}) = {t_cudnn / t_auto:.2f}× cuDNN; "
                  f"autotuner picked dkdv {bmod._dkdv_tuned.best_config}, dq {bmod._dq_tuned.best_config}", "",
                  "| kernel | config (BM×BN w s) | ms | err | share of charged FLOPs/s |", "|---|---|---|---|---|"]
        best = {}
        for kind, table in (("dkdv", DKDV), ("dq", DQ)):
            for bm, bn, w, s in table[D]:
                name = f"{bm}x{bn} w{w} s{s}"
                try:
                    if kind == "dkdv":
                        fn = lambda: bmod._glm_attn_bwd_dkdv_kernel[(triton.cdiv(T, bn), B * H)](  # noqa: E731
                            *dkdv_args, HEAD_DIM=D, BLOCK_M=bm, BLOCK_N=bn, DOT_PRECISION="tf32", num_warps=w, num_stages=s)
                        dk.fill_(float("nan"))
                        dv.fill_(float("nan"))
                        fn()
                        err = max(rel_err(ref[1], dk), rel_err(ref[2], dv))
                    else:
                        fn = lambda: bmod._glm_attn_bwd_dq_kernel[(triton.cdiv(T, bm), B * H)](  # noqa: E731
                            *dq_args, HEAD_DIM=D, BLOCK_M=bm, BLOCK_N=bn, DOT_PRECISION="tf32", num_warps=w, num_stages=s)
                        dq.fill_(float("nan"))
                        fn()
                        err = rel_err(ref[0], dq)
                    ms = bench(fn, rep=100) if err < 2e-2 else float("nan")
                except Exception as e:  # noqa: BLE001
                    ms, err = float("nan"), float("nan")
                    log(f"  {kind} {name}: {type(e).__name__}: {str(e).splitlines()[0][:100] if str(e) else ''}")
                if ms == ms and (kind not in best or ms < best[kind][1]):
                    best[kind] = (name, ms)
                lines.append(f"| {kind} | {name} | {ms:.3f} | {err:.1e} | {flops / ms / 1e9 if ms == ms else float('nan'):.0f} |")
                log(f"  bwd D={D} {kind} {name}: {ms:.3f} ms err {err:.1e}")
        if len(best) == 2:
            tot = best["dkdv"][1] + best["dq"][1]
            lines += ["", f"best dkdv {best['dkdv'][0]} + best dq {best['dq'][0]} = {tot:.3f} ms (+ preprocess) → "
                      f"{flops / tot / 1e9:.0f} TFLOP/s, {t_cudnn / tot:.2f}× cuDNN"]
        del q, k, v, do, o, lse, qq, kk, vv, out, ref
        torch.cuda.empty_cache()


# ---------------------------------------------------------------- RoPE

ROPE_CFGS = [(64, 4, 1), (32, 4, 1), (128, 4, 1), (128, 8, 1), (256, 8, 1), (64, 8, 1), (32, 4, 2), (64, 4, 2),
             (32, 4, 4), (16, 4, 4), (64, 4, 4), (32, 2, 1)]  # (block_t, warps, heads per program)


def rope_section(lines, old_path):
    from glmkit.kernels import rope as rmod
    from glmkit.rope import apply_rope_reference, rope_cos_sin

    old = None
    if old_path and os.path.exists(old_path):
        spec = importlib.util.spec_from_file_location("rope_old", old_path)
        old = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(old)
    x = torch.empty(1 << 28, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    copy_gbs = 2 * x.numel() / bench(lambda: y.copy_(x), rep=100) / 1e6
    del x, y
    lines += ["", "### RoPE, out of place, bf16 (GB/s = read + write of q and k)", "",
              f"copy ceiling in this run (256 MiB): {copy_gbs:.0f} GB/s", "",
              "| shape | impl | block_t | warps | heads/prog | GB/s | err |", "|---|---|---|---|---|---|---|"]
    for name, B, H, Hkv, T, D, R, pairing in (("GLM-4-9B", 2, 32, 2, 8192, 128, 64, "interleaved"),
                                              ("GLM-4.5", 1, 96, 8, 8192, 128, 64, "half")):
        g = torch.Generator(device="cuda").manual_seed(0)
        q = torch.randn(B, H, T, D, device="cuda", dtype=torch.bfloat16, generator=g)
        k = torch.randn(B, Hkv, T, D, device="cuda", dtype=torch.bfloat16, generator=g)
        cos, sin = rope_cos_sin(torch.arange(T, device="cuda").expand(B, T), R, 1e6)
        ref = apply_rope_reference(q.float(), cos, sin, R, pairing)
        nbytes = 2 * (H + Hkv) * B * T * D * 2
        runs = []
        if old is not None:
            runs.append(("old", lambda: old.rope_fwd(q, k, cos, sin, R, pairing), "-", "-", "-"))
        for bt, w, hp in ROPE_CFGS:
            runs.append(("new", lambda bt=bt, w=w, hp=hp: rmod.rope_fwd(q, k, cos, sin, R, pairing, block_t=bt, num_warps=w,
                                                                       heads_per_program=hp), bt, w, hp))
        runs.append(("new default", lambda: rmod.rope_fwd(q, k, cos, sin, R, pairing), "", "", ""))
        for impl, fn, bt, w, hp in runs:
            try:
                err = rel_err(ref, fn()[0])
                gbs = nbytes / bench(fn, rep=100) / 1e6
            except Exception as e:  # noqa: BLE001
                err, gbs = float("nan"), float("nan")
                log(f"  rope {impl} {bt} {w} {hp}: {e!r}")
            lines.append(f"| {name} {pairing} | {impl} | {bt} | {w} | {hp} | {gbs:.0f} | {err:.1e} |")
            log(f"  rope {name} {impl} bt={bt} w={w} hp={hp}: {gbs:.0f} GB/s err {err:.1e}")


# ---------------------------------------------------------------- MoE grouped GEMM

MOE_CFGS = {  # alignment block_m -> (BLOCK_N, BLOCK_K, warps, stages)
    128: [(256, 64, 8, 3), (256, 64, 8, 4), (128, 64, 8, 3), (128, 64, 8, 4), (128, 128, 8, 3), (256, 128, 8, 2),
          (256, 32, 8, 5), (128, 64, 4, 4), (128, 128, 4, 3)],
    256: [(128, 64, 8, 3), (128, 64, 8, 4), (128, 32, 8, 4), (64, 64, 8, 4), (128, 128, 8, 2), (256, 64, 8, 3),
          (128, 64, 16, 3)],
}


def moe_section(lines):
    from glmkit.kernels import moe_gemm as mg
    from glmkit.kernels.moe_align import moe_align

    E, S, K, N, k = 64, 131072, 2048, 2048, 8
    g = torch.Generator(device="cuda").manual_seed(1)
    w = (torch.randn(E, N, K, device="cuda", generator=g) / math.sqrt(K)).to(torch.bfloat16)
    x_tok = torch.randn(S // k, K, device="cuda", generator=g).to(torch.bfloat16)
    t = torch.arange(S // k, device="cuda")[:, None]
    idx = (t + torch.arange(k, device="cuda")[None, :] * (E // k)) % E
    flat = idx.reshape(-1)
    perm = torch.sort(flat, stable=True).indices
    x_sorted = x_tok[perm // k].contiguous()
    offs = torch.bincount(flat, minlength=E).cumsum(0).to(torch.int32)
    wt = w.transpose(-2, -1)
    ref = torch._grouped_mm(x_sorted, wt, offs=offs)
    flops = 2 * S * K * N
    t_ref = bench(lambda: torch._grouped_mm(x_sorted, wt, offs=offs))
    bm0 = mg.default_block_m(S, E, "cuda")
    al0 = moe_align(flat[perm].reshape(-1, 1), E, bm0)
    t_auto = bench(lambda: mg.moe_gemm(x_sorted, w, *al0[:3], top_k=1, block_m=bm0))
    lines += ["", f"### MoE grouped GEMM, E={E}, S={S}, K=N={K}", "",
              f"torch._grouped_mm {flops / t_ref / 1e9:.0f} TFLOP/s ({t_ref:.3f} ms); ours autotuned (rows by slot, "
              f"block_m={bm0}) {flops / t_auto / 1e9:.0f} TFLOP/s = {t_ref / t_auto:.2f}×, picked {mg._moe_gemm_tuned.best_config}", "",
              "| block_m | config (BN BK w s) | by slot TFLOP/s | vs grouped_mm | gathering TFLOP/s | vs grouped_mm | err |",
              "|---|---|---|---|---|---|---|"]
    for bm, cfgs in MOE_CFGS.items():
        al_sorted = moe_align(flat[perm].reshape(-1, 1), E, bm)
        al_tok = moe_align(idx, E, bm)
        for bn, bk, wp, st in cfgs:
            cfg = dict(BLOCK_N=bn, BLOCK_K=bk, num_warps=wp, num_stages=st)
            try:
                f1 = lambda: mg.moe_gemm(x_sorted, w, *al_sorted[:3], top_k=1, block_m=bm, config=cfg)  # noqa: E731
                f2 = lambda: mg.moe_gemm(x_tok, w, *al_tok[:3], top_k=k, block_m=bm, config=cfg)  # noqa: E731
                err = max(rel_err(ref, f1()), rel_err(ref, f2()[perm]))
                t1, t2 = bench(f1, rep=100), bench(f2, rep=100)
            except Exception as e:  # noqa: BLE001
                t1 = t2 = err = float("nan")
                log(f"  moe {bm} {cfg}: {type(e).__name__}: {str(e).splitlines()[0][:100] if str(e) else ''}")
            lines.append(f"| {bm} | {bn} {bk} w{wp} s{st} | {flops / t1 / 1e9:.0f} | {t_ref / t1:.2f} | {flops / t2 / 1e9:.0f} | "
                         f"{t_ref / t2:.2f} | {err:.1e} |")
            log(f"  moe bm={bm} {bn} {bk} w{wp} s{st}: slot {flops / t1 / 1e9:.0f} gather {flops / t2 / 1e9:.0f} TFLOP/s "
                f"(ref {flops / t_ref / 1e9:.0f}) err {err:.1e}")


# ---------------------------------------------------------------- MoE backward, piece by piece

WGRAD_SWEEP = [  # (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages)
    (128, 128, 64, 8, 3), (128, 128, 32, 8, 4), (128, 64, 64, 4, 4), (64, 128, 64, 4, 4),
    (128, 256, 64, 8, 3), (128, 256, 64, 8, 4), (256, 128, 64, 8, 3), (256, 128, 64, 8, 4),
    (128, 256, 32, 8, 5), (256, 128, 32, 8, 5), (128, 128, 64, 8, 4), (128, 128, 128, 8, 2),
]
DGRAD_SWEEP = [  # (BLOCK_N, BLOCK_K, warps, stages)
    (128, 64, 8, 3), (128, 64, 8, 4), (128, 32, 8, 5), (128, 128, 8, 2), (64, 64, 4, 4), (128, 64, 4, 4),
    (64, 128, 4, 3), (256, 64, 8, 3), (256, 32, 8, 4),
]
DX_SWEEP = [(256, 64, 8, 3), (256, 64, 8, 4), (128, 64, 8, 3), (128, 128, 8, 3), (256, 32, 8, 5), (256, 128, 8, 2)]


def _load_module(path, name):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def moe_bwd_section(lines, old_path, full=True):
    """full=False (section moe_bwd_pieces): the pieces of the current module only, no layer, no sweep."""
    from glmkit import moe as gmoe
    from glmkit.kernels import moe_gemm as mg
    from glmkit.kernels.moe_align import moe_align

    old = (_load_module(old_path, "glmkit.kernels.moe_gemm_old")
           if full and old_path and os.path.exists(old_path) else None)
    N, H, I, E, k = 16384, 2048, 1024, 64, 8
    S = N * k
    dt = torch.bfloat16
    torch.manual_seed(0)
    experts = gmoe.Experts(E, H, I).to("cuda", dt)
    wgu, wd = experts.gate_up_proj, experts.down_proj
    x = torch.randn(N, H, device="cuda").to(dt).requires_grad_()
    dy = torch.randn(N, H, device="cuda").to(dt)
    g = torch.Generator(device="cuda").manual_seed(7)
    gumbel = -torch.log(-torch.log(torch.rand(N, E, device="cuda", generator=g).clamp(1e-20, 1 - 1e-7)))
    idx = torch.topk(gumbel, k, dim=-1).indices
    w = torch.softmax(torch.randn(N, k, device="cuda"), -1).requires_grad_()
    topw = w.detach().reshape(-1).float().contiguous()
    bm = mg.default_block_m(S, E, "cuda")
    sorted_ids, expert_ids, ntpp, counts = moe_align(idx, E, bm)
    al = (sorted_ids, expert_ids, ntpp)
    xd, wgud, wdd = x.detach(), wgu.detach(), wd.detach()
    h = torch.empty(S, 2 * I, device="cuda", dtype=dt)
    a = mg.moe_gemm(xd, wgud, *al, top_k=k, block_m=bm, swiglu=True, pre_out=h)
    gf = 2 * S * H * I                     # FLOPs of one [S, H] x [H, I] product
    lines += ["", f"### MoE backward pieces, N={N}, H={H}, I={I}, E={E}, k={k}, bf16, uniform routing, block_m={bm}", "",
              "| piece | impl | ms | TFLOP/s | err vs old |", "|---|---|---|---|---|"]

    def row(piece, impl, fn, flops, ref=None, got=None):
        ms = bench(fn, rep=100, warmup=25)
        err = f"{rel_err(ref.float(), got.float()):.1e}" if ref is not None else "—"
        lines.append(f"| {piece} | {impl} | {ms:.3f} | {flops / ms / 1e9 if flops else float('nan'):.0f} | {err} |")
        log(lines[-1])
        return ms

    new_dh, new_dw, new_aw = mg._moe_swiglu_dgrad(dy, wdd, h, topw, *al, k, bm, I, store_aw=True)
    res = {}
    if old is not None:
        old_dh, old_dw = old._moe_swiglu_dgrad(dy, wdd, h, topw, *al, k, bm, I)
        res["dgrad old"] = row("dgrad + SwiGLU bwd", "old (fixed 128×64 w8 s3)",
                               lambda: old._moe_swiglu_dgrad(dy, wdd, h, topw, *al, k, bm, I), gf)
    else:
        old_dh, old_dw = new_dh, new_dw
    res["dgrad new"] = row("dgrad + SwiGLU bwd", "new (autotuned, stores w·a)",
                           lambda: mg._moe_swiglu_dgrad(dy, wdd, h, topw, *al, k, bm, I, store_aw=True), gf, old_dh, new_dh)
    lines.append(f"| dgrad autotuned pick | {mg._moe_gemm_tuned.best_config} | | | |")
    row("dgrad + SwiGLU bwd", "new, no w·a store", lambda: mg._moe_swiglu_dgrad(dy, wdd, h, topw, *al, k, bm, I), gf)
    lines.append(f"| d topk_weight | err new vs old | | | {rel_err(old_dw, new_dw):.1e} |")
    wgt = wgud.transpose(1, 2)
    dx_new = mg.moe_gemm(new_dh, wgt, *al, top_k=1, block_m=bm)
    if old is not None:
        dx_old = old.moe_gemm(new_dh, wgt, *al, top_k=1, block_m=bm)
        res["dx old"] = row("dx grouped GEMM", "old autotune", lambda: old.moe_gemm(new_dh, wgt, *al, top_k=1, block_m=bm), 2 * gf)
    res["dx new"] = row("dx grouped GEMM", "new autotune", lambda: mg.moe_gemm(new_dh, wgt, *al, top_k=1, block_m=bm), 2 * gf,
                        dx_old if old is not None else None, dx_new)
    lines.append(f"| dx autotuned pick | {mg._moe_gemm_tuned.best_config} | | | |")
    res["combine"] = row("dx combine", "current", lambda: mg.moe_combine(dx_new, k), 0)
    wgu_args = (new_dh, xd, sorted_ids, counts)
    wgu_kw = dict(block_m=bm, left_div=1, right_div=k)
    g_new = mg.moe_weight_grad(*wgu_args, **wgu_kw)
    if old is not None:
        g_old = old.moe_weight_grad(*wgu_args, **wgu_kw)
        res["wgu old"] = row("dW_gate_up", "old autotune", lambda: old.moe_weight_grad(*wgu_args, **wgu_kw), 2 * gf)
        lines.append(f"| dW_gate_up old pick | {old._moe_wgrad_tuned.best_config} | | | |")
    res["wgu new"] = row("dW_gate_up", "new autotune", lambda: mg.moe_weight_grad(*wgu_args, **wgu_kw), 2 * gf,
                         g_old if old is not None else None, g_new)
    lines.append(f"| dW_gate_up new pick | {mg._moe_wgrad_tuned.best_config} | | | |")
    wd_kw = dict(block_m=bm, left_div=k, right_div=1)
    d_new = mg.moe_weight_grad(dy, new_aw, sorted_ids, counts, **wd_kw)
    if old is not None:
        d_old = old.moe_weight_grad(dy, a, sorted_ids, counts, topk_weight=topw, **wd_kw)
        res["wd old"] = row("dW_down", "old autotune, w in the K loop",
                            lambda: old.moe_weight_grad(dy, a, sorted_ids, counts, topk_weight=topw, **wd_kw), gf)
        lines.append(f"| dW_down old pick | {old._moe_wgrad_tuned.best_config} | | | |")
    row("dW_down", "new autotune, w in the K loop",
        lambda: mg.moe_weight_grad(dy, a, sorted_ids, counts, topk_weight=topw, **wd_kw), gf)
    res["wd new"] = row("dW_down", "new autotune, from w·a", lambda: mg.moe_weight_grad(dy, new_aw, sorted_ids, counts, **wd_kw),
                        gf, d_old if old is not None else None, d_new)
    lines.append(f"| dW_down new pick | {mg._moe_wgrad_tuned.best_config} | | | |")
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
    impls = {"composite": lambda: gmoe.experts_sorted(x, idx, w, experts, use_grouped_mm=True),
             "new": lambda: mg.moe_experts(x, idx, w, wgu, wd, check=False)}
    if old is not None:
        impls["old"] = lambda: old.moe_experts(x, idx, w, wgu, wd, check=False)
    lines += ["", "| layer | fwd ms (no grad) | fwd ms (autograd) | fwd+bwd ms | bwd ≈ ms | fwd+bwd TFLOP/s |",
              "|---|---|---|---|---|---|"]
    ref = None
    for name, f in impls.items():
        gr = torch.autograd.grad(f(), inputs, dy)
        if ref is None:
            ref = gr
        errs = " / ".join(f"{rel_err(r.float(), q.float()):.1e}" for r, q in zip(ref, gr))

        def fwd_ng(f=f):
            with torch.no_grad():
                return f()
        t0 = bench(fwd_ng, rep=100, warmup=25)
        t1 = bench(f, rep=100, warmup=25)
        t2 = bench(lambda f=f: torch.autograd.grad(f(), inputs, dy), rep=200, warmup=50)
        lines.append(f"| {name} (grads vs composite {errs}) | {t0:.2f} | {t1:.2f} | {t2:.2f} | {t2 - t1:.2f} | {18 * N * k * H * I / t2 / 1e9:.0f} |")
        log(lines[-1])

    # fixed configurations of each piece
    lines += ["", "| piece | config | ms | TFLOP/s | err vs autotuned |", "|---|---|---|---|---|"]
    for bmm, bn, bk, wp, st in WGRAD_SWEEP:
        cfg = dict(BLOCK_M=bmm, BLOCK_N=bn, BLOCK_K=bk, num_warps=wp, num_stages=st)
        name = f"{bmm}×{bn}×{bk} w{wp} s{st}"
        for piece, fn, flops, want in (
                ("dW_gate_up", lambda: mg.moe_weight_grad(*wgu_args, **wgu_kw, config=cfg), 2 * gf, g_new),
                ("dW_down from w·a", lambda: mg.moe_weight_grad(dy, new_aw, sorted_ids, counts, **wd_kw, config=cfg), gf, d_new),
                ("dW_down w in loop", lambda: mg.moe_weight_grad(dy, a, sorted_ids, counts, topk_weight=topw, **wd_kw, config=cfg),
                 gf, d_new)):
            if piece == "dW_down w in loop" and bmm == 64:
                continue
            try:
                err = rel_err(want.float(), fn().float())
                ms = bench(fn, rep=60, warmup=20)
            except Exception as e:  # noqa: BLE001
                ms, err = float("nan"), float("nan")
                log(f"  {piece} {name}: {type(e).__name__}: {str(e).splitlines()[0][:100] if str(e) else ''}")
            lines.append(f"| {piece} | {name} | {ms:.3f} | {flops / ms / 1e9:.0f} | {err:.1e} |")
            log(lines[-1])
    for bn, bk, wp, st in DGRAD_SWEEP:
        cfg = dict(BLOCK_N=bn, BLOCK_K=bk, num_warps=wp, num_stages=st)
        fn = lambda: mg._moe_swiglu_dgrad(dy, wdd, h, topw, *al, k, bm, I, store_aw=True, config=cfg)  # noqa: E731
        try:
            dh_c, dw_c, aw_c = fn()
            err = max(rel_err(new_dh.float(), dh_c.float()), rel_err(new_dw, dw_c), rel_err(new_aw.float(), aw_c.float()))
            ms = bench(fn, rep=60, warmup=20)
        except Exception as e:  # noqa: BLE001
            ms, err = float("nan"), float("nan")
            log(f"  dgrad {cfg}: {type(e).__name__}: {str(e).splitlines()[0][:100] if str(e) else ''}")
        lines.append(f"| dgrad + SwiGLU bwd | {bn}×{bk} w{wp} s{st} | {ms:.3f} | {gf / ms / 1e9:.0f} | {err:.1e} |")
        log(lines[-1])
    for bn, bk, wp, st in DX_SWEEP:
        cfg = dict(BLOCK_N=bn, BLOCK_K=bk, num_warps=wp, num_stages=st)
        fn = lambda: mg.moe_gemm(new_dh, wgt, *al, top_k=1, block_m=bm, config=cfg)  # noqa: E731
        try:
            err = rel_err(dx_new.float(), fn().float())
            ms = bench(fn, rep=60, warmup=20)
        except Exception as e:  # noqa: BLE001
            ms, err = float("nan"), float("nan")
            log(f"  dx {cfg}: {type(e).__name__}: {str(e).splitlines()[0][:100] if str(e) else ''}")
        lines.append(f"| dx grouped GEMM | {bn}×{bk} w{wp} s{st} | {ms:.3f} | {2 * gf / ms / 1e9:.0f} | {err:.1e} |")
        log(lines[-1])
    out = torch.empty(N, H, device="cuda", dtype=dt)
    for blk, wp in ((1024, 4), (1024, 8), (2048, 8), (512, 4), (256, 2)):
        fn = lambda: mg._moe_combine_kernel[(N, triton.cdiv(H, blk))](  # noqa: E731
            dx_new, dx_new, out, H, dx_new.stride(0), out.stride(0), TOP_K=k, BLOCK=blk, HAS_W=False, num_warps=wp)
        fn()
        ms = bench(fn, rep=60, warmup=20)
        lines.append(f"| dx combine | BLOCK {blk} w{wp} | {ms:.3f} | {(S + N) * H * 2 / ms / 1e6:.0f} GB/s | — |")
        log(lines[-1])


# ---------------------------------------------------------------- RMSNorm and SwiGLU launch options

def norm_section(lines):
    from glmkit.kernels import rmsnorm as rn

    orig, orig_fwd = rn._launch_opts, rn._fwd_launch_opts
    lines += ["", "### RMSNorm, bf16 (GB/s: fwd 2·M·N·2 bytes, bwd 3·M·N·2)", "",
              "| shape | pass | warps | programs | GB/s |", "|---|---|---|---|---|"]
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    for M, N in ((16384, 8192), (16384, 5120), (16384, 4096)):
        g = torch.Generator(device="cuda").manual_seed(0)
        x = torch.randn(M, N, device="cuda", dtype=torch.bfloat16, generator=g)
        w = (1 + 0.1 * torch.randn(N, device="cuda", generator=g)).to(torch.bfloat16)
        dy = torch.randn_like(x)
        y, rstd = rn.rmsnorm_fwd(x, w, 1e-5, return_rstd=True)
        dx_ref, dw_ref = rn.rmsnorm_bwd(dy, x, w, rstd)
        for warps in (None, 4, 8, 16, 32):
            rn._launch_opts = orig if warps is None else (lambda block_n, device, w_=warps: {"num_warps": w_})
            rn._fwd_launch_opts = orig_fwd if warps is None else rn._launch_opts
            try:
                yy = rn.rmsnorm_fwd(x, w, 1e-5)
                assert rel_err(y.float(), yy.float()) < 1e-2
                gbs = 2 * M * N * 2 / bench(lambda: rn.rmsnorm_fwd(x, w, 1e-5), rep=100) / 1e6
                lines.append(f"| {M}×{N} | fwd | {warps or 'default'} | {M} | {gbs:.0f} |")
                log(lines[-1])
                for P in (sms, 2 * sms, 4 * sms, 8 * sms):
                    dx, dw = rn.rmsnorm_bwd(dy, x, w, rstd, num_programs=P)
                    assert rel_err(dx_ref.float(), dx.float()) < 1e-2 and rel_err(dw_ref.float(), dw.float()) < 1e-2
                    gbs = 3 * M * N * 2 / bench(lambda P=P: rn.rmsnorm_bwd(dy, x, w, rstd, num_programs=P), rep=100) / 1e6
                    lines.append(f"| {M}×{N} | bwd | {warps or 'default'} | {P} | {gbs:.0f} |")
                    log(lines[-1])
            except Exception as e:  # noqa: BLE001
                log(f"  rmsnorm {M}x{N} warps {warps}: {type(e).__name__}: {str(e)[:100]}")
        rn._launch_opts, rn._fwd_launch_opts = orig, orig_fwd


def swiglu_section(lines):
    from glmkit.kernels import swiglu as sw

    orig = sw._block
    lines += ["", "### SwiGLU, bf16 (GB/s: fwd 3·M·I·2 bytes, bwd 5·M·I·2)", "",
              "| shape | pass | BLOCK | warps | GB/s |", "|---|---|---|---|---|"]
    for M, I in ((16384, 13696), (16384, 10944), (16384, 1536)):
        g = torch.Generator(device="cuda").manual_seed(0)
        gu = torch.randn(M, 2 * I, device="cuda", dtype=torch.bfloat16, generator=g)
        dy = torch.randn(M, I, device="cuda", dtype=torch.bfloat16, generator=g)
        y_ref, d_ref = sw.swiglu_fwd(gu), sw.swiglu_bwd(dy, gu)
        for blk, warps in ((None, None), (1024, 4), (1024, 8), (2048, 4), (2048, 8), (4096, 8), (4096, 16), (512, 4)):
            sw._block = orig if blk is None else (lambda I_, device, b=blk, w_=warps: (min(b, triton.next_power_of_2(I_)), {"num_warps": w_}))
            try:
                assert torch.equal(sw.swiglu_fwd(gu), y_ref) and torch.equal(sw.swiglu_bwd(dy, gu), d_ref)
                f = 3 * M * I * 2 / bench(lambda: sw.swiglu_fwd(gu), rep=100) / 1e6
                b = 5 * M * I * 2 / bench(lambda: sw.swiglu_bwd(dy, gu), rep=100) / 1e6
                lines.append(f"| {M}×{I} | fwd | {blk or 'default'} | {warps or 'default'} | {f:.0f} |")
                lines.append(f"| {M}×{I} | bwd | {blk or 'default'} | {warps or 'default'} | {b:.0f} |")
                log(lines[-2]); log(lines[-1])
            except Exception as e:  # noqa: BLE001
                log(f"  swiglu {M}x{I} {blk} {warps}: {type(e).__name__}: {str(e)[:100]}")
        sw._block = orig


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sections", nargs="*", default=["bwd", "rope", "moe"])
    ap.add_argument("--old-rope", default=".perf/rope_old.py")
    ap.add_argument("--old-moe", default=".perf/moe_gemm_base.py", help="an earlier kernels/moe_gemm.py to time beside")
    ap.add_argument("--out", default="/tmp/sweep_kernels.md")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("needs CUDA")
    lines = [f"# Kernel tuning sweeps on {torch.cuda.get_device_name()}; torch {torch.__version__}, triton {triton.__version__}",
             f"bf16 matmul 8192³ = {matmul_ceiling():.0f} TFLOP/s in this run"]
    log(lines[-1])
    for sec in args.sections:
        try:
            {"bwd": lambda: bwd_section(lines), "rope": lambda: rope_section(lines, args.old_rope),
             "moe": lambda: moe_section(lines), "moe_bwd": lambda: moe_bwd_section(lines, args.old_moe),
             "moe_bwd_pieces": lambda: moe_bwd_section(lines, None, full=False),
             "norm": lambda: norm_section(lines),
             "swiglu": lambda: swiglu_section(lines)}[sec]()
        except Exception:  # noqa: BLE001
            traceback.print_exc()
            lines.append(f"section {sec} failed: see the log")
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
