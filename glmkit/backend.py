"""Which implementation runs: the Triton kernels or the plain-torch path.

The rule is the one the course promises: on a CUDA tensor glmkit uses its Triton kernel, anywhere else
the torch path. The choice is visible (``get_backend()``, ``describe()``) and can be overridden:

    glmkit.set_backend("torch")            # everywhere, from now on
    with glmkit.use_backend("triton"): ... # inside a block only (on CPU: the Triton interpreter)
    GLMKIT_BACKEND=torch python train.py   # from the environment

"auto" (the default) picks "triton" for CUDA tensors and "torch" otherwise. "triton" on CPU tensors runs
the kernels under the Triton interpreter, which is slow but exact: the lessons use it at small sizes to
show that the very same kernel runs on a laptop.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
from collections.abc import Iterator
from typing import Literal

import torch

# Without CUDA, Triton kernels can only run under its CPU interpreter, and triton decides interpreter vs
# compiler when a kernel is decorated. So the switch is set here, before anything in glmkit imports triton
# (kernels/__init__.py does the same for code that imports glmkit.kernels directly).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

Backend = Literal["auto", "torch", "triton"]
_VALID = ("auto", "torch", "triton")
_backend: str = os.environ.get("GLMKIT_BACKEND", "auto").strip().lower() or "auto"
if _backend not in _VALID:
    raise ValueError(f"GLMKIT_BACKEND={_backend!r} is not one of {_VALID}")


def set_backend(name: Backend) -> None:
    """Set the backend for every later call: "auto", "torch" or "triton"."""
    global _backend
    if name not in _VALID:
        raise ValueError(f"backend must be one of {_VALID}, got {name!r}")
    if name == "triton" and not triton_available():
        raise RuntimeError("backend 'triton' asked for, but triton is not installed: " + TRITON_FIX)
    _backend = name


def get_backend() -> str:
    """The backend setting ("auto", "torch" or "triton")."""
    return _backend


@contextlib.contextmanager
def use_backend(name: Backend) -> Iterator[None]:
    """Use a backend inside a ``with`` block, then restore the previous one."""
    previous = _backend
    set_backend(name)
    try:
        yield
    finally:
        set_backend(previous)


TRITON_FIX = (
    "pip install 'triton>=3.6,<3.7' (Linux x86-64; CUDA builds of torch already bring their own). "
    "Without it the torch path runs everywhere and the kernels are skipped."
)


_TRITON = importlib.util.find_spec("triton") is not None


def triton_available() -> bool:
    return _TRITON


def interpreter_active() -> bool:
    """True when Triton kernels run under the CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def require_kernel_device(t: torch.Tensor | torch.device) -> None:
    """What every kernel launcher checks first (a tensor, or the device of its tensors): CUDA runs natively,
    CPU only under the interpreter (which has to be switched on before triton is imported)."""
    device = t if isinstance(t, torch.device) else t.device
    if device.type != "cuda" and not interpreter_active():
        raise RuntimeError("CPU tensors need the Triton interpreter: set TRITON_INTERPRET=1 before importing triton")


def resolve(t: torch.Tensor) -> str:
    """The backend that actually runs for tensor ``t``: "torch" or "triton"."""
    if _backend == "torch" or not triton_available():
        return "torch"
    if _backend == "triton":
        return "triton"
    return "triton" if t.is_cuda else "torch"


class KernelAudit:
    """What ran, counted per (op, path): ``audit.counts[("rmsnorm", "triton")] == 17``.

    Ops recorded (each at the point where the implementation is chosen, once per call): "attention"
    (forward; its backward follows the forward's path), "attention_decode" (the explicit-mask torch math of
    a decode step or a padded batch), "rmsnorm", "swiglu", "rope", "moe_experts", "mla_decode", "delta_rule",
    "delta_rule_step", "lightning_indexer", "sparse_mla", "sparse_mla_decode". ``paths(op)`` is the set of paths an
    op took; ``only_triton()`` is True when every recorded op took "triton".
    """

    def __init__(self) -> None:
        self.counts: dict[tuple[str, str], int] = {}

    def paths(self, op: str) -> set[str]:
        return {p for (o, p) in self.counts if o == op}

    def ops(self) -> set[str]:
        return {o for (o, _) in self.counts}

    def only_triton(self) -> bool:
        return bool(self.counts) and all(p == "triton" for (_, p) in self.counts)

    def __repr__(self) -> str:
        rows = ", ".join(f"{o}:{p}×{n}" for (o, p), n in sorted(self.counts.items()))
        return f"KernelAudit({rows or 'nothing recorded'})"


_audits: list[KernelAudit] = []


def record(op: str, path: str) -> None:
    """Called by glmkit's dispatchers each time an op runs; counts it in every active ``audit()``."""
    for a in _audits:
        a.counts[(op, path)] = a.counts.get((op, path), 0) + 1


@contextlib.contextmanager
def audit() -> Iterator[KernelAudit]:
    """Record which implementation every dispatched op used inside the block::

    with glmkit.backend.audit() as a:
        model.loss(x, y).backward()
    assert a.only_triton(), a
    """
    a = KernelAudit()
    _audits.append(a)
    try:
        yield a
    finally:
        _audits.remove(a)


def describe() -> str:
    """One line saying what runs where, for notebooks and logs."""
    if not triton_available():
        return "backend: torch everywhere (triton not installed)"
    mode = "interpreter (CPU)" if interpreter_active() else "native"
    cuda = torch.cuda.is_available()
    where = {
        "auto": "Triton kernels on CUDA tensors, torch elsewhere",
        "torch": "torch everywhere (kernels off)",
        "triton": "Triton kernels for every tensor",
    }[_backend]
    return f"backend={_backend}: {where}; CUDA {'available' if cuda else 'not available'}; triton mode: {mode}"
