"""Graded exercises: author, validate, release, self-check, autograde — with untrusted student code.

Commands (``python -m glmkit.grading <command> --help`` for each; ``glmkit.grading.main(argv)``)::

    validate   every master solution passes all its public and hidden checks; every stub fails them
    release    the student version (stubs, public checks, notebook) into a folder, verified leak-free
    release-solutions   after the deadline (exercise.toml ``deadline``): the master solutions, never hidden checks
    check      a learner's self-check: the public checks, saying plainly that hidden ones come later
    autograde  a folder of submissions -> gradebook.csv + one feedback file per student

How it differs from nbgrader/otter (shared/reference/course-anchors.md §1.10-1.11): checks are Python
functions beside their points, time limit and teaching message; the student's code runs in its own
bubblewrap sandbox (own user, pid, mount, network and IPC namespaces, an unprivileged uid, a seccomp filter)
and only *answers* (plain data) cross back, so hidden checks' source, inputs and expected values never reach
the student, comparisons cannot be monkeypatched from student code, and nothing the student's code says
reaches a hidden check's feedback; the self-check never says "all tests passed" without saying that hidden
checks remain. No Docker.

The pieces: :mod:`.api` (Check, Ctx — what a checks file is written with), :mod:`.exercise` (folders,
solution markers, finding a student's file without following links), :mod:`.isolation` (the sandbox),
:mod:`.sandbox` (the worker process: limits, wire format, pipes with deadlines), :mod:`.runner` (running
checks), :mod:`.commands` (the CLI, the gradebook and feedback). See docs/instructor-guide.md.
"""

from __future__ import annotations

from glmkit.grading.api import Check, CheckFailed, Ctx  # noqa: F401
from glmkit.grading.exercise import load_sibling  # noqa: F401


def main(argv=None) -> int:
    """The command-line tool; returns the exit status."""
    from glmkit.grading.commands import main as _main

    return _main(argv)


def self_check(path=None, *, seed=None) -> bool:
    """Run the public checks of the exercise in ``path`` (default: the current folder, i.e. the
    notebook's) on the *saved* student file, print a report, and return True if all public checks pass.
    Hidden checks are run only when the work is graded."""
    from glmkit.grading.commands import self_check as _self_check

    return _self_check(path, seed=seed)
