"""release-solutions: refused (nothing written) before an exercise's deadline or without one, written after it;
the file is the master without its markers and runs; hidden checks never appear; the command line says so."""

from __future__ import annotations

import datetime as dt
import io
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from glmkit.grading import main as grading_main
from glmkit.grading.exercise import BEGIN, END, load_exercise
from glmkit.grading.solutions import read_deadline, release_solutions, solution_source

REPO = Path(__file__).resolve().parents[2]
EX01 = REPO / "tests" / "grading" / "fixture_exercises" / "01_blank_infilling"
UTC = dt.timezone.utc


def _exercises(tmp_path: Path, deadline: str | None) -> Path:
    root = tmp_path / "exercises"
    shutil.copytree(EX01, root / EX01.name)
    if deadline is not None:
        toml = root / EX01.name / "exercise.toml"
        toml.write_text(toml.read_text().replace("points = 21", f"deadline = {deadline}\npoints = 21"))
    return root


def test_refused_before_the_deadline_and_without_one(tmp_path):
    root = _exercises(tmp_path / "a", "2030-01-10T23:59:00+01:00")
    log = io.StringIO()
    problems = release_solutions(root, tmp_path / "out", now=dt.datetime(2030, 1, 10, 22, 0, tzinfo=UTC), out=log)
    assert problems and "has not passed" in problems[0] and "2030-01-10T23:59:00+01:00" in problems[0]
    assert "REFUSED (nothing was written)" in log.getvalue() and not (tmp_path / "out").exists()
    root = _exercises(tmp_path / "b", None)
    problems = release_solutions(root, tmp_path / "out", now=dt.datetime(2031, 1, 1, tzinfo=UTC), out=io.StringIO())
    assert problems and "no deadline" in problems[0] and not (tmp_path / "out").exists()
    assert release_solutions(root, tmp_path / "early", early=True, out=io.StringIO()) == []


def test_after_the_deadline_the_master_without_markers_is_released(tmp_path):
    root = _exercises(tmp_path, "2030-01-10T23:59:00+01:00")
    assert read_deadline(load_exercise(root / EX01.name)) == dt.datetime(2030, 1, 10, 22, 59, tzinfo=UTC)
    out = tmp_path / "out"
    assert release_solutions(root, out, now=dt.datetime(2030, 1, 10, 23, 0, tzinfo=UTC), out=io.StringIO()) == []
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert files == [f"{EX01.name}/ex01_solution.py"]
    text = (out / EX01.name / "ex01_solution.py").read_text()
    master = (EX01 / "ex01.py").read_text()
    assert BEGIN not in text and END not in text and "NotImplementedError" not in text
    assert solution_source(master) in text and "row0 += [mask_pos[k]] * (e - s + 1)" in text
    hidden = (EX01 / "hidden_checks.py").read_text()
    assert "shuffled_order" in hidden and "shuffled_order" not in text
    # the released file is a working solution
    run = subprocess.run(
        [
            sys.executable,
            "-c",
            "import ex01_solution as m, torch; print(m.glm_mask(torch.tensor([2]), 3).int().tolist())",
        ],
        cwd=out / EX01.name,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0 and run.stdout.strip() == "[[[1, 1, 0], [1, 1, 0], [1, 1, 1]]]", run.stderr


def test_a_deadline_without_time_zone_is_refused(tmp_path):
    root = _exercises(tmp_path, "2030-01-10T23:59:00")
    problems = release_solutions(root, tmp_path / "out", now=dt.datetime(2031, 1, 1, tzinfo=UTC), out=io.StringIO())
    assert problems and "time zone" in problems[0]


def test_command_line(tmp_path, capsys):
    root = _exercises(tmp_path, "2030-01-10T23:59:00+00:00")
    argv = ["release-solutions", "--exercises-dir", str(root), "--out", str(tmp_path / "o")]
    assert grading_main([*argv, "--now", "2030-01-09T00:00:00+00:00"]) == 1
    assert "has not passed" in capsys.readouterr().out
    assert grading_main([*argv, "--now", "2030-01-09T00:00:00"]) == 2  # no time zone
    assert grading_main([*argv, "--now", "2030-01-11T00:00:00+00:00"]) == 0
    assert (tmp_path / "o" / EX01.name / "ex01_solution.py").is_file()
    with pytest.raises(SystemExit):
        grading_main(["release-solutions", "--help"])
    assert "deadline" in capsys.readouterr().out
