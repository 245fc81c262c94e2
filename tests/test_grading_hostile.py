"""Hostile submissions: each must end as a recorded failure or timeout for that student alone, the
gradebook complete, every other student graded correctly, no process left behind, no file of anyone
else touched. The fixtures are in tests/hostile/ (one student's ex01.py each).

Time limits are shrunk (12 s per submission) and four submissions run at a time; the whole file takes
well under two minutes on 2 cores.
"""

from __future__ import annotations

import csv
import io
import os
import shutil
from pathlib import Path

import pytest

from glmkit.grading.commands import autograde
from glmkit.grading.exercise import load_exercise

REPO = Path(__file__).resolve().parents[1]
EXERCISES = REPO / "exercises"
EX01 = EXERCISES / "01_blank_infilling"
HOSTILE = Path(__file__).parent / "hostile"
LIMITS = {"total_timeout": 12, "startup_timeout": 12}
MARK = "glmkit-hostile-child"
FULL = 21

# student -> (allowed statuses, points, flags that must be present)
EXPECTED = {
    "infinite_loop": ({"timeout"}, 0, set()),
    "sleep_forever": ({"timeout"}, 0, set()),
    "os_exit_import": ({"crashed"}, 0, set()),
    "sys_exit_import": ({"import-error"}, 0, set()),
    "raise_exits": ({"graded"}, 0, set()),
    "keyboard_interrupt_import": ({"import-error"}, 0, set()),
    "print_1gb": ({"output-limit"}, 0, set()),
    "memory_hog": ({"graded", "crashed", "timeout"}, 0, set()),   # MemoryError, or the budget spent zeroing
    "spawn_children": ({"graded"}, 0, {"blocked-actions"}),
    "read_instructor_files": ({"graded"}, 0, {"blocked-actions"}),
    # patching builtins.isinstance breaks its own worker's reply encoder: "crashed" is its own doing
    "monkeypatch_grader": ({"graded", "crashed"}, 0, set()),
    "lying_objects": ({"graded"}, 0, set()),
    "syntax_error": ({"import-error"}, 0, set()),
    "imports_reference": ({"graded"}, FULL, {"reference-import"}),
    "sneaky_reference": ({"graded"}, FULL, {"reference-import"}),
    "kill_grader": ({"graded"}, 0, {"blocked-actions"}),
}
GOOD = ["good_a", "good_b", "good_c"]


def _strays() -> list[str]:
    found = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                cmd = Path(f"/proc/{d}/cmdline").read_bytes()
            except OSError:
                continue
            if MARK.encode() in cmd:
                found.append(d)
    return found


def _rows(out: Path) -> dict[str, dict]:
    return {r["student"]: r for r in csv.DictReader(io.StringIO((out / "gradebook.csv").read_text()))}


@pytest.fixture(scope="module")
def graded(tmp_path_factory):
    subs = tmp_path_factory.mktemp("submissions")
    out = tmp_path_factory.mktemp("grades")
    for name in EXPECTED:
        (subs / name).mkdir()
        shutil.copy(HOSTILE / f"{name}.py", subs / name / "ex01.py")
    master = (EX01 / "ex01.py").read_text()
    for name in GOOD:
        (subs / name).mkdir()
    (subs / "good_a" / "ex01.py").write_text(master)
    (subs / "good_b" / "work").mkdir()
    (subs / "good_b" / "work" / "ex01 (2).py").write_text(master)     # renamed, in a sub-folder
    (subs / "good_c" / "ex01.py").write_text(master)
    log = io.StringIO()
    rows = autograde(subs, out, exercises_dir=EXERCISES, ids=["01"], jobs=4, limits=LIMITS, out=log)
    return subs, out, rows, log.getvalue()


def test_gradebook_complete_and_good_students_unaffected(graded):
    subs, out, rows, log = graded
    book = _rows(out)
    assert set(book) == set(EXPECTED) | set(GOOD), log
    for name in GOOD:
        assert book[name]["points"] == str(FULL) and book[name]["status"] == "graded", (name, book[name], log)
        assert book[name]["flags"] == "", book[name]


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_each_hostile_submission_is_contained(graded, name):
    subs, out, rows, log = graded
    statuses, points, flags = EXPECTED[name]
    row = _rows(out)[name]
    assert row["status"] in statuses, (name, row)
    assert float(row["points"]) == points, (name, row)
    assert flags <= set(filter(None, row["flags"].split(";"))), (name, row)
    assert (out / "feedback" / f"{name}.md").is_file()


def test_flagged_submissions_say_so_in_feedback(graded):
    subs, out, rows, log = graded
    for name in ("imports_reference", "sneaky_reference"):
        text = (out / "feedback" / f"{name}.md").read_text()
        assert "FLAGGED" in text and "reference implementation" in text


def test_no_process_survives(graded):
    from glmkit.grading.sandbox import stray_processes

    assert _strays() == []
    assert stray_processes(None) == []


def test_children_are_killed_even_without_the_audit_hook(tmp_path):
    """With the Python-level tripwire off, the children really start; the process-group kill and the
    /proc sweep must still leave nothing behind."""
    (tmp_path / "subs" / "spawner").mkdir(parents=True)
    shutil.copy(HOSTILE / "spawn_children.py", tmp_path / "subs" / "spawner" / "ex01.py")
    autograde(tmp_path / "subs", tmp_path / "out", exercises_dir=EXERCISES, ids=["01"], limits=LIMITS,
              audit_hook=False, out=io.StringIO())
    assert _rows(tmp_path / "out")["spawner"]["points"] == "0"
    assert _strays() == []


def test_feedback_never_shows_hidden_checks(graded):
    subs, out, rows, log = graded
    ex = load_exercise(EX01)
    hidden_src = (EX01 / "hidden_checks.py").read_text()
    for fb in (out / "feedback").glob("*.md"):
        text = fb.read_text()
        for c in ex.hidden:
            assert c.name not in text, (fb.name, c.name)
        assert "load_sibling" not in text and "hidden_checks" not in text
        assert hidden_src[:200] not in text


def test_writing_grades_and_other_students_files_is_blocked(graded):
    subs, out, rows, log = graded
    victim_files = [out / "gradebook.csv", out / "results" / "good_a.json", out / "feedback" / "good_a.md",
                    subs / "good_a" / "ex01.py"]
    before = {p: p.read_bytes() for p in victim_files}
    src = (HOSTILE / "write_outside.py").read_text()
    for placeholder, p in zip(["__GRADEBOOK__", "__VICTIM_RESULTS__", "__VICTIM_FEEDBACK__",
                               "__VICTIM_SUBMISSION__"], victim_files):
        src = src.replace(placeholder, str(p))
    (subs / "writer").mkdir()
    (subs / "writer" / "ex01.py").write_text(src)
    autograde(subs, out, exercises_dir=EXERCISES, ids=["01"], student="writer", limits=LIMITS, out=io.StringIO())
    for p in victim_files[1:]:
        assert p.read_bytes() == before[p], p
    book = _rows(out)
    old = {r["student"]: r for r in csv.DictReader(io.StringIO(before[victim_files[0]].decode()))}
    for name, row in old.items():
        assert book[name] == row, name
    assert book["writer"]["points"] == "0" and "blocked-actions" in book["writer"]["flags"], book["writer"]
    shutil.rmtree(subs / "writer")
