"""Side by side on one GPU: glmkit 0.1 (the code before the one-decoder refactor, issue 9) against the current tree,
for every kernel-backed op and for training throughput, so no figure may fall unnoticed.

    python benchmarks/compare_refactor.py --old .old        # .old: a checkout of the previous commit's
                                                            # glmkit/ and kernels/ (carried to the GPU machine)
Each version runs in its own subprocess (both are packages named glmkit), alternating old, new, old, new; the table
takes each figure's best of the two rounds and writes benchmarks/results/refactor_h200.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# (name, what it measures)
ROWS = [
    "attention fwd, causal, B4 T2048 H16 D128",
    "attention fwd+bwd, causal, B4 T2048 H16 D128",
    "attention fwd, GLM mask sep=T/2, B4 T2048 H16 D128",
    "attention fwd+bwd, causal GQA 32/4, B2 T4096 D128",
    "rmsnorm fwd, 16384×4096",
    "rmsnorm fwd+bwd, 16384×4096",
    "swiglu fwd, 16384×2·5632",
    "swiglu fwd+bwd, 16384×2·5632",
    "rope fwd+bwd q/k, B4 T4096 H32/8 D128 R64",
    "moe_experts fwd, N8192 H2048 I1024 E64 k8",
    "moe_experts fwd+bwd, N8192 H2048 I1024 E64 k8",
    "train step, gpu-small (tokens/s)",
    "train step, gpu-moe (tokens/s)",
]


def worker(version: str, rows: list[str], profile_dir: str | None) -> dict[str, float]:
    """Milliseconds per call (tokens/s for the train rows) of each row in ``rows``, with the API of ``version``.
    ``profile_dir``: also profile 5 training steps of each train row (torch.profiler) and write the kernels' GPU
    time, the step's wall time and the top kernels there, one file per version and row."""
    import torch
    import triton

    def want(*names):
        return any(n in rows for n in names)

    torch.manual_seed(0)
    dev, bf = "cuda", torch.bfloat16
    old = version == "old"
    if old:
        from glmkit.attention import glm_attention as attention
        from glmkit.kernels.moe_gemm import moe_experts as _moe
        from glmkit.lm_data import LMData
        from glmkit.mlp import swiglu
        from glmkit.models.glm_dense import GLMDenseModel as Dense
        from glmkit.models.glm_dense import get_config as dense_config
        from glmkit.models.glm_moe import GLMMoEModel as MoEModel
        from glmkit.models.glm_moe import get_config as moe_config
        from glmkit.norms import rms_norm as rmsnorm
        from glmkit.rope import apply_rope_qk as rope
        from glmkit.rope import rope_cos_sin

        def moe_experts(x, i, w, a, b):
            return _moe(x, i, w, a, b, check=False)
    else:
        from glmkit.data.lm_data import LMData
        from glmkit.models.decoder import Decoder as Dense
        from glmkit.models.decoder import Decoder as MoEModel
        from glmkit.models.presets import get_config as dense_config
        from glmkit.models.presets import get_config as moe_config
        from glmkit.ops.attention import attention
        from glmkit.ops.moe_experts import moe_experts as _moe
        from glmkit.ops.rmsnorm import rmsnorm
        from glmkit.ops.rope import rope as _rope
        from glmkit.ops.rope import rope_cos_sin
        from glmkit.ops.swiglu import swiglu

        def moe_experts(x, i, w, a, b):
            return _moe(x, i, w, a, b, impl="triton")

        def rope(q, k, cos, sin, R, pairing):
            return _rope(q, k, cos, sin, R, pairing)

    bench = lambda fn: triton.testing.do_bench(fn, warmup=25, rep=100)  # noqa: E731
    out = {}

    def attn_rows(name_fwd, name_bwd, B, H, Hkv, T, D, sep_value):
        q = torch.randn(B, H, T, D, device=dev, dtype=bf, requires_grad=True)
        k = torch.randn(B, Hkv, T, D, device=dev, dtype=bf, requires_grad=True)
        v = torch.randn(B, Hkv, T, D, device=dev, dtype=bf, requires_grad=True)
        sep = torch.full((B,), sep_value, device=dev, dtype=torch.long)
        with torch.no_grad():
            out[name_fwd] = bench(lambda: attention(q, k, v, sep))
        if name_bwd:
            do = torch.randn(B, H, T, D, device=dev, dtype=bf)
            out[name_bwd] = bench(lambda: torch.autograd.grad(attention(q, k, v, sep), (q, k, v), do))

    if want(ROWS[0], ROWS[1]):
        attn_rows(ROWS[0], ROWS[1], 4, 16, 16, 2048, 128, 0)
    if want(ROWS[2]):
        attn_rows(ROWS[2], None, 4, 16, 16, 2048, 128, 1024)
    if want(ROWS[3]):
        q = torch.randn(2, 32, 4096, 128, device=dev, dtype=bf, requires_grad=True)
        k = torch.randn(2, 4, 4096, 128, device=dev, dtype=bf, requires_grad=True)
        v = torch.randn(2, 4, 4096, 128, device=dev, dtype=bf, requires_grad=True)
        sep0, do = torch.zeros(2, device=dev, dtype=torch.long), torch.randn_like(q)
        out[ROWS[3]] = bench(lambda: torch.autograd.grad(attention(q, k, v, sep0), (q, k, v), do))

    if want(ROWS[4], ROWS[5]):
        x = torch.randn(16384, 4096, device=dev, dtype=bf, requires_grad=True)
        w = torch.ones(4096, device=dev, dtype=bf, requires_grad=True)
        with torch.no_grad():
            out[ROWS[4]] = bench(lambda: rmsnorm(x, w, 1e-5))
        dy = torch.randn_like(x)
        out[ROWS[5]] = bench(lambda: torch.autograd.grad(rmsnorm(x, w, 1e-5), (x, w), dy))
    if want(ROWS[6], ROWS[7]):
        gu = torch.randn(16384, 2 * 5632, device=dev, dtype=bf, requires_grad=True)
        with torch.no_grad():
            out[ROWS[6]] = bench(lambda: swiglu(gu))
        dy = torch.randn(16384, 5632, device=dev, dtype=bf)
        out[ROWS[7]] = bench(lambda: torch.autograd.grad(swiglu(gu), gu, dy))
    if want(ROWS[8]):
        q = torch.randn(4, 32, 4096, 128, device=dev, dtype=bf, requires_grad=True)
        k = torch.randn(4, 8, 4096, 128, device=dev, dtype=bf, requires_grad=True)
        cos, sin = rope_cos_sin(torch.arange(4096, device=dev), 64, 1e6)
        gq, gk = torch.randn_like(q), torch.randn_like(k)
        out[ROWS[8]] = bench(lambda: torch.autograd.grad(rope(q, k, cos, sin, 64, "half"), (q, k), (gq, gk)))

    if want(ROWS[9], ROWS[10]):
        N, Hm, Im, E, kk = 8192, 2048, 1024, 64, 8
        xm = torch.randn(N, Hm, device=dev, dtype=bf, requires_grad=True)
        idx = torch.rand(N, E, device=dev).topk(kk, dim=-1).indices
        wt = torch.rand(N, kk, device=dev, requires_grad=True)
        wgu = (torch.randn(E, 2 * Im, Hm, device=dev, dtype=bf) * 0.02).requires_grad_()
        wd = (torch.randn(E, Hm, Im, device=dev, dtype=bf) * 0.02).requires_grad_()
        with torch.no_grad():
            out[ROWS[9]] = bench(lambda: moe_experts(xm, idx, wt, wgu, wd))
        dym = torch.randn(N, Hm, device=dev, dtype=bf)
        out[ROWS[10]] = bench(lambda: torch.autograd.grad(moe_experts(xm, idx, wt, wgu, wd), (xm, wt, wgu, wd), dym))

    for row, make in (
        (ROWS[11], lambda: Dense(dense_config("gpu-small"))),
        (ROWS[12], lambda: MoEModel(moe_config("gpu-moe"))),
    ):
        if not want(row):
            continue
        torch.manual_seed(0)
        model = make().to(dev).train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=False)
        data = LMData(batch_size=16, seq_len=512, seed=0)
        tokens = 16 * 512

        def step(i, data=data, model=model, opt=opt):
            b = data.batch(i)
            ids, tg = b.input_ids.to(dev), b.targets.to(dev)
            with torch.autocast("cuda", dtype=bf):
                loss = model.loss(ids, tg) if old else model.loss({"input_ids": ids, "targets": tg})
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            return float(loss)  # the trainer reads the loss back every step too

        for i in range(8):
            step(i)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        n = 30
        for i in range(8, 8 + n):
            step(i)
        torch.cuda.synchronize()
        out[row] = tokens * n / (time.perf_counter() - t0)
        if profile_dir:
            profile_steps(row, version, step, profile_dir)
    return out


def profile_steps(row: str, version: str, step, profile_dir: str, n: int = 5) -> None:
    """Profile n training steps: is the step bound by the GPU (kernel time ≈ wall time) or by the host?"""
    import torch
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        for i in range(100, 100 + n):
            step(i)
        torch.cuda.synchronize()
        wall = (time.perf_counter() - t0) / n
    events = prof.key_averages()

    from torch.autograd import DeviceType

    def kernel_time(e):  # µs of GPU kernels, counted once: device events, not the CPU ops or annotations above them
        if e.device_type == DeviceType.CPU or getattr(e, "is_user_annotation", False):
            return 0.0
        return getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0)

    gpu = sum(kernel_time(e) for e in events) / n / 1e3
    launches = sum(e.count for e in events if e.key.startswith(("cudaLaunchKernel", "cuLaunchKernel"))) / n
    name = f"{version}_{row.split(',')[-1].strip().split(' ')[0]}.txt"
    text = (
        f"{version} {row}: wall {wall * 1e3:.2f} ms/step under the profiler, GPU kernels {gpu:.2f} ms/step, "
        f"{launches:.0f} kernel launches/step\n\n"
        + events.table(sort_by="self_cuda_time_total", row_limit=25, max_name_column_width=60)
    )
    Path(profile_dir).mkdir(parents=True, exist_ok=True)
    (Path(profile_dir) / name).write_text(text)
    print(text.splitlines()[0], flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--old", default=".old", help="folder holding the old glmkit/ and kernels/")
    p.add_argument("--worker", choices=("old", "new"), help=argparse.SUPPRESS)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--rows", default="", help="comma-separated substrings: only the rows that contain one of them")
    p.add_argument("--profile", metavar="DIR", help="also profile the training rows' steps into DIR")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "refactor_h200.md"))
    args = p.parse_args()
    rows = [r for r in ROWS if not args.rows or any(s.strip() and s.strip() in r for s in args.rows.split(","))]
    if not rows:
        raise SystemExit(f"--rows {args.rows!r} matches no row of {ROWS}")
    if args.worker:
        print("RESULT " + json.dumps(worker(args.worker, rows, args.profile)))
        return
    import torch
    import triton

    runs = {"old": [], "new": []}
    for _ in range(args.rounds):
        for version in ("old", "new"):
            env = {**os.environ, "PYTHONPATH": str(Path(args.old).resolve() if version == "old" else ROOT)}
            res = subprocess.run(
                [sys.executable, __file__, "--worker", version, "--rows", args.rows]
                + (["--profile", str(Path(args.profile).resolve())] if args.profile else []),
                env=env,
                capture_output=True,
                text=True,
                cwd=ROOT if version == "new" else args.old,
            )
            print(*(ln for ln in res.stdout.splitlines() if not ln.startswith("RESULT ")), sep="\n", flush=True)
            line = next((ln for ln in res.stdout.splitlines() if ln.startswith("RESULT ")), None)
            if line is None:
                print(res.stdout[-3000:], res.stderr[-3000:])
                raise SystemExit(f"the {version} worker failed")
            runs[version].append(json.loads(line[7:]))
            print(version, "done", flush=True)
    lines = [
        "# One-decoder refactor (issue 9): glmkit 0.1 vs 0.2 side by side\n",
        f"date {time.strftime('%Y-%m-%d')}; GPU {torch.cuda.get_device_name(0)}; torch {torch.__version__}; "
        f"triton {triton.__version__}; bf16; best of {args.rounds} alternating rounds per version "
        f"(`benchmarks/compare_refactor.py`).\n",
        "| what | 0.1 | 0.2 | 0.2 / 0.1 (higher = faster) |",
        "|---|---|---|---|",
    ]
    for row in rows:
        rate = "tokens/s" in row
        old = max(r[row] for r in runs["old"]) if rate else min(r[row] for r in runs["old"])
        new = max(r[row] for r in runs["new"]) if rate else min(r[row] for r in runs["new"])
        unit = "" if rate else " ms"
        ratio = new / old if rate else old / new
        lines.append(f"| {row} | {old:,.3f}{unit} | {new:,.3f}{unit} | {ratio:.3f} |")
    lines.append("\nEvery round: " + json.dumps(runs))
    text = "\n".join(lines) + "\n"
    print(text)
    Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
