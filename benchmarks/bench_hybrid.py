"""Benchmark: the 3:1 hybrid (gpu-hybrid: KDA, KDA, KDA, attention, twice) against its full-attention twin
(gpu-small: the same model with attention in every layer).

GPU only; a script, not a test. fp32 weights under bf16 autocast, as ``train()`` runs them; the training step is
checked to run every op on the Triton kernels (``glmkit.backend.audit``). Each time is the median of
triton.testing.do_bench after a first call (compilation and autotuning). "hybrid/twin" is a speed ratio,
time(twin) / time(hybrid): > 1 means the hybrid is faster. B = 4 throughout: the delta-rule kernels' autotune key
includes B·H, so the run shares its compiles with the GPU tests of tests/models/test_hybrid.py.

Sections (``--only`` picks some; each writes its table as soon as it is done):

* ``train``: one training step's forward and backward (``model.loss``, no optimizer step) at T = 1K, 4K, 8K:
  ms, tokens/s.
* ``decode``: one cached decode step after a prefill of P = 1K / 8K tokens: ms per step, and the memory of the
  cache (``Cache.nbytes``: the KDA layers' fixed state against the attention layers' k, v). The cache's length is
  set back after each timed step, so every timed step decodes position P.

    python benchmarks/bench_hybrid.py            # → benchmarks/results/hybrid_h200.md
    python benchmarks/bench_hybrid.py --smoke    # tiny models and shapes, any device (CPU: torch path), no file
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import platform
import sys
import traceback

import common  # benchmarks/common.py
import torch
import triton

from glmkit import backend
from glmkit.models.decoder import Decoder
from glmkit.models.presets import get_config

DEV, B = "cuda", 4
MODELS = {"hybrid": "gpu-hybrid", "twin": "gpu-small"}
TRAIN_TS = [1024, 4096, 8192]
DECODE_PS = [1024, 8192]
# --smoke: cpu-size models, tiny shapes, on a CPU the torch path
SMOKE = dict(MODELS={"hybrid": "cpu-hybrid", "twin": "cpu-small"}, TRAIN_TS=[24], DECODE_PS=[16], B=2)


def fmt(x, spec):
    return "n/a" if x is None else format(x, spec)


def models():
    """(hybrid, twin) on the device, the same seed, max positions raised to the longest T."""
    longest = max(TRAIN_TS + DECODE_PS) + 1
    out = []
    for name in MODELS.values():
        torch.manual_seed(0)
        out.append(Decoder(get_config(name, max_position_embeddings=max(longest, 256))).to(DEV))
    return out


def autocast():
    return torch.autocast("cuda", dtype=torch.bfloat16) if DEV == "cuda" else contextlib.nullcontext()


def run_train(log):
    hybrid, twin = models()
    rows = [
        f"## Training step (forward + backward of the loss, bf16 autocast), B = {B}",
        "",
        "| T | hybrid ms | twin ms | hybrid tokens/s | twin tokens/s | hybrid/twin |",
        "|---|---|---|---|---|---|",
    ]
    for T in TRAIN_TS:
        x = torch.randint(0, 264, (B, T + 1), device=DEV)
        batch = {"input_ids": x[:, :-1], "targets": x[:, 1:]}
        ms = {}
        for name, model in (("hybrid", hybrid), ("twin", twin)):

            def step(model=model, batch=batch):
                model.zero_grad(set_to_none=True)
                with autocast():
                    loss = model.loss(batch)
                loss.backward()

            try:
                with backend.audit() as a:
                    step()
                if DEV == "cuda" and not a.only_triton():
                    raise RuntimeError(f"not every op ran on the kernels: {a}")
                ms[name] = common.bench(step, rep=200, warmup=10)
            except Exception as e:  # noqa: BLE001
                common.reraise_if_smoke()
                log(f"train {name} T={T} failed: {e!r}")
                traceback.print_exc()
        h, t = ms.get("hybrid"), ms.get("twin")
        rows.append(
            f"| {T} | {fmt(h, '.2f')} | {fmt(t, '.2f')} | {fmt(h and B * T / h * 1e3, '.3g')} | "
            f"{fmt(t and B * T / t * 1e3, '.3g')} | {fmt(h and t and t / h, '.2f')} |"
        )
        log(rows[-1])
    return rows


def run_decode(log):
    hybrid, twin = models()
    rows = [
        f"## Cached decode step (one token per row after a prefill of P tokens, bf16 autocast), B = {B}",
        "",
        "| P | hybrid ms/step | twin ms/step | hybrid/twin | hybrid cache MiB | twin cache MiB | memory twin/hybrid |",
        "|---|---|---|---|---|---|---|",
    ]
    for P in DECODE_PS:
        ms, mib = {}, {}
        for name, model in (("hybrid", hybrid), ("twin", twin)):
            model.eval()
            x = torch.randint(0, 264, (B, P + 1), device=DEV)
            try:
                cache = model.new_cache(B, P + 1)
                with torch.no_grad(), autocast():
                    model(x[:, :P], cache=cache)

                    def step(model=model, cache=cache, tok=x[:, P:], P=P):
                        model(tok, cache=cache)
                        cache.length = P  # decode position P again next time

                    ms[name] = common.bench(step, rep=200, warmup=10)
                mib[name] = cache.nbytes / 2**20
            except Exception as e:  # noqa: BLE001
                common.reraise_if_smoke()
                log(f"decode {name} P={P} failed: {e!r}")
                traceback.print_exc()
        h, t = ms.get("hybrid"), ms.get("twin")
        mh, mt = mib.get("hybrid"), mib.get("twin")
        rows.append(
            f"| {P} | {fmt(h, '.3f')} | {fmt(t, '.3f')} | {fmt(h and t and t / h, '.2f')} | {fmt(mh, '.1f')} | "
            f"{fmt(mt, '.1f')} | {fmt(mh and mt and mt / mh, '.2f')} |"
        )
        log(rows[-1])
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "hybrid_h200.md"))
    ap.add_argument("--only", default="train,decode", help="comma-separated sections: train, decode")
    ap.add_argument(
        "--smoke",
        action="store_true",
        help="check the script: cpu-size models, tiny shapes, one timed call, any device (CPU: the torch path), "
        "nothing written",
    )
    args = ap.parse_args()
    global DEV
    if args.smoke:
        common.SMOKE = True
        DEV = common.device()
        globals().update(SMOKE)
    elif not torch.cuda.is_available():
        sys.exit("this benchmark needs a CUDA GPU (--smoke checks the script on CPU)")

    def log(msg):
        print(msg, flush=True)

    cfg = get_config(MODELS["hybrid"])
    gpu = torch.cuda.get_device_name() if DEV == "cuda" else f"CPU ({platform.machine()}, torch path)"
    head = [
        "# The 3:1 KDA/attention hybrid (gpu-hybrid) against its full-attention twin (gpu-small)",
        "",
        f"- date: {datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- GPU: {gpu}; torch {torch.__version__}, triton {triton.__version__}, CUDA {torch.version.cuda}, "
        f"Python {platform.python_version()}",
        f"- models: {MODELS['hybrid']} vs {MODELS['twin']} ({cfg.num_hidden_layers} layers, d = {cfg.hidden_size}, "
        f"{cfg.num_attention_heads} heads of {cfg.head_dim}, byte vocabulary); fp32 weights, bf16 autocast; "
        "median of triton.testing.do_bench after a first call (compile + autotune); "
        "'hybrid/twin' = time(twin) / time(hybrid), > 1: the hybrid is faster",
    ]
    if args.smoke:
        head.append("- SMOKE RUN: cpu-size models, tiny shapes, one timed call, numbers meaningless")
    log("\n".join(head))
    only = set(args.only.split(","))
    sections = []

    def write():
        if args.smoke:
            return
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            f.write("\n".join(head + sections) + "\n")

    for name, run in (("train", run_train), ("decode", run_decode)):
        if name not in only:
            continue
        try:
            sections += [""] + run(log)
        except Exception as e:  # noqa: BLE001
            common.reraise_if_smoke()
            traceback.print_exc()
            sections += ["", f"## {name}: failed: {e!r}"]
        write()
    print("\n" + "\n".join(head + sections))


if __name__ == "__main__":
    main()
