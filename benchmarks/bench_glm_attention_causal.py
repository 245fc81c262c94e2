"""Benchmark: the GLM flash-attention FORWARD kernel on a plain causal mask vs SDPA's cuDNN and flash backends.

GPU only; a script, not a test. bf16, causal (our kernel with sep = 0, where the GLM mask is exactly the
causal one), B·T = 32K tokens per shape (T = 2K, 8K, 32K → B = 16, 4, 1), H = 2048 / D heads (H_kv = H),
the shapes of bench_glm_attention_bwd.py. Forward only, no log-sum-exp stored (inference forward; SDPA
runs under no_grad with inputs that need no grad). TFLOP/s over the unmasked pairs, the FlashAttention
convention: 4 · D · T(T+1)/2 per head, the same count for every column. Each figure is the median of
triton.testing.do_bench; the baselines are measured in the same run, and our output is checked against
cuDNN's (and flash's against cuDNN's) before anything is timed. Ours is the launcher
``glmkit.kernels.attention.attention_fwd`` (autotuned tiles); the sweep launches the raw jit kernel at fixed
tiles (``common.attention_fwd_fixed``).

    python benchmarks/bench_glm_attention_causal.py         # table → benchmarks/results/glm_attention_causal_h200.md
    python benchmarks/bench_glm_attention_causal.py --sweep # also time fixed kernel configurations at T = 8K
    python benchmarks/bench_glm_attention_causal.py --smoke # tiny shapes, any device, no file written
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys

import common  # benchmarks/common.py (before triton: it switches the interpreter on without CUDA)
import torch
import torch.nn.functional as F
import triton
from common import attention_fwd_fixed, bench, each_shape, matmul_ceiling
from torch.nn.attention import SDPBackend, sdpa_kernel

import glmkit.kernels  # noqa: F401
from glmkit.kernels import attention as kmod
from glmkit.kernels.attention import attention_fwd, visible_pairs
from glmkit.testing import rel_err

TOKENS = 32 * 1024
MODEL_DIM = 2048
TARGET_CUDNN = 1.0  # issue: causal fwd ≥ 1.0× cuDNN SDPA
DEV, DT = "cuda", torch.bfloat16  # --smoke without CUDA: CPU (interpreter), fp32
# SDPA backends of the two baseline columns; --smoke without CUDA has no cuDNN and uses the math backend instead
CUDNN, FLASH = SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION
SMOKE_SHAPE = dict(tokens=128, model_dim=32, T=[64], D=[16])


def _cfg():
    cfg = getattr(kmod._attn_fwd_tuned, "best_config", None)
    return "" if cfg is None else f"{cfg.kwargs['BLOCK_M']}x{cfg.kwargs['BLOCK_N']} w{cfg.num_warps} s{cfg.num_stages}"


def sdpa_fwd(q, k, v, backend):
    def run():
        with torch.no_grad(), sdpa_kernel([backend]):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    return run


def make_inputs(T, D, seed):
    B, H = TOKENS // T, MODEL_DIM // D
    g = torch.Generator(device=DEV).manual_seed(seed)
    q, k, v = (torch.randn(B, H, T, D, device=DEV, dtype=DT, generator=g) for _ in range(3))
    return q, k, v, torch.zeros(B, dtype=torch.int64, device=DEV)


def run_shape(T, D, log):
    q, k, v, causal = make_inputs(T, D, seed=T + D)
    B, H = q.shape[0], q.shape[1]
    flops = 4 * D * visible_pairs(T, 0) * B * H
    row = dict(T=T, D=D, B=B, H=H)
    ours = lambda: attention_fwd(q, k, v, causal)  # noqa: E731
    cudnn = sdpa_fwd(q, k, v, CUDNN)
    ref = cudnn().clone()
    row["err_ours"] = rel_err(ref, ours().clone())
    if row["err_ours"] > 2e-2:
        raise AssertionError(f"ours differs from cuDNN: rel err {row['err_ours']:.2e} at T={T} D={D}")
    row["ours"] = flops / bench(ours) / 1e9
    row["cfg"] = _cfg()
    row["cudnn"] = flops / bench(cudnn) / 1e9
    try:
        flash = sdpa_fwd(q, k, v, FLASH)
        row["err_flash"] = rel_err(ref, flash())
        row["flash"] = flops / bench(flash) / 1e9
    except Exception as e:  # noqa: BLE001
        common.reraise_if_smoke()
        log(f"SDPA flash backend failed at T={T} D={D}: {e!r}")
        row["flash"], row["err_flash"] = float("nan"), float("nan")
    if DEV == "cuda":
        torch.cuda.empty_cache()
    return row


SWEEP = {  # head dim -> (block_m, block_n, warps, stages), launched raw (common.attention_fwd_fixed)
    128: [(128, 128, 8, 3), (128, 128, 8, 2), (128, 128, 8, 4), (128, 64, 8, 3), (128, 64, 8, 4), (128, 64, 8, 5),
          (64, 128, 4, 3), (256, 64, 8, 3)],
    64: [(128, 64, 8, 4), (128, 64, 8, 3), (128, 128, 8, 3), (128, 64, 4, 3), (128, 128, 4, 3), (64, 64, 4, 3),
         (128, 64, 4, 4), (256, 64, 8, 3)],
}  # fmt: skip


def sweep(D, log, T=8192, configs=None):
    q, k, v, causal = make_inputs(T, D, seed=7)
    B, H = q.shape[0], q.shape[1]
    flops = 4 * D * visible_pairs(T, 0) * B * H
    ref = sdpa_fwd(q, k, v, CUDNN)()
    rows = []
    for bm, bn, w, s in SWEEP[D] if configs is None else configs:
        name = f"{bm}x{bn} w{w} s{s}"
        try:
            fn = lambda: attention_fwd_fixed(q, k, v, causal, bm, bn, w, s)  # noqa: E731, B023
            err = rel_err(ref, fn())
            tf = flops / bench(fn, rep=150) / 1e9 if err <= 2e-2 else float("nan")
            rows.append((name, tf, f"{err:.1e}"))
        except Exception as e:  # noqa: BLE001
            common.reraise_if_smoke()
            msg = str(e).splitlines()[0][:80] if str(e) else ""
            rows.append((name, float("nan"), f"error: {type(e).__name__}: {msg}"))
        log(f"  causal sweep T={T} D={D} {rows[-1][0]}: {rows[-1][1]:.0f} TFLOP/s ({rows[-1][2]})")
    return rows


def main():
    global TOKENS, MODEL_DIM, DEV, DT, CUDNN
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "glm_attention_causal_h200.md"))
    ap.add_argument("--T", type=int, nargs="*", default=[2048, 8192, 32768])
    ap.add_argument("--D", type=int, nargs="*", default=[128, 64])
    ap.add_argument("--sweep", action="store_true", help="also time fixed kernel configurations at T=8K")
    ap.add_argument(
        "--smoke",
        action="store_true",
        help="check the script: tiny shapes, one timed call, main table and a 2-config sweep, any "
        "device (CPU: interpreter, fp32, SDPA's math backend in the cuDNN column), nothing written",
    )
    args = ap.parse_args()
    if args.smoke:
        common.SMOKE = True
        TOKENS, MODEL_DIM = SMOKE_SHAPE["tokens"], SMOKE_SHAPE["model_dim"]
        args.T, args.D, args.sweep = SMOKE_SHAPE["T"], SMOKE_SHAPE["D"], True
        if not torch.cuda.is_available():
            DEV, DT, CUDNN = "cpu", torch.float32, SDPBackend.MATH
    elif not torch.cuda.is_available():
        sys.exit("this benchmark needs a CUDA GPU (--smoke checks the script on CPU)")

    def log(msg):
        print(msg, flush=True)

    if DEV == "cuda":
        machine = f"{torch.cuda.get_device_name()}; torch {torch.__version__}, triton {triton.__version__}, "
        machine += f"CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}"
    else:
        machine = (
            f"CPU ({platform.machine()}, Triton interpreter); torch {torch.__version__}, triton {triton.__version__}"
        )
    head = [
        "# GLM attention forward on a causal mask: Triton kernel vs SDPA (cuDNN and flash backends)",
        "",
        f"- date: {datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- GPU: {machine}, Python {platform.python_version()}",
        f"- setup: {str(DT)[6:]}, causal (ours: sep = 0), B·T = {TOKENS} tokens, H = {MODEL_DIM}/D heads (H_kv = H); "
        "forward only, no lse stored; TFLOP/s = 4·D·T(T+1)/2 per head over the time; median of "
        "triton.testing.do_bench; outputs checked against cuDNN's first (rel. RMS error).",
        f"- target: ours/cuDNN ≥ {TARGET_CUDNN}",
    ]
    if args.smoke:
        head.append(f"- SMOKE RUN: tiny shapes, one timed call, numbers meaningless; 'cuDNN' column = {CUDNN.name}")
    try:
        head.append(f"- ceiling measured in this run: bf16 matmul 8192³ = {matmul_ceiling():.0f} TFLOP/s")
    except Exception as e:  # noqa: BLE001
        common.reraise_if_smoke()
        log(f"matmul ceiling failed: {e!r}")
    log("\n".join(head))
    rows, extra = [], []

    def render():
        lines = list(head) + [
            "",
            "| D | T | B×H | ours TFLOP/s | cuDNN TFLOP/s | flash TFLOP/s | ours/cuDNN | ours/flash "
            "| ours config (autotuned) | err ours | err flash |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        nan = float("nan")
        for r in rows:
            o, c, f = r.get("ours", nan), r.get("cudnn", nan), r.get("flash", nan)
            lines.append(
                f"| {r['D']} | {r['T']} | {r['B']}×{r['H']} | {o:.0f} | {c:.0f} | {f:.0f} | {o / c:.2f} | "
                f"{o / f:.2f} | {r.get('cfg', '')} | {r.get('err_ours', nan):.1e} | {r.get('err_flash', nan):.1e} |"
            )
        return "\n".join(lines + extra) + "\n"

    def write():
        if args.smoke:
            return
        os.makedirs(os.path.dirname(args.out), exist_ok=True)
        with open(args.out, "w") as f:
            f.write(render())

    for r in each_shape(args.D, args.T, run_shape, log):
        rows.append(r)
        log(
            f"D={r['D']} T={r['T']}: ours {r['ours']:.0f} cuDNN {r['cudnn']:.0f} flash {r['flash']:.0f} TFLOP/s "
            f"[{r['cfg']}]"
        )
        write()
    if args.sweep:
        T = args.T[0] if args.smoke else 8192
        for D in args.D:
            extra += [
                "",
                f"### Fixed configurations, causal, T={T}, D={D}",
                "",
                "| config | TFLOP/s | rel err vs cuDNN |",
                "|---|---|---|",
            ]
            configs = SWEEP[128][:2] if args.smoke else None
            extra += [f"| {n} | {tf:.0f} | {e} |" for n, tf, e in sweep(D, log, T, configs)]
            write()
    write()
    print("\n" + render())


if __name__ == "__main__":
    main()
