"""Benchmark: GLM flash-attention forward kernel vs torch SDPA (dense boolean mask) and FlexAttention.

GPU only; a script, not a test. bf16, Part A = T/2 for every sample, B·T = 32K tokens per shape
(T = 2K, 8K, 32K → B = 16, 4, 1) and H = 2048 / D heads (D = 64 → 32 heads, D = 128 → 16 heads).
TFLOP/s count only the FLOPs the mask lets through: 4 · D · visible (i, j) pairs per head, the same count
for every implementation (so a dense-mask SDPA that computes everything is charged for what matters).
Each figure is the median of triton.testing.do_bench after warm-up; the baselines are measured in the
same run, and every output is checked against SDPA before it is timed. Ours is the launcher
``glmkit.kernels.attention.attention_fwd`` (autotuned tiles); the sweep launches the raw jit kernel
``_attn_fwd_kernel`` at fixed tiles (``common.attention_fwd_fixed``).

    python benchmarks/bench_glm_attention.py                 # table → benchmarks/results/glm_attention_h200.md
    python benchmarks/bench_glm_attention.py --sweep         # also time fixed kernel configurations
    python benchmarks/bench_glm_attention.py --smoke         # tiny shapes, any device, no file written
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import traceback

import common  # benchmarks/common.py (before triton: it switches the interpreter on without CUDA)
import torch
import torch.nn.functional as F
import triton
from common import attention_fwd_fixed, bench, matmul_ceiling

import glmkit.kernels  # noqa: F401
from glmkit.kernels import attention as kmod
from glmkit.kernels.attention import attention_fwd, visible_pairs
from glmkit.ops.attention import attention_mask
from glmkit.testing import rel_err

TOKENS = 32 * 1024  # B·T per shape
MODEL_DIM = 2048  # H · D
TARGET_FLEX, TARGET_SDPA = 1.1, 1.8
DEV, DT = "cuda", torch.bfloat16  # --smoke without CUDA: CPU (interpreter), fp32
SMOKE_SHAPE = dict(tokens=128, model_dim=32, T=[64], D=[16])


def make_inputs(T, D, seed=0):
    B, H = TOKENS // T, MODEL_DIM // D
    g = torch.Generator(device=DEV).manual_seed(seed)
    q, k, v = (torch.randn(B, H, T, D, device=DEV, dtype=DT, generator=g) for _ in range(3))
    sep = torch.full((B,), T // 2, dtype=torch.int64, device=DEV)
    return q, k, v, sep


def flex_fn(q, k, v, sep):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    B, H, T, D = q.shape

    def prefix_lm(b, h, q_idx, kv_idx):  # the GLM mask: Part A (kv < sep) or causal
        return (kv_idx < sep[b]) | (q_idx >= kv_idx)

    block_mask = create_block_mask(prefix_lm, B, None, T, T, device="cuda")
    compiled = torch.compile(flex_attention, dynamic=False)
    return lambda: compiled(q, k, v, block_mask=block_mask)


def run_shape(T, D, log):
    q, k, v, sep = make_inputs(T, D, seed=T + D)
    B, H = q.shape[0], q.shape[1]
    flops = 4 * D * visible_pairs(T, T // 2) * B * H
    row = dict(T=T, D=D, B=B, H=H)
    ours = lambda: attention_fwd(q, k, v, sep)  # noqa: E731
    mask = attention_mask(sep, T)[:, None]  # [B, 1, T, T] bool
    sdpa = lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # noqa: E731, F821 (del below)
    ref = sdpa()
    o = ours().clone()
    row["err_ours"] = rel_err(ref, o)
    cfg = getattr(kmod._attn_fwd_tuned, "best_config", None)
    row["cfg"] = (
        "" if cfg is None else f"{cfg.kwargs['BLOCK_M']}x{cfg.kwargs['BLOCK_N']} w{cfg.num_warps} s{cfg.num_stages}"
    )
    if row["err_ours"] > 2e-2:
        raise AssertionError(f"ours differs from SDPA: rel err {row['err_ours']:.2e} at T={T} D={D}")
    row["ours"] = flops / bench(ours) / 1e9
    row["sdpa"] = flops / bench(sdpa) / 1e9
    if DEV != "cuda":  # FlexAttention's compiled kernel is a GPU thing; on CPU it would only test inductor
        log("FlexAttention skipped (no CUDA)")
        row["flex"] = float("nan")
        return row
    try:
        flex = flex_fn(q, k, v, sep)
        fo = flex()
        row["err_flex"] = rel_err(ref, fo)
        row["flex"] = flops / bench(flex) / 1e9
    except Exception as e:  # noqa: BLE001
        common.reraise_if_smoke()
        log(f"FlexAttention failed at T={T} D={D}: {e!r}")
        traceback.print_exc()
        row["flex"] = float("nan")
    del mask
    torch.cuda.empty_cache()
    return row


# Fixed configurations, launched raw (common.attention_fwd_fixed). The earlier sweep also had rows with
# tensor-descriptor (TMA) loads and warp_specialize: the kernel no longer has those paths, so they are gone.
SWEEP = [  # (block_m, block_n, warps, stages)
    (128, 64, 8, 3), (128, 128, 8, 3), (128, 64, 4, 3), (128, 128, 8, 2), (128, 64, 8, 4), (128, 128, 4, 3),
    (64, 64, 4, 3), (64, 128, 4, 3),
]  # fmt: skip


def sweep(T, D, log, configs=SWEEP):
    q, k, v, sep = make_inputs(T, D, seed=7)
    B, H = q.shape[0], q.shape[1]
    flops = 4 * D * visible_pairs(T, T // 2) * B * H
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask(sep, T)[:, None])
    rows = []
    for bm, bn, w, s in configs:
        name = f"{bm}x{bn} w{w} s{s}"
        try:
            fn = lambda: attention_fwd_fixed(q, k, v, sep, bm, bn, w, s)  # noqa: E731, B023
            err = rel_err(ref, fn())
            tf = flops / bench(fn, rep=150) / 1e9 if err <= 2e-2 else float("nan")
            rows.append((name, tf, f"{err:.1e}"))
        except Exception as e:  # noqa: BLE001
            common.reraise_if_smoke()
            msg = str(e).splitlines()[0][:80] if str(e) else ""
            rows.append((name, float("nan"), f"error: {type(e).__name__}: {msg}"))
        log(f"  sweep T={T} D={D} {rows[-1][0]}: {rows[-1][1]:.0f} TFLOP/s ({rows[-1][2]})")
    return rows


def main():
    global TOKENS, MODEL_DIM, DEV, DT
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "glm_attention_h200.md"))
    ap.add_argument("--sweep", action="store_true", help="also time fixed kernel configurations at T=8K")
    ap.add_argument("--no-main", action="store_true", help="skip the main table (with --sweep)")
    ap.add_argument("--T", type=int, nargs="*", default=[2048, 8192, 32768])
    ap.add_argument("--D", type=int, nargs="*", default=[128, 64])
    ap.add_argument(
        "--smoke",
        action="store_true",
        help="check the script: tiny shapes, one timed call, main table and a 2-config sweep, any "
        "device (CPU: interpreter, fp32), nothing written",
    )
    args = ap.parse_args()
    if args.smoke:
        common.SMOKE = True
        TOKENS, MODEL_DIM = SMOKE_SHAPE["tokens"], SMOKE_SHAPE["model_dim"]
        args.T, args.D, args.sweep = SMOKE_SHAPE["T"], SMOKE_SHAPE["D"], True
        if not torch.cuda.is_available():
            DEV, DT = "cpu", torch.float32
    elif not torch.cuda.is_available():
        sys.exit("this benchmark needs a CUDA GPU (--smoke checks the script on CPU)")
    torch._dynamo.config.cache_size_limit = 64

    def log(msg):
        print(msg, flush=True)

    def write(text):
        if not args.smoke:
            with open(args.out, "w") as f:
                f.write(text)

    gpu = torch.cuda.get_device_name() if DEV == "cuda" else f"CPU ({platform.machine()}, Triton interpreter)"
    head = [
        "# GLM attention forward: Triton kernel vs FlexAttention vs dense-mask SDPA",
        "",
        f"- date: {datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- GPU: {gpu}; torch {torch.__version__}, triton {triton.__version__}, CUDA {torch.version.cuda}, "
        f"Python {platform.python_version()}",
        f"- setup: {str(DT)[6:]}, B·T = {TOKENS} tokens, H = {MODEL_DIM}/D heads (H_kv = H), Part A = T/2 for every "
        "sample; TFLOP/s over the unmasked FLOPs only (4·D·visible pairs per head) for every column; median of "
        "triton.testing.do_bench; every output checked against SDPA first (rel. RMS error columns).",
        "- baselines: `F.scaled_dot_product_attention` with the dense [B,1,T,T] boolean mask; "
        "`torch.compile(flex_attention)` with mask_mod `kv < sep[b] or q >= kv` and its block mask.",
        f"- targets: ours/Flex ≥ {TARGET_FLEX}, ours/SDPA ≥ {TARGET_SDPA}",
    ]
    if args.smoke:
        head.append("- SMOKE RUN: tiny shapes, one timed call, numbers meaningless")
    log("\n".join(head))
    try:
        mm = matmul_ceiling()
        head.append(f"- ceiling measured in this run: bf16 matmul 8192³ = {mm:.0f} TFLOP/s")
        log(head[-1])
    except Exception as e:  # noqa: BLE001
        common.reraise_if_smoke()
        log(f"matmul ceiling failed: {e!r}")

    rows = []
    table = []

    def render():
        lines = list(head) + [
            "",
            "| D | T | B×H | ours TFLOP/s | ours config (autotuned) | Flex TFLOP/s | SDPA dense TFLOP/s "
            "| ours/Flex | ours/SDPA | err ours | err Flex |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        nan = float("nan")
        for r in rows:
            o, fl, sd = r.get("ours", nan), r.get("flex", nan), r.get("sdpa", nan)
            lines.append(
                f"| {r['D']} | {r['T']} | {r['B']}×{r['H']} | {o:.0f} | {r.get('cfg', '')} | {fl:.0f} | {sd:.0f} "
                f"| {o / fl:.2f} | {o / sd:.2f} | {r.get('err_ours', nan):.1e} | {r.get('err_flex', nan):.1e} |"
            )
        lines += table
        return "\n".join(lines) + "\n"

    if not args.no_main:
        for D in args.D:
            for T in args.T:
                log(f"shape D={D} T={T} ...")
                try:
                    rows.append(run_shape(T, D, log))
                    log(str(rows[-1]))
                except Exception as e:  # noqa: BLE001
                    common.reraise_if_smoke()
                    traceback.print_exc()
                    rows.append(dict(T=T, D=D, B=TOKENS // T, H=MODEL_DIM // D, cfg=f"error {type(e).__name__}"))
                write(render())
    if args.sweep:
        for D in args.D if args.smoke else (128, 64):
            T = args.T[0] if args.smoke else 8192
            table += [
                "",
                f"### Fixed configurations, T={T}, D={D} (sweep; raw kernel launches)",
                "",
                "| config | TFLOP/s | rel err vs SDPA |",
                "|---|---|---|",
            ]
            for name, tf, err in sweep(T, D, log, SWEEP[:2] if args.smoke else SWEEP):
                table.append(f"| {name} | {tf:.0f} | {err} |")
            write(render())
    text = render()
    write(text)
    print("\n" + text)


if __name__ == "__main__":
    main()
