"""Data parallelism for the one trainer: DDP and FSDP2 (``torch.distributed.fsdp.fully_shard``) under ``torchrun``,
with checkpoints that do not depend on the number of processes.

What it implements
    ``glmkit.train.train(..., parallel=...)`` takes one of these and changes nothing else in its loop:
    * ``Local()`` — one process (the default): what ``train`` always did.
    * ``DataParallel("ddp")`` — every process holds the whole model; after the backward, DDP averages the gradients
      over processes (bucketed all-reduce overlapped with the backward).
    * ``DataParallel("fsdp")`` — FSDP2: every decoder layer, and the rest of the model as the root, is sharded by
      rows over the processes (each parameter a ``DTensor`` holding 1/N of it; the optimizer state follows). A layer's
      parameters are all-gathered just before it runs, forward and backward, and freed after; gradients are
      reduce-scattered, so each process updates its own shard. Memory per process falls with N; the arithmetic is
      DDP's.
    Launch: ``torchrun --nproc_per_node N -m glmkit train CONFIG`` (``init_from_env`` starts the process group: NCCL on
    GPUs, one per process, gloo on CPU).

The global batch stays the global batch
    ``TrainConfig.batch_size`` is the batch of one optimizer step over all processes: process r takes rows
    ``[r·B/N, (r+1)·B/N)`` of ``data.batch(step)`` (``shard``), so N processes see exactly the batch one process would,
    the averaged gradient is the one-process gradient (up to the order of floating-point sums), and the logged loss
    is the mean over processes (all-reduced). MoE expert loads are summed over processes before they are recorded and
    before the bias update, so every process takes the same balancing step.

Checkpoints independent of N
    A checkpoint is the ordinary glmkit training folder (``glmkit.checkpoint``): full tensors, the optimizer state
    keyed by the parameter order of ``make_optimizer``. DDP: process 0 writes its (replicated) state. FSDP: every
    shard is gathered (``DTensor.full_tensor``) into a full copy on process 0, which writes it. Loading, each process
    reads the full folder and keeps its own shard. So a run saved by 4 FSDP processes resumes on 1 process without
    torch.distributed, or on 2 with DDP, and vice versa. The price: the full model and optimizer state pass through
    one process's CPU memory when saving (and every process's when loading) — right for models that fit one machine;
    beyond, ``torch.distributed.checkpoint`` writes shards in parallel and reshards on load.

How it differs from what trains GLM-5: expert parallelism (experts split over GPUs, tokens sent to them by
all-to-all), tensor and pipeline parallelism (Megatron-Core) are not here; data parallelism is the part every one
of those runs also uses.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from glmkit.checkpoint import load_training_state, save_training_state

MODES = ("ddp", "fsdp")


class LossModule(nn.Module):
    """``forward(batch) -> (model.loss(batch), model.aux_losses())``, and ``loss(batch)``: the trainer's forward as one
    module call. DDP and FSDP2 act in hooks around module calls; ``model.loss`` calls ``model.forward`` directly."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return self.model.loss(batch), self.model.aux_losses()

    def loss(self, batch) -> torch.Tensor:
        return self(batch)[0]

    @property
    def device(self) -> torch.device:
        return self.model.device


class Local:
    """One process, no torch.distributed: the interface ``train`` uses, doing what it always did."""

    rank, world_size = 0, 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def wrap(self, model: nn.Module) -> nn.Module:
        """The module ``train`` calls: ``net(batch) -> (loss, aux)``. Build the optimizer after this (FSDP2 replaces
        the parameters)."""
        return LossModule(model)

    def check(self, batch_size: int) -> None:
        """Raise unless the global batch splits evenly over the processes."""

    def shard(self, batch: Any) -> Any:
        """This process's rows of the global batch."""
        return batch

    def mean(self, value: float) -> float:
        """The mean over processes of a per-process number."""
        return value

    def sum_(self, tensors: list[torch.Tensor]) -> None:
        """Sum each tensor over processes, in place."""

    def clip_grad_norm(self, model: nn.Module, max_norm: float) -> float:
        """Clip the global gradient norm to ``max_norm`` (inf: measure only); returns the norm before clipping."""
        return float(torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm))

    def save(self, out_dir, model: nn.Module, optimizer: torch.optim.Optimizer, step: int, extra: dict) -> None:
        save_training_state(out_dir, model, optimizer, step, extra)

    def load(self, out_dir, model: nn.Module, optimizer: torch.optim.Optimizer):
        return load_training_state(out_dir, model, optimizer)

    def __repr__(self) -> str:
        return "Local()"


class DataParallel(Local):
    """DDP (``mode="ddp"``) or FSDP2 (``mode="fsdp"``) over the default process group (started by ``init_from_env``
    or by you). ``device``: this process's device (default: ``cuda:LOCAL_RANK`` with NCCL, else CPU)."""

    def __init__(self, mode: str = "ddp", device: str | torch.device | None = None):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError(
                "DataParallel needs a torch.distributed process group: launch with torchrun and call "
                "glmkit.distributed.init_from_env() (the train command does)"
            )
        self.mode, self.rank, self.world_size = mode, dist.get_rank(), dist.get_world_size()
        if device is None:
            device = f"cuda:{torch.cuda.current_device()}" if dist.get_backend() == "nccl" else "cpu"
        self.device = torch.device(device)

    def __repr__(self) -> str:
        return f"DataParallel({self.mode!r}, rank {self.rank} of {self.world_size}, {self.device})"

    # -- the model ---------------------------------------------------------------------------------------
    def wrap(self, model: nn.Module) -> nn.Module:
        net = LossModule(model)
        if self.mode == "ddp":
            from torch.nn.parallel import DistributedDataParallel

            # Every parameter gets a gradient each step (the MTP layers through their aux loss; a routed expert
            # nobody picked through the zero rows of the stacked expert weights), so DDP need not search the graph
            # for unused ones. Buffers (router biases, load counters) are kept equal by the trainer, not broadcast
            # by DDP at every forward.
            ids = [self.device.index] if self.device.type == "cuda" else None
            no_sync = {"broadcast_buffers": False}
            if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters:  # torch >= 2.13
                no_sync = {"forward_sync_buffers": False}
            return DistributedDataParallel(net, device_ids=ids, **no_sync)
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        with torch.no_grad():  # every process starts from process 0's weights, as DDP's constructor ensures
            for t in [*model.parameters(), *model.buffers()]:
                dist.broadcast(t.data, src=0)
        mesh = init_device_mesh(self.device.type, (self.world_size,))
        for layer in model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(net, mesh=mesh)  # the root: embeddings, final norm, head, MTP
        return net

    def check(self, batch_size: int) -> None:
        if batch_size % self.world_size:
            raise ValueError(
                f"TrainConfig.batch_size={batch_size} (the global batch) must be a multiple of the number of "
                f"processes ({self.world_size})"
            )

    def shard(self, batch: Any) -> Any:
        def rows(t):
            if not isinstance(t, torch.Tensor) or t.dim() == 0:
                return t
            n = t.shape[0] // self.world_size
            return t[self.rank * n : (self.rank + 1) * n]

        if dataclasses.is_dataclass(batch):
            return dataclasses.replace(
                batch, **{f.name: rows(getattr(batch, f.name)) for f in dataclasses.fields(batch)}
            )
        if isinstance(batch, dict):
            return {k: rows(v) for k, v in batch.items()}
        raise TypeError(f"cannot split a {type(batch).__name__} over processes (a dataclass or dict of tensors)")

    def mean(self, value: float) -> float:
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return float(t) / self.world_size

    def sum_(self, tensors: list[torch.Tensor]) -> None:
        for t in tensors:
            dist.all_reduce(t)

    def clip_grad_norm(self, model: nn.Module, max_norm: float) -> float:
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)  # a DTensor under FSDP: the global norm
        return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)

    # -- checkpoints -------------------------------------------------------------------------------------
    def save(self, out_dir, model, optimizer, step, extra) -> None:
        if self.mode == "ddp":
            if self.is_main:
                save_training_state(out_dir, model, optimizer, step, extra)
        else:
            full_model, full_opt = _gather(model, optimizer)  # collective
            if self.is_main:
                save_training_state(out_dir, full_model, full_opt, step, extra)
        dist.barrier()  # the checkpoint is complete before any process moves on (or is killed)

    def load(self, out_dir, model, optimizer):
        if self.mode == "ddp":
            return load_training_state(out_dir, model, optimizer)
        full_model = type(model)(model.config)  # on the CPU: the checkpoint's full tensors land here first
        full_opt = _like(optimizer, model, full_model)
        state = load_training_state(out_dir, full_model, full_opt)
        if state is not None:
            _scatter(full_model, full_opt, model, optimizer)
        return state


# ----------------------------------------------------------------------------------------------------------
# FSDP: full tensors <-> shards
# ----------------------------------------------------------------------------------------------------------
def _full(t: torch.Tensor) -> torch.Tensor:
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().cpu()


def _like(optimizer: torch.optim.Optimizer, model: nn.Module, other: nn.Module) -> torch.optim.Optimizer:
    """An optimizer of the same class and groups over ``other``'s parameters of the same names, in the same order."""
    names = {id(p): n for n, p in model.named_parameters()}
    params = dict(other.named_parameters())
    groups = [{**g, "params": [params[names[id(p)]] for p in g["params"]]} for g in optimizer.param_groups]
    return type(optimizer)(groups)


def _gather(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[nn.Module, torch.optim.Optimizer]:
    """A plain CPU copy of a sharded model and its optimizer (gathered on every process, in the same order)."""
    state = {k: _full(v) for k, v in model.state_dict().items()}
    with torch.device("meta"):
        full = type(model)(model.config)
    full.load_state_dict(state, assign=True)
    if hasattr(full, "tie_weights"):
        full.tie_weights()
    sd = optimizer.state_dict()
    sd["state"] = {
        pid: {k: _full(v) if isinstance(v, torch.Tensor) else v for k, v in sorted(entries.items())}
        for pid, entries in sorted(sd["state"].items())
    }
    full_opt = _like(optimizer, model, full)
    full_opt.load_state_dict(sd)
    return full, full_opt


def _local(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """This process's part of ``full`` laid out as ``like`` (a DTensor shard, or a plain replicated tensor)."""
    full = full.to(like.device, like.dtype)
    if hasattr(like, "device_mesh"):
        from torch.distributed.tensor import distribute_tensor

        return distribute_tensor(full, like.device_mesh, like.placements, src_data_rank=None)  # no communication
    return full


@torch.no_grad()
def _scatter(full_model, full_opt, model, optimizer) -> None:
    """Copy full tensors into a sharded model (each process its shard) and rebuild the optimizer's state."""
    mine = model.state_dict()
    for name, value in full_model.state_dict().items():
        target = mine[name]
        local = _local(value, target)
        (target.to_local() if hasattr(target, "to_local") else target).copy_(
            local.to_local() if hasattr(local, "to_local") else local
        )
    sd = full_opt.state_dict()
    params = [p for g in optimizer.param_groups for p in g["params"]]
    sd["state"] = {
        pid: {
            k: _local(v, params[pid]) if isinstance(v, torch.Tensor) and v.shape == params[pid].shape else v
            for k, v in entries.items()
        }
        for pid, entries in sd["state"].items()
    }
    optimizer.load_state_dict(sd)


# ----------------------------------------------------------------------------------------------------------
# torchrun
# ----------------------------------------------------------------------------------------------------------
def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ and "LOCAL_RANK" in os.environ


def init_from_env(backend: str | None = None) -> torch.device:
    """Start the default process group from torchrun's environment (idempotent) and return this process's device:
    ``cuda:LOCAL_RANK`` with NCCL when CUDA is available, else the CPU with gloo."""
    if not launched_by_torchrun():
        raise RuntimeError("not launched by torchrun (RANK, WORLD_SIZE and LOCAL_RANK are unset)")
    local_rank = int(os.environ["LOCAL_RANK"])
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend == "nccl":
        if local_rank >= torch.cuda.device_count():
            raise RuntimeError(f"LOCAL_RANK={local_rank} but only {torch.cuda.device_count()} CUDA devices")
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group(backend, device_id=device if backend == "nccl" else None)
    return device


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
