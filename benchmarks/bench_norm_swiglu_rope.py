"""Benchmark: fused RMSNorm and SwiGLU vs liger-kernel, torch.compile and eager; fused partial RoPE vs eager
(and torch.compile of it).

GPU only; a script, not a test. bf16 throughout, real GLM shapes (GLM-4-9B: d = 4096, I = 13696,
32 q heads / 2 kv heads, D = 128, rotary 64; GLM-4.5: d = 5120, 96 / 8 heads; GLM-4.5 expert I = 1536).
Memory-bound ops, so the figure of merit is GB/s of *necessary* traffic, the same byte count charged
to every implementation:

    RMSNorm fwd: read x, write y (2·M·N·b)           fwd+bwd: + read x, dy, write dx (5·M·N·b)
    SwiGLU  fwd: read 2I, write I (3·M·I·b)          fwd+bwd: + read dy, 2I, write 2I (8·M·I·b)
    RoPE out of place: read + write q and k (2·(H+H_kv)·B·T·D·b); in place: only the rotary dims (R instead of D)

The forward+backward rows are timed twice: as called from Python (autograd and launch overhead included,
what a training step pays, and host-bound when the GPU work is short) and replayed from a CUDA graph
(``common.graph_bench``: the GPU time alone).

(weights, rstd and cos/sin tables are ignored: they are ≤ 1/M of the traffic). Each time is the median of
triton.testing.do_bench; every output (and gradient) is checked against the fp32 torch reference before
it is timed. Ratios "ours/X" are speed ratios (time of X / time of ours): > 1 means ours is faster.

Ours: the kernels through their autograd ops, ``glmkit.ops.rmsnorm.RMSNormFunction``,
``glmkit.ops.swiglu.SwiGLUFunction`` and ``glmkit.ops.rope.RopeFunction`` (the forward-only RoPE columns: the launcher
``glmkit.kernels.rope.rope_fwd``). Baselines:

* eager: the Hugging Face formulation in bf16 (GlmRMSNorm: fp32 inside, ``weight * x.to(bf16)``; Phi3MLP's
  ``up * silu(gate)`` on chunk views; glm/glm4_moe ``apply_rotary_pos_emb`` with doubled cos/sin).
* compile: ``torch.compile`` of the same eager function (default mode, dynamic=False).
* liger: ``liger_kernel.transformers.rms_norm.LigerRMSNorm`` (casting_mode "llama") and
  ``liger_kernel.ops.swiglu.LigerSiLUMulFunction`` on separate contiguous gate/up tensors — its own
  layout, its best case. Skipped (column "n/a") when liger-kernel is not importable.

    python benchmarks/bench_norm_swiglu_rope.py            # → benchmarks/results/norm_swiglu_rope_h200.md
    python benchmarks/bench_norm_swiglu_rope.py --quick    # fewer shapes
    python benchmarks/bench_norm_swiglu_rope.py --smoke    # tiny shapes, any device, no compile/liger, no file
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

import glmkit.kernels  # noqa: F401
from glmkit.kernels.rope import rope_fwd
from glmkit.ops.rmsnorm import RMSNormFunction, rmsnorm_reference
from glmkit.ops.rope import RopeFunction, rope_cos_sin, rope_reference
from glmkit.ops.swiglu import SwiGLUFunction, swiglu_reference
from glmkit.testing import rel_err

DT = torch.bfloat16
B16 = 2  # bytes per bf16 element
TOKENS = 16 * 1024
TARGET_LIGER = 1.0  # issue 4: RMSNorm and SwiGLU ≥ 1.0× liger

NORM_SHAPES = [(TOKENS, 4096), (TOKENS, 5120), (TOKENS, 8192), (4096, 16384)]  # (rows, hidden)
SWIGLU_SHAPES = [(TOKENS, 13696), (TOKENS, 10944), (TOKENS, 12288), (TOKENS, 1536)]  # (rows, I)
ROPE_SHAPES = [  # (name, B, H, H_kv, T, D, R, pairing)
    ("GLM-4-9B", 2, 32, 2, 8192, 128, 64, "interleaved"),
    ("GLM-4.5", 1, 96, 8, 8192, 128, 64, "half"),
    ("GLM-4-9B, T=2K", 8, 32, 2, 2048, 128, 64, "interleaved"),
]
DEV = "cuda"  # --smoke without CUDA: CPU (kernels under the interpreter)
SMOKE_NORM, SMOKE_SWIGLU = [(32, 96)], [(32, 80)]
SMOKE_ROPE = [("tiny", 1, 4, 2, 16, 32, 16, "interleaved"), ("tiny", 1, 4, 2, 16, 32, 16, "half")]


def bench(fn, rep=200):
    return common.bench(fn, rep=rep, warmup=25)  # ms; memory-bound ops need a shorter warm-up


def copy_ceiling():
    x = torch.empty(1 << (20 if common.SMOKE else 30), dtype=torch.uint8, device=DEV)
    y = torch.empty_like(x)
    ms = bench(lambda: y.copy_(x), rep=100)
    return 2 * x.numel() / ms / 1e6  # GB/s


# ---- eager (HF formulation) baselines ----


def eager_rmsnorm(x, w, eps=1e-5):
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return w * xf.to(x.dtype)


def eager_swiglu(gate_up):
    gate, up = gate_up.chunk(2, dim=-1)
    return up * F.silu(gate)


def _rot_interleaved(x):
    return torch.stack((-x[..., 1::2], x[..., 0::2]), dim=-1).flatten(-2)


def _rot_half(x):
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


def eager_rope(q, k, cos2, sin2, pairing):
    """HF apply_rotary_pos_emb: cos2/sin2 [B, 1, T, R] already in the layout of the pairing."""
    R = cos2.shape[-1]
    rot = _rot_interleaved if pairing == "interleaved" else _rot_half
    out = []
    for x in (q, k):
        xr, xp = x[..., :R], x[..., R:]
        out.append(torch.cat((xr * cos2 + rot(xr) * sin2, xp), dim=-1))
    return out


def liger():
    try:
        import liger_kernel
        from liger_kernel.ops.swiglu import LigerSiLUMulFunction
        from liger_kernel.transformers.rms_norm import LigerRMSNorm

        version = getattr(liger_kernel, "__version__", None)
        if version is None:
            from importlib.metadata import version as v

            version = v("liger-kernel")
        return LigerRMSNorm, LigerSiLUMulFunction, version
    except Exception:  # noqa: BLE001
        return None, None, None


def no_grad(fn):
    def run():
        with torch.no_grad():
            return fn()

    return run


def fwd_bwd(fn, inputs, dy):
    def run():
        for t in inputs:
            t.grad = None
        fn().backward(dy)

    return run


def graph_gbs(nbytes, fn, name, log):
    """GB/s of fn replayed from a CUDA graph (no host overhead); NaN if it cannot be captured."""
    if DEV != "cuda":
        return float("nan")
    try:
        return nbytes / common.graph_bench(fn, rep=200, warmup=25) / 1e6
    except Exception as e:  # noqa: BLE001
        log(f"  {name}: CUDA graph capture failed: {type(e).__name__}: {str(e)[:120]}")
        torch.cuda.synchronize()
        return float("nan")


def run_norm(M, N, log, LigerRMSNorm):
    g = torch.Generator(device=DEV).manual_seed(0)
    x = torch.randn(M, N, device=DEV, dtype=DT, generator=g).requires_grad_()
    w = (1 + 0.1 * torch.randn(N, device=DEV, generator=g)).to(DT).requires_grad_()
    dy = torch.randn(M, N, device=DEV, dtype=DT, generator=g)
    ref = rmsnorm_reference(x.detach().float(), w.detach().float(), 1e-5)
    impls = {"ours": lambda: RMSNormFunction.apply(x, w, 1e-5), "eager": lambda: eager_rmsnorm(x, w)}
    if not common.SMOKE:
        comp = torch.compile(eager_rmsnorm, dynamic=False)
        impls["compile"] = lambda: comp(x, w)
    if LigerRMSNorm is not None:
        mod = LigerRMSNorm(N, eps=1e-5).to(DEV, DT)
        with torch.no_grad():
            mod.weight.copy_(w)
        impls["liger"] = lambda: mod(x)
    r = dict(shape=f"{M}×{N}")
    for name, fn in impls.items():
        try:
            with torch.no_grad():
                r[f"err_{name}"] = rel_err(ref, fn())
            r[f"fwd_{name}"] = 2 * M * N * B16 / bench(no_grad(fn)) / 1e6
            params = [x, w] if name != "liger" else [x, mod.weight]
            r[f"fb_{name}"] = 5 * M * N * B16 / bench(fwd_bwd(fn, params, dy)) / 1e6
            r[f"fbg_{name}"] = graph_gbs(5 * M * N * B16, fwd_bwd(fn, params, dy), name, log)
        except Exception as e:  # noqa: BLE001
            common.reraise_if_smoke()
            traceback.print_exc()
            log(f"  {name} failed: {e!r}")
    return r


def run_swiglu(M, I, log, LigerSiLUMul):
    g = torch.Generator(device=DEV).manual_seed(0)
    gu = torch.randn(M, 2 * I, device=DEV, dtype=DT, generator=g).requires_grad_()
    dy = torch.randn(M, I, device=DEV, dtype=DT, generator=g)
    ref = swiglu_reference(gu.detach().float())
    impls = {"ours": lambda: SwiGLUFunction.apply(gu), "eager": lambda: eager_swiglu(gu)}
    if not common.SMOKE:
        comp = torch.compile(eager_swiglu, dynamic=False)
        impls["compile"] = lambda: comp(gu)
    ins = {k: [gu] for k in impls}
    if LigerSiLUMul is not None:
        a = gu.detach()[:, :I].contiguous().requires_grad_()
        b = gu.detach()[:, I:].contiguous().requires_grad_()
        impls["liger"] = lambda: LigerSiLUMul.apply(a, b)
        ins["liger"] = [a, b]
    r = dict(shape=f"{M}×{I}")
    for name, fn in impls.items():
        try:
            with torch.no_grad():
                r[f"err_{name}"] = rel_err(ref, fn())
            r[f"fwd_{name}"] = 3 * M * I * B16 / bench(no_grad(fn)) / 1e6
            r[f"fb_{name}"] = 8 * M * I * B16 / bench(fwd_bwd(fn, ins[name], dy)) / 1e6
            r[f"fbg_{name}"] = graph_gbs(8 * M * I * B16, fwd_bwd(fn, ins[name], dy), name, log)
        except Exception as e:  # noqa: BLE001
            common.reraise_if_smoke()
            traceback.print_exc()
            log(f"  {name} failed: {e!r}")
    return r


def run_rope(name, B, H, H_kv, T, D, R, pairing, log):
    g = torch.Generator(device=DEV).manual_seed(0)
    q = torch.randn(B, H, T, D, device=DEV, dtype=DT, generator=g)
    k = torch.randn(B, H_kv, T, D, device=DEV, dtype=DT, generator=g)
    pos = torch.arange(T, device=DEV).expand(B, T)
    cos, sin = rope_cos_sin(pos, R, 1e6)  # [B, T, R/2] fp32
    if pairing == "interleaved":
        cos2, sin2 = cos.repeat_interleave(2, -1), sin.repeat_interleave(2, -1)
    else:
        cos2, sin2 = torch.cat((cos, cos), -1), torch.cat((sin, sin), -1)
    cos2, sin2 = cos2[:, None].to(DT), sin2[:, None].to(DT)  # HF casts cos/sin to the activations' dtype
    rq = rope_reference(q.float(), cos, sin, R, pairing)
    full = 2 * (H + H_kv) * B * T * D * B16
    rot = 2 * (H + H_kv) * B * T * R * B16
    r = dict(shape=f"{name}: B={B} H={H}/{H_kv} T={T} D={D} R={R} {pairing}")
    qi, ki = q.clone(), k.clone()
    impls = {
        "ours": (lambda: rope_fwd(q, k, cos, sin, R, pairing), full),
        "ours_inplace": (lambda: rope_fwd(qi, ki, cos, sin, R, pairing, inplace=True), rot),
        "eager": (lambda: eager_rope(q, k, cos2, sin2, pairing), full),
    }
    if not common.SMOKE:
        comp = torch.compile(eager_rope, dynamic=False)
        impls["compile"] = (lambda: comp(q, k, cos2, sin2, pairing), full)
    for nm, (fn, nbytes) in impls.items():
        try:
            if nm != "ours_inplace":
                r[f"err_{nm}"] = rel_err(rq, fn()[0])
            r[f"fwd_{nm}"] = nbytes / bench(fn) / 1e6
        except Exception as e:  # noqa: BLE001
            common.reraise_if_smoke()
            traceback.print_exc()
            log(f"  {nm} failed: {e!r}")
    # training path: forward + backward through autograd (out of place), vs eager autograd
    try:
        ql, kl = q.clone().requires_grad_(), k.clone().requires_grad_()
        dq, dk = torch.randn_like(q), torch.randn_like(k)

        def ours_fb():
            ql.grad = kl.grad = None
            a, b = RopeFunction.apply(ql, kl, cos, sin, R, pairing, False)
            torch.autograd.backward((a, b), (dq, dk))

        def eager_fb():
            ql.grad = kl.grad = None
            a, b = eager_rope(ql, kl, cos2, sin2, pairing)
            torch.autograd.backward((a, b), (dq, dk))

        r["fb_ours"] = 2 * full / bench(ours_fb) / 1e6
        r["fb_eager"] = 2 * full / bench(eager_fb) / 1e6
    except Exception as e:  # noqa: BLE001
        common.reraise_if_smoke()
        traceback.print_exc()
        log(f"  rope fwd+bwd failed: {e!r}")
    return r


def fmt(v, spec=".0f"):
    return "n/a" if v is None or v != v else format(v, spec)


def ratio(r, a, b):
    x, y = r.get(a), r.get(b)
    return "n/a" if x is None or y is None else f"{x / y:.2f}"


def main():
    global DEV
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "norm_swiglu_rope_h200.md"))
    ap.add_argument("--quick", action="store_true", help="one shape per op")
    ap.add_argument(
        "--smoke",
        action="store_true",
        help="check the script: tiny shapes, one timed call, any device (CPU: interpreter), no "
        "torch.compile or liger columns, nothing written",
    )
    args = ap.parse_args()
    if args.smoke:
        common.SMOKE = True
        DEV = common.device()
    elif not torch.cuda.is_available():
        sys.exit("this benchmark needs a CUDA GPU (--smoke checks the script on CPU)")
    torch._dynamo.config.cache_size_limit = 64

    def log(msg):
        print(msg, flush=True)

    LigerRMSNorm, LigerSiLUMul, liger_version = liger() if not args.smoke else (None, None, None)
    gpu = torch.cuda.get_device_name() if DEV == "cuda" else f"CPU ({platform.machine()}, Triton interpreter)"
    head = [
        "# Fused RMSNorm, SwiGLU and partial RoPE: Triton kernels vs liger-kernel, torch.compile and eager",
        "",
        f"- date: {datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- GPU: {gpu}; torch {torch.__version__}, triton {triton.__version__}, "
        f"CUDA {torch.version.cuda}, liger-kernel {liger_version or 'not installed'}, "
        f"Python {platform.python_version()}",
        "- setup: bf16; GB/s of necessary traffic (see the script's docstring), the same bytes for every column; "
        "median of triton.testing.do_bench; 'ours/X' = time(X) / time(ours); errors are rel. RMS vs the fp32 "
        "reference.",
        f"- targets (issue 4): RMSNorm and SwiGLU ours/liger ≥ {TARGET_LIGER}",
    ]
    if args.smoke:
        head.append(
            "- SMOKE RUN: tiny shapes, one timed call, no torch.compile/liger/CUDA-graph columns, numbers meaningless"
        )
    try:
        gbs = copy_ceiling()
        head.append(f"- ceiling measured in this run: device-to-device copy of 1 GiB = {gbs:.0f} GB/s (read + write)")
    except Exception as e:  # noqa: BLE001
        common.reraise_if_smoke()
        log(f"copy ceiling failed: {e!r}")
    log("\n".join(head))
    norm_shapes = NORM_SHAPES[:1] if args.quick else NORM_SHAPES
    swiglu_shapes = SWIGLU_SHAPES[:1] if args.quick else SWIGLU_SHAPES
    rope_shapes = ROPE_SHAPES[:1] if args.quick else ROPE_SHAPES
    if args.smoke:
        norm_shapes, swiglu_shapes, rope_shapes = SMOKE_NORM, SMOKE_SWIGLU, SMOKE_ROPE

    sections = []

    def write():
        if args.smoke:
            return
        with open(args.out, "w") as f:
            f.write("\n".join(head + sections) + "\n")

    for title, shapes, runner in (
        ("RMSNorm (rows × hidden)", norm_shapes, lambda s: run_norm(*s, log, LigerRMSNorm)),
        ("SwiGLU (rows × I; input rows × 2I)", swiglu_shapes, lambda s: run_swiglu(*s, log, LigerSiLUMul)),
    ):
        sections += [
            "",
            f"## {title}",
            "",
            "| shape | pass | ours GB/s | liger | compile | eager | ours/liger | ours/compile | ours/eager | err ours "
            "| err liger |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for s in shapes:
            log(f"{title} {s} ...")
            r = runner(s)
            log(str(r))
            for p, label in (("fwd", "fwd"), ("fb", "fwd+bwd"), ("fbg", "fwd+bwd, CUDA graph")):
                sections.append(
                    f"| {r['shape']} | {label} | {fmt(r.get(p + '_ours'))} | {fmt(r.get(p + '_liger'))} | "
                    f"{fmt(r.get(p + '_compile'))} | {fmt(r.get(p + '_eager'))} | "
                    f"{ratio(r, p + '_ours', p + '_liger')} | "
                    f"{ratio(r, p + '_ours', p + '_compile')} | {ratio(r, p + '_ours', p + '_eager')} | "
                    f"{fmt(r.get('err_ours'), '.1e')} | {fmt(r.get('err_liger'), '.1e')} |"
                )
            write()

    sections += [
        "",
        "## Partial RoPE on q and k (one launch for both)",
        "",
        "| shape | ours GB/s | ours in place GB/s | compile | eager | ours/compile | ours/eager | fwd+bwd ours GB/s "
        "| fwd+bwd eager | fwd+bwd ours/eager | err ours | err eager |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in rope_shapes:
        log(f"RoPE {s} ...")
        r = run_rope(*s, log)
        log(str(r))
        sections.append(
            f"| {r['shape']} | {fmt(r.get('fwd_ours'))} | {fmt(r.get('fwd_ours_inplace'))} | "
            f"{fmt(r.get('fwd_compile'))} | {fmt(r.get('fwd_eager'))} | {ratio(r, 'fwd_ours', 'fwd_compile')} | "
            f"{ratio(r, 'fwd_ours', 'fwd_eager')} | "
            f"{fmt(r.get('fb_ours'))} | {fmt(r.get('fb_eager'))} | {ratio(r, 'fb_ours', 'fb_eager')} | "
            f"{fmt(r.get('err_ours'), '.1e')} | {fmt(r.get('err_eager'), '.1e')} |"
        )
        write()
    sections += [
        "",
        "In-place RoPE moves only the rotary half (R of D dims), so its GB/s counts those bytes; its time "
        "is what a model that rotates q/k in place pays.",
    ]
    write()
    print("\n" + "\n".join(head + sections))


if __name__ == "__main__":
    main()
