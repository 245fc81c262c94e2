"""Training the GLM models: blank infilling (GLM-2021) or next-token prediction (dense and MoE models), with a
progress bar, a live loss plot, checkpoints and exact resume.

What it implements
    ``train(model, data, cfg)``: AdamW with linear warm-up then cosine decay to ``min_lr_ratio * lr``,
    gradient clipping, a tqdm progress bar (the widget variant in JupyterLab) with the loss in its
    postfix, a live loss plot in notebooks, and safetensors checkpoints every ``ckpt_every`` steps
    (``glmkit.checkpoint``) that a later call resumes from.

Two objectives; the batch decides which (``batch_loss``)
    * Blank infilling (lesson 01): ``data.batch(step)`` gives a ``glmkit.blank_infilling.GLMBatch`` (Part A +
      Part B, 2D positions, the Part-A length ``sep``) and ``model.loss(batch)`` of the GLM-2021
      ``GLMModel`` averages the loss over Part B. (A ``GLMDenseModel`` with 2D positions, the GLM-2021 /
      ChatGLM-6B settings, trains on the same batches.)
    * Next-token prediction (lessons 03 on): ``data.batch(step)`` gives a ``glmkit.lm_data.LMBatch``
      (random windows of the corpus, targets shifted by one) and ``model.loss(input_ids, targets)`` of
      ``GLMDenseModel`` / ``GLMMoEModel`` averages the loss over every position: a plain causal LM.
    ``default_data`` picks the matching data for the model. The loop itself is the usual one.

Mixture-of-Experts models (``glmkit.models.glm_moe``; anything holding ``glmkit.moe.MoE`` layers)
    * The sequence-wise balance loss (``model.aux_loss()``, present when the config's ``aux_loss_alpha``
      > 0) is added to the loss that is back-propagated; ``History.losses`` keeps the language-model loss
      alone and ``History.aux_losses`` the balance loss, so runs with and without it compare directly.
    * Aux-loss-free balancing (DeepSeek-V3): with ``TrainConfig.bias_update_rate`` γ > 0, after each
      ``optimizer.step()`` every router's selection bias moves by ``γ · sign(mean_load − load_i)``
      (``model.update_bias``) using that step's expert loads.
    * Every step records the expert-load imbalance ``History.max_violation`` (max over MoE layers of
      MaxVio = max_load / mean_load − 1; 0 = balanced) and, every ``log_every`` steps, each layer's load
      shares (``History.expert_loads``): ``History.plot_load()`` draws it.

Reproducible, and resumable to the bit (on CPU)
    Nothing in a step depends on the past except the weights and the optimizer state:
      * the data is a function of the step: ``data.batch(step)`` (``BlankInfillingData`` seeds its
        span sampling from (seed, step)), so a resumed run sees the same batches in the same order;
      * the learning rate is a function of the step (no scheduler object to save);
      * the RNG that dropout draws from is re-seeded from (seed, step) before each step;
      * weights, AdamW moments and its step counters are saved bit-exactly (safetensors, fp32), and so are
        persistent buffers such as the MoE routers' ``e_score_correction_bias``; the MoE load counters
        are reset at the start of every step, so they carry nothing across steps.
    So a run killed after step k and resumed from its last checkpoint ends with the same weights and
    losses as a run that never stopped. ``tests/test_train.py`` (blank infilling) and
    ``tests/test_train_lm.py`` (dense and MoE next-token) check this bitwise on CPU. On CUDA,
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

from glmkit.blank_infilling import GLMBatch
from glmkit.checkpoint import load_training_state, save_training_state
from glmkit.lm_data import LMBatch, LMData
from glmkit.models.glm2021 import GLMModel
from glmkit.models.glm_dense import GLMDenseModel
from glmkit.moe import MoE, max_violation, total_aux_loss

# The two objectives: History.objective and the plot titles use these names.
BLANK_INFILLING = "blank_infilling"
NEXT_TOKEN = "next_token"
TITLES = {BLANK_INFILLING: "blank-infilling loss (Part B)", NEXT_TOKEN: "next-token loss (causal LM)"}

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
    log_every: int = 10             # steps between progress-bar / plot updates (and MoE load snapshots)
    bias_update_rate: float = 0.0   # MoE: γ of the aux-loss-free bias update per step (DeepSeek-V3: 0.001); 0 = off

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
        if not (isinstance(self.bias_update_rate, (int, float)) and math.isfinite(self.bias_update_rate)
                and self.bias_update_rate >= 0):
            raise ValueError(f"TrainConfig.bias_update_rate must be a number >= 0 (0 = off), got "
                             f"{self.bias_update_rate!r}")
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
def _ema(values: list[float], beta: float = 0.9) -> list[float]:
    """Bias-corrected exponential moving average."""
    out, avg = [], 0.0
    for i, x in enumerate(values):
        avg = beta * avg + (1 - beta) * x
        out.append(avg / (1 - beta ** (i + 1)))
    return out


def _new_figure():
    from matplotlib.figure import Figure

    return Figure(figsize=(6.4, 3.2), layout="constrained").add_subplot()


@dataclass
class History:
    """Per-step records of a run (a resumed run continues the lists of the run it resumes).

    ``losses`` is the objective's loss (Part-B or next-token cross entropy), without any MoE balance
    loss, which goes to ``aux_losses`` (one per step when the model has one, else empty).
    MoE models only (empty otherwise): ``max_violation`` per step, max over the MoE layers of
    max_load / mean_load − 1 for that step's batch (0 = every expert got the same number of slots);
    ``expert_loads[i][layer][e]``, every ``log_every`` steps (at ``load_steps[i]``), the share of the
    layer's routed slots that went to expert e (each row sums to 1; balanced = 1/E).
    """

    steps: list[int] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    lrs: list[float] = field(default_factory=list)
    grad_norms: list[float] = field(default_factory=list)
    eval_steps: list[int] = field(default_factory=list)
    eval_losses: list[float] = field(default_factory=list)
    elapsed_s: float = 0.0          # wall time of the training steps, summed over resumed calls
    resumed_from: int | None = None  # the step this call resumed from (None: started fresh)
    objective: str = BLANK_INFILLING  # or NEXT_TOKEN: what ``losses`` measures (sets the plot title)
    aux_losses: list[float] = field(default_factory=list)
    max_violation: list[float] = field(default_factory=list)
    load_steps: list[int] = field(default_factory=list)
    expert_loads: list[list[list[float]]] = field(default_factory=list)

    @property
    def steps_per_s(self) -> float:
        return len(self.steps) / self.elapsed_s if self.elapsed_s > 0 else float("nan")

    def smoothed(self, beta: float = 0.9) -> list[float]:
        """Bias-corrected exponential moving average of the loss."""
        return _ema(self.losses, beta)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "History":
        return cls(**{k: v for k, v in d.items() if k in {f.name for f in dataclasses.fields(cls)}})

    def plot(self, ax=None, title: str | None = None):
        """Draw the loss curve on ``ax`` (a new matplotlib Figure if None); returns the figure.
        ``title`` None: the objective's (``TITLES``)."""
        ax = _new_figure() if ax is None else ax
        _draw(ax, self, title or TITLES.get(self.objective, "loss"))
        return ax.figure

    def plot_load(self, ax=None, label: str | None = None, title: str = "expert-load imbalance (MoE)"):
        """Draw ``max_violation`` per step (raw and smoothed) on ``ax`` (a new figure if None) and return
        the figure. Call it on two histories with the same ``ax`` and a ``label`` each to compare runs
        (e.g. with and without ``bias_update_rate``)."""
        if not self.max_violation:
            raise ValueError("this History has no expert-load records: the model had no MoE layers")
        ax = _new_figure() if ax is None else ax
        steps = self.steps[-len(self.max_violation):]
        line, = ax.plot(steps, self.max_violation, alpha=0.25, lw=1)
        ax.plot(steps, _ema(self.max_violation), color=line.get_color(), lw=2, label=label or "MaxVio (smoothed)")
        ax.set_xlabel("step")
        ax.set_ylabel("max load / mean load − 1")
        ax.set_title(title)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(loc="upper right")
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

    def __init__(self, min_interval_s: float = 2.0, title: str = TITLES[BLANK_INFILLING]):
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
    raise TypeError(f"data.batch(step) must return a GLMBatch or an LMBatch (or a dict of tensors), "
                    f"got {type(batch).__name__}")


def objective_of(batch: Any) -> str:
    """``NEXT_TOKEN`` for an ``LMBatch``, ``BLANK_INFILLING`` for anything else (a ``GLMBatch``)."""
    return NEXT_TOKEN if isinstance(batch, LMBatch) else BLANK_INFILLING


def batch_loss(model: torch.nn.Module, batch: Any) -> torch.Tensor:
    """The objective's loss of ``model`` on ``batch`` (the batch type decides, see the module docstring).

    LMBatch  → ``model.loss(input_ids, targets)`` (dense / MoE models: mean next-token cross entropy).
    GLMBatch → ``model.loss(batch)`` for ``GLMModel``; for a ``GLMDenseModel`` with 2D positions
               ``model.loss(input_ids, targets, position_ids=, sep=)`` (mean over Part B).
    """
    if isinstance(batch, LMBatch):
        if not isinstance(model, GLMDenseModel):
            raise TypeError(f"an LMBatch (next-token prediction) needs a GLMDenseModel or GLMMoEModel; "
                            f"{type(model).__name__} trains on blank-infilling GLMBatches (BlankInfillingData)")
        return model.loss(batch.input_ids, batch.targets)
    if isinstance(model, GLMDenseModel):
        if not isinstance(batch, GLMBatch):
            raise TypeError(f"{type(model).__name__} trains on LMBatch (glmkit.lm_data.LMData) or GLMBatch, "
                            f"got {type(batch).__name__}")
        if model.config.position not in ("learned2d", "rope2d"):
            raise TypeError(f"a GLMBatch (blank infilling) needs 2D positions (position='learned2d' or 'rope2d'); "
                            f"this model has position={model.config.position!r}: train it on LMData")
        return model.loss(batch.input_ids, batch.targets, position_ids=batch.position_ids, sep=batch.sep)
    return model.loss(batch)


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
def evaluate(model: torch.nn.Module, eval_data: Any, n_batches: int = 4, device: torch.device | None = None) -> float:
    """Mean loss over ``eval_data.batch(0..n_batches-1)`` (Part B or next token, as the batches say), in
    eval mode (no dropout; MoE layers record no load)."""
    device = device or model.device
    was_training = model.training
    model.eval()
    try:
        losses = []
        for i in range(n_batches):
            with _autocast(device):
                losses.append(float(batch_loss(model, _to_device(eval_data.batch(i), device))))
        return sum(losses) / len(losses)
    finally:
        model.train(was_training)


def _autocast(device: torch.device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def default_data(cfg: TrainConfig, split: str = "train", model: torch.nn.Module | None = None):
    """Batches over the built-in corpus shaped by ``cfg`` (batch_size, seq_len, seed) for ``model``:
    ``LMData`` (next token; ``split`` "train" or the held-out "val") for a ``GLMDenseModel`` or
    ``GLMMoEModel``, ``BlankInfillingData`` (which has no split) for a GLM-2021 ``GLMModel`` or None."""
    if isinstance(model, GLMDenseModel):
        return LMData(batch_size=cfg.batch_size, seq_len=cfg.seq_len, seed=cfg.seed, split=split)
    from glmkit.blank_infilling import BlankInfillingData

    return BlankInfillingData(batch_size=cfg.batch_size, seq_len=cfg.seq_len, seed=cfg.seed)


# ----------------------------------------------------------------------------------------------------
# MoE hooks (on the glmkit.moe.MoE modules: GLMMoEModel.moe_layers(), or any MoE module found)
# ----------------------------------------------------------------------------------------------------
def moe_layers(model: torch.nn.Module) -> list[MoE]:
    """The model's MoE layers in order: ``model.moe_layers()`` if it has one, else every ``MoE`` module."""
    if callable(getattr(model, "moe_layers", None)):
        return list(model.moe_layers())
    return [m for m in model.modules() if isinstance(m, MoE)]


def _record_load(history: History, layers: list[MoE], step: int, snapshot: bool) -> None:
    loads = torch.stack([m.load_accum for m in layers]).float().cpu()      # [layers, E] slots this step
    history.max_violation.append(max(max_violation(row) for row in loads))
    if snapshot:
        shares = loads / loads.sum(dim=1, keepdim=True).clamp_min(1)
        history.load_steps.append(step)
        history.expert_loads.append(shares.tolist())


# ----------------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------------
def train(
    model: torch.nn.Module,
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

    model:     a ``GLMModel`` (GLM-2021, blank infilling), ``GLMDenseModel`` or ``GLMMoEModel`` (next token).
    data:      anything with ``batch(step) -> GLMBatch | LMBatch`` that is deterministic in ``step``
               (None: ``default_data(cfg, model=model)``: blank infilling for a GLMModel, ``LMData``
               for the dense and MoE models, over the built-in corpus, shaped by cfg).
    out_dir:   where checkpoints go (every ``cfg.ckpt_every`` steps and at the end); None = no checkpoints.
    resume:    continue from the latest checkpoint in ``out_dir`` if there is one (same data order,
               same schedule, same RNG: the result equals an uninterrupted run).
    progress:  tqdm bar (widget in JupyterLab) with the loss in the postfix.
    live_plot: "auto" (on in a notebook kernel, off in plain Python), True or False.
    callback:  ``callback(step, {"loss", "lr", "grad_norm"})`` after each step (MoE models add
               "max_violation", and "aux_loss" when there is one); an exception raised there ends the
               run like a crash (the last checkpoint stays); returning True stops it cleanly (with a
               checkpoint).
    eval_data: batches for ``evaluate`` every ``cfg.eval_every`` steps (e.g. ``default_data(cfg, "val", model)``).
    max_steps: stop after this many steps in total (the schedule still spans ``cfg.steps``), saving a
               checkpoint: the way to train in pieces.
    device:    None = CUDA if available, else CPU (bf16 autocast on CUDA). The model is moved there.
    deterministic: on CPU, ``torch.use_deterministic_algorithms(True)`` during the run.

    MoE models: the balance loss ``model.aux_loss()`` (when not None) is added to the loss; with
    ``cfg.bias_update_rate`` > 0 the routers' selection biases are updated after each optimizer step.
    """
    if not isinstance(model, (GLMModel, GLMDenseModel)):
        raise TypeError(f"model must be a GLMModel, GLMDenseModel or GLMMoEModel, got {type(model).__name__}")
    cfg = cfg if cfg is not None else TrainConfig()
    if not isinstance(cfg, TrainConfig):
        raise TypeError(f"cfg must be a TrainConfig, got {type(cfg).__name__}")
    if cfg.seq_len > model.config.max_seq_len:
        raise ValueError(f"TrainConfig.seq_len={cfg.seq_len} is longer than the model allows "
                         f"(max_seq_len={model.config.max_seq_len})")
    if max_steps is not None and (not isinstance(max_steps, int) or max_steps < 1):
        raise ValueError(f"max_steps must be a positive int or None, got {max_steps!r}")
    if data is None:
        data = default_data(cfg, model=model)
    if not callable(getattr(data, "batch", None)):
        raise TypeError(f"data must have a batch(step) method returning a GLMBatch or an LMBatch, "
                        f"got {type(data).__name__}")
    if live_plot not in ("auto", True, False):
        raise ValueError(f"live_plot must be 'auto', True or False, got {live_plot!r}")
    if cfg.eval_every and eval_data is None:
        warnings.warn("TrainConfig.eval_every is set but no eval_data was given: no evaluation", stacklevel=2)
    layers = moe_layers(model)
    if cfg.bias_update_rate > 0 and not layers:
        warnings.warn("TrainConfig.bias_update_rate is set but the model has no MoE layers: no bias update",
                      stacklevel=2)

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
    if start < end:
        torch.manual_seed(_step_seed(cfg.seed, start))  # as the loop will: a data object may draw from it
        history.objective = objective_of(data.batch(start))

    def save(step: int) -> None:
        extra = {"seed": cfg.seed, "train_config": cfg.to_dict(), "model_config": model.config.to_dict(),
                 "history": history.to_dict()}
        save_training_state(out_dir, model, optimizer, step, extra)

    show_plot = in_notebook() if live_plot == "auto" else bool(live_plot)
    plot = LivePlot(title=TITLES[history.objective]) if show_plot and start < end else None
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
                for m in layers:
                    m.reset_load()                     # the loads below are this step's alone
                with _autocast(device):
                    loss = batch_loss(model, batch)
                    aux = total_aux_loss(layers)
                    total = loss if aux is None else loss + aux
                optimizer.zero_grad(set_to_none=True)
                total.backward()
                if cfg.grad_clip > 0:
                    grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip))
                else:
                    grad_norm = float(torch.linalg.vector_norm(
                        torch.stack([p.grad.norm() for p in model.parameters() if p.grad is not None])))
                optimizer.step()
                step = step_index + 1
                metrics = {"loss": float(loss.detach()), "lr": lr, "grad_norm": grad_norm}
                if aux is not None:
                    metrics["aux_loss"] = float(aux.detach())
                if layers:
                    _record_load(history, layers, step, snapshot=step % cfg.log_every == 0 or step == end)
                    metrics["max_violation"] = history.max_violation[-1]
                    if cfg.bias_update_rate > 0:
                        for m in layers:                                   # from this step's loads
                            m.update_bias(cfg.bias_update_rate)
                total_value = metrics["loss"] + metrics.get("aux_loss", 0.0)
                if not math.isfinite(total_value):
                    raise FloatingPointError(f"loss became {total_value} at step {step}: lower TrainConfig.lr "
                                             f"(now {cfg.lr}) or check the data")
                history.steps.append(step)
                history.losses.append(metrics["loss"])
                history.lrs.append(lr)
                history.grad_norms.append(grad_norm)
                if aux is not None:
                    history.aux_losses.append(metrics["aux_loss"])
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
                    if layers:
                        postfix["maxvio"] = f"{history.max_violation[-1]:.2f}"
                    bar.set_postfix(postfix, refresh=False)
                    if plot is not None:
                        plot.update(history)
                stop = False
                if callback is not None:
                    stop = callback(step, metrics) is True
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
