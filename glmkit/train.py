"""Training GLM with the blank-infilling objective: progress bar, live loss plot, checkpoints, exact resume.

What it implements
    ``train(model, data, cfg)``: AdamW with linear warm-up then cosine decay to ``min_lr_ratio * lr``,
    gradient clipping, a tqdm progress bar (the widget variant in JupyterLab) with the loss in its
    postfix, a live loss plot in notebooks, and safetensors checkpoints every ``ckpt_every`` steps
    (``glmkit.checkpoint``) that a later call resumes from.

How it differs from a GPT training loop
    Only in the batch: ``model.loss(batch)`` reads a ``GLMBatch`` (Part A + Part B, 2D positions, the
    Part-A length ``sep``) and averages the loss over Part B. The loop itself is the usual one.

Reproducible, and resumable to the bit (on CPU)
    Nothing in a step depends on the past except the weights and the optimizer state:
      * the data is a function of the step: ``data.batch(step)`` (``BlankInfillingData`` seeds its
        span sampling from (seed, step)), so a resumed run sees the same batches in the same order;
      * the learning rate is a function of the step (no scheduler object to save);
      * the RNG that dropout draws from is re-seeded from (seed, step) before each step;
      * weights, AdamW moments and its step counters are saved bit-exactly (safetensors, fp32).
    So a run killed after step k and resumed from its last checkpoint ends with the same weights and
    losses as a run that never stopped. ``tests/test_train.py`` checks this bitwise on CPU. On CUDA,
    bf16 autocast and non-deterministic kernels make runs close, not identical.

Measured (cpu-tiny preset, 0.89M parameters, ``TrainConfig()`` defaults: 1500 steps of 16 x 128 tokens,
default ``BlankInfillingData``, torch 2.13/2.11 on 2 CPU threads): 11.2-11.8 steps/s when the 2 cores are
free (1500 steps in ~135 s), loss (smoothed) 5.60 -> 2.22 (step 150) -> 1.10 (step 650) -> 0.72 (step
1500); 3000 steps: 255 s, 0.40-0.6. The [gMASK] continuation becomes fluent in that time ("Today is Friday.
Tomorrow is" -> " Tuesday, and yesterday was Tuesday. On"); short [MASK] blanks do not yet end at the
right place (see the lesson notes).
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from glmkit.checkpoint import load_training_state, save_training_state
from glmkit.models.glm2021 import GLMModel

# ----------------------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------------------
@dataclass
class TrainConfig:
    """Hyper-parameters of one run. ``steps`` is the length of the whole schedule (warm-up + cosine)."""

    steps: int = 1500              # cpu-tiny: ~2.3 min on 2 free CPU cores
    batch_size: int = 16
    seq_len: int = 128
    lr: float = 3e-3
    warmup_steps: int = 30
    min_lr_ratio: float = 0.1       # cosine decays to lr * min_lr_ratio
    weight_decay: float = 0.1       # GLM-10B used 0.1
    betas: tuple[float, float] = (0.9, 0.95)  # GLM-10B's Adam betas
    grad_clip: float = 1.0          # max global grad norm; 0 turns clipping off
    seed: int = 0
    ckpt_every: int = 100           # steps between checkpoints (needs out_dir); 0 = only at the end
    eval_every: int = 0             # steps between evaluations (needs eval_data); 0 = off
    eval_batches: int = 4
    log_every: int = 10             # steps between progress-bar / plot updates

    def __post_init__(self) -> None:
        ints = {"steps": 1, "batch_size": 1, "seq_len": 2, "warmup_steps": 0, "ckpt_every": 0,
                "eval_every": 0, "eval_batches": 1, "log_every": 1}
        for name, lo in ints.items():
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ValueError(f"TrainConfig.{name} must be an int >= {lo}, got {v!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"TrainConfig.seed must be a non-negative int, got {self.seed!r}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"TrainConfig.lr must be a positive number, got {self.lr!r}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"TrainConfig.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio!r}")
        if self.weight_decay < 0:
            raise ValueError(f"TrainConfig.weight_decay must be >= 0, got {self.weight_decay!r}")
        if self.grad_clip < 0:
            raise ValueError(f"TrainConfig.grad_clip must be >= 0 (0 = off), got {self.grad_clip!r}")
        self.betas = tuple(float(b) for b in self.betas)  # JSON gives lists back
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"TrainConfig.betas must be two numbers in [0, 1), got {self.betas!r}")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["betas"] = list(self.betas)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"TrainConfig.from_dict: unknown keys {unknown}")
        return cls(**d)


def lr_at(cfg: TrainConfig, step: int) -> float:
    """Learning rate for update number ``step`` (0-based): linear warm-up, then cosine to lr*min_lr_ratio."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1, cfg.steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + (cfg.lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on the 2-D weights (matrices and embedding tables) only, not on biases
    or LayerNorm gains: the usual GPT/GLM split. The tied head is one parameter and appears once."""
    decay, no_decay = [], []
    for p in model.parameters():  # parameters() already deduplicates the tied head
        if not p.requires_grad:
            continue
        (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, foreach=False)


# ----------------------------------------------------------------------------------------------------
# History
# ----------------------------------------------------------------------------------------------------
@dataclass
class History:
    """Per-step records of a run (a resumed run continues the lists of the run it resumes)."""

    steps: list[int] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    lrs: list[float] = field(default_factory=list)
    grad_norms: list[float] = field(default_factory=list)
    eval_steps: list[int] = field(default_factory=list)
    eval_losses: list[float] = field(default_factory=list)
    elapsed_s: float = 0.0          # wall time of the training steps, summed over resumed calls
    resumed_from: int | None = None  # the step this call resumed from (None: started fresh)

    @property
    def steps_per_s(self) -> float:
        return len(self.steps) / self.elapsed_s if self.elapsed_s > 0 else float("nan")

    def smoothed(self, beta: float = 0.9) -> list[float]:
        """Bias-corrected exponential moving average of the loss."""
        out, avg = [], 0.0
        for i, x in enumerate(self.losses):
            avg = beta * avg + (1 - beta) * x
            out.append(avg / (1 - beta ** (i + 1)))
        return out

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "History":
        return cls(**{k: v for k, v in d.items() if k in {f.name for f in dataclasses.fields(cls)}})

    def plot(self, ax=None, title: str = "blank-infilling loss (Part B)"):
        """Draw the loss curve on ``ax`` (a new matplotlib Figure if None); returns the figure."""
        if ax is None:
            from matplotlib.figure import Figure

            fig = Figure(figsize=(6.4, 3.2), layout="constrained")
            ax = fig.add_subplot()
        _draw(ax, self, title)
        return ax.figure

    def __repr__(self) -> str:
        last = f"{self.losses[-1]:.4f}" if self.losses else "-"
        return (f"History({len(self.steps)} steps, last loss {last}, {self.elapsed_s:.1f} s, "
                f"{self.steps_per_s:.2f} steps/s)")


def _draw(ax, h: History, title: str) -> None:
    ax.clear()
    if h.losses:
        ax.plot(h.steps, h.losses, color="tab:blue", alpha=0.3, lw=1, label="loss")
        ax.plot(h.steps, h.smoothed(), color="tab:blue", lw=2, label="smoothed")
    if h.eval_losses:
        ax.plot(h.eval_steps, h.eval_losses, "o-", color="tab:orange", label="eval")
    ax.set_xlabel("step")
    ax.set_ylabel("cross entropy (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if h.losses:
        ax.legend(loc="upper right")


# ----------------------------------------------------------------------------------------------------
# Notebook detection and the live plot
# ----------------------------------------------------------------------------------------------------
def in_notebook() -> bool:
    """True inside a Jupyter kernel (JupyterLab, classic notebook, nbclient), False in plain Python."""
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    shell = get_ipython()
    return shell is not None and type(shell).__name__ == "ZMQInteractiveShell"


class LivePlot:
    """A loss plot that redraws in place in a notebook output, at most once every ``min_interval_s``.

    Renders a matplotlib Figure to PNG and updates one IPython display handle, so it works in any
    Jupyter frontend without a matplotlib backend setting (and leaves no duplicate figure behind).
    """

    def __init__(self, min_interval_s: float = 2.0, title: str = "blank-infilling loss (Part B)"):
        from IPython.display import Image, display
        from matplotlib.figure import Figure

        self._Image = Image
        self.min_interval_s = min_interval_s
        self.title = title
        self.fig = Figure(figsize=(6.4, 3.2), dpi=90, layout="constrained")
        self.ax = self.fig.add_subplot()
        _draw(self.ax, History(), title)
        self.handle = display(self._image(), display_id=True)
        self._last = time.perf_counter()

    def _image(self):
        buf = io.BytesIO()
        self.fig.savefig(buf, format="png")
        return self._Image(data=buf.getvalue(), format="png")

    def update(self, history: History, force: bool = False) -> None:
        now = time.perf_counter()
        if not force and now - self._last < self.min_interval_s:
            return
        self._last = now
        _draw(self.ax, history, self.title)
        self.handle.update(self._image())


# ----------------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------------
def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _to_device(batch: Any, device: torch.device) -> Any:
    if hasattr(batch, "to") and callable(batch.to) and not isinstance(batch, torch.Tensor):
        return batch.to(device)
    if dataclasses.is_dataclass(batch):
        return dataclasses.replace(batch, **{
            f.name: getattr(batch, f.name).to(device)
            for f in dataclasses.fields(batch) if isinstance(getattr(batch, f.name), torch.Tensor)})
    if isinstance(batch, dict):
        return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    raise TypeError(f"data.batch(step) must return a GLMBatch (or a dict of tensors), got {type(batch).__name__}")


def _step_seed(seed: int, step: int) -> int:
    return (seed * 1_000_003 + step) % (2**63 - 1)


@contextlib.contextmanager
def _deterministic(on: bool):
    previous = torch.are_deterministic_algorithms_enabled()
    if on:
        torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous)


@torch.no_grad()
def evaluate(model: GLMModel, eval_data: Any, n_batches: int = 4, device: torch.device | None = None) -> float:
    """Mean Part-B loss over ``eval_data.batch(0..n_batches-1)``, in eval mode (no dropout)."""
    device = device or model.device
    was_training = model.training
    model.eval()
    try:
        losses = []
        for i in range(n_batches):
            with _autocast(device):
                losses.append(float(model.loss(_to_device(eval_data.batch(i), device))))
        return sum(losses) / len(losses)
    finally:
        model.train(was_training)


def _autocast(device: torch.device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def default_data(cfg: TrainConfig, split: str = "train"):
    """Blank-infilling batches over the built-in corpus, shaped by ``cfg`` (batch_size, seq_len, seed)."""
    from glmkit.blank_infilling import BlankInfillingData

    return BlankInfillingData(batch_size=cfg.batch_size, seq_len=cfg.seq_len, seed=cfg.seed)


def train(
    model: GLMModel,
    data: Any = None,
    cfg: TrainConfig | None = None,
    out_dir: str | Path | None = None,
    resume: bool = True,
    progress: bool = True,
    live_plot: bool | str = "auto",
    callback: Callable[[int, dict[str, float]], Any] | None = None,
    *,
    eval_data: Any = None,
    max_steps: int | None = None,
    device: str | torch.device | None = None,
    deterministic: bool = True,
) -> History:
    """Train ``model`` on ``data.batch(step)`` for ``cfg.steps`` steps; returns the ``History``.

    data:      anything with ``batch(step) -> GLMBatch`` that is deterministic in ``step``
               (None: ``BlankInfillingData`` over the built-in corpus, shaped by cfg).
    out_dir:   where checkpoints go (every ``cfg.ckpt_every`` steps and at the end); None = no checkpoints.
    resume:    continue from the latest checkpoint in ``out_dir`` if there is one (same data order,
               same schedule, same RNG: the result equals an uninterrupted run).
    progress:  tqdm bar (widget in JupyterLab) with the loss in the postfix.
    live_plot: "auto" (on in a notebook kernel, off in plain Python), True or False.
    callback:  ``callback(step, {"loss", "lr", "grad_norm"})`` after each step; an exception raised
               there ends the run like a crash (the last checkpoint stays); returning True stops it cleanly
               (with a checkpoint).
    max_steps: stop after this many steps in total (the schedule still spans ``cfg.steps``), saving a
               checkpoint: the way to train in pieces.
    device:    None = CUDA if available, else CPU (bf16 autocast on CUDA). The model is moved there.
    deterministic: on CPU, ``torch.use_deterministic_algorithms(True)`` during the run.
    """
    if not isinstance(model, GLMModel):
        raise TypeError(f"model must be a GLMModel, got {type(model).__name__}")
    cfg = cfg if cfg is not None else TrainConfig()
    if not isinstance(cfg, TrainConfig):
        raise TypeError(f"cfg must be a TrainConfig, got {type(cfg).__name__}")
    if cfg.seq_len > model.config.max_seq_len:
        raise ValueError(f"TrainConfig.seq_len={cfg.seq_len} is longer than the model allows "
                         f"(max_seq_len={model.config.max_seq_len})")
    if max_steps is not None and (not isinstance(max_steps, int) or max_steps < 1):
        raise ValueError(f"max_steps must be a positive int or None, got {max_steps!r}")
    if data is None:
        data = default_data(cfg)
    if not callable(getattr(data, "batch", None)):
        raise TypeError(f"data must have a batch(step) method returning a GLMBatch, got {type(data).__name__}")
    if live_plot not in ("auto", True, False):
        raise ValueError(f"live_plot must be 'auto', True or False, got {live_plot!r}")
    if cfg.eval_every and eval_data is None:
        warnings.warn("TrainConfig.eval_every is set but no eval_data was given: no evaluation", stacklevel=2)

    device = torch.device(device) if device is not None else default_device()
    model.to(device)
    optimizer = make_optimizer(model, cfg)
    history = History()
    start = 0
    if out_dir is not None and resume:
        state = load_training_state(out_dir, model, optimizer)
        if state is not None:
            saved = state.extra.get("train_config")
            if saved is not None and TrainConfig.from_dict(saved) != cfg:
                warnings.warn(f"resuming {state.path} with a different TrainConfig than it was saved with "
                              f"(saved {saved}); the result will not equal an uninterrupted run", stacklevel=2)
            history = History.from_dict(state.extra.get("history", {}))
            history.resumed_from = start = state.step
    end = cfg.steps if max_steps is None else min(cfg.steps, max_steps)

    def save(step: int) -> None:
        extra = {"seed": cfg.seed, "train_config": cfg.to_dict(), "model_config": model.config.to_dict(),
                 "history": history.to_dict()}
        save_training_state(out_dir, model, optimizer, step, extra)

    show_plot = in_notebook() if live_plot == "auto" else bool(live_plot)
    plot = LivePlot() if show_plot and start < end else None
    from tqdm.auto import tqdm

    bar = tqdm(total=cfg.steps, initial=start, disable=not progress, desc="train", unit="step",
               dynamic_ncols=True)
    model.train()
    step = start
    try:
        with _deterministic(deterministic and device.type == "cpu"):
            for step_index in range(start, end):
                t0 = time.perf_counter()
                torch.manual_seed(_step_seed(cfg.seed, step_index))  # dropout draws depend on the step only
                batch = _to_device(data.batch(step_index), device)
                lr = lr_at(cfg, step_index)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                with _autocast(device):
                    loss = model.loss(batch)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if cfg.grad_clip > 0:
                    grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip))
                else:
                    grad_norm = float(torch.linalg.vector_norm(
                        torch.stack([p.grad.norm() for p in model.parameters() if p.grad is not None])))
                optimizer.step()
                step = step_index + 1
                loss_value = float(loss.detach())
                if not math.isfinite(loss_value):
                    raise FloatingPointError(f"loss became {loss_value} at step {step}: lower TrainConfig.lr "
                                             f"(now {cfg.lr}) or check the data")
                history.steps.append(step)
                history.losses.append(loss_value)
                history.lrs.append(lr)
                history.grad_norms.append(grad_norm)
                history.elapsed_s += time.perf_counter() - t0

                if eval_data is not None and cfg.eval_every and (step % cfg.eval_every == 0 or step == end):
                    history.eval_steps.append(step)
                    history.eval_losses.append(evaluate(model, eval_data, cfg.eval_batches, device))
                    model.train()
                bar.update(1)
                if step % cfg.log_every == 0 or step == end:
                    postfix = {"loss": f"{history.smoothed()[-1]:.3f}", "lr": f"{lr:.1e}"}
                    if history.eval_losses:
                        postfix["eval"] = f"{history.eval_losses[-1]:.3f}"
                    bar.set_postfix(postfix, refresh=False)
                    if plot is not None:
                        plot.update(history)
                stop = False
                if callback is not None:
                    stop = callback(step, {"loss": loss_value, "lr": lr, "grad_norm": grad_norm}) is True
                if out_dir is not None and ((cfg.ckpt_every and step % cfg.ckpt_every == 0)
                                            or step == end or stop):
                    save(step)
                if stop:
                    break
    finally:
        bar.close()
        if plot is not None:
            plot.update(history, force=True)
    model.eval()
    return history
