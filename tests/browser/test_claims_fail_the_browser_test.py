"""The browser test can fail on a lesson's stated results: run it (in a subprocess, on a throwaway lessons folder)
over a one-cell notebook whose stated result does not hold, and over one whose result holds."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from browser_support import REPO

nbformat = pytest.importorskip("nbformat")  # a course extra: absent on the GPU image

pytestmark = pytest.mark.browser


def _lesson(folder: Path, holds: bool) -> None:
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.cells.append(
        nbformat.v4.new_code_cell(f'from glmkit import course\ncourse.claim("the loss falls", {holds}, "2.1 -> 1.3")')
    )
    nbformat.write(nb, folder / "00_claim.ipynb")


@pytest.mark.timeout(600)
@pytest.mark.parametrize("holds", [False, True], ids=["false-claim", "true-claim"])
def test_a_false_stated_result_fails_the_browser_test(tmp_path, holds):
    lessons = tmp_path / "lessons"
    lessons.mkdir()
    _lesson(lessons, holds)
    env = dict(os.environ, GLMKIT_LESSONS_DIR=str(lessons), GLMKIT_SCREENSHOTS=str(tmp_path / "shots"))
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-m",
            "browser",
            "-p",
            "no:cacheprovider",
            str(REPO / "tests" / "browser" / "test_lessons_browser.py"),
            "-k",
            "test_lesson_runs_in_jupyterlab",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=540,
    )
    out = run.stdout + run.stderr
    if holds:
        assert run.returncode == 0, out[-3000:]
    else:
        assert run.returncode != 0 and "stated results that do not hold" in out and "the loss falls" in out, out[-3000:]
