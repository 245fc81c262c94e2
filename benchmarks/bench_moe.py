"""Benchmark: lesson 04's MoE kernels (glmkit.kernels.moe_experts) on the GPU.

1. Grouped GEMM alone: 64 experts, 131072 slots evenly spread (2048 per expert), K = N = 2048, bf16 —
   ours (rows read by slot, like torch's contiguous input; and rows gathered from 16384 tokens, k = 8)
   vs ``torch._grouped_mm`` on the pre-sorted rows (≈642 TFLOP/s on an H200 in perf-anchors.md).
   Also GEMM 1 with the SwiGLU epilogue (gate‖up N = 2048 → 1024) vs grouped_mm + silu·up.
2. The routed-experts layer, forward and forward+backward (grads for x, routing weights, both weight
   stacks): N = 16384 tokens, H = 2048, I = 1024, E = 64, k = 8, bf16 — ``glmkit.ops.moe_experts.moe_experts``
   with impl="triton" vs the HF-style composite (``moe_experts_sorted``, on torch._grouped_mm on the GPU: sort +
   gather + grouped_mm + scatter) vs the per-expert loop (``moe_experts_reference``); uniform routing and
   Zipf-skewed routing.
3. A decode step (8 tokens) for the record.

Every output is checked against a baseline before anything is timed. Writes
benchmarks/results/moe_h200.md (date, GPU, versions, the table, ratios vs the targets: ≥ 1.0× grouped_mm,
≥ 1.3× composite, ≥ 5× loop, skewed within 15% of uniform).

    PYTHONPATH=. python benchmarks/bench_moe.py            # on the H200
    PYTHONPATH=. python benchmarks/bench_moe.py --smoke    # tiny shapes, any machine, no file written
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
if not torch.cuda.is_available():  # the Triton interpreter, switched on before triton is imported (as glmkit does)
    os.environ.setdefault("TRITON_INTERPRET", "1")

import triton  # noqa: E402
import triton.testing  # noqa: E402

import glmkit.kernels  # noqa: E402,F401
from glmkit import moe as gmoe  # noqa: E402
from glmkit.kernels import moe_experts as mg  # noqa: E402
from glmkit.kernels.moe_align import moe_align  # noqa: E402
from glmkit.ops.moe_experts import _grouped_mm_ok, _swiglu, moe_experts, moe_experts_reference  # noqa: E402
from glmkit.testing import rel_err  # noqa: E402

TARGETS = {"grouped_mm": 1.0, "composite": 1.3, "loop": 5.0, "skew": 0.15}


def bench(fn, smoke):
    """Median milliseconds of fn()."""
    if smoke:  # one call, timed (the interpreter compiles nothing)
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e3
    return triton.testing.do_bench(fn, warmup=50, rep=300, return_mode="median")


def even_routing(N, k, E, device):
    """topk_idx [N, k]: distinct experts per token, every expert exactly N·k/E slots (needs E % k == 0...
    and N % E == 0): token t takes experts (t + j·E/k) mod E."""
    t = torch.arange(N, device=device)[:, None]
    j = torch.arange(k, device=device)[None, :]
    return (t + j * (E // k)) % E


def random_routing(N, k, E, device, zipf_s=None, seed=0):
    """Sample k distinct experts per token (Gumbel top-k): uniform, or ∝ 1/rank^s (Zipf) with s = zipf_s."""
    g = torch.Generator(device=device).manual_seed(seed)
    logp = torch.zeros(E, device=device)
    if zipf_s:
        logp = -zipf_s * torch.log(torch.arange(1, E + 1, device=device, dtype=torch.float32))
    gumbel = -torch.log(-torch.log(torch.rand(N, E, device=device, generator=g).clamp(1e-20, 1 - 1e-7)))
    return torch.topk(logp + gumbel, k, dim=-1).indices


def ceiling(dev, smoke):
    n = 256 if smoke else 8192
    a = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    ms = bench(lambda: a @ a, smoke)
    return 2 * n**3 / ms / 1e9


def grouped_gemm_section(dev, smoke, lines, ratios):
    E, S, K, Nn, k = (4, 256, 64, 64, 2) if smoke else (64, 131072, 2048, 2048, 8)
    dt = torch.bfloat16 if dev == "cuda" else torch.float16
    g = torch.Generator(device=dev).manual_seed(1)
    w = (torch.randn(E, Nn, K, device=dev, generator=g) / math.sqrt(K)).to(dt)  # HF layout [E, N, K]
    x_tok = torch.randn(S // k, K, device=dev, generator=g).to(dt)
    idx = even_routing(S // k, k, E, dev)
    flat = idx.reshape(-1)
    perm = torch.sort(flat, stable=True).indices
    x_sorted = x_tok[perm // k].contiguous()  # [S, K] by expert
    counts = torch.bincount(flat, minlength=E)
    offs = counts.cumsum(0).to(torch.int32)
    bm = mg.default_block_m(S, E, dev)
    # ours, rows read by slot: the sorted rows themselves, slot s -> expert of row s
    idx_sorted = flat[perm].reshape(-1, 1)
    al_sorted = moe_align(idx_sorted, E, bm)
    al_tok = moe_align(idx, E, bm)
    wt = w.transpose(-2, -1)  # [E, K, N] view

    def ours_slot():
        return mg.moe_gemm(x_sorted, w, *al_sorted[:3], top_k=1, block_m=bm)

    def ours_gather():
        return mg.moe_gemm(x_tok, w, *al_tok[:3], top_k=k, block_m=bm)

    def torch_gmm():
        return torch._grouped_mm(x_sorted, wt, offs=offs)

    ref = torch_gmm()
    err_slot = rel_err(ref, ours_slot())
    err_gather = rel_err(ref, ours_gather()[perm])
    flops = 2 * S * K * Nn
    t_ref, t_slot, t_gather = (bench(f, smoke) for f in (torch_gmm, ours_slot, ours_gather))
    cfg = getattr(mg._moe_gemm_tuned, "best_config", None)

    # GEMM 1 with the SwiGLU epilogue: N = 2048 gate‖up -> 1024 outputs
    def ours_swiglu():
        return mg.moe_gemm(x_tok, w, *al_tok[:3], top_k=k, block_m=bm, swiglu=True)

    def torch_swiglu():
        return _swiglu(torch._grouped_mm(x_sorted, wt, offs=offs))

    err_sw = rel_err(torch_swiglu(), ours_swiglu()[perm])
    t_sw_ref, t_sw = bench(torch_swiglu, smoke), bench(ours_swiglu, smoke)

    tf = lambda ms: flops / ms / 1e9  # noqa: E731
    lines += [
        f"## 1. Grouped GEMM: E = {E}, S = {S} slots evenly spread ({S // E} per expert), K = N = {K}, {str(dt)[6:]}",
        "",
        "| kernel | ms | TFLOP/s | vs torch._grouped_mm | rel. err vs grouped_mm |",
        "|---|---|---|---|---|",
        f"| torch._grouped_mm (rows pre-sorted, contiguous) | {t_ref:.3f} | {tf(t_ref):.0f} | 1.00 | — |",
        f"| ours, rows by slot (top_k = 1, block_m = {bm}) | {t_slot:.3f} | {tf(t_slot):.0f} | {t_ref / t_slot:.2f} "
        f"| {err_slot:.1e} |",
        f"| ours, gathering rows of {S // k} tokens (top_k = {k}) | {t_gather:.3f} | {tf(t_gather):.0f} "
        f"| {t_ref / t_gather:.2f} | {err_gather:.1e} |",
        f"| grouped_mm + silu·up (gate‖up → {Nn // 2}) | {t_sw_ref:.3f} | {tf(t_sw_ref):.0f} | 1.00 | — |",
        f"| ours, SwiGLU epilogue, gathering | {t_sw:.3f} | {tf(t_sw):.0f} | {t_sw_ref / t_sw:.2f} | {err_sw:.1e} |",
        "",
        f"Autotuned config of the last GEMM key: `{cfg}`.",
        "",
    ]
    ratios["grouped_mm (rows by slot)"] = (t_ref / t_slot, TARGETS["grouped_mm"])
    ratios["grouped_mm (gathering)"] = (t_ref / t_gather, TARGETS["grouped_mm"])


def layer_section(dev, smoke, lines, ratios):
    N, H, I, E, k = (32, 32, 32, 4, 2) if smoke else (16384, 2048, 1024, 64, 8)
    dt = torch.bfloat16 if dev == "cuda" else torch.float32
    experts = gmoe.Experts(E, H, I).to(dev, dt)
    x = torch.randn(N, H, device=dev).to(dt).requires_grad_()
    dy = torch.randn(N, H, device=dev).to(dt)
    params = [experts.gate_up_proj, experts.down_proj]
    # per-slot FLOPs: forward 2·H·2I + 2·I·H = 6·H·I; backward twice that
    flops_fwd = 6 * N * k * H * I
    if dev == "cuda" and not _grouped_mm_ok(x, *params):  # the composite picks grouped_mm itself where it can
        raise RuntimeError("the composite baseline must run on torch._grouped_mm here, and it cannot")

    def runner(name):
        impl = {"ours": "triton", "composite": "sorted", "loop": "loop"}[name]
        return lambda xx, i, w: moe_experts(xx, i, w, *params, impl=impl)

    lines += [
        f"## 2. Routed-experts layer: N = {N} tokens, H = {H}, I = {I}, E = {E}, k = {k}, {str(dt)[6:]}",
        "",
        "Forward FLOPs 6·N·k·H·I, forward+backward 3× that. Grads: x, routing weights, both weight stacks.",
        "",
        "| routing | max/mean expert load | impl | fwd ms | fwd TFLOP/s | fwd+bwd ms | fwd+bwd TFLOP/s "
        "| rel. err y / dx / dW_gu vs loop |",
        "|---|---|---|---|---|---|---|---|",
    ]
    times = {}
    for routing in ("uniform", "zipf"):
        idx = random_routing(N, k, E, dev, zipf_s=1.0 if routing == "zipf" else None, seed=7)
        load = torch.bincount(idx.reshape(-1), minlength=E).float()
        imbalance = float(load.max() / load.mean())
        w = torch.softmax(torch.randn(N, k, device=dev), -1).requires_grad_()
        inputs = [x, w, *params]
        outs = {}
        for name in ("loop", "composite", "ours"):
            f = runner(name)
            y = f(x, idx, w)
            grads = torch.autograd.grad(y, inputs, dy)
            outs[name] = (y.detach(), grads[0], grads[2])
        for name in ("loop", "composite", "ours"):
            f = runner(name)

            def fwd(f=f, idx=idx, w=w):
                with torch.no_grad():
                    return f(x, idx, w)

            def fwd_bwd(f=f, idx=idx, w=w, inputs=inputs):
                return torch.autograd.grad(f(x, idx, w), inputs, dy)

            t_f, t_fb = bench(fwd, smoke), bench(fwd_bwd, smoke)
            times[(routing, name)] = (t_f, t_fb)
            errs = " / ".join(f"{rel_err(a.float(), b.float()):.1e}" for a, b in zip(outs["loop"], outs[name]))
            lines.append(
                f"| {routing} | {imbalance:.2f} | {name} | {t_f:.2f} | {flops_fwd / t_f / 1e9:.0f} | "
                f"{t_fb:.2f} | {3 * flops_fwd / t_fb / 1e9:.0f} | {errs if name != 'loop' else '—'} |"
            )
    lines.append("")
    for routing in ("uniform", "zipf"):
        o = times[(routing, "ours")]
        for base, key in (("composite", "composite"), ("loop", "loop")):
            b = times[(routing, base)]
            ratios[f"{routing}: ours vs {base}, fwd"] = (b[0] / o[0], TARGETS[key])
            ratios[f"{routing}: ours vs {base}, fwd+bwd"] = (b[1] / o[1], TARGETS[key])
    for i, what in ((0, "fwd"), (1, "fwd+bwd")):
        slow = times[("zipf", "ours")][i] / times[("uniform", "ours")][i] - 1
        ratios[f"ours: Zipf slowdown vs uniform, {what}"] = (slow, TARGETS["skew"])

    # a decode step
    Nd = 8
    xd = torch.randn(Nd, H, device=dev).to(dt)
    idd = random_routing(Nd, k, E, dev, seed=3)
    wd = torch.softmax(torch.randn(Nd, k, device=dev), -1)
    with torch.no_grad():
        ref = moe_experts_reference(xd, idd, wd, *params)
        err = rel_err(ref.float(), runner("ours")(xd, idd, wd).float())
        td = {n: bench(lambda f=runner(n): f(xd, idd, wd), smoke) for n in ("loop", "composite", "ours")}  # noqa: B008
    lines += [
        f"Decode step, {Nd} tokens (block_m = {mg.default_block_m(Nd * k, E, dev)}), forward: "
        f"ours {td['ours'] * 1e3:.0f} µs, composite {td['composite'] * 1e3:.0f} µs, loop {td['loop'] * 1e3:.0f} µs "
        f"(rel. err vs loop {err:.1e}).",
        "",
    ]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on any device; writes no file (unless --out)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    smoke = args.smoke
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    if not smoke and dev != "cuda":
        sys.exit("needs CUDA (use --smoke to check the script on CPU)")
    out = Path(args.out) if args.out else (None if smoke else ROOT / "benchmarks/results/moe_h200.md")
    gpu = torch.cuda.get_device_name() if dev == "cuda" else platform.processor() or "CPU"
    lines = [
        "# MoE kernels: grouped GEMM and routed-experts layer vs torch._grouped_mm, the HF-style composite, a loop",
        "",
        f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
        f"- GPU: {gpu}; torch {torch.__version__}, triton {triton.__version__}, CUDA {torch.version.cuda}, "
        f"Python {platform.python_version()}",
        "- median of triton.testing.do_bench; every output checked against a baseline first (rel. RMS error columns)",
        f"- targets: ≥ {TARGETS['grouped_mm']}× torch._grouped_mm, ≥ {TARGETS['composite']}× composite, "
        f"≥ {TARGETS['loop']}× loop, Zipf routing within {TARGETS['skew']:.0%} of uniform",
    ]
    if smoke:
        lines.append("- SMOKE RUN: tiny shapes, numbers meaningless")
    lines.append(f"- ceiling measured in this run: bf16 matmul 8192³ = {ceiling(dev, smoke):.0f} TFLOP/s")
    lines.append("")
    ratios: dict[str, tuple[float, float]] = {}
    grouped_gemm_section(dev, smoke, lines, ratios)
    layer_section(dev, smoke, lines, ratios)
    lines += ["## Ratios vs targets", "", "| ratio | measured | target | met |", "|---|---|---|---|"]
    for name, (val, target) in ratios.items():
        if "slowdown" in name:
            lines.append(f"| {name} | {val:+.1%} | ≤ {target:.0%} | {'yes' if val <= target else 'no'} |")
        else:
            lines.append(f"| {name} | {val:.2f}× | ≥ {target}× | {'yes' if val >= target else 'no'} |")
    lines += ["", "How it was run: `PYTHONPATH=. python benchmarks/bench_moe.py` from the repository root.", ""]
    print("\n".join(lines))
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text("\n".join(lines))
        print(f"wrote {out}")


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
