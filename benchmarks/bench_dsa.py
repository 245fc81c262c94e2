"""Benchmark: DSA's attention (lightning indexer + top-k + sparse MLA) against dense MLA prefill; sparse decode.

GPU only; a script, not a test. GLM-5's attention dims: 64 heads, q·k head 192 + 64 and v head 256 for dense MLA;
MQA mode for DSA (latent R = 512, rope DR = 64, scale 256^-½), index heads 32 × 128, k = 2048. bf16 inputs, B = 1.
Each time is the median of triton.testing.do_bench after a first call (compile + autotune); outputs are checked
against the torch references at a small shape before anything is timed.

Sections (``--only`` picks some; each writes its table as soon as it is done):

* ``layer``: T = 16K/32K/64K/128K. Dense = ``glmkit.ops.attention.attention`` (the flash kernels that take a v head
  unlike the q·k head: the MLA prefill kernel, issue 10) on the expanded q, k, v [1, 64, T, 256], causal. DSA =
  ``indexer_topk`` (fused fp32 logits, then ``torch.topk`` per query chunk) + ``sparse_mla`` on the absorbed
  query [1, T, 64, 512 + 64] and the latent cache. Both sides time attention only: the projections (dense: kv_b_proj's
  expansion; DSA: W_UK/W_UV absorption, the indexer's wq_b/wk/weights_proj) are left out of both. Columns: the
  logits alone and top-k's share (full ``indexer_topk`` minus the same chunked logits without selection), sparse
  attention forward and its effective TFLOP/s = 2·T·H·k·(R + DR + R) / time, dense/DSA = the speed-up.
* ``decode``: ``sparse_mla_decode`` for one new token per sequence at B = 32/64/128 against a 64K latent cache, k =
  2048 random distinct rows per token, CUDA-graph replay. Bandwidth counts the selected latent rows read,
  B·k·(R + DR)·2 bytes (q, o and the indices are < 3%), against a device-to-device copy of 1 GiB (read + write).
* ``bwd``: the sparse backward (dq, dc_kv, dk_rope with fp32 atomics) at T = 8K, k = 2048 — informational.

    python benchmarks/bench_dsa.py                  # → benchmarks/results/dsa_h200.md
    python benchmarks/bench_dsa.py --only layer     # some sections
    python benchmarks/bench_dsa.py --quick          # T = 16K/32K only, one decode batch
    python benchmarks/bench_dsa.py --smoke          # tiny shapes, any device (CPU: interpreter, fp32), no file
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import traceback
from functools import partial

import common  # benchmarks/common.py
import torch
import triton

import glmkit.ops.lightning_indexer as li
from glmkit import backend
from glmkit.ops.attention import attention
from glmkit.ops.lightning_indexer import indexer_topk, lightning_indexer
from glmkit.ops.sparse_mla import selected_mask, sparse_mla, sparse_mla_decode, sparse_mla_reference
from glmkit.testing import rel_err

DEV, DT = "cuda", torch.bfloat16
H, NOPE, ROPE, V, R = 64, 192, 64, 256, 512  # GLM-5 MLA
HI, DI, TOPK = 32, 128, 2048  # GLM-5 indexer
TS = [16384, 32768, 65536, 131072]
DECODE_B, DECODE_L = [32, 64, 128], 65536
BWD_T = 8192
CHECK_T = 300  # the shape checked against the references (T > k below: TOPK is scaled down for it)
SMOKE = dict(H=2, NOPE=16, ROPE=16, V=16, R=32, HI=2, DI=16, TOPK=16, TS=[48, 96], DECODE_B=[2], DECODE_L=80,
             BWD_T=40, CHECK_T=40)  # fmt: skip
# issue 11 targets
TARGET_32K, TARGET_64K = 3.0, 5.0  # DSA layer vs dense MLA prefill
TARGET_TFLOPS = 300.0  # sparse attention forward, effective
TARGET_DECODE = 0.70  # of copy bandwidth at B >= 32


def fmt(x, spec=".2f"):
    return "n/a" if x is None or x != x else format(x, spec)


def ratio(a, b):
    return "n/a" if a is None or b is None else f"{b / a:.2f}"


def label(T):
    return f"{T // 1024}K" if T >= 1024 else str(T)


def bench(fn, rep=100):
    return common.bench(fn, rep=rep, warmup=10)


def dsa_inputs(T, seed=0):
    g = torch.Generator(device=DEV).manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, device=DEV, generator=g).to(DT)

    q_lat, q_rope, c_kv, k_rope = rnd(1, T, H, R), rnd(1, T, H, ROPE), rnd(1, T, R), rnd(1, T, ROPE)
    qi, ki = rnd(1, T, HI, DI), rnd(1, T, DI)
    wi = torch.randn(1, T, HI, device=DEV, generator=g) * HI**-0.5
    return (q_lat, q_rope, c_kv, k_rope), (qi, ki, wi)


def scale():
    return (NOPE + ROPE) ** -0.5


def check(log):
    """At T = CHECK_T with k = T/3: the kernels' top-k against the reference's (recall of the reference's set: the
    fp32 logits of bf16 inputs differ in the last bits, which may swap a near-tie at the boundary), and sparse
    attention against the masked reference. Returns the attention's relative error."""
    T, k = CHECK_T, max(4, CHECK_T // 3)
    mla, (qi, ki, wi) = dsa_inputs(T, seed=1)
    idx = indexer_topk(qi, ki, wi, k)
    with backend.use_backend("torch"):
        idx_ref = indexer_topk(qi, ki, wi, k)
    got, want = (selected_mask(i, T) for i in (idx, idx_ref))
    recall = float((got & want).sum() / want.sum())
    err = rel_err(sparse_mla_reference(*[t.float() for t in mla], idx, scale()), sparse_mla(*mla, idx, scale()))
    log(
        f"  check T={T} k={k}: top-k recall of the reference's selection {recall:.4f}; "
        f"sparse attention rel. error {err:.2e}"
    )
    if not recall > 0.99 or not err < 2e-2:
        raise AssertionError(f"check failed: top-k recall {recall:.4f}, attention error {err:.2e}")
    return err


def logits_only(qi, ki, wi):
    """The chunked logits of ``indexer_topk`` without the selection (its chunks, its keys per chunk)."""
    T, L = qi.shape[1], ki.shape[1]
    chunk = max(64, li.LOGITS_CHUNK_BYTES // (4 * L))
    for t0 in range(0, T, chunk):
        t1 = min(T, t0 + chunk)
        lightning_indexer(qi[:, t0:t1], ki[:, :t1], wi[:, t0:t1], t0)


def run_layer(ts, log):
    rows = [
        f"## DSA attention vs dense MLA prefill: H = {H}, q·k {NOPE}+{ROPE}, v {V}; DSA R = {R}, DR = {ROPE}, "
        f"index {HI}×{DI}, k = {TOPK}; bf16, B = 1",
        "",
        f"Check before timing: {check(log):.1e} relative error of sparse attention vs the masked reference.",
        "",
        "| T | dense MLA ms | dense TFLOP/s | logits ms | indexer TFLOP/s | top-k ms | sparse attn ms | "
        "sparse TFLOP/s | DSA total ms | dense/DSA |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    found = {}
    for T in ts:
        log(f"layer T={T} ...")
        r = {}
        try:
            mla, (qi, ki, wi) = dsa_inputs(T)
            with torch.no_grad():
                idx = indexer_topk(qi, ki, wi, TOPK)
                r["logits"] = bench(partial(logits_only, qi, ki, wi))
                r["index"] = bench(partial(indexer_topk, qi, ki, wi, TOPK))
                r["sparse"] = bench(partial(sparse_mla, *mla, idx, scale()))
                del idx, mla, qi, ki, wi
                torch.cuda.empty_cache() if DEV == "cuda" else None
                g = torch.Generator(device=DEV).manual_seed(2)
                q = torch.randn(1, H, T, NOPE + ROPE, device=DEV, generator=g).to(DT)
                k = torch.randn(1, H, T, NOPE + ROPE, device=DEV, generator=g).to(DT)
                v = torch.randn(1, H, T, V, device=DEV, generator=g).to(DT)
                sep = torch.zeros(1, dtype=torch.int64, device=DEV)
                r["dense"] = bench(partial(attention, q, k, v, sep, scale()), rep=50)
                del q, k, v
        except Exception as e:  # noqa: BLE001
            common.reraise_if_smoke()
            traceback.print_exc()
            log(f"  failed: {e!r}")
        log(f"  {r}")
        pairs = T * (T + 1) / 2
        dense_tf = 2 * H * (NOPE + ROPE + V) * pairs / r["dense"] / 1e9 if r.get("dense") else None
        index_tf = 2 * HI * DI * pairs / r["logits"] / 1e9 if r.get("logits") else None
        slots = T * min(TOPK, T)  # every slot is computed, also the −1 ones of the first k tokens
        sparse_tf = 2 * H * slots * (R + ROPE + R) / r["sparse"] / 1e9 if r.get("sparse") else None
        total = r["index"] + r["sparse"] if r.get("index") and r.get("sparse") else None
        topk = r["index"] - r["logits"] if r.get("index") and r.get("logits") else None
        if total and r.get("dense"):
            found[T] = r["dense"] / total
        if sparse_tf:
            found.setdefault("tflops", []).append((T, sparse_tf))
        rows.append(
            f"| {label(T)} | {fmt(r.get('dense'))} | {fmt(dense_tf, '.0f')} | {fmt(r.get('logits'))} | "
            f"{fmt(index_tf, '.0f')} | {fmt(topk)} | {fmt(r.get('sparse'))} | {fmt(sparse_tf, '.0f')} | {fmt(total)} | "
            f"{ratio(total, r.get('dense'))} |"
        )
        log(rows[-1])  # the row survives in the log if a later T runs out of time
        torch.cuda.empty_cache() if DEV == "cuda" else None
    return rows, found


def gpu_time(fn):
    """Milliseconds of fn replayed from a CUDA graph (smoke mode: one wall-clock call)."""
    return common.bench(fn) if common.SMOKE else common.graph_bench(fn, rep=100, warmup=25)


def copy_gbs(nbytes):
    x = torch.empty(nbytes, dtype=torch.uint8, device=DEV)
    y = torch.empty_like(x)
    return 2 * nbytes / gpu_time(lambda: y.copy_(x)) / 1e6


def run_decode(batches, log, ceiling):
    rows = [
        f"## Sparse decode: one token per sequence, latent cache of {DECODE_L} tokens, k = {TOPK} rows read per token "
        "(CUDA-graph replay, GPU time)",
        "",
        "| B | µs | GB/s (selected rows) | of 1 GiB copy | rel err |",
        "|---|---|---|---|---|",
    ]
    found = {}
    for B in batches:
        r = {}
        try:
            g = torch.Generator(device=DEV).manual_seed(3)
            qn = torch.randn(B, 1, H, R, device=DEV, generator=g).to(DT)
            qr = torch.randn(B, 1, H, ROPE, device=DEV, generator=g).to(DT)
            c = torch.randn(B, DECODE_L, R, device=DEV, generator=g).to(DT)
            kr = torch.randn(B, DECODE_L, ROPE, device=DEV, generator=g).to(DT)
            n = min(TOPK, DECODE_L)
            idx = torch.rand(B, 1, DECODE_L, device=DEV, generator=g).argsort(-1)[..., :n].to(torch.int32)
            o = sparse_mla_decode(qn, qr, c, kr, idx, scale())
            r["err"] = rel_err(sparse_mla_reference(qn.float(), qr.float(), c.float(), kr.float(), idx, scale()), o)
            r["us"] = gpu_time(partial(sparse_mla_decode, qn, qr, c, kr, idx, scale())) * 1e3
            r["gbs"] = B * n * (R + ROPE) * c.element_size() / r["us"] / 1e3
        except Exception as e:  # noqa: BLE001
            common.reraise_if_smoke()
            traceback.print_exc()
            log(f"  decode B={B} failed: {e!r}")
        log(f"decode B={B}: {r}")
        of_copy = r["gbs"] / ceiling if r.get("gbs") and ceiling else None
        if of_copy:
            found[B] = of_copy
        rows.append(
            f"| {B} | {fmt(r.get('us'), '.1f')} | {fmt(r.get('gbs'), '.0f')} | {fmt(of_copy, '.0%')} | "
            f"{fmt(r.get('err'), '.1e')} |"
        )
        torch.cuda.empty_cache() if DEV == "cuda" else None
    return rows, found


def run_bwd(log):
    T = BWD_T
    rows = [f"## Sparse attention backward at T = {label(T)}, k = {TOPK}", ""]
    rows += ["| fwd ms | fwd+bwd ms | bwd ms | bwd TFLOP/s (2.5× fwd FLOPs) |", "|---|---|---|---|"]
    r = {}
    try:
        mla, (qi, ki, wi) = dsa_inputs(T)
        idx = indexer_topk(qi, ki, wi, TOPK)
        ts = [t.requires_grad_() for t in mla]
        out = sparse_mla(*ts, idx, scale())
        do = torch.randn_like(out)

        def fb():
            for t in ts:
                t.grad = None
            sparse_mla(*ts, idx, scale()).backward(do)

        with torch.no_grad():
            r["fwd"] = bench(lambda: sparse_mla(*mla, idx, scale()))
        r["fb"] = bench(fb)
    except Exception as e:  # noqa: BLE001
        common.reraise_if_smoke()
        traceback.print_exc()
        log(f"  bwd failed: {e!r}")
    log(f"bwd: {r}")
    bwd = r["fb"] - r["fwd"] if r.get("fb") and r.get("fwd") else None
    flops = 2.5 * 2 * H * T * min(TOPK, T) * (R + ROPE + R)
    rows.append(
        f"| {fmt(r.get('fwd'))} | {fmt(r.get('fb'))} | {fmt(bwd)} | {fmt(flops / bwd / 1e9 if bwd else None, '.0f')} |"
    )
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "dsa_h200.md"))
    ap.add_argument("--only", default="layer,decode,bwd", help="comma-separated sections: layer, decode, bwd")
    ap.add_argument("--quick", action="store_true", help="T = 16K/32K only, one decode batch")
    ap.add_argument(
        "--smoke", action="store_true", help="check the script: tiny shapes, one timed call, any device, no file"
    )
    args = ap.parse_args()
    global DEV, DT
    if args.smoke:
        common.SMOKE = True
        DEV = common.device()
        DT = torch.bfloat16 if DEV == "cuda" else torch.float32  # bf16 tl.dot is wrong under the interpreter
        globals().update(SMOKE)
        backend.set_backend("triton")  # CPU tensors too: the kernels under the interpreter
    elif not torch.cuda.is_available():
        sys.exit("this benchmark needs a CUDA GPU (--smoke checks the script on CPU)")
    only = set(args.only.split(","))

    def log(msg):
        print(msg, flush=True)

    ceiling = None
    try:
        ceiling = copy_gbs(1 << 20 if args.smoke else 1 << 30)
    except Exception as e:  # noqa: BLE001
        common.reraise_if_smoke()
        log(f"copy ceiling failed: {e!r}")
    gpu = torch.cuda.get_device_name() if DEV == "cuda" else f"CPU ({platform.machine()}, Triton interpreter)"
    head = [
        "# DSA (lightning indexer + top-k + sparse MLA) vs dense MLA prefill; sparse decode",
        "",
        f"- date: {datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- GPU: {gpu}; torch {torch.__version__}, triton {triton.__version__}, CUDA {torch.version.cuda}, "
        f"Python {platform.python_version()}",
        "- setup: bf16, B = 1, GLM-5 attention dims; median of triton.testing.do_bench after a first call (compile + "
        "autotune); attention only on both sides (no projections); dense/DSA = time(dense) / time(DSA).",
        f"- targets (issue 11): DSA ≥ {TARGET_32K}× dense at 32K and ≥ {TARGET_64K}× at 64K; sparse forward ≥ "
        f"{TARGET_TFLOPS:.0f} TFLOP/s effective; decode ≥ {TARGET_DECODE:.0%} of copy bandwidth at B ≥ 32",
        f"- device-to-device copy of 1 GiB in this run: {fmt(ceiling, '.0f')} GB/s (read + write)",
    ]
    if args.smoke:
        head.append("- SMOKE RUN: tiny shapes, one timed call, numbers meaningless")
    log("\n".join(head))
    quick = args.quick and not args.smoke
    sections, found = [], {}

    def write():
        if args.smoke:
            return
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            f.write("\n".join(head + sections) + "\n")

    runs = [
        ("layer", lambda: run_layer(TS[:2] if quick else TS, log)),
        ("decode", lambda: run_decode(DECODE_B[:1] if quick else DECODE_B, log, ceiling)),
        ("bwd", lambda: (run_bwd(log), {})),
    ]
    for name, run in runs:
        if name not in only:
            continue
        try:
            rows, f = run()
            sections += [""] + rows
            found[name] = f
        except Exception as e:  # noqa: BLE001
            common.reraise_if_smoke()
            traceback.print_exc()
            sections += ["", f"## {name}: failed: {e!r}"]
        write()
    layer, dec = found.get("layer", {}), found.get("decode", {})
    best_tf = max((tf for _, tf in layer.get("tflops", [])), default=None)
    big = [v for b, v in dec.items() if b >= 32] or list(dec.values())
    lines = [
        ("DSA vs dense at 32K", layer.get(32768), TARGET_32K, "×"),
        ("DSA vs dense at 64K", layer.get(65536), TARGET_64K, "×"),
        ("sparse forward TFLOP/s (best T)", best_tf, TARGET_TFLOPS, ""),
        ("decode, share of copy bandwidth (worst B ≥ 32)", min(big) if big else None, TARGET_DECODE, ""),
    ]
    import glmkit.kernels.sparse_mla as ksm

    tuned = {name: getattr(getattr(ksm, name), "cache", {}) for name in ("_fwd_tuned", "_bwd_tuned")}
    if any(tuned.values()):
        chosen = [f"{n} {key[:4]} → {cfg}" for n, c in tuned.items() for key, cfg in c.items()]  # key: H, R, DR, …
        sections += ["", "Autotune choices: " + "; ".join(chosen)]
    sections += ["", "## Against the targets", "", "| ratio | measured | target | met |", "|---|---|---|---|"]
    for name, got, want, unit in lines:
        met = "n/a" if got is None else ("yes" if got >= want else "no")
        sections.append(f"| {name} | {fmt(got)}{unit if got is not None else ''} | {want}{unit} | {met} |")
    write()
    print("\n" + "\n".join(head + sections))


if __name__ == "__main__":
    main()
