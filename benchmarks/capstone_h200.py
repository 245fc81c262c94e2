"""The capstone's training run on one H200 (lesson 09): train, sample, measure the MTP drafter, export, check the
export in transformers; a small bundle of what happened goes to ``--out`` (never the weights).

GPU script (``--smoke`` checks it on a CPU). In order, each step timed:

1. ``python -m glmkit train CONFIG --time-budget S --no-resume`` (default configs/capstone_h200.toml, S = 220 s: the
   schedule is fitted to the budget, glmkit.cli), in a work folder (``--work``, default /tmp/capstone_run: the
   checkpoints stay there). Its log goes to ``train.log``; its ``history.json`` (losses, eval losses, the MTP and
   indexer losses, the indexer's recall, expert loads and max violation per step) is copied.
2. ``python -m glmkit generate`` on the last checkpoint, 3 code prompts, 200 new tokens, greedy and then
   temperature 0.8 (top-k 50, seed 0): ``samples.txt``.
3. MTP acceptance on held-out text: ``glmkit.speculative.measure_acceptance`` with 8 windows of 64 tokens of the
   corpus's "val" split (files never trained on), 64 new tokens each, greedy, draft_tokens = 1 and 3.
4. Export: ``glmkit.hf.save_hf`` (glm5_next layout) into the work folder, loaded by transformers'
   ``Glm5NextForConditionalGeneration`` in fp32 (TF32 off) on the same device; logits on 2 held-out windows of
   ``--parity-len`` tokens (past the indexer's top-k, so the pooled selection matters) against ours on the torch path
   and on the kernels: max |Δ| and relative error; greedy continuations of 32 tokens compared. ``export_parity.txt``.
5. Generation speed of the trained model (``bench_capstone.decode_speeds``): B = 1 and 32, 128 new tokens after
   128-token held-out prompts, plain and with 1 and 3 drafts (bf16 autocast). Skipped when the run has used more
   than ``--deadline`` − 25 s.

Bundle (``--out``): ``run.json`` (the resolved run config, the time budget, steps, tokens, throughput, final losses,
acceptance, decode rows, export parity, each step's seconds), ``history.json``, ``samples.txt``,
``export_parity.txt``, ``train.log``. Format: benchmarks/README.md, capstone section.

If the training command fails early on the kernels (a minute or more of the budget left), it is run again on the torch
path (``GLMKIT_BACKEND=torch``, for every later stage too) with the budget left: ``run.json``'s ``backend`` and
``errors`` say so, and ``train_torch_fallback.log`` is its log.

    PYTHONPATH=. python benchmarks/capstone_h200.py --out $OUT/capstone_run_h200
    PYTHONPATH=. python benchmarks/capstone_h200.py --smoke --out /tmp/capstone_smoke   # CPU, minutes, tiny corpus
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch

# transformers binds fla's chunk_kda Triton kernel for glm5_next's KDA layers when the fla package imports, and that
# kernel's dots do not follow torch's "TF32 off": the export check wants transformers' fp32 torch reference
# (benchmarks/capstone_export_kda_path.py measures the difference). Nothing in this script uses fla.
sys.modules.setdefault("fla", None)

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))  # bench_capstone, common

PROMPTS = [
    "def fibonacci(n):\n",
    "import os\nimport sys\n\n\ndef main(argv):\n",
    'class Stack:\n    """A last-in, first-out stack."""\n\n    def __init__(self):\n',
]
SETTINGS = dict(
    new_tokens=200,
    acc_prompts=8,
    acc_prompt_len=64,
    acc_new=64,
    drafts=[1, 3],
    decode_batches=[1, 32],
    decode_prompt=128,
    decode_new=128,
    gen_check=32,
)
# --smoke: the CPU twin on a small corpus (the stdlib's json package, BPE 320), 3 steps, short everything
SMOKE = dict(
    new_tokens=8,
    acc_prompts=2,
    acc_prompt_len=16,
    acc_new=6,
    drafts=[1, 2],
    decode_batches=[1, 2],
    decode_prompt=16,
    decode_new=4,
    gen_check=4,
)
T0 = time.perf_counter()


def elapsed() -> float:
    return time.perf_counter() - T0


def env() -> dict[str, str]:
    e = {**os.environ, "HF_HUB_OFFLINE": "1"}
    e["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), e.get("PYTHONPATH", "")) if p)
    return e


def cli(args: list[str], log_path: Path | None = None, timeout: float = 900) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, "-m", "glmkit", *args], cwd=ROOT, env=env(), capture_output=True, text=True, timeout=timeout
    )
    if log_path is not None:
        log_path.write_text(proc.stdout + proc.stderr, encoding="utf-8")
    if proc.returncode != 0:
        raise RuntimeError(f"python -m glmkit {args[0]} exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    return proc


def run_config(config: Path, work: Path, smoke: bool) -> dict:
    """The run config with out_dir in the work folder (and, in smoke mode, a small corpus and 3 short steps)."""
    from glmkit.cli import read_config
    from glmkit.data.python_corpus import stdlib_root

    raw = read_config(config)
    raw["out_dir"] = str(work / "run")
    if smoke:
        raw["data"] = {"corpus": "python", "root": str(stdlib_root() / "json"), "vocab_size": 320}
        raw["train"] = {**raw.get("train", {}), "steps": 3, "batch_size": 2, "seq_len": 80, "warmup_steps": 1}
        raw["train"].update(ckpt_every=0, eval_every=3, eval_batches=1, log_every=1)
    return raw


def held_out(raw: dict, n: int, length: int, seed: int = 0) -> list[list[int]]:
    """n windows of ``length`` tokens from the corpus's held-out split (CodeData "val"), as token-id lists."""
    from glmkit.data.python_corpus import CodeData, PythonCorpus

    data = raw.get("data", {})
    corpus = PythonCorpus(data.get("vocab_size", 8192), data.get("root"))
    return CodeData(corpus, n, length, seed, "val").batch(0).input_ids.tolist()


def export_parity(model, folder: Path, windows: list[list[int]], gen_check: int, device) -> dict:
    """save_hf, then transformers' Glm5NextForConditionalGeneration (fp32) against ours (fp32, torch path and
    kernels) on ``windows``; greedy continuations compared."""
    import transformers

    transformers.logging.set_verbosity_error()  # the load report lists the vision tower a text export lacks
    from glmkit import backend
    from glmkit.generate import generate
    from glmkit.hf import save_hf
    from glmkit.testing import rel_err

    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        model = model.float().eval()
        save_hf(model, folder)
        hf = transformers.Glm5NextForConditionalGeneration.from_pretrained(str(folder), dtype=torch.float32)
        hf = hf.to(device).eval()
        x = torch.tensor(windows, device=device)
        out = {"seq_len": x.shape[1], "rows": x.shape[0], "dtype": "float32", "transformers": transformers.__version__}
        out["transformers_kda"] = "torch reference" if sys.modules.get("fla", 0) is None else "fla, if installed"
        with torch.no_grad():
            theirs = hf(x).logits.float()
            for path in ("torch", "auto"):
                with backend.use_backend(path):
                    ours = model(x).float()
                name = "torch path" if path == "torch" else "kernels" if device.type == "cuda" else "auto (torch)"
                out[name] = {
                    "max_abs_diff": float((ours - theirs).abs().max()),
                    "rel_err": float(rel_err(ours, theirs)),
                }
            prompt = x[:1, : min(64, x.shape[1] - 1)]
            ref = hf.generate(prompt, max_new_tokens=gen_check, do_sample=False, eos_token_id=None, pad_token_id=0)
            mine = generate(model, prompt, gen_check, stop_tokens=()).tokens[0]
            out["greedy_tokens_equal"] = mine == ref[0, prompt.shape[1] :].tolist()
            out["greedy_tokens"] = gen_check
        out["logit_scale"] = float(theirs.abs().max())
        return out
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=None, help="default configs/capstone_h200.toml (--smoke: capstone_cpu.toml)")
    ap.add_argument("--time-budget", type=float, default=220.0, help="seconds of training (glmkit train --time-budget)")
    ap.add_argument("--deadline", type=float, default=320.0, help="optional steps are skipped near this many seconds")
    ap.add_argument("--work", default="/tmp/capstone_run", help="checkpoints and the export go here (emptied first)")
    ap.add_argument("--out", required=True, help="the bundle folder (no weights)")
    ap.add_argument("--parity-len", type=int, default=1024, help="tokens per window of the export check")
    ap.add_argument("--smoke", action="store_true", help="check the script on any device: tiny corpus, 3 steps")
    args = ap.parse_args()
    s = dict(SMOKE if args.smoke else SETTINGS)
    args.config = args.config or str(ROOT / "configs" / ("capstone_cpu.toml" if args.smoke else "capstone_h200.toml"))
    if args.smoke:
        args.parity_len = min(args.parity_len, 80)
    elif not torch.cuda.is_available():
        sys.exit("this run needs a CUDA GPU (--smoke checks the script on CPU)")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    out, work = Path(args.out), Path(args.work)
    out.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    raw = run_config(Path(args.config), work, args.smoke)
    config_path = work / "config.json"
    config_path.write_text(json.dumps(raw, indent=1) + "\n", encoding="utf-8")
    run_dir = Path(raw["out_dir"])
    report = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "device": torch.cuda.get_device_name() if device.type == "cuda" else f"CPU ({platform.machine()})",
        "versions": {"torch": torch.__version__, "python": platform.python_version()},
        "smoke": args.smoke,
        "config_file": os.path.relpath(args.config, ROOT),
        "time_budget_s": args.time_budget,
        "seconds": {},
        "errors": {},
    }

    def save():
        report["seconds"]["total"] = round(elapsed(), 1)
        (out / "run.json").write_text(json.dumps(report, indent=1, default=str) + "\n", encoding="utf-8")

    def step(name, fn):
        t = time.perf_counter()
        print(f"[{elapsed():6.1f} s] {name} ...", flush=True)
        try:
            return fn()
        except Exception as e:  # noqa: BLE001
            if args.smoke:
                raise
            traceback.print_exc()
            report["errors"][name] = repr(e)
        finally:
            report["seconds"][name] = round(time.perf_counter() - t, 1)
            save()

    # 1. train
    def train():
        def attempt(budget, log_name):
            argv = ["train", str(config_path), "--time-budget", f"{budget:.0f}", "--no-resume"]
            try:
                cli(argv, out / log_name, timeout=budget + 600)
            finally:
                print("\n".join((out / log_name).read_text().replace("\r", "\n").splitlines()[-6:]))

        try:
            attempt(args.time_budget, "train.log")
            report["backend"] = "auto (the Triton kernels on CUDA)"
        except RuntimeError as e:
            # the kernels failed early (not a slow run): train on the torch path with the budget left, and say so
            left = args.time_budget - (time.perf_counter() - t_train)
            if args.smoke or left < 60 or not (run_dir / "run.json").is_file():
                raise
            report["errors"]["train on the kernels"] = str(e)[-2000:]
            report["backend"] = "torch (fallback: the run on the kernels failed, see errors)"
            os.environ["GLMKIT_BACKEND"] = "torch"  # this process's later stages and every later command
            from glmkit import backend

            backend.set_backend("torch")
            attempt(left, "train_torch_fallback.log")
        shutil.copy(run_dir / "history.json", out / "history.json")
        h = json.loads((run_dir / "history.json").read_text())
        run = json.loads((run_dir / "run.json").read_text())
        steps, tcfg = h["steps"][-1], run["train"]
        report["run_config"] = run
        from glmkit.data.python_corpus import PythonCorpus

        data = raw.get("data", {})
        report["corpus"] = PythonCorpus(data.get("vocab_size", 8192), data.get("root")).stats
        report["train"] = {
            "steps": steps,
            "tokens": steps * tcfg["batch_size"] * tcfg["seq_len"],
            "train_seconds": h["elapsed_s"],
            "tokens_per_s": steps * tcfg["batch_size"] * tcfg["seq_len"] / h["elapsed_s"],
            "loss_first": h["losses"][0],
            "loss_last_10": sum(h["losses"][-10:]) / len(h["losses"][-10:]),
            "eval_loss_last": h["eval_losses"][-1] if h["eval_losses"] else None,
            "aux_last": {k: v[-1] for k, v in h["aux"].items()},
            "stats_last": {k: v[-1] for k, v in h["stats"].items()},
        }
        log_name = "train_torch_fallback.log" if (out / "train_torch_fallback.log").is_file() else "train.log"
        for line in (out / log_name).read_text().replace("\r", "\n").splitlines():
            if line.startswith("time budget") or line.startswith("model:"):
                report["train"].setdefault("log_lines", []).append(line)

    t_train = time.perf_counter()
    step("train", train)

    # 2. samples
    def samples():
        parts = []
        for temp, extra in ((0.0, []), (0.8, ["--top-k", "50", "--seed", "0"])):
            argv = ["generate", str(run_dir), "--max-new-tokens", str(s["new_tokens"]), "--temperature", str(temp)]
            for p in PROMPTS:
                argv += ["--prompt", p]
            proc = cli(argv + extra, timeout=600)
            parts.append(f"==== python -m glmkit generate, temperature {temp} {' '.join(extra)} ====\n{proc.stdout}")
        (out / "samples.txt").write_text("\n".join(parts), encoding="utf-8")

    step("samples", samples)

    from glmkit.checkpoint import load_pretrained

    model = None

    def load():
        nonlocal model
        model = load_pretrained(run_dir, device=device).eval()

    step("load", load)
    if model is None:
        return 1
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()

    # 3. MTP acceptance on held-out text
    def acceptance():
        from glmkit.speculative import measure_acceptance

        prompts = held_out(raw, s["acc_prompts"], s["acc_prompt_len"], seed=1)
        report["acceptance"] = {}
        for n in s["drafts"]:
            with torch.no_grad(), autocast:
                stats = measure_acceptance(model, prompts, draft_tokens=n, max_new_tokens=s["acc_new"])
            report["acceptance"][n] = {
                "acceptance": stats.acceptance,
                "mean_accepted": stats.mean_accepted,
                "prompts": len(prompts),
                "prompt_len": s["acc_prompt_len"],
                "new_tokens": s["acc_new"],
            }
            print(f"draft_tokens={n}: acceptance {stats.acceptance}, mean accepted {stats.mean_accepted:.2f}")

    step("acceptance", acceptance)

    # 4. export and parity in transformers
    def export():
        windows = held_out(raw, 2, args.parity_len, seed=3)
        parity = export_parity(model, work / "export", windows, s["gen_check"], device)
        report["export_parity"] = parity
        lines = [
            "glm5_next export of the trained capstone (glmkit.hf.save_hf) loaded by transformers "
            f"{parity['transformers']} Glm5NextForConditionalGeneration, fp32, TF32 off, on {report['device']}; "
            f"transformers' KDA: {parity['transformers_kda']}",
            f"logits on {parity['rows']} held-out windows of {parity['seq_len']} tokens (largest |logit| "
            f"{parity['logit_scale']:.2f}):",
        ]
        for name in ("torch path", "kernels", "auto (torch)"):
            if name in parity:
                lines.append(
                    f"  ours ({name}) vs transformers: max abs diff {parity[name]['max_abs_diff']:.3e}, "
                    f"relative error {parity[name]['rel_err']:.3e}"
                )
        lines.append(f"greedy continuation of {parity['greedy_tokens']} tokens equal: {parity['greedy_tokens_equal']}")
        (out / "export_parity.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
        print("\n".join(lines))

    step("export", export)

    # 5. generation speed of the trained model
    def decode():
        import bench_capstone

        if device.type == "cpu":
            bench_capstone.DEV = "cpu"

        def prompts_of(B):
            return held_out(raw, B, s["decode_prompt"], seed=2)

        rows = bench_capstone.decode_speeds(model, prompts_of, s["decode_batches"], s["decode_new"], s["drafts"], print)
        report["decode"] = rows
        print("\n".join(bench_capstone.decode_table(rows)))

    if elapsed() < args.deadline - 25 or args.smoke:
        step("decode", decode)
    else:
        report["errors"]["decode"] = f"skipped: {elapsed():.0f} s used"
    save()
    print(f"done in {elapsed():.0f} s; bundle in {out}: {sorted(p.name for p in out.iterdir())}")
    return 1 if report["errors"] and not all(v.startswith("skipped") for v in report["errors"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
