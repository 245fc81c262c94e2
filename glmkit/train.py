"""Training any glmkit model: one loop for blank infilling (GLM-2021) and next-token prediction (the decoder),
with a progress bar, safetensors checkpoints and exact resume.

What it implements
    ``train(model, data, cfg)``: AdamW with linear warm-up then cosine decay to ``min_lr_ratio · lr``, gradient
    clipping, tqdm progress (the widget in JupyterLab), checkpoints every ``ckpt_every`` steps
    (``glmkit.checkpoint``) that a later call resumes from. The loss is ``model.loss(batch)`` whatever the model;
    the batch type says which objective it is (a ``GLMBatch``: blank infilling over Part B; an ``LMBatch``:
    next-token prediction), and ``History.objective`` records it.

Auxiliary losses and MoE balancing, whatever the layers
    * ``model.aux_losses()`` (named losses set by the last training forward: the MoE balance loss when
      ``aux_loss_alpha`` > 0; the MTP loss of a model with MTP modules; later lessons add the DSA indexer's) are
      added to the loss that is back-propagated; ``History.losses`` keeps the objective alone and
      ``History.aux[name]`` each of the others, unweighted. The MTP loss is weighted by λ (``mtp_weight_at``: 0.3,
      then 0.1 for the last third of the steps, as DeepSeek-V3 and GLM-4.5 did over their tokens).
    * Aux-loss-free balancing (DeepSeek-V3): with ``TrainConfig.bias_update_rate`` γ > 0, after each
      ``optimizer.step()`` every router's selection bias moves by ``γ · sign(mean_load − load_i)`` using that
      step's expert loads (``model.update_bias``). Every step records the imbalance ``History.max_violation`` and,
      every ``log_every`` steps, each MoE layer's load shares (``History.expert_loads``).

Reproducible, and resumable to the bit (on CPU): the batch is a function of the step (``data.batch(step)``), so
is the learning rate, the RNG is re-seeded from (seed, step) before each step, and weights, AdamW moments and
persistent buffers (the routers' biases) are saved bit-exactly; MoE load counters are reset every step. A run
killed after step k and resumed from its last checkpoint ends with the same weights as one that never stopped
(tests/test_train.py). On CUDA, bf16 autocast and non-deterministic kernels make runs close, not identical.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from glmkit.data.blank_infilling import GLMBatch
from glmkit.data.lm_data import LMData
from glmkit.distributed import Local
from glmkit.models.decoder import MTP_AUX, Decoder
from glmkit.moe import max_violation

BLANK_INFILLING, NEXT_TOKEN = "blank_infilling", "next_token"


@dataclass
class TrainConfig:
    """Hyper-parameters of one run. ``steps`` is the length of the whole schedule (warm-up + cosine)."""

    steps: int = 1500
    batch_size: int = 16
    seq_len: int = 128
    lr: float = 3e-3
    warmup_steps: int = 30
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    weight_decay: float = 0.1  # GLM-10B used 0.1
    betas: tuple[float, float] = (0.9, 0.95)  # GLM-10B's Adam betas
    grad_clip: float = 1.0  # max global grad norm; 0 turns clipping off
    seed: int = 0
    ckpt_every: int = 100  # steps between checkpoints (needs out_dir); 0 = only at the end
    eval_every: int = 0  # steps between evaluations (needs eval_data); 0 = off
    eval_batches: int = 4
    log_every: int = 10  # steps between progress-bar / plot updates (and MoE load snapshots)
    bias_update_rate: float = 0.0  # MoE: γ of the aux-loss-free bias update per step (DeepSeek-V3: 0.001); 0 = off
    # MTP loss weight λ: mtp_weight until mtp_weight_switch · steps, then mtp_weight_final (DeepSeek-V3: 0.3 for the
    # first 10T of 14.8T tokens, then 0.1; GLM-4.5: 0.3 for 15T of 23T, then 0.1)
    mtp_weight: float = 0.3
    mtp_weight_final: float = 0.1
    mtp_weight_switch: float = 0.67

    def __post_init__(self) -> None:
        ints = {
            "steps": 1,
            "batch_size": 1,
            "seq_len": 2,
            "warmup_steps": 0,
            "ckpt_every": 0,
            "eval_every": 0,
            "eval_batches": 1,
            "log_every": 1,
        }
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
        if not (
            isinstance(self.bias_update_rate, (int, float))
            and math.isfinite(self.bias_update_rate)
            and self.bias_update_rate >= 0
        ):
            raise ValueError(
                f"TrainConfig.bias_update_rate must be a number >= 0 (0 = off), got {self.bias_update_rate!r}"
            )
        for name in ("mtp_weight", "mtp_weight_final", "mtp_weight_switch"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise ValueError(f"TrainConfig.{name} must be a finite number >= 0, got {v!r}")
        if self.mtp_weight_switch > 1:
            raise ValueError(
                f"TrainConfig.mtp_weight_switch is a fraction of steps in [0, 1], got {self.mtp_weight_switch}"
            )
        self.betas = tuple(float(b) for b in self.betas)  # JSON gives lists back
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"TrainConfig.betas must be two numbers in [0, 1), got {self.betas!r}")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["betas"] = list(self.betas)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"TrainConfig.from_dict: unknown keys {unknown}")
        return cls(**d)


def mtp_weight_at(cfg: TrainConfig, step: int) -> float:
    """λ of the MTP loss for update number ``step`` (0-based): ``mtp_weight`` for the first ``mtp_weight_switch``
    share of ``cfg.steps``, then ``mtp_weight_final``."""
    return cfg.mtp_weight if step < cfg.mtp_weight_switch * cfg.steps else cfg.mtp_weight_final


def lr_at(cfg: TrainConfig, step: int) -> float:
    """Learning rate for update number ``step`` (0-based): linear warm-up, then cosine to lr·min_lr_ratio."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps))
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + (cfg.lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices and embedding tables only, not on biases or norm gains (the usual
    GPT/GLM split). A tied head is one parameter and appears once."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, foreach=False)


@dataclass
class History:
    """Per-step records of a run (a resumed run continues the lists of the run it resumes).

    ``losses``: the objective's loss (Part-B or next-token cross entropy); ``aux[name]``: each auxiliary loss;
    ``stats[name]``: each diagnostic a module reports in ``aux_stats`` (not a loss: e.g. the DSA indexer's top-k
    recall "dsa_recall", averaged over the layers that report it).
    MoE models only: ``max_violation`` per step (max over MoE layers of max_load / mean_load − 1; 0 = balanced);
    ``expert_loads[i][layer][e]``, every ``log_every`` steps (at ``load_steps[i]``), expert e's share of the
    layer's routed slots. Plots: ``glmkit.course.viz``.
    """

    steps: list[int] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    lrs: list[float] = field(default_factory=list)
    grad_norms: list[float] = field(default_factory=list)
    eval_steps: list[int] = field(default_factory=list)
    eval_losses: list[float] = field(default_factory=list)
    elapsed_s: float = 0.0  # wall time of the training steps, summed over resumed calls
    resumed_from: int | None = None  # the step this call resumed from (None: started fresh)
    objective: str = NEXT_TOKEN  # or BLANK_INFILLING: what ``losses`` measures
    aux: dict[str, list[float]] = field(default_factory=dict)
    stats: dict[str, list[float]] = field(default_factory=dict)
    max_violation: list[float] = field(default_factory=list)
    load_steps: list[int] = field(default_factory=list)
    expert_loads: list[list[list[float]]] = field(default_factory=list)

    @property
    def steps_per_s(self) -> float:
        return len(self.steps) / self.elapsed_s if self.elapsed_s > 0 else float("nan")

    def smoothed(self, beta: float = 0.9, values: list[float] | None = None) -> list[float]:
        """Bias-corrected exponential moving average of ``values`` (default: the loss)."""
        out, avg = [], 0.0
        for i, x in enumerate(self.losses if values is None else values):
            avg = beta * avg + (1 - beta) * x
            out.append(avg / (1 - beta ** (i + 1)))
        return out

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> History:
        return cls(**{k: v for k, v in d.items() if k in {f.name for f in dataclasses.fields(cls)}})

    def __repr__(self) -> str:
        last = f"{self.losses[-1]:.4f}" if self.losses else "-"
        return (
            f"History({len(self.steps)} steps, last loss {last}, {self.elapsed_s:.1f} s, "
            f"{self.steps_per_s:.2f} steps/s)"
        )


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _to_device(batch: Any, device: torch.device) -> Any:
    if dataclasses.is_dataclass(batch):
        return dataclasses.replace(
            batch,
            **{
                f.name: getattr(batch, f.name).to(device)
                for f in dataclasses.fields(batch)
                if isinstance(getattr(batch, f.name), torch.Tensor)
            },
        )
    if isinstance(batch, dict):
        return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    raise TypeError(
        f"data.batch(step) must return a GLMBatch, an LMBatch or a dict of tensors, got {type(batch).__name__}"
    )


def _autocast(device: torch.device):
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()


@torch.no_grad()
def evaluate(model: torch.nn.Module, eval_data: Any, n_batches: int = 4, device: torch.device | None = None) -> float:
    """Mean ``model.loss`` over ``eval_data.batch(0..n_batches-1)``, in eval mode (no dropout, no MoE loads)."""
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


def default_data(cfg: TrainConfig, split: str = "train", model: torch.nn.Module | None = None):
    """Batches over the built-in corpus shaped by ``cfg``: ``BlankInfillingData`` for a GLM-2021 model (it has no
    split), else ``LMData`` (``split`` "train" or the held-out "val")."""
    if getattr(model, "two_d_positions", False):
        from glmkit.data.blank_infilling import BlankInfillingData

        return BlankInfillingData(batch_size=cfg.batch_size, seq_len=cfg.seq_len, seed=cfg.seed)
    return LMData(batch_size=cfg.batch_size, seq_len=cfg.seq_len, seed=cfg.seed, split=split)


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


def _aux_stats(model: torch.nn.Module) -> dict[str, float]:
    """Diagnostics the modules set in the last training forward (``aux_stats``: name → scalar tensor), averaged over
    the modules that report the same name. Nothing here is added to the loss."""
    values: dict[str, list[float]] = {}
    for m in model.modules():
        for name, v in (getattr(m, "aux_stats", None) or {}).items():
            values.setdefault(name, []).append(float(v))
    return {name: sum(v) / len(v) for name, v in values.items()}


def _record_load(history: History, layers: list, step: int, snapshot: bool) -> None:
    loads = torch.stack([m.load_accum for m in layers]).float().cpu()  # [layers, E] slots this step
    history.max_violation.append(max(max_violation(row) for row in loads))
    if snapshot:
        history.load_steps.append(step)
        history.expert_loads.append((loads / loads.sum(dim=1, keepdim=True).clamp_min(1)).tolist())


def train(
    model: Decoder,
    data: Any = None,
    cfg: TrainConfig | None = None,
    out_dir: str | Path | None = None,
    resume: bool = True,
    progress: bool = True,
    callback: Callable[[int, dict[str, float], History], Any] | None = None,
    *,
    eval_data: Any = None,
    max_steps: int | None = None,
    device: str | torch.device | None = None,
    deterministic: bool = True,
    parallel: Local | None = None,
) -> History:
    """Train ``model`` (any glmkit model) on ``data.batch(step)`` for ``cfg.steps`` steps; returns the ``History``.

    data:      anything with ``batch(step)`` that is deterministic in ``step`` (None: ``default_data``).
    out_dir:   where checkpoints go (every ``cfg.ckpt_every`` steps and at the end); None = no checkpoints.
    resume:    continue from the latest checkpoint in ``out_dir`` (same data, schedule and RNG: the result equals
               an uninterrupted run).
    callback:  ``callback(step, metrics, history)`` after each step (metrics: "loss", "lr", "grad_norm", each
               auxiliary loss, "max_violation" for MoE models); an exception there ends the run like a crash (the
               last checkpoint stays); returning True stops it cleanly, with a checkpoint.
               ``glmkit.course.live_plot()`` is one: the loss curve redrawn in a notebook.
    eval_data: batches for ``evaluate`` every ``cfg.eval_every`` steps (e.g. ``default_data(cfg, "val", model)``).
    max_steps: stop after this many steps in total (the schedule still spans ``cfg.steps``): training in pieces.
    device:    None = CUDA if available, else CPU (bf16 autocast on CUDA). The model is moved there.
    deterministic: on CPU, ``torch.use_deterministic_algorithms(True)`` during the run.
    parallel:  ``glmkit.distributed.DataParallel("ddp" | "fsdp")`` under torchrun (``cfg.batch_size`` is then the
               global batch, split over the processes; checkpoints stay world-size independent); None = one process.
    """
    if not callable(getattr(model, "loss", None)) or not hasattr(model, "config"):
        raise TypeError(f"model must be a glmkit model (Decoder, GLMModel), got {type(model).__name__}")
    cfg = cfg if cfg is not None else TrainConfig()
    if not isinstance(cfg, TrainConfig):
        raise TypeError(f"cfg must be a TrainConfig, got {type(cfg).__name__}")
    if cfg.seq_len > model.config.max_position_embeddings:
        raise ValueError(
            f"TrainConfig.seq_len={cfg.seq_len} is longer than the model allows "
            f"(max_position_embeddings={model.config.max_position_embeddings})"
        )
    if max_steps is not None and (not isinstance(max_steps, int) or max_steps < 1):
        raise ValueError(f"max_steps must be a positive int or None, got {max_steps!r}")
    data = default_data(cfg, model=model) if data is None else data
    if not callable(getattr(data, "batch", None)):
        raise TypeError(f"data must have a batch(step) method, got {type(data).__name__}")
    if cfg.eval_every and eval_data is None:
        warnings.warn("TrainConfig.eval_every is set but no eval_data was given: no evaluation", stacklevel=2)
    layers = model.moe_layers()
    if cfg.bias_update_rate > 0 and not layers:
        warnings.warn("TrainConfig.bias_update_rate is set but the model has no MoE layers", stacklevel=2)

    par = parallel if parallel is not None else Local()
    par.check(cfg.batch_size)
    device = torch.device(device) if device is not None else default_device()
    model.to(device)
    net = par.wrap(model)  # net(batch) -> (loss, aux losses), through DDP / FSDP2 when parallel
    optimizer = make_optimizer(model, cfg)
    history, start = History(), 0
    if out_dir is not None and resume:
        state = par.load(out_dir, model, optimizer)
        if state is not None:
            saved = state.extra.get("train_config")
            if saved is not None and TrainConfig.from_dict(saved) != cfg:
                warnings.warn(
                    f"resuming {state.path} with a different TrainConfig than it was saved with "
                    f"(saved {saved}); the result will not equal an uninterrupted run",
                    stacklevel=2,
                )
            history = History.from_dict(state.extra.get("history", {}))
            history.resumed_from = start = state.step
    end = cfg.steps if max_steps is None else min(cfg.steps, max_steps)
    if start < end:
        torch.manual_seed(_step_seed(cfg.seed, start))  # as the loop will: a data object may draw from it
        first = data.batch(start)
        history.objective = BLANK_INFILLING if isinstance(first, GLMBatch) else NEXT_TOKEN
        ids = first["input_ids"] if isinstance(first, dict) else first.input_ids
        model.check_tokens(ids)  # once, at the edge: the forward never syncs to check

    def save(step: int) -> None:
        extra = {"seed": cfg.seed, "train_config": cfg.to_dict(), "history": history.to_dict()}
        par.save(out_dir, model, optimizer, step, extra)

    from tqdm.auto import tqdm

    bar = tqdm(
        total=cfg.steps,
        initial=start,
        disable=not (progress and par.is_main),
        desc="train",
        unit="step",
        dynamic_ncols=True,
    )
    net.train()
    try:
        with _deterministic(deterministic and device.type == "cpu"):
            for step_index in range(start, end):
                t0 = time.perf_counter()
                torch.manual_seed(_step_seed(cfg.seed, step_index))  # dropout draws depend on the step only
                batch = _to_device(par.shard(data.batch(step_index)), device)
                lr = lr_at(cfg, step_index)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                for m in layers:
                    m.reset_load()  # the loads below are this step's alone
                with _autocast(device):
                    loss, aux = net(batch)
                    lam = mtp_weight_at(cfg, step_index)
                    total = loss + sum(lam * v if name == MTP_AUX else v for name, v in aux.items())
                optimizer.zero_grad(set_to_none=True)
                total.backward()
                clip = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
                grad_norm = par.clip_grad_norm(model, clip)
                optimizer.step()
                step = step_index + 1
                metrics = {"loss": par.mean(float(loss.detach())), "lr": lr, "grad_norm": grad_norm}
                metrics.update({name: par.mean(float(v.detach())) for name, v in aux.items()})
                if layers:
                    par.sum_([m.load_accum for m in layers])  # every process records and balances the global load
                    _record_load(history, layers, step, snapshot=step % cfg.log_every == 0 or step == end)
                    metrics["max_violation"] = history.max_violation[-1]
                    if cfg.bias_update_rate > 0:
                        model.update_bias(cfg.bias_update_rate)  # from this step's loads
                total_value = metrics["loss"] + sum(metrics[name] for name in aux)
                if not math.isfinite(total_value):
                    raise FloatingPointError(
                        f"loss became {total_value} at step {step}: lower TrainConfig.lr "
                        f"(now {cfg.lr}) or check the data"
                    )
                history.steps.append(step)
                history.losses.append(metrics["loss"])
                history.lrs.append(lr)
                history.grad_norms.append(grad_norm)
                for name in aux:
                    history.aux.setdefault(name, []).append(metrics[name])
                stats = {name: par.mean(v) for name, v in _aux_stats(model).items()}  # over processes
                metrics.update(stats)
                for name, v in stats.items():
                    history.stats.setdefault(name, []).append(v)
                history.elapsed_s += time.perf_counter() - t0

                if eval_data is not None and cfg.eval_every and (step % cfg.eval_every == 0 or step == end):
                    history.eval_steps.append(step)
                    history.eval_losses.append(
                        evaluate(getattr(net, "module", net), eval_data, cfg.eval_batches, device)
                    )
                bar.update(1)
                if step % cfg.log_every == 0 or step == end:
                    postfix = {"loss": f"{history.smoothed()[-1]:.3f}", "lr": f"{lr:.1e}"}
                    if history.eval_losses:
                        postfix["eval"] = f"{history.eval_losses[-1]:.3f}"
                    if layers:
                        postfix["maxvio"] = f"{history.max_violation[-1]:.2f}"
                    bar.set_postfix(postfix, refresh=False)
                stop = callback is not None and callback(step, metrics, history) is True
                if out_dir is not None and ((cfg.ckpt_every and step % cfg.ckpt_every == 0) or step == end or stop):
                    save(step)
                if stop:
                    break
    finally:
        bar.close()
    model.eval()
    return history
