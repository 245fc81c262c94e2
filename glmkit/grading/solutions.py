"""Releasing the master solutions once an exercise's deadline has passed (``release-solutions``).

Each exercise may set ``deadline`` in its exercise.toml, a TOML date-time with its time zone
(``deadline = 2026-12-15T23:59:00+01:00``). ``release_solutions`` writes, for every chosen exercise whose deadline
has passed, ``OUT/<folder>/<module>_solution.py``: the master with its ``# BEGIN SOLUTION`` / ``# END SOLUTION``
marker lines removed, so the learners get the code the checks were validated against. It refuses, and writes
nothing at all, when any chosen exercise has no deadline or one still ahead (``early=True`` overrides that, for an
instructor who means it), and it checks that what it wrote names no hidden check and carries no hidden-check code:
the hidden checks stay secret for the next class.

How it differs from ``release``: ``release`` ships stubs before the work; this ships the answers after it.
"""

from __future__ import annotations

import datetime as dt
import re
import sys
from pathlib import Path

from glmkit.grading.exercise import (
    BEGIN,
    END,
    HIDDEN_FILE,
    PUBLIC_FILE,
    SETTINGS_FILE,
    Exercise,
    find_exercises,
    tomllib,
)


def read_deadline(ex: Exercise) -> dt.datetime | None:
    """The exercise's deadline (aware datetime), or None when exercise.toml sets none."""
    cfg = tomllib.loads((ex.path / SETTINGS_FILE).read_text())
    raw = cfg.get("deadline")
    if raw is None:
        return None
    if isinstance(raw, str):
        try:
            raw = dt.datetime.fromisoformat(raw)
        except ValueError:
            raise ValueError(f"{ex.path / SETTINGS_FILE}: deadline {raw!r} is not an ISO date-time") from None
    if not isinstance(raw, dt.datetime) or raw.tzinfo is None:
        raise ValueError(
            f"{ex.path / SETTINGS_FILE}: deadline must be a date-time with its time zone, e.g. "
            f"deadline = 2026-12-15T23:59:00+01:00 (got {raw!r})"
        )
    return raw


def solution_source(master: str) -> str:
    """The master without its solution-marker lines (the solutions themselves stay)."""
    kept = [ln for ln in master.splitlines() if not ln.strip().startswith((BEGIN, END))]
    return "\n".join(kept) + "\n"


def _hidden_lines(ex: Exercise) -> list[str]:
    """Distinctive lines of the hidden checks: not comments or imports, not shared with the public checks."""
    path = ex.path / HIDDEN_FILE
    if not path.is_file():
        return []
    public = ex.path / PUBLIC_FILE
    shared = {ln.strip() for ln in public.read_text().splitlines()} if public.is_file() else set()
    return [
        s.strip()
        for s in path.read_text().splitlines()
        if len(s.strip()) >= 25 and not s.strip().startswith(("#", "import ", "from ")) and s.strip() not in shared
    ]


def release_solutions(
    exercises_dir: Path,
    out_dir: Path,
    ids: list[str] | None = None,
    *,
    now: dt.datetime | None = None,
    early: bool = False,
    out=None,
) -> list[str]:
    """Write the solutions of the chosen exercises (default: all) to ``out_dir`` if every deadline has passed;
    returns the problems (empty = written)."""
    out = out or sys.stdout
    now = now or dt.datetime.now(dt.timezone.utc)
    if now.tzinfo is None:
        raise ValueError("now must carry a time zone")
    exercises = find_exercises(exercises_dir, ids)
    problems = []
    for ex in exercises:
        try:
            deadline = read_deadline(ex)
        except ValueError as e:
            problems.append(str(e))
            continue
        if early:
            continue
        if deadline is None:
            problems.append(
                f"exercise {ex.id}: no deadline in {SETTINGS_FILE} (add e.g. deadline = 2026-12-15T23:59:00+01:00, "
                f"or pass --before-deadline to release anyway)"
            )
        elif now < deadline:
            problems.append(
                f"exercise {ex.id}: its deadline {deadline.isoformat()} has not passed (now {now.isoformat()})"
            )
    if problems:
        print("release-solutions REFUSED (nothing was written):\n  " + "\n  ".join(problems), file=out)
        return problems
    written = []
    for ex in exercises:
        dest = Path(out_dir) / ex.path.name
        dest.mkdir(parents=True, exist_ok=True)
        text = (
            f"# Solution of exercise {ex.id}: {ex.title}\n"
            f"# Released after the deadline; the code the grader's checks were validated against.\n"
            + solution_source((ex.path / ex.student_file).read_text())
        )
        hidden = _hidden_lines(ex)
        leaks = [c.name for c in ex.hidden if re.search(rf"\b{re.escape(c.name)}\b", text)]
        leaks += [ln[:60] for ln in hidden if ln in {s.strip() for s in text.splitlines()}]
        if leaks:
            problems.append(f"exercise {ex.id}: the solution file would show hidden checks: {leaks}")
            continue
        target = dest / f"{ex.module}_solution.py"
        target.write_text(text)
        written.append(target)
    if problems:
        for p in written:
            p.unlink()
        print("release-solutions REFUSED:\n  " + "\n  ".join(problems), file=out)
        return problems
    for p in written:
        print(f"released {p}", file=out)
    return []


__all__ = ["read_deadline", "solution_source", "release_solutions"]
