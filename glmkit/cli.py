"""``python -m glmkit train CONFIG`` and ``python -m glmkit generate CHECKPOINT``: the capstone as scripts.

train CONFIG (a .toml or .json file; every key below but ``out_dir`` is optional)::

    out_dir  = "runs/python-small"   # the training folder, relative to the current directory
    preset   = "cpu-small"           # a glmkit.models.presets name; [model] then overrides its fields
    parallel = "auto"                # "none", "ddp", "fsdp"; auto = ddp under torchrun with > 1 process, else none
    device   = "auto"                # "cpu", "cuda"; auto = cuda when available (under torchrun: cuda:LOCAL_RANK)

    [model]                          # DecoderConfig fields: overrides of the preset, or (no preset) the whole config
    num_hidden_layers = 2

    [data]
    corpus     = "python"            # the stdlib's source with a BPE (glmkit.data.python_corpus), or a byte-level
                                     # corpus of glmkit.data.corpus ("stories", "stdlib")
    vocab_size = 8192                # the BPE's vocabulary (python); the model's vocab_size is set to it
    root       = "src/myproject"     # python: another folder of *.py files than the stdlib (same selection rules)

    [train]                          # glmkit.train.TrainConfig fields (batch_size is the global batch)
    steps = 300
    seq_len = 256
    eval_every = 100

The model is built from ``train.seed`` (the same on every process), trained by ``glmkit.train.train`` with a tqdm
bar, checkpointed every ``ckpt_every`` steps into ``out_dir`` and resumed from there when run again (on any number
of processes: ``glmkit.distributed``). ``out_dir`` also gets ``run.json`` (the resolved configs), ``history.json``
(``glmkit.train.History.to_dict()`` at the end: losses, eval losses, aux losses, stats such as the indexer's recall,
expert loads) and, for the python corpus, the tokenizer (``tokenizer.json``, ``tokenizer_config.json``). Under
``torchrun --nproc_per_node N`` the same command runs data parallel: NCCL on GPUs, gloo on CPUs.

``--time-budget S`` trains for a wall-clock budget instead of a step count: after ``FIT_AFTER`` steps (compilation
and autotuning) the next ``FIT_STEPS`` are timed, and ``train.steps`` is cut to the steps that fit in 95 % of what is
left of S (the rest for evaluations and checkpoints to come), so warm-up and the cosine decay end inside the budget;
the run also stops, checkpointed, once S has passed. Meant for a fresh run: the checkpoints record the shortened
schedule.

generate CHECKPOINT (a training folder: its latest checkpoint; a step folder; or a model folder) samples from the
model with the tokenizer found in the folder or its parents: ``--prompt`` (repeatable), ``--max-new-tokens``,
``--temperature`` (0 = greedy), ``--top-k``, ``--top-p``, ``--seed``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

RUN_NAME = "run.json"
HISTORY_NAME = "history.json"
FIT_AFTER, FIT_STEPS = 3, 10  # --time-budget: steps left untimed (compile, autotune), then steps timed
FIT_MARGIN = 0.95  # of the time left: evaluations and checkpoints to come
TOP_KEYS = {"out_dir", "preset", "parallel", "device", "model", "data", "train"}
PARALLEL = ("auto", "none", "ddp", "fsdp")
BYTE_CORPORA = ("stories", "stdlib", "default")


# ----------------------------------------------------------------------------------------------------------
# The run config
# ----------------------------------------------------------------------------------------------------------
def read_config(path: str | os.PathLike) -> dict[str, Any]:
    """A run config from a .toml or .json file, its keys checked."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no config file {path}")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".toml":
        try:
            import tomllib
        except ModuleNotFoundError:  # Python 3.10
            import tomli as tomllib
        raw = tomllib.loads(text)
    elif path.suffix == ".json":
        raw = json.loads(text)
    else:
        raise ValueError(f"{path}: the config must be a .toml or .json file")
    return check_config(raw, str(path))


def check_config(raw: dict[str, Any], where: str = "config") -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: a run config is a table of keys, got {type(raw).__name__}")
    unknown = sorted(set(raw) - TOP_KEYS)
    if unknown:
        raise ValueError(f"{where}: unknown keys {unknown}; a run config has {sorted(TOP_KEYS)}")
    if "out_dir" not in raw:
        raise ValueError(f"{where}: out_dir (the training folder) is required")
    for table in ("model", "data", "train"):
        if not isinstance(raw.get(table, {}), dict):
            raise ValueError(f"{where}: [{table}] must be a table of fields")
    data_unknown = sorted(set(raw.get("data", {})) - {"corpus", "vocab_size", "root"})
    if data_unknown:
        raise ValueError(f"{where}: unknown [data] keys {data_unknown} (corpus, vocab_size, root)")
    if raw.get("parallel", "auto") not in PARALLEL:
        raise ValueError(f"{where}: parallel must be one of {PARALLEL}, got {raw['parallel']!r}")
    if raw.get("device", "auto") not in ("auto", "cpu", "cuda"):
        raise ValueError(f"{where}: device must be 'auto', 'cpu' or 'cuda', got {raw['device']!r}")
    if "preset" not in raw and not raw.get("model"):
        raise ValueError(f"{where}: name a preset, or give the whole model config in [model]")
    return raw


def _corpus_and_tokenizer(data: dict[str, Any], is_main: bool, barrier):
    """For the [data] table: (make(cfg, split) -> batches, tokenizer, its end-of-text id or None, the tokenizer's
    folder or None). Process 0 builds the python corpus while the others wait, then all read the cache."""
    name = data.get("corpus", "python")
    if name == "python":
        from glmkit.data.python_corpus import DEFAULT_VOCAB, CodeData, PythonCorpus

        vocab, root = data.get("vocab_size", DEFAULT_VOCAB), data.get("root")
        if is_main:
            PythonCorpus(vocab, root, verbose=True)  # built once (under a minute for the stdlib), then cached
        barrier()
        corpus = PythonCorpus(vocab, root)

        def make(cfg, split):
            return CodeData(corpus, cfg.batch_size, cfg.seq_len, cfg.seed, split)

        return make, corpus.tokenizer, corpus.eos_id, corpus.folder
    if name in BYTE_CORPORA:
        if {"vocab_size", "root"} & set(data):
            raise ValueError(f"[data] vocab_size and root are for the python corpus; {name!r} is byte-level")
        from glmkit.data.lm_data import LMData
        from glmkit.data.tokenizer import ByteTokenizer

        def make(cfg, split):
            return LMData(batch_size=cfg.batch_size, seq_len=cfg.seq_len, seed=cfg.seed, split=split, corpus=name)

        return make, ByteTokenizer(), None, None
    raise ValueError(f"[data] corpus must be 'python' or one of {BYTE_CORPORA}, got {name!r}")


def _model_config(raw: dict[str, Any], vocab_size: int, eos_id: int | None):
    from glmkit.models.decoder import DecoderConfig
    from glmkit.models.presets import get_config

    fields = dict(raw.get("model", {}))
    if fields.get("vocab_size", vocab_size) < vocab_size:
        raise ValueError(f"[model] vocab_size={fields['vocab_size']} is smaller than the tokenizer's {vocab_size}")
    fields.setdefault("vocab_size", vocab_size)
    if eos_id is not None:
        fields.setdefault("eos_token_id", [eos_id])
        fields.setdefault("pad_token_id", eos_id)
    if "preset" in raw:
        return get_config(raw["preset"], **fields)
    return DecoderConfig.from_dict(fields)


def _parallel(raw: dict[str, Any]):
    """(the trainer's parallel object, this process's device)."""
    from glmkit import distributed

    mode = raw.get("parallel", "auto")
    if distributed.launched_by_torchrun():
        backend = "nccl" if raw.get("device", "auto") != "cpu" and torch.cuda.is_available() else "gloo"
        device = distributed.init_from_env(backend)
        world = int(os.environ["WORLD_SIZE"])
        mode = ("ddp" if world > 1 else "none") if mode == "auto" else mode
        if mode == "none":
            if world > 1:
                raise ValueError(f"parallel = 'none' but torchrun started {world} processes")
            return distributed.Local(), device
        return distributed.DataParallel(mode, device), device
    if mode in ("ddp", "fsdp"):
        raise ValueError(f"parallel = {mode!r} needs torchrun: torchrun --nproc_per_node N -m glmkit train CONFIG")
    want = raw.get("device", "auto")
    device = torch.device("cuda" if want == "cuda" or (want == "auto" and torch.cuda.is_available()) else "cpu")
    return distributed.Local(), device


# ----------------------------------------------------------------------------------------------------------
# train
# ----------------------------------------------------------------------------------------------------------
def run_train(
    config: dict[str, Any] | str | os.PathLike,
    *,
    max_steps: int | None = None,
    resume: bool = True,
    progress: bool = True,
    callback=None,
    time_budget: float | None = None,
):
    """Train as ``config`` says (a dict or a config file); returns the ``History``. ``max_steps`` stops after that
    many steps in total (a checkpoint is written), ``callback`` as in ``glmkit.train.train``, ``time_budget``
    seconds of training (the module docstring's ``--time-budget``)."""
    import torch.distributed as dist

    from glmkit.models.decoder import Decoder
    from glmkit.train import TrainConfig, train

    raw = read_config(config) if not isinstance(config, dict) else check_config(config)
    cfg = TrainConfig.from_dict(raw.get("train", {}))
    par, device = _parallel(raw)
    barrier = dist.barrier if dist.is_initialized() else (lambda: None)
    make_data, tokenizer, eos_id, tok_folder = _corpus_and_tokenizer(raw.get("data", {}), par.is_main, barrier)
    model_cfg = _model_config(raw, tokenizer.vocab_size, eos_id)
    out_dir = Path(raw["out_dir"])
    if par.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        run = {**raw, "model": model_cfg.to_dict(), "train": cfg.to_dict(), "out_dir": str(out_dir)}
        (out_dir / RUN_NAME).write_text(json.dumps(run, indent=1) + "\n", encoding="utf-8")
        for name in ("tokenizer.json", "tokenizer_config.json"):
            if tok_folder is not None:
                (out_dir / name).write_bytes((tok_folder / name).read_bytes())
    barrier()

    torch.manual_seed(cfg.seed)  # the same initial weights on every process
    model = Decoder(model_cfg)
    eval_data = make_data(cfg, "val") if cfg.eval_every else None
    if par.is_main:
        n = model.num_parameters()
        print(f"model: {n / 1e6:.2f}M parameters ({model.extra_repr()}); {par!r}; device {device}", file=sys.stderr)
    t0 = time.perf_counter()
    if time_budget is not None:
        callback = _fit_to_budget(cfg, time_budget, t0, par, callback)
    history = train(
        model,
        make_data(cfg, "train"),
        cfg,
        out_dir,
        resume=resume,
        progress=progress,
        callback=callback,
        eval_data=eval_data,
        max_steps=max_steps,
        device=device,
        parallel=par,
    )
    if par.is_main:
        (out_dir / HISTORY_NAME).write_text(json.dumps(history.to_dict()) + "\n", encoding="utf-8")
    if par.is_main and history.steps:
        done = [s for s in history.steps if history.resumed_from is None or s > history.resumed_from]
        tok_s = len(done) * cfg.batch_size * cfg.seq_len / max(time.perf_counter() - t0, 1e-9)
        line = f"step {history.steps[-1]}: loss {history.losses[-1]:.4f}"
        if history.eval_losses:
            line += f", val loss {history.eval_losses[-1]:.4f}"
        print(
            f"{line}; {len(done)} steps this run, {tok_s:,.0f} tokens/s (wall clock); saved in {out_dir}",
            file=sys.stderr,
        )
    return history


def _fit_to_budget(cfg, seconds: float, t0: float, par, inner=None):
    """A ``train`` callback that shortens ``cfg.steps`` (the schedule reads it at every step) to what fits in
    ``seconds`` from ``t0``, timed over the FIT_STEPS steps after the first FIT_AFTER of this call, and stops the run
    once the budget has passed. Processes agree through ``par.mean`` (the mean fit; any process over budget)."""
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not seconds > 0:
        raise ValueError(f"time_budget must be a positive number of seconds, got {seconds!r}")
    clock: list[float] = []

    def fit(step, metrics, history):
        clock.append(time.perf_counter())
        if len(clock) == FIT_AFTER + FIT_STEPS + 1:
            per_step = (clock[-1] - clock[FIT_AFTER]) / FIT_STEPS
            fitted = par.mean(step + FIT_MARGIN * max(seconds - (clock[-1] - t0), 0.0) / per_step)
            cfg.steps = max(step, min(cfg.steps, int(fitted)))
            if par.is_main:
                print(f"\ntime budget {seconds:g} s: {per_step * 1e3:.1f} ms/step, {cfg.steps} steps", file=sys.stderr)
        over = par.mean(float(clock[-1] - t0 >= seconds)) > 0
        stop = inner is not None and inner(step, metrics, history) is True
        return stop or over or step >= cfg.steps

    return fit


def train_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m glmkit train", description="Train a glmkit decoder from a run config (see glmkit.cli)."
    )
    p.add_argument("config", help="a .toml or .json run config")
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many steps in total (checkpointed)")
    p.add_argument("--no-resume", action="store_true", help="start fresh even if out_dir holds checkpoints")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--time-budget", type=float, default=None, help="seconds: fit train.steps to this wall-clock budget")
    args = p.parse_args(argv)
    from glmkit import distributed

    try:
        run_train(
            args.config,
            max_steps=args.max_steps,
            resume=not args.no_resume,
            progress=not args.quiet,
            time_budget=args.time_budget,
        )
    finally:
        distributed.shutdown()
    return 0


# ----------------------------------------------------------------------------------------------------------
# generate
# ----------------------------------------------------------------------------------------------------------
def find_tokenizer(folder: str | os.PathLike):
    """The tokenizer of a checkpoint: ``tokenizer.json`` in the folder or up to two parents (an HFTokenizer), else
    a byte-level run (``run.json`` naming a byte corpus): ``ByteTokenizer``."""
    folder = Path(folder).resolve()
    for candidate in (folder, folder.parent, folder.parent.parent):
        if (candidate / "tokenizer.json").is_file():
            from glmkit.data.hf_tokenizer import HFTokenizer

            return HFTokenizer.from_folder(candidate)
        if (candidate / RUN_NAME).is_file():
            run = json.loads((candidate / RUN_NAME).read_text(encoding="utf-8"))
            if run.get("data", {}).get("corpus") in BYTE_CORPORA:
                from glmkit.data.tokenizer import ByteTokenizer

                return ByteTokenizer()
    raise FileNotFoundError(f"no tokenizer.json (or byte-level {RUN_NAME}) in {folder} or its parents")


def run_generate(
    checkpoint: str | os.PathLike,
    prompts: list[str],
    max_new_tokens: int = 200,
    temperature: float = 0.8,
    top_k: int | None = 50,
    top_p: float | None = None,
    seed: int = 0,
    device: str | None = None,
) -> list[str]:
    """The completions of ``prompts`` by the model in ``checkpoint`` (see the module docstring)."""
    from glmkit.checkpoint import load_pretrained
    from glmkit.generate import generate

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = load_pretrained(checkpoint, device=device).eval()
    tokenizer = find_tokenizer(checkpoint)
    ids = [tokenizer.encode(p) for p in prompts]
    if any(not row for row in ids):
        eos = getattr(tokenizer, "eos_token_id", None)
        if eos is None:
            raise ValueError("an empty prompt needs a tokenizer with an end-of-text token to start from")
        ids = [row or [eos] for row in ids]
    gen = torch.Generator().manual_seed(seed)  # drawn on the CPU: the same samples on any device
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=model.device.type == "cuda"):
        out = generate(model, ids, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, generator=gen)
    return [tokenizer.decode(row) for row in out.tokens]


def generate_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m glmkit generate", description="Sample from a trained glmkit model.")
    p.add_argument("checkpoint", help="a training folder (its latest checkpoint), a step folder or a model folder")
    p.add_argument("--prompt", action="append", help="a prompt (repeat for a batch); default: an empty one")
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=50, help="0 = no top-k")
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    args = p.parse_args(argv)
    prompts = args.prompt or [""]
    texts = run_generate(
        args.checkpoint,
        prompts,
        args.max_new_tokens,
        args.temperature,
        args.top_k or None,
        args.top_p,
        args.seed,
        args.device,
    )
    for prompt, text in zip(prompts, texts):
        print(f"{prompt}{text}")
        if len(prompts) > 1:
            print("-" * 60)
    return 0
