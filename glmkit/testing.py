"""Helpers for checking kernels against their references: relative error, tolerances, poisoned memory.

Used by tests/, by the lessons when they check a hand-built version against glmkit's, and by the exercise
checks. The error measure is relative: the RMS of the difference over the RMS of the reference, so one
tolerance works for outputs of any scale (a single global ``atol`` does not).

Poisoning (fla's trick, ``tests/conftest.py``): inside ``poisoned_allocations()`` every ``torch.empty`` /
``torch.empty_like`` returns memory filled with NaN (integers: their minimum), so an output element a kernel
forgets to write shows up as NaN instead of passing by luck. Kernel launchers allocate their outputs with
``torch.empty``; no launcher needs an ``out=`` argument for tests.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

# Relative-error budgets (RMS of the difference / RMS of the reference) per compute dtype. fp32 kernels
# still differ from torch by summation order; fp16 keeps 10 mantissa bits, bf16 only 7.
REL_TOL = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 2e-2}


def rel_err(ref: torch.Tensor, out: torch.Tensor) -> float:
    """RMS(out - ref) / RMS(ref), computed in fp64. NaN anywhere in ``out`` gives inf."""
    if ref.shape != out.shape:
        raise ValueError(f"shape mismatch: reference {tuple(ref.shape)} vs output {tuple(out.shape)}")
    ref64, out64 = ref.detach().double().cpu(), out.detach().double().cpu()
    if not torch.isfinite(out64).all():
        return float("inf")
    denom = ref64.pow(2).mean().sqrt().clamp_min(1e-30)
    return float((out64 - ref64).pow(2).mean().sqrt() / denom)


def assert_close(name: str, ref: torch.Tensor, out: torch.Tensor, tol: float | None = None) -> float:
    """Assert ``rel_err(ref, out) <= tol`` (default: REL_TOL for ``out``'s dtype); return the error."""
    tol = REL_TOL.get(out.dtype, 1e-5) if tol is None else tol
    err = rel_err(ref, out)
    if not err <= tol:
        bad = (~torch.isfinite(out)).sum().item()
        extra = f"; {bad} non-finite values (poisoned memory never written?)" if bad else ""
        raise AssertionError(f"{name}: relative error {err:.3e} > tolerance {tol:.1e}{extra}")
    return err


def poisoned(shape, dtype=torch.float32, device="cpu") -> torch.Tensor:
    """A tensor full of NaN (or the integer minimum)."""
    if dtype.is_floating_point:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.full(shape, torch.iinfo(dtype).min, dtype=dtype, device=device)


def _poison(t: torch.Tensor) -> torch.Tensor:
    if t.is_floating_point():
        return t.fill_(float("nan"))
    if t.dtype != torch.bool:
        return t.fill_(torch.iinfo(t.dtype).min)
    return t


@contextlib.contextmanager
def poisoned_allocations() -> Iterator[None]:
    """Inside the block, ``torch.empty`` and ``torch.empty_like`` hand out poisoned memory (see the module
    docstring). Restores both on exit."""
    empty, empty_like = torch.empty, torch.empty_like
    torch.empty = lambda *a, **k: _poison(empty(*a, **k))  # noqa: E731
    torch.empty_like = lambda *a, **k: _poison(empty_like(*a, **k))  # noqa: E731
    try:
        yield
    finally:
        torch.empty, torch.empty_like = empty, empty_like
