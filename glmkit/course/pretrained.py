"""Ready-trained lesson models, so that a slow machine can skip a lesson's training cell and still run the rest.

    skip_training()                     True when GLMKIT_SKIP_TRAINING=1 (or a lesson sets SKIP_TRAINING = True)
    train_or_load(key, model, fit)      trains with ``fit()`` (a function returning the ``History``) and keeps the
                                        result; with ``skip=True`` loads the kept (or shipped) weights instead
    LESSON01                            lesson 01's blank-infilling recipe (the numbers its training cell uses)
    lesson01_data(seed)                 its corpus split, word tokenizer and batches
    python -m glmkit.course pretrain lesson01 --seeds 0 1 2 3 4
                                        trains the recipe once per seed and prints the fill accuracy of each,
                                        with mean ± spread (the figures lesson 01 states); ``--ship`` writes
                                        seed 0's model to lessons/pretrained/ (the checkpoint the repo ships)

Where the weights live: ``lessons/pretrained/<key>/`` is committed (lesson 01's model, 0.8M parameters in fp16,
about 1.6 MB); every other run keeps its result in ``runs/pretrained/<key>/`` (not committed), so a lesson's
first full run builds the checkpoint that later runs may load. A model folder is ``glmkit.checkpoint``'s
(config.json + model.safetensors), plus ``history.json`` (the training curve) and, for word models,
``tokenizer.json``.

How it differs from before: every lesson trained from scratch on every run; on a slow or busy machine the
training cells were most of a lesson's time, and nothing after them could run without them.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from glmkit.course import fast_mode
from glmkit.course.course_map import repo_root

SKIP_ENV = "GLMKIT_SKIP_TRAINING"


def skip_training() -> bool:
    """True when the environment asks to load ready-trained models instead of training (GLMKIT_SKIP_TRAINING=1)."""
    return os.environ.get(SKIP_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def shipped_dir(key: str) -> Path:
    return repo_root() / "lessons" / "pretrained" / key


def cache_dir(key: str) -> Path:
    return Path(os.environ.get("GLMKIT_PRETRAINED_CACHE", repo_root() / "runs" / "pretrained")) / key


def find(key: str) -> Path | None:
    """The folder of ``key``'s ready-trained model: the one kept by an earlier run, else the shipped one."""
    for d in (cache_dir(key), shipped_dir(key)):
        if (d / "config.json").is_file():
            return d
    return None


def save(key: str, model: torch.nn.Module, history=None, tokenizer=None, folder: Path | None = None) -> Path:
    """Keep ``model`` (and its history and word tokenizer) as ``key``'s ready-trained model."""
    from glmkit.checkpoint import save_pretrained

    folder = Path(folder) if folder is not None else cache_dir(key)
    save_pretrained(model, folder)
    if history is not None:
        (folder / "history.json").write_text(json.dumps(history.to_dict()))
    if tokenizer is not None and hasattr(tokenizer, "save"):
        tokenizer.save(folder / "tokenizer.json")
    return folder


def load_into(model: torch.nn.Module, folder: Path):
    """Load the weights of ``folder`` into ``model`` (same config) and return the saved History (or None)."""
    from glmkit.checkpoint import load_pretrained
    from glmkit.train import History

    saved = load_pretrained(folder)
    if saved.config.to_dict() != model.config.to_dict():
        raise ValueError(f"{folder} holds a model of another configuration than this lesson's; delete it to retrain")
    dtype = next(model.parameters()).dtype
    model.load_state_dict({k: v.to(dtype) for k, v in saved.state_dict().items()})
    hist = folder / "history.json"
    return History.from_dict(json.loads(hist.read_text())) if hist.is_file() else None


def train_or_load(
    key: str, model: torch.nn.Module, fit: Callable[[], object], skip: bool | None = None, tokenizer=None
):
    """Train ``model`` with ``fit()`` (which returns a ``History``) and keep the result for later runs, or, with
    ``skip`` (default: ``skip_training()``), load the kept or shipped weights into it. Returns the History (the
    saved one when loaded). Says which it did."""
    skip = skip_training() if skip is None else skip
    if skip:
        folder = find(key)
        if folder is not None:
            hist = load_into(model, folder)
            print(f"SKIP_TRAINING: loaded the ready-trained model from {_short(folder)} (no training in this run)")
            model.eval()
            return hist
        print(f"SKIP_TRAINING: no ready-trained model for {key!r} yet, so this run trains it once and keeps it")
    history = fit()
    if fast_mode():  # a CI-sized run is not a ready-trained model: keep nothing
        return history
    try:
        save(key, model, history, tokenizer)
    except OSError as e:  # a read-only checkout: the lesson goes on, only the next run cannot skip
        print(f"(could not keep the trained model in {_short(cache_dir(key))}: {e})")
    return history


def _short(p: Path) -> str:
    try:
        return str(p.relative_to(repo_root()))
    except ValueError:
        return str(p)


# ----------------------------------------------------------------------------------------------------
# Lesson 01's recipe: word tokens, mostly one-word [MASK] spans, the corpus's fixed facts


@dataclasses.dataclass(frozen=True)
class BlankRecipe:
    steps: int = 2000
    batch_size: int = 16
    seq_len: int = 32
    lr: float = 3e-3
    warmup_steps: int = 20
    span_prob: float = 0.75  # share of [MASK] examples (GLM's default mix is 0.5)
    poisson_lambda: float = 1.0  # span lengths ~ Poisson(1) truncated to >= 1: mostly single words
    max_position_embeddings: int = 64
    n_train_lines: int = 500  # of the corpus's fact lines; the rest are held out
    eval_blanks: int = 100  # held-out lines, one word blanked in each


LESSON01 = BlankRecipe()


def fact_lines() -> list[str]:
    """The lines of the built-in ``stories`` corpus made only of its 14 fixed facts (579 lines, in corpus order)."""
    from glmkit.data.corpus import _FACTS, load_corpus

    facts = set(_FACTS)
    return [
        ln
        for ln in load_corpus("stories").split("\n")
        if ln and all(s.strip() + "." in facts for s in ln.split(".") if s.strip())
    ]


def lesson01_data(seed: int = 0, recipe: BlankRecipe = LESSON01):
    """(train_text, val_text, tokenizer, batches) of lesson 01's recipe: the lines of the built-in corpus made only
    of its fixed facts ("The sky is blue. Bees make honey. ..."), the first ``n_train_lines`` to train on."""
    from glmkit.data import blank_infilling as bi
    from glmkit.data.tokenizer import WordTokenizer

    lines = fact_lines()
    train_text = "\n".join(lines[: recipe.n_train_lines]) + "\n"
    val_text = "\n".join(lines[recipe.n_train_lines :]) + "\n"
    tok = WordTokenizer.fit(train_text)
    cfg = bi.BlankInfillingConfig(span_prob=recipe.span_prob, poisson_lambda=recipe.poisson_lambda)
    data = bi.BlankInfillingData(
        train_text, tok, seq_len=recipe.seq_len, batch_size=recipe.batch_size, seed=seed, cfg=cfg
    )
    return train_text, val_text, tok, data


def lesson01_model(tok, seed: int = 0, recipe: BlankRecipe = LESSON01):
    from glmkit.models.glm2021 import GLMModel, get_config

    torch.manual_seed(seed)
    return GLMModel(
        get_config("cpu-words", vocab_size=tok.vocab_size, max_position_embeddings=recipe.max_position_embeddings)
    )


def lesson01_train_config(recipe: BlankRecipe = LESSON01, steps: int | None = None, seed: int = 0):
    from glmkit.train import TrainConfig

    return TrainConfig(
        steps=steps or recipe.steps,
        batch_size=recipe.batch_size,
        seq_len=recipe.seq_len,
        lr=recipe.lr,
        warmup_steps=recipe.warmup_steps,
        ckpt_every=0,
        seed=seed,
    )


def measure_lesson01(seeds=(0, 1, 2, 3, 4), steps: int | None = None, ship: bool = False, out=sys.stdout) -> dict:
    """Train lesson 01's recipe once per seed (model init and batches), score each on the held-out blanks and
    print one row per seed plus mean ± spread (standard deviation, and min–max). Returns the figures."""
    from glmkit.generate import fill_accuracy
    from glmkit.train import train

    rows = []
    print("| seed | steps | s | steps/s | exact match | ends with [END] | commonest-word guess |", file=out)
    print("|---|---|---|---|---|---|---|", file=out)
    for seed in seeds:
        _, val_text, tok, data = lesson01_data(seed)
        model = lesson01_model(tok, seed)
        t0 = time.perf_counter()
        hist = train(model, data, lesson01_train_config(steps=steps, seed=seed), progress=False)
        secs = time.perf_counter() - t0
        acc = fill_accuracy(model, tok, val_text, n=LESSON01.eval_blanks, seed=1)
        rows.append(dict(seed=seed, accuracy=acc["accuracy"], finished=acc["finished"], baseline=acc["baseline"]))
        print(
            f"| {seed} | {len(hist.steps)} | {secs:.0f} | {len(hist.steps) / secs:.1f} | {acc['accuracy']:.2f} | "
            f"{acc['finished']:.2f} | {acc['baseline']:.2f} |",
            file=out,
            flush=True,
        )
        if ship and seed == 0:
            model.half()
            print(f"shipped: {save('01-blank-infilling', model, hist, tok, shipped_dir('01-blank-infilling'))}")
    accs = [r["accuracy"] for r in rows]
    summary = dict(
        rows=rows,
        mean=statistics.mean(accs),
        std=statistics.stdev(accs) if len(accs) > 1 else 0.0,
        min=min(accs),
        max=max(accs),
    )
    print(
        f"exact match over {len(accs)} seeds: {summary['mean']:.2f} ± {summary['std']:.2f} "
        f"(min {summary['min']:.2f}, max {summary['max']:.2f}); uptime load {os.getloadavg()[0]:.1f}",
        file=out,
    )
    return summary


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m glmkit.course pretrain", description=__doc__.splitlines()[0])
    ap.add_argument("lesson", choices=["lesson01"])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--ship", action="store_true", help="write seed 0's model to lessons/pretrained/")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    measure_lesson01(args.seeds, args.steps, args.ship)
    return 0


if __name__ == "__main__":
    sys.exit(main())
