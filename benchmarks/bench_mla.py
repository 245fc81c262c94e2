"""Benchmark: MLA's two kernels — the prefill/training flash attention at MLA's head dims, and the absorbed decode over
the latent cache — against their baselines, measured in the same run.

GPU only; a script, not a test. bf16. Every output is checked against a baseline's before it is timed.

* ``prefill``: ``glmkit.ops.attention`` (``kernels/attention.py``) at GLM-4.7-Flash's / GLM-5's MLA heads — q·k 192 +
  64 = 256, v 256 — causal, H = 20 (GLM-4.7-Flash), B·T = 32K tokens, T = 4K and 16K. Forward, and forward+backward
  through the autograd op. Baselines: SDPA's cuDNN and flash backends on q/k padded to the v head (GLM's q·k head
  already equals its v head, 256, so nothing is padded here; ``--dk 192 --dv 128`` would pad DeepSeek's), and our own
  kernel at D = 128 (H = 40, the same H·D) as the rate a 256-wide head should keep. TFLOP/s over the unmasked pairs:
  forward 2·(Dk + Dv) per (query, key) pair and head, backward 2·(3·Dk + 2·Dv) (five matmuls); the same count for
  every column. Median of triton.testing.do_bench.
* ``decode``: ``glmkit.ops.mla_decode`` (``kernels/mla_decode.py``) for one new token at B = 1/32/128 and cache
  lengths 4K/32K, GLM-4.7-Flash's shape (20 heads; latent 512 + rope 64), plus GLM-5's 64 heads at B = 32 — replayed
  from a CUDA graph (GPU time). Achieved bandwidth = the bytes a step must read (every cached row once: B·L·576·2,
  plus the queries and outputs) over the time, against a 1 GiB device-to-device copy measured in the run (read +
  write over the time) and against a torch composite of the same absorbed math (bf16 einsums over views of the cache,
  fp32 softmax) — what one would write without a kernel.

Targets (issue 10): prefill ≥ 1.0× padded SDPA-cuDNN and ≥ 0.9× our D = 128 rate; decode ≥ 70% of copy bandwidth at
B ≥ 32 and ≥ 3× the composite.

    python benchmarks/bench_mla.py                  # → benchmarks/results/mla_h200.md
    python benchmarks/bench_mla.py --only decode    # one section
    python benchmarks/bench_mla.py --smoke          # tiny shapes, any device (CPU: interpreter, fp32), no file
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
from torch.nn.attention import SDPBackend, sdpa_kernel

import glmkit.kernels  # noqa: F401
from glmkit.kernels import attention as kattn
from glmkit.kernels import mla_decode as kdec
from glmkit.kernels.attention import visible_pairs
from glmkit.ops.attention import AttentionFunction
from glmkit.testing import rel_err

DEV, DT = "cuda", torch.bfloat16  # --smoke without CUDA: CPU (interpreter) and fp32
CUDNN, FLASH = SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION
PREFILL = dict(tokens=32 * 1024, heads=20, Ts=[4096, 16384], ref_D=128)
DECODE = [(20, 1, 4096), (20, 1, 32768), (20, 32, 4096), (20, 32, 32768), (20, 128, 4096), (20, 128, 32768)]
DECODE += [(64, 32, 32768)]  # (H, B, L): GLM-5's heads
R, P = 512, 64  # kv_lora_rank, qk_rope_head_dim
SMOKE = dict(tokens=128, heads=2, Ts=[64], ref_D=16, dk=32, dv=16, DECODE=[(3, 1, 100), (3, 4, 70)], R=32, P=16)
TARGET_CUDNN, TARGET_D128 = 1.0, 0.9
TARGET_COPY, TARGET_COMPOSITE = 0.70, 3.0


def fmt(x, spec=".0f"):
    return "n/a" if x is None or x != x else format(x, spec)


def ratio(a, b):
    """b / a as "1.23×" (a, b times: > 1 means the first is faster), or n/a."""
    return "n/a" if not a or not b or a != a or b != b else f"{b / a:.2f}×"


# ---------------------------------------------------------------------------------------------------- prefill
def _cfg(tuned):
    cfg = getattr(tuned, "best_config", None)
    return "" if cfg is None else f"{cfg.kwargs['BLOCK_M']}x{cfg.kwargs['BLOCK_N']} w{cfg.num_warps} s{cfg.num_stages}"


def prefill_inputs(B, H, T, dk, dv, seed):
    g = torch.Generator(device=DEV).manual_seed(seed)
    shapes = ((B, H, T, dk), (B, H, T, dk), (B, H, T, dv), (B, H, T, dv))
    return [torch.randn(s, device=DEV, dtype=DT, generator=g) for s in shapes]  # q, k, v, dO


def ours_fn(q, k, v, do, sep, backward):
    if not backward:
        return lambda: kattn.attention_fwd(q, k, v, sep)
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]

    def run():
        for t in leaves:
            t.grad = None
        AttentionFunction.apply(*leaves, sep, None).backward(do)
        return leaves[0].grad

    return run


def sdpa_fn(q, k, v, do, backend, backward):
    """SDPA causal on q/k zero-padded to v's head (scale kept at 1/√Dk: padding adds zeros to every dot product)."""
    dk, dv = q.shape[-1], v.shape[-1]
    if dv > dk:
        q, k = (F.pad(t, (0, dv - dk)) for t in (q, k))
    elif dk > dv:
        v = F.pad(v, (0, dk - dv))
    scale = dk**-0.5
    if not backward:

        def fwd():
            with torch.no_grad(), sdpa_kernel([backend]):
                return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)[..., :dv]

        return fwd
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    do_p = F.pad(do, (0, v.shape[-1] - dv))

    def run():
        for t in leaves:
            t.grad = None
        with sdpa_kernel([backend]):
            F.scaled_dot_product_attention(*leaves, is_causal=True, scale=scale).backward(do_p)
        return leaves[0].grad[..., :dk]

    return run


def prefill_rows(args, log):
    """One row per (T, pass), yielded as soon as it is measured."""
    for T in PREFILL["Ts"]:
        B, H = max(1, PREFILL["tokens"] // T), PREFILL["heads"]
        pairs = visible_pairs(T, 0) * B * H
        q, k, v, do = prefill_inputs(B, H, T, args.dk, args.dv, seed=T)
        D0 = PREFILL["ref_D"]
        q0, k0, v0, do0 = prefill_inputs(B, H * args.dv // D0, T, D0, D0, seed=T + 1)
        sep = torch.zeros(B, dtype=torch.int64, device=DEV)
        for backward in (False, True):
            r = dict(T=T, B=B, H=H, pass_="fwd+bwd" if backward else "fwd")
            flops = pairs * 2 * (args.dk + args.dv) + (pairs * 2 * (3 * args.dk + 2 * args.dv) if backward else 0)
            flops0 = visible_pairs(T, 0) * B * q0.shape[1] * (4 * D0 + (10 * D0 if backward else 0))
            ours = ours_fn(q, k, v, do, sep, backward)
            for name, sdpa_backend in (("cudnn", CUDNN), ("flash", FLASH)):  # each checked against ours, then timed
                try:
                    fn = sdpa_fn(q, k, v, do, sdpa_backend, backward)
                    err = rel_err(fn().float(), ours().float())
                    r.setdefault("err", err)  # vs cuDNN (vs flash when cuDNN failed)
                    if err > 2e-2:
                        raise AssertionError(f"ours differs from SDPA {name}: rel err {err:.2e}")
                    r[name] = flops / common.bench(fn) / 1e9
                except Exception as e:  # noqa: BLE001
                    common.reraise_if_smoke()
                    log(f"SDPA {name} at T={T} {r['pass_']} failed: {e!r}")
            try:
                if "err" in r and r["err"] <= 2e-2:  # ours is timed only once it has been checked
                    r["ours"] = flops / common.bench(ours) / 1e9
                    r["cfg"] = _cfg(kattn._dq_tuned if backward else kattn._attn_fwd_tuned)
                    r["d128"] = flops0 / common.bench(ours_fn(q0, k0, v0, do0, sep, backward)) / 1e9
            except Exception as e:  # noqa: BLE001
                common.reraise_if_smoke()
                traceback.print_exc()
                log(f"prefill T={T} {r['pass_']} failed: {e!r}")
            log(f"prefill {r}")
            yield r
        if DEV == "cuda":
            torch.cuda.empty_cache()


def prefill_table(args, rows, ceiling=None):
    pad = {True: f" (SDPA: q/k padded {args.dk} → {args.dv})", False: f" (SDPA: v padded {args.dv} → {args.dk})"}
    pad = "" if args.dk == args.dv else pad[args.dv > args.dk]
    lines = [
        f"## Prefill / training: causal attention, q·k head {args.dk}, v head {args.dv}, H = {PREFILL['heads']}, "
        f"B·T = {PREFILL['tokens']}{pad}",
        "",
        "| T | B×H | pass | ours TFLOP/s | SDPA cuDNN | SDPA flash | ours D=128 (H·D same) | ours/cuDNN | ours/flash | "
        "ours/ours D=128 | ours config (autotuned; bwd: dq kernel) | err vs SDPA |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        o, c, f, d = (r.get(k) for k in ("ours", "cudnn", "flash", "d128"))
        q = lambda a, b: "n/a" if not a or not b else f"{a / b:.2f}"  # noqa: E731
        lines.append(
            f"| {r['T']} | {r['B']}×{r['H']} | {r['pass_']} | {fmt(o)} | {fmt(c)} | {fmt(f)} | {fmt(d)} | {q(o, c)} | "
            f"{q(o, f)} | {q(o, d)} | {r.get('cfg', '')} | {fmt(r.get('err'), '.1e')} |"
        )
    lines += ["", f"Targets: ours/cuDNN ≥ {TARGET_CUDNN}, ours/ours D=128 ≥ {TARGET_D128}."]
    return lines


# ---------------------------------------------------------------------------------------------------- decode
def gpu_time(fn):
    """Milliseconds of fn replayed from a CUDA graph (smoke mode: one wall-clock call)."""
    return common.bench(fn) if common.SMOKE else common.graph_bench(fn, rep=100, warmup=25)


def copy_gbs(nbytes):
    x = torch.empty(nbytes, dtype=torch.uint8, device=DEV)
    y = torch.empty_like(x)
    return 2 * nbytes / gpu_time(lambda: y.copy_(x)) / 1e6


def composite(q_lat, q_rope, c_kv, k_rot, scale):
    """The absorbed math in torch: bf16 einsums over the cache views, fp32 softmax."""
    s = torch.einsum("bthr,blr->bthl", q_lat, c_kv) + torch.einsum("bthp,blp->bthl", q_rope, k_rot)
    p = (s.float() * scale).softmax(-1).to(c_kv.dtype)
    return torch.einsum("bthl,blr->bthr", p, c_kv)


def decode_inputs(H, B, L, seed):
    g = torch.Generator(device=DEV).manual_seed(seed)
    latent = torch.randn(B, L, R + P, device=DEV, dtype=DT, generator=g)  # MLAState's layout: [c_KV | k_rot]
    q_lat = torch.randn(B, 1, H, R, device=DEV, dtype=DT, generator=g) / R**0.25
    q_rope = torch.randn(B, 1, H, P, device=DEV, dtype=DT, generator=g)
    return q_lat, q_rope, latent[..., :R], latent[..., R:]


def decode_rows(args, log):
    """One row per (H, B, L), yielded as soon as it is measured."""
    scale = 256**-0.5
    for H, B, L in DECODE:
        r = dict(H=H, B=B, L=L, splits=kdec.num_splits(B, L, torch.device(DEV))[0])
        try:
            q_lat, q_rope, c_kv, k_rot = decode_inputs(H, B, L, seed=B + L)
            nbytes = kdec.decode_bytes(B, L, H, R, P, itemsize=q_lat.element_size())
            out = kdec.mla_decode_fwd(q_lat, q_rope, c_kv, k_rot, scale)  # compiles and autotunes
            ref = composite(q_lat, q_rope, c_kv, k_rot, scale)
            r["err"] = rel_err(ref.float(), out.float())
            if r["err"] > 2e-2:
                raise AssertionError(f"ours differs from the composite: rel err {r['err']:.2e}")
            r["us"] = gpu_time(lambda: kdec.mla_decode_fwd(q_lat, q_rope, c_kv, k_rot, scale)) * 1e3  # noqa: B023
            r["gbs"] = nbytes / r["us"] / 1e3
            r["comp_us"] = gpu_time(lambda: composite(q_lat, q_rope, c_kv, k_rot, scale)) * 1e3  # noqa: B023
            cfg = getattr(kdec._decode_tuned, "best_config", None)
            r["cfg"] = "" if cfg is None or DEV != "cuda" else f"{cfg.kwargs['BLOCK_H']}x{cfg.kwargs['BLOCK_N']} "
            r["cfg"] += "" if cfg is None or DEV != "cuda" else f"w{cfg.num_warps} s{cfg.num_stages}"
        except Exception as e:  # noqa: BLE001
            common.reraise_if_smoke()
            traceback.print_exc()
            log(f"decode H={H} B={B} L={L} failed: {e!r}")
        if DEV == "cuda":
            torch.cuda.empty_cache()
        log(f"decode {r}")
        yield r


def decode_table(args, rows, ceiling):
    lines = [
        f"## Decode: one token, absorbed, latent {R} + rope {P} per cached token (CUDA-graph replay, GPU time)",
        "",
        "| H | B | L | cache MiB | splits | ours µs | ours GB/s | of copy | composite µs | ours/composite | "
        "ours config (autotuned) | err vs composite |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        mib = r["B"] * r["L"] * (R + P) * torch.empty((), dtype=DT).element_size() / 2**20
        of = r["gbs"] / ceiling if r.get("gbs") and ceiling else None
        lines.append(
            f"| {r['H']} | {r['B']} | {r['L']} | {mib:.0f} | {r['splits']} | {fmt(r.get('us'), '.1f')} | "
            f"{fmt(r.get('gbs'))} | {fmt(of, '.0%')} | {fmt(r.get('comp_us'), '.1f')} | "
            f"{ratio(r.get('us'), r.get('comp_us'))} | {r.get('cfg', '')} | {fmt(r.get('err'), '.1e')} |"
        )
    lines += ["", f"Targets: ≥ {TARGET_COPY:.0%} of copy bandwidth at B ≥ 32, ≥ {TARGET_COMPOSITE}× the composite."]
    return lines


def main():
    global DEV, DT, CUDNN, DECODE, R, P
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "mla_h200.md"))
    ap.add_argument("--only", default="prefill,decode", help="comma-separated sections: prefill, decode")
    ap.add_argument("--dk", type=int, default=256, help="prefill q·k head (GLM: 192 + 64)")
    ap.add_argument("--dv", type=int, default=256, help="prefill v head (GLM: 256)")
    ap.add_argument(
        "--smoke",
        action="store_true",
        help="check the script: tiny shapes, one timed call, any device (CPU: interpreter, fp32, SDPA's math "
        "backend in the cuDNN column), nothing written",
    )
    args = ap.parse_args()
    sections = set(args.only.split(","))
    if args.smoke:
        common.SMOKE = True
        PREFILL.update(tokens=SMOKE["tokens"], heads=SMOKE["heads"], Ts=SMOKE["Ts"], ref_D=SMOKE["ref_D"])
        args.dk, args.dv = SMOKE["dk"], SMOKE["dv"]
        DECODE, R, P = SMOKE["DECODE"], SMOKE["R"], SMOKE["P"]
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
        "# MLA kernels: prefill attention at MLA's head dims, absorbed decode over the latent cache",
        "",
        f"- date: {datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- GPU: {machine}, Python {platform.python_version()}",
        f"- setup: {str(DT)[6:]}; see the docstring of benchmarks/bench_mla.py for what each column counts",
    ]
    if args.smoke:
        head.append(f"- SMOKE RUN: tiny shapes, one timed call, numbers meaningless; 'cuDNN' column = {CUDNN.name}")
    ceiling = None
    try:
        head.append(f"- ceiling measured in this run: bf16 matmul 8192³ = {common.matmul_ceiling():.0f} TFLOP/s")
        ceiling = copy_gbs(1 << 20 if args.smoke else 1 << 30)
        head.append(f"- device-to-device copy of 1 GiB in this run: {fmt(ceiling)} GB/s (read + write)")
    except Exception as e:  # noqa: BLE001
        common.reraise_if_smoke()
        log(f"ceilings failed: {e!r}")
    log("\n".join(head))
    tables: dict[str, list[str]] = {}  # section → its table so far

    def render():
        return "\n".join(head + [line for t in tables.values() for line in [""] + t]) + "\n"

    # decode first (cheap to compile); each table is rewritten after every row, so a run cut short keeps its rows
    for name, rows_of, table in (("decode", decode_rows, decode_table), ("prefill", prefill_rows, prefill_table)):
        if name not in sections:
            continue
        rows = []
        for r in rows_of(args, log):
            rows.append(r)
            tables[name] = table(args, rows, ceiling)
            if not args.smoke:
                os.makedirs(os.path.dirname(args.out), exist_ok=True)
                with open(args.out, "w") as f:
                    f.write(render())
    print("\n" + render())


if __name__ == "__main__":
    main()
