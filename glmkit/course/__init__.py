"""The course's tooling, apart from the library (``glmkit`` never imports it): lesson helpers here; the course map
in ``course_map``; tables and committed benchmark results in ``tables``; a lesson's stated results in ``claims``;
ready-trained lesson models in ``pretrained``; plots and widgets in ``viz``, ``viz_positions``, ``viz_blocks``,
``viz_moe``; the machine check in ``doctor``; parameter counting in ``counting``; the generations no checkpoint
needs (LayerNorm, GeGLU, 2D RoPE, DeepNorm) in ``lineage``.

Lesson helpers, the plumbing every lesson shares so notebooks stay short:

    fast_mode()         True when GLMKIT_FAST=1: CI and the browser tests shrink every lesson with it.
                        The default (unset) is the full lesson, whose run time the lesson header states.
    pick(full, fast)    the full-run value, or the CI-sized one in fast mode.
    start("01", threads=2)  sets torch's CPU threads (the lesson says why that number), prints a banner (mode,
                        device, threads, backend) and returns a LessonClock; time sections with
                        ``with clock.section("training"):`` and print the totals with ``clock.done()``.
    set_threads(n)      torch's intra-op CPU threads (``with threads(n):`` for one block)
    lesson("05")        an entry of the course map; ``lesson_map_html()`` the whole map as a table.
    table(headers, rows), show_benchmark(file, sections)   tables, and benchmarks/results/ files
    claim(text, holds)  a stated result, printed with its verdict for this run (tests fail on a false one)
"""

from __future__ import annotations

import contextlib
import os
import platform
import time
from collections.abc import Iterator

FAST_ENV = "GLMKIT_FAST"


def fast_mode() -> bool:
    """True when the environment asks for a CI-sized run (GLMKIT_FAST=1, or true/yes/on)."""
    return os.environ.get(FAST_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def pick(full, fast):
    """``full`` in a normal run, ``fast`` under GLMKIT_FAST=1 (e.g. ``steps = pick(400, 40)``)."""
    return fast if fast_mode() else full


# ----------------------------------------------------------------------------------------------------
# The lesson clock


class LessonClock:
    """Wall-clock time per section of a lesson, so a learner can compare with the stated run time."""

    def __init__(self, lesson: str):
        self.lesson = lesson
        self.t0 = time.perf_counter()
        self.sections: list[tuple[str, float]] = []

    @contextlib.contextmanager
    def section(self, name: str) -> Iterator[None]:
        t = time.perf_counter()
        try:
            yield
        finally:
            self.sections.append((name, time.perf_counter() - t))

    def elapsed(self) -> float:
        """Seconds since the lesson started."""
        return time.perf_counter() - self.t0

    def done(self) -> float:
        """Print the time of each timed section and the total; return the total in seconds."""
        total = self.elapsed()
        for name, sec in self.sections:
            print(f"  {name:<40s} {sec:7.1f} s")
        mode = "fast (GLMKIT_FAST=1)" if fast_mode() else "full"
        print(f"lesson {self.lesson} ran in {total:.0f} s ({mode} run, {_device_line()})")
        return total


def _device_line() -> str:
    try:
        import torch

        if torch.cuda.is_available():
            return f"GPU: {torch.cuda.get_device_name(0)}"
        return f"CPU: {os.cpu_count()} cores, torch threads={torch.get_num_threads()}"
    except Exception:  # pragma: no cover - torch missing: the doctor explains
        return f"CPU: {os.cpu_count()} cores"


def set_threads(n: int | None) -> int:
    """Set torch's intra-op CPU threads to ``n`` (at most the machine's cores; None: leave them) and return the
    number in force. Small models on 2 cores are sensitive to this: a lesson sets it on purpose and says why."""
    import torch

    if n is not None:
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"threads must be a positive int or None, got {n!r}")
        torch.set_num_threads(min(n, os.cpu_count() or n))
    return torch.get_num_threads()


@contextlib.contextmanager
def threads(n: int) -> Iterator[int]:
    """``with threads(1):`` run the block on ``n`` torch CPU threads; the previous number is restored after."""
    import torch

    before = torch.get_num_threads()
    try:
        yield set_threads(n)
    finally:
        torch.set_num_threads(before)


def start(lesson: str, threads: int | None = None) -> LessonClock:
    """Set the CPU threads (``threads``, see ``set_threads``), print the lesson banner (run mode, device,
    threads, kernel backend) and start the lesson clock."""
    set_threads(threads)
    mode = "FAST (GLMKIT_FAST=1: CI-sized run)" if fast_mode() else "full run"
    line = f"lesson {lesson} · {mode} · {_device_line()} · Python {platform.python_version()}"
    try:
        from glmkit import backend

        line += "\n" + backend.describe()
    except Exception:  # pragma: no cover
        pass
    print(line)
    return LessonClock(lesson)


# ----------------------------------------------------------------------------------------------------
# The course map (one place: glmkit.course.course_map), tables, benchmark files, stated results, checkpoints

from glmkit.course.claims import claim  # noqa: E402
from glmkit.course.course_map import LESSONS, Lesson, lesson, lesson_map, lesson_map_html, next_lesson  # noqa: E402
from glmkit.course.tables import show_benchmark, table  # noqa: E402

__all__ = [
    "fast_mode",
    "pick",
    "start",
    "set_threads",
    "threads",
    "LessonClock",
    "Lesson",
    "LESSONS",
    "lesson",
    "next_lesson",
    "lesson_map",
    "lesson_map_html",
    "table",
    "show_benchmark",
    "claim",
]
