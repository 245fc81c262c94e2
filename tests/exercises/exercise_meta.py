"""The assertion every exercise's meta-tests share, written once (imported by tests/exercises/test_exercise_NN.py)."""

from __future__ import annotations

from glmkit.grading.runner import run_checks


def with_mistake(master: str, old: str, new: str) -> str:
    """The master with one typical mistake: ``old`` (which must occur exactly once) replaced by ``new``."""
    assert master.count(old) == 1, old
    return master.replace(old, new)


def assert_loses_exactly(exercise, source: str, catching: set[str], seed: str) -> None:
    """``source`` fails exactly the checks named in ``catching``, as wrong answers (not crashes), and scores the
    exercise's points less theirs."""
    res = run_checks(exercise, source, exercise.checks, seed=seed)
    failed = {c.name for c in res.checks if c.status != "passed"}
    assert failed == catching, [(c.name, c.status, c.summary) for c in res.checks if c.status != "passed"]
    assert all(c.status == "failed" for c in res.checks if c.name in failed)  # wrong answers, not crashes
    assert res.points == exercise.points - sum(c.points for c in exercise.checks if c.name in catching)
