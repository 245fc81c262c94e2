"""Benchmark: speculative decoding with the model's own MTP drafter (``glmkit.speculative``), batch 1, on the course's
GPU preset trained briefly with the MTP loss.

GPU only; a script, not a test. Sections, in order (each table is written as soon as it is done):

* ``train``: gpu-small (8 layers, d = 512, byte vocabulary) with one MTP module applied at depths 1..3 (GLM-5's
  shared-parameter scheme: ``num_nextn_predict_layers=1, mtp_depth=3``), trained with ``glmkit.train.train`` (bf16
  autocast, λ = 0.3 then 0.1) on the built-in ``stories`` corpus, batch 32 × 256 bytes, for a wall-clock budget
  (``--train-seconds``, default 80): a 12-step probe on a throwaway copy times a step (and compiles/autotunes the
  kernels), then the schedule is sized to the budget. Reports the loss, the per-depth MTP losses and the
  held-out loss.
* ``decode``: bf16 weights, greedy, batch 1, 4 held-out prompts of 64 bytes, 256 new tokens each, no early stop.
  Baselines: ``generate()`` (the library's loop: stop checks and a host sync per token) and a lean loop (argmax
  fed back on the device, one sync at the end). Speculative: ``generate(draft_tokens=n)`` for n = 1, 2, 3. Tokens
  per second end to end (prefill included), speed-ups, identical tokens (bf16, and again in fp32 with TF32 off on
  2 prompts: a bf16 verify of n + 1 tokens and a one-token step round differently, so a near-tie may flip),
  acceptance per draft position and mean accepted length.
* ``where``: one more speculative run per n with ``timing=True`` (a device sync between phases): prefill, draft
  (MTP forwards), verify (main forward), accept (the round's host sync and bookkeeping), rollback, other.
* ``compile`` (``--compile``): the same plain and speculative runs with ``Decoder.hidden_states`` and
  ``Decoder.mtp_hidden`` under ``torch.compile`` (inductor, automatic dynamic shapes: a cached forward's offset
  is a Python int, so CUDA graphs would need a graph per position). Skipped when the run has used more than
  ``--compile-after`` seconds, so the eager tables always land.
* ``targets``: first-draft acceptance >= 0.6; end-to-end speed-up >= 1.4x (stretch 1.6x, the GLM-4.6 vLLM report).

    python benchmarks/bench_speculative.py                 # -> benchmarks/results/speculative_h200.md
    python benchmarks/bench_speculative.py --compile --save /tmp/spec_ckpt   # + torch.compile, the model saved
    python benchmarks/bench_speculative.py --smoke         # cpu-size model, a few steps, any device, no file
"""

from __future__ import annotations

import argparse
import copy
import datetime
import os
import platform
import sys
import time
import traceback

import common  # benchmarks/common.py
import torch
import triton

from glmkit.data.lm_data import LMData
from glmkit.generate import generate
from glmkit.models.decoder import Decoder
from glmkit.models.presets import get_config
from glmkit.train import TrainConfig, evaluate, train

DEV = "cuda"
PRESET, MTP_DEPTH = "gpu-small", 3
TRAIN_S, BATCH, SEQ, PROBE_STEPS = 80.0, 32, 256, 12
PROMPTS, PROMPT_LEN, NEW, DRAFTS = 4, 64, 256, [1, 2, 3]
COMPILE_BACKEND, LAYERS = "inductor", {}
# --smoke: a cpu-size model, a few training steps, short generations; torch.compile with the eager backend
SMOKE = dict(
    PRESET="cpu-small",
    TRAIN_S=0.0,
    BATCH=2,
    SEQ=32,
    PROBE_STEPS=0,
    PROMPTS=1,
    PROMPT_LEN=16,
    NEW=12,
    DRAFTS=[1, 2],
    COMPILE_BACKEND="eager",
    LAYERS=dict(num_hidden_layers=2),
)
T0 = time.perf_counter()


def fmt(x, spec):
    return "n/a" if x is None else format(x, spec)


def timed(fn):
    common.sync()
    t = time.perf_counter()
    out = fn()
    common.sync()
    return out, time.perf_counter() - t


# -- train ------------------------------------------------------------------------------------------------------
def run_train(log):
    torch.manual_seed(0)
    cfg = get_config(PRESET, num_nextn_predict_layers=1, mtp_depth=MTP_DEPTH, **LAYERS)
    model = Decoder(cfg)
    data = LMData(batch_size=BATCH, seq_len=SEQ)
    steps = 3
    if PROBE_STEPS:
        stamps = []
        probe = TrainConfig(steps=PROBE_STEPS, batch_size=BATCH, seq_len=SEQ, warmup_steps=2, ckpt_every=0)
        train(
            copy.deepcopy(model),
            data,
            probe,
            progress=False,
            device=DEV,
            callback=lambda *a: stamps.append(time.perf_counter()),
        )
        step_s = (stamps[-1] - stamps[3]) / (len(stamps) - 4)  # steps 5.. (compiles and autotuning are over)
        steps = max(50, int(TRAIN_S / step_s))
        log(f"probe: {step_s * 1e3:.1f} ms per training step -> {steps} steps for {TRAIN_S:.0f} s")
    tc = TrainConfig(steps=steps, batch_size=BATCH, seq_len=SEQ, warmup_steps=min(30, steps // 10 + 1), ckpt_every=0)
    history, seconds = timed(lambda: train(model, data, tc, progress=False, device=DEV))
    model.eval()
    val = LMData(batch_size=BATCH, seq_len=SEQ, split="val")
    b = val.batch(0).to(DEV)
    with torch.no_grad():
        depths = model.mtp_losses(b.input_ids, b.targets, model.hidden_states(b.input_ids)).tolist()
    val_loss = evaluate(model, val, 4)
    tail = max(1, len(history.losses) // 20)
    rows = [
        "## Training (glmkit.train.train, bf16 autocast on the GPU)",
        "",
        "| preset | parameters (main / MTP) | MTP | data | steps | batch × bytes | train s | loss (last 5%) "
        "| MTP loss (last 5%) | held-out loss | held-out MTP loss per depth |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
        f"| {PRESET} | {model.num_parameters() / 1e6:.1f}M / "
        f"{(model.num_parameters(include_mtp=True) - model.num_parameters()) / 1e6:.1f}M | 1 module × depth "
        f"{MTP_DEPTH} (shared), λ 0.3 → 0.1 | stories (built-in), bytes | {steps} | {BATCH} × {SEQ} | {seconds:.1f} | "
        f"{sum(history.losses[-tail:]) / tail:.3f} | {sum(history.aux['mtp'][-tail:]) / tail:.3f} | {val_loss:.3f} | "
        f"{', '.join(f'{x:.3f}' for x in depths)} |",
    ]
    log("\n".join(rows))
    return model, rows


# -- decode -----------------------------------------------------------------------------------------------------
def lean_greedy(model, prompt, new):
    """Plain greedy decoding without stop checks: the argmax goes back in on the device, one sync at the end."""
    dev, P = model.device, len(prompt)
    x = torch.tensor([prompt], device=dev)
    sep, pos = torch.zeros(1, dtype=torch.int64, device=dev), torch.arange(P, device=dev)[None]  # as generate()
    cache = model.new_cache(1, P + new)
    out = torch.empty(1, new, dtype=torch.int64, device=dev)
    tok = model(x, pos, sep, cache=cache)[:, -1].argmax(-1, keepdim=True)
    out[:, :1] = tok
    pos = pos[:, -1:]
    for i in range(1, new):
        pos = pos + 1
        tok = model(tok, pos, sep, cache=cache)[:, -1].argmax(-1, keepdim=True)
        out[:, i : i + 1] = tok
    return out[0].tolist()


def decode_runs(model, prompts, label, log, warm_up=True):
    """Plain (generate, lean) and speculative (n in DRAFTS) over the prompts: {mode: (tokens/s, tokens, stats)}."""
    res = {}
    with torch.no_grad():
        if warm_up:  # kernels, autotuning, the allocator
            generate(model, [prompts[0]], 4, stop_tokens=())
            lean_greedy(model, prompts[0], 4)
            for n in DRAFTS:
                generate(model, [prompts[0]], 8, stop_tokens=(), draft_tokens=n)
        for mode in ["generate", "lean"] + [f"n={n}" for n in DRAFTS]:
            toks, secs, stats = [], 0.0, None
            for p in prompts:
                if mode == "generate":
                    out, t = timed(lambda p=p: generate(model, [p], NEW, stop_tokens=()).tokens[0])
                elif mode == "lean":
                    out, t = timed(lambda p=p: lean_greedy(model, p, NEW))
                else:
                    n = int(mode[2:])
                    o, t = timed(lambda p=p, n=n: generate(model, [p], NEW, stop_tokens=(), draft_tokens=n))
                    out, stats = o.tokens[0], o.speculation if stats is None else stats.merge(o.speculation)
                toks.append(out)
                secs += t
            res[mode] = (len(prompts) * NEW / secs, toks, stats)
            log(f"{label} {mode}: {res[mode][0]:.0f} tokens/s")
    return res


def identical(res, mode):
    same = [a == b for a, b in zip(res[mode][1], res["generate"][1])]
    return f"{sum(same)}/{len(same)}"


def decode_table(res, check, title, check_name="identical (fp32)"):
    """One row per mode; ``check[mode]``: the extra identity column (fp32 runs, or compiled vs eager)."""
    base, lean = res["generate"][0], res["lean"][0]
    rows = [
        title,
        "",
        "| mode | draft tokens | tokens/s | ms/token | vs generate() | vs lean loop | identical tokens (bf16) "
        f"| {check_name} | acceptance per draft position | mean accepted | tokens per main forward |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for mode, (tps, _, stats) in res.items():
        n = "0" if stats is None else str(stats.draft_tokens)
        acc = "-" if stats is None else ", ".join(f"{a:.2f}" for a in stats.acceptance)
        mean = None if stats is None else stats.mean_accepted
        rows.append(
            f"| {mode} | {n} | {tps:.0f} | {1e3 / tps:.2f} | {tps / base:.2f} | {tps / lean:.2f} | "
            f"{identical(res, mode)} | {check.get(mode, '-')} | {acc} | {fmt(mean, '.2f')} | "
            f"{fmt(None if mean is None else 1 + mean, '.2f')} |"
        )
    return rows


def fp32_identity(model, prompts):
    """Plain vs speculative greedy tokens with fp32 weights and TF32 off (rounding kept small)."""
    m32 = copy.deepcopy(model).float()
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        with torch.no_grad():
            ref = [generate(m32, [p], NEW, stop_tokens=()).tokens[0] for p in prompts]
            out = {"lean": sum(lean_greedy(m32, p, NEW) == r for p, r in zip(prompts, ref))}
            for n in DRAFTS:
                out[f"n={n}"] = sum(
                    generate(m32, [p], NEW, stop_tokens=(), draft_tokens=n).tokens[0] == r for p, r in zip(prompts, ref)
                )
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    return {k: f"{v}/{len(prompts)}" for k, v in out.items()} | {"generate": f"{len(prompts)}/{len(prompts)}"}


def run_where(model, prompts, log):
    rows = [
        "## Where the time goes (timing=True: a device sync between phases; ms per round, share of the run)",
        "",
        "| draft tokens | ms per round | tokens per round | prefill | draft | verify | accept | rollback | other |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    phases = ("prefill", "draft", "verify", "accept", "rollback", "other")
    with torch.no_grad():
        for n in DRAFTS:
            stats = None
            for p in prompts:
                s = generate_timed(model, p, n)
                stats = s if stats is None else stats.merge(s)
            total = sum(stats.times.values())
            per_round = total / stats.rounds * 1e3
            shares = " | ".join(f"{stats.times.get(k, 0.0) / total:.0%}" for k in phases)
            rows.append(f"| {n} | {per_round:.2f} | {1 + stats.mean_accepted:.2f} | {shares} |")
            log(rows[-1])
    return rows


def generate_timed(model, prompt, n):
    from glmkit.speculative import generate_speculative

    return generate_speculative(model, [prompt], NEW, draft_tokens=n, stop_tokens=(), timing=True).speculation


def compiled(model):
    """A copy whose main-model forward (the plain decode step, the prefill and the verify) runs under torch.compile
    with automatic dynamic shapes: the first call of each kind compiles it static, the next one with the offsets
    and lengths symbolic. The MTP forwards stay eager (one layer each; compiling them adds graphs per depth)."""
    torch._dynamo.config.cache_size_limit = 64
    m = copy.deepcopy(model)
    m.hidden_states = torch.compile(m.hidden_states, backend=COMPILE_BACKEND, fullgraph=True)
    return m


def targets(res):
    best = max((m for m in res if m.startswith("n=")), key=lambda m: res[m][0])
    acc1 = res["n=1"][2].acceptance[0]
    speed = res[best][0] / res["generate"][0]
    speed_lean = res[best][0] / res["lean"][0]
    return [
        "## Targets (issue 13, perf-anchors §7)",
        "",
        "| ratio | measured | target | met |",
        "|---|---|---|---|",
        f"| acceptance of the first draft token (n = 1) | {acc1:.2f} | >= 0.6 | {'yes' if acc1 >= 0.6 else 'no'} |",
        f"| end-to-end tokens/s, best speculative ({best}) vs generate() | {speed:.2f}x | >= 1.4x (stretch 1.6x) | "
        f"{'yes' if speed >= 1.4 else 'no'}{' (stretch too)' if speed >= 1.6 else ''} |",
        f"| the same vs the lean plain loop | {speed_lean:.2f}x | >= 1.4x | {'yes' if speed_lean >= 1.4 else 'no'} |",
    ]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "speculative_h200.md"))
    ap.add_argument("--train-seconds", type=float, default=80.0, help="training budget (s), after the probe")
    ap.add_argument("--compile", action="store_true", help="also time the forwards under torch.compile")
    ap.add_argument("--compile-after", type=float, default=150.0, help="skip compile past this many seconds")
    ap.add_argument("--save", default=os.environ.get("GLMKIT_SPEC_CKPT"), help="save the trained model here (bf16)")
    ap.add_argument(
        "--smoke", action="store_true", help="check the script: cpu-small, 3 training steps, short decodes, no file"
    )
    args = ap.parse_args()
    global DEV, TRAIN_S
    if args.smoke:
        common.SMOKE = True
        DEV = common.device()
        globals().update(SMOKE)
    elif not torch.cuda.is_available():
        sys.exit("this benchmark needs a CUDA GPU (--smoke checks the script on CPU)")
    else:
        TRAIN_S = args.train_seconds

    def log(msg):
        print(msg, flush=True)

    gpu = torch.cuda.get_device_name() if DEV == "cuda" else f"CPU ({platform.machine()})"
    head = [
        "# Speculative decoding with the MTP drafter, batch 1",
        "",
        f"- date: {datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- GPU: {gpu}; torch {torch.__version__}, triton {triton.__version__}, CUDA {torch.version.cuda}, "
        f"Python {platform.python_version()}",
        f"- model: {PRESET} + one MTP module trained at depths 1..{MTP_DEPTH}; decoding in bf16, greedy, "
        f"{PROMPTS} held-out prompts of {PROMPT_LEN} bytes, {NEW} new tokens each (prefill included in the time)",
    ]
    if args.smoke:
        head.append("- SMOKE RUN: cpu-size model, 3 training steps, short decodes, numbers meaningless")
    log("\n".join(head))
    sections = []

    def write():
        if args.smoke:
            return
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            f.write("\n".join(head + sections) + "\n")

    model, rows = run_train(log)
    sections += [""] + rows
    write()
    dec = copy.deepcopy(model).to(torch.bfloat16) if DEV == "cuda" else model
    if args.save:
        from glmkit.checkpoint import save_pretrained

        log(f"saved to {save_pretrained(dec, args.save)}")
    prompts = LMData(batch_size=PROMPTS, seq_len=PROMPT_LEN, seed=7, split="val").batch(0).input_ids.tolist()
    res = decode_runs(dec, prompts, "eager", log)
    fp32 = fp32_identity(model, prompts[:2])
    sections += [""] + decode_table(res, fp32, "## Decoding (eager), batch 1")
    write()
    for name, run in (("where", lambda: run_where(dec, prompts, log)), ("targets", lambda: targets(res))):
        try:
            sections += [""] + run()
        except Exception as e:  # noqa: BLE001
            common.reraise_if_smoke()
            traceback.print_exc()
            sections += ["", f"## {name}: failed: {e!r}"]
        write()
    if args.compile or args.smoke:
        elapsed = time.perf_counter() - T0
        if elapsed > args.compile_after and not args.smoke:
            sections += ["", f"## torch.compile: skipped ({elapsed:.0f} s used, limit {args.compile_after:.0f} s)"]
        else:
            try:
                cm = compiled(dec)
                _, secs = timed(lambda: decode_runs(cm, prompts[:1], "compiled (warm-up)", log, warm_up=False))
                res_c = decode_runs(cm, prompts, "compiled", log, warm_up=False)
                title = (
                    f"## Decoding with torch.compile ({COMPILE_BACKEND}) on the main model's forward, batch 1 "
                    f"(first pass with the compiles: {secs:.0f} s)"
                )
                vs_eager = {
                    mode: f"{sum(a == b for a, b in zip(r[1], res['generate'][1]))}/{len(prompts)}"
                    for mode, r in res_c.items()
                }
                rows = decode_table(res_c, vs_eager, title, "same tokens as eager generate()")
                sections += [""] + rows + [""] + targets(res_c)[2:]
            except Exception as e:  # noqa: BLE001
                common.reraise_if_smoke()
                traceback.print_exc()
                sections += ["", f"## torch.compile: failed: {e!r}"]
        write()
    sections += ["", f"Total run time: {time.perf_counter() - T0:.0f} s."]
    write()
    print("\n" + "\n".join(head + sections))


if __name__ == "__main__":
    main()
