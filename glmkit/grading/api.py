"""What an exercise's ``checks.py`` / ``hidden_checks.py`` is written with.

A check is a function of a :class:`Ctx`, declared with its points, time limit and teaching message in one
place::

    @Check(points=2, timeout=10, message="Part B's position row should repeat ...")
    def positions_shuffled(ctx):
        tokens, spans, order = random_case(ctx.rng)
        got = ctx.call("position_rows", len(tokens), spans, order)     # runs in the student's process
        want = reference(...)                                           # runs here, in the grader
        ctx.expect_tensor("position_rows(...)", got, want)

``ctx.call`` sends the *inputs* to the student's process and returns the answer as plain data rebuilt in
the grading process; the expected value is computed here from glmkit's reference, never stored. The
``expect_*`` helpers raise :class:`CheckFailed` with a *summary* (which part is wrong, never values) and a
*detail* (values, indices, inputs). Feedback for a hidden check shows its ``message`` and the summary only;
a public check also shows the detail, since its inputs are the learner's to see anyway.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch


class CheckFailed(AssertionError):
    """A wrong answer. ``summary`` must not contain data; ``detail`` may (shown for public checks only)."""

    def __init__(self, summary: str, detail: str = ""):
        super().__init__(summary)
        self.summary, self.detail = summary, detail


class StudentError(Exception):
    """The student's function raised, was missing, or its process stopped; set by ``Ctx.call``."""

    def __init__(self, status: str, summary: str, detail: str = ""):
        super().__init__(summary)
        self.status, self.summary, self.detail = status, summary, detail


@dataclass
class Check:
    """A graded check: ``points``, wall-clock ``timeout`` in seconds, and the teaching ``message`` shown
    when it fails. ``hidden=True`` only in ``hidden_checks.py`` (``validate`` enforces it). ``title`` is
    what the learner sees for a public check (default: the function's name)."""

    points: float
    timeout: float
    message: str
    hidden: bool = False
    title: str = ""
    name: str = ""
    fn: Callable | None = field(default=None, repr=False)

    def __call__(self, fn: Callable) -> Check:
        self.fn, self.name = fn, fn.__name__
        self.title = self.title or fn.__name__.replace("_", " ")
        return self


def _short(t: Any, n: int = 24, at: int = 0) -> str:
    """A tensor's flattened values around flat index ``at`` (where the first difference is)."""
    if isinstance(t, torch.Tensor):
        flat = t.reshape(-1).tolist()
        lo = max(0, min(at - n // 2, len(flat) - n))
        s = ", ".join(str(int(x) if t.dtype == torch.bool else x) for x in flat[lo : lo + n])
        return (
            f"[{'..., ' if lo > 0 else ''}{s}{', ...' if lo + n < len(flat) else ''}] "
            f"(flat {lo}..{min(lo + n, len(flat)) - 1} of shape {list(t.shape)}, {str(t.dtype)[6:]})"
        )
    return repr(t)[:200]


class Ctx:
    """What a check function receives: a seeded ``rng`` (``random.Random``), a seeded torch ``gen``,
    ``call`` to run a student function, and comparison helpers."""

    def __init__(self, caller: Callable, seed: int, inputs_note: Callable[[str], None] | None = None):
        self._caller = caller
        self.seed = seed
        self.rng = random.Random(seed)
        self.gen = torch.Generator().manual_seed(seed)
        self._note = inputs_note or (lambda s: None)

    def call(self, function: str, *args, **kwargs):
        """Run ``function(*args, **kwargs)`` in the student's process; returns its value as plain data
        (tensors rebuilt here) or raises :class:`StudentError`."""
        return self._caller(function, list(args), dict(kwargs))

    def note_inputs(self, text: str) -> None:
        """Describe the current inputs (shown in a *public* check's failure detail, never for hidden)."""
        self._note(text)

    def fail(self, summary: str, detail: str = ""):
        raise CheckFailed(summary, detail)

    # -- helpers ------------------------------------------------------------------------------------------
    def expect_tuple(self, what: str, got, n: int) -> tuple:
        if not isinstance(got, (tuple, list)) or len(got) != n:
            kind = type(got).__name__ if not isinstance(got, (tuple, list)) else f"{len(got)} values"
            raise CheckFailed(f"{what} should return {n} values", f"it returned {kind}")
        return tuple(got)

    def expect_int(self, what: str, got, expected: int) -> None:
        if type(got) is not int:
            raise CheckFailed(
                f"{what} should be a Python int", f"got {type(got).__name__} (use int(...) on a 0-d tensor)"
            )
        if got != int(expected):
            raise CheckFailed(f"{what} has the wrong value", f"expected {int(expected)}, got {got}")

    def expect_tensor(self, what: str, got, expected: torch.Tensor, *, tol: float | None = None) -> None:
        """Type, dtype, shape, then values (exact for integer/bool dtypes; relative error for floats)."""
        if not isinstance(got, torch.Tensor):
            raise CheckFailed(f"{what} should be a torch tensor", f"got {got!r}"[:200])
        if got.dtype != expected.dtype:
            raise CheckFailed(
                f"{what} has the wrong dtype", f"expected {str(expected.dtype)[6:]}, got {str(got.dtype)[6:]}"
            )
        if tuple(got.shape) != tuple(expected.shape):
            raise CheckFailed(f"{what} has the wrong shape", f"expected {list(expected.shape)}, got {list(got.shape)}")
        if expected.dtype.is_floating_point:
            from glmkit.testing import rel_err

            err = rel_err(expected, got)
            if not err <= (tol if tol is not None else 1e-5):
                raise CheckFailed(f"{what} has wrong values", f"relative error {err:.2e}")
            return
        if not torch.equal(got, expected):
            bad = (got != expected).nonzero()
            first = tuple(int(i) for i in bad[0])
            at = int((got != expected).reshape(-1).nonzero()[0])
            raise CheckFailed(
                f"{what} has wrong values",
                f"{len(bad)} of {expected.numel()} entries differ; first at index {list(first)}: "
                f"expected {expected[first].item()}, got {got[first].item()}\n"
                f"      expected {_short(expected, at=at)}\n      got      {_short(got, at=at)}",
            )
