"""The graded-exercise system on exercise 01: meta-tests (master passes, stub fails, release leaks
nothing, a broken master is refused), the learner's self-check, autograde (missing/empty/partial/renamed
files, idempotent re-runs, one-student re-grades) and the strict wire decoder. Hostile submissions are in
test_grading_hostile.py."""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from glmkit.grading import main as grading_main
from glmkit.grading.commands import (
    _cell,
    autograde,
    feedback_stem,
    printable,
    release,
    render_feedback,
    self_check,
    validate,
    verify_release,
)
from glmkit.grading.exercise import (
    ExerciseError,
    Refused,
    load_exercise,
    locate_submission,
    notebook_to_source,
    read_regular,
    reference_imports,
    solution_lines,
    stub_source,
)
from glmkit.grading.runner import ExerciseResult
from glmkit.grading.sandbox import BadValue, decode_value

REPO = Path(__file__).resolve().parents[2]
EXERCISES = Path(os.environ.get("GLMKIT_EXERCISES") or REPO / "tests" / "grading" / "fixture_exercises")
EX01 = EXERCISES / "01_blank_infilling"
FAST = {"total_timeout": 30, "startup_timeout": 30}


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    out = tmp_path_factory.mktemp("release")
    log = io.StringIO()
    problems = release(EXERCISES, out, force=True, out=log)
    assert problems == [], log.getvalue()
    return out, log.getvalue()


def test_validate_master_passes_every_check_and_stub_fails_every_check():
    log = io.StringIO()
    assert validate(EXERCISES, out=log) == [], log.getvalue()
    text = log.getvalue()
    assert "master ex01.py: 21/21 points" in text
    assert "stub: 0/21 points, 11/11 checks say 'not implemented yet'" in text


def test_exercise_settings_are_consistent():
    ex = load_exercise(EX01)
    assert sum(c.points for c in ex.checks) == ex.points == 21
    assert ex.public and ex.hidden and all(c.hidden for c in ex.hidden)
    assert all(c.message.strip() and c.timeout > 0 for c in ex.checks)


def test_release_contains_exactly_the_student_files(released):
    out, log = released
    d = out / "01_blank_infilling"
    assert sorted(p.name for p in d.iterdir()) == ["checks.py", "ex01.ipynb", "ex01.py", "exercise.toml"]
    assert (out / "README.md").is_file()
    stub = (d / "ex01.py").read_text()
    for fn in ("part_a_b", "position_rows", "glm_mask"):
        assert f'NotImplementedError("ex01.{fn}: not implemented yet' in stub
    assert "BEGIN SOLUTION" not in stub and "END SOLUTION" not in stub
    master = (EX01 / "ex01.py").read_text()
    for line in solution_lines(master):
        assert line not in stub
    nb = json.loads((d / "ex01.ipynb").read_text())
    assert all(c.get("outputs", []) == [] for c in nb["cells"] if c["cell_type"] == "code")
    assert verify_release(out, [load_exercise(EX01)]) == []
    assert "verified: no solution code, no hidden check" in log


def test_release_contains_no_hidden_check(released):
    out, _ = released
    ex = load_exercise(EX01)
    hidden_src = (EX01 / "hidden_checks.py").read_text()
    for f in (out / "01_blank_infilling").iterdir():
        text = f.read_text()
        for c in ex.hidden:
            assert c.name not in text, (f.name, c.name)
        assert "hidden=True" not in text
    assert not list(out.rglob("hidden_checks*"))
    assert len(hidden_src) > 500  # the instructor side does have them


def test_released_stub_fails_with_not_implemented_yet(released):
    out, _ = released
    log = io.StringIO()
    assert self_check(out / "01_blank_infilling", seed=1, out=log, limits=FAST) is False
    text = log.getvalue()
    assert text.count("not implemented yet") == 6
    assert "Public checks: 0 of 6 pass (0 of 12 points)." in text
    assert "hidden checks worth 9 more points (21 in all) are run as well" in text
    assert "FLAGGED" not in text


def test_self_check_on_the_master_passes_and_still_mentions_hidden_checks(tmp_path):
    d = tmp_path / "01_blank_infilling"
    shutil.copytree(EX01, d, ignore=shutil.ignore_patterns("hidden_checks.py", "__pycache__"))
    log = io.StringIO()
    assert self_check(d, seed=7, out=log, limits=FAST) is True, log.getvalue()
    text = log.getvalue()
    assert "Public checks: 6 of 6 pass (12 of 12 points)." in text
    assert "does not guarantee full marks" in text


def test_self_check_failure_teaches_and_shows_public_inputs(tmp_path):
    d = tmp_path / "ex"
    shutil.copytree(EX01, d, ignore=shutil.ignore_patterns("hidden_checks.py", "__pycache__"))
    src = (d / "ex01.py").read_text().replace("row0 += [mask_pos[k]] * (e - s + 1)", "row0 += [s] * (e - s + 1)")
    (d / "ex01.py").write_text(src)
    log = io.StringIO()
    assert self_check(d, seed=3, out=log, limits=FAST) is False
    text = log.getvalue()
    assert "FAIL  random texts: position rows" in text
    assert "Part-A position is its span's start minus what earlier spans lost" in text
    assert "inputs: n=" in text


def _broken_copy(tmp_path: Path, old: str, new: str) -> Path:
    root = tmp_path / "exercises"
    shutil.copytree(EX01, root / EX01.name, ignore=shutil.ignore_patterns("__pycache__"))
    p = root / EX01.name / "ex01.py"
    src = p.read_text()
    assert old in src
    p.write_text(src.replace(old, new))
    return root


def test_release_with_a_broken_master_is_refused_with_the_reason(tmp_path):
    root = _broken_copy(tmp_path, "return causal[None] | part_a", "return causal[None] & part_a")
    log = io.StringIO()
    problems = release(root, tmp_path / "out", out=log)
    assert any("fails on the master solution" in p and "worked_example_mask" in p for p in problems)
    assert "release REFUSED" in log.getvalue()
    assert not (tmp_path / "out").exists()


def test_release_with_an_unmarked_function_is_refused(tmp_path):
    root = _broken_copy(tmp_path, "    # BEGIN SOLUTION\n    i = torch.arange(T)", "    i = torch.arange(T)")
    src = (root / EX01.name / "ex01.py").read_text()
    # drop the now-unmatched END marker of glm_mask
    idx = src.rindex("    # END SOLUTION\n")
    (root / EX01.name / "ex01.py").write_text(src[:idx] + src[idx + len("    # END SOLUTION\n") :])
    problems = release(root, tmp_path / "out", out=io.StringIO())
    assert any("no # BEGIN SOLUTION region in glm_mask" in p for p in problems), problems


def test_markers_are_checked():
    with pytest.raises(ExerciseError, match="without # END SOLUTION"):
        stub_source("def f():\n    # BEGIN SOLUTION\n    return 1\n", "m")
    with pytest.raises(ExerciseError, match="inside a function"):
        stub_source("# BEGIN SOLUTION\nx = 1\n# END SOLUTION\n", "m")
    stub = stub_source("def f(x):\n    '''doc'''\n    # BEGIN SOLUTION\n    return x + 1\n    # END SOLUTION\n", "m")
    assert 'raise NotImplementedError("m.f: not implemented yet' in stub and "x + 1" not in stub


# ---------------------------------------------------------------------------------------------------------
# autograde


def _submissions(root: Path) -> Path:
    master = (EX01 / "ex01.py").read_text()
    stub = stub_source(master, "ex01")
    partial = master.replace(
        "    i = torch.arange(T)\n", "    raise NotImplementedError('ex01.glm_mask: not implemented yet')\n"
    )
    for name in ("alice", "bob", "carol", "dave", "erin", "frank", "gina"):
        (root / name).mkdir(parents=True)
    (root / "alice" / "ex01.py").write_text(master)
    (root / "bob" / "ex01.py").write_text(partial)
    defs = master.split("IGNORE = -100")[1].join(["IGNORE = -100", ""])
    cells = [
        {"cell_type": "code", "metadata": {}, "outputs": [], "execution_count": None, "source": src}
        for src in ["%load_ext autoreload\nimport torch", defs, "from glmkit.grading import self_check\nself_check()"]
    ]
    nb = {"cells": cells, "metadata": {}, "nbformat": 4, "nbformat_minor": 5}
    (root / "carol" / "ex01.ipynb").write_text(json.dumps(nb))  # functions in the notebook
    (root / "dave" / "ex01.py").write_text("# I did not finish\n")  # empty
    (root / "erin" / "notes.txt").write_text("sorry")  # missing
    (root / "frank" / "Ex01 (1).py").write_text(stub)  # renamed, unfinished
    (root / "gina" / "solution_v2.py").write_text(master)  # renamed, complete
    return root


def _book(out: Path) -> dict:
    return {r["student"]: r for r in csv.DictReader(io.StringIO((out / "gradebook.csv").read_text()))}


def test_autograde_handles_missing_empty_partial_renamed(tmp_path):
    subs = _submissions(tmp_path / "subs")
    out = tmp_path / "out"
    autograde(subs, out, exercises_dir=EXERCISES, ids=["01"], jobs=2, limits=FAST, out=io.StringIO())
    text = (out / "gradebook.csv").read_text()
    assert text.splitlines()[0] == "student,exercise,points,max_points,status,flags,notes,isolation,feedback"
    book = _book(out)
    got = {n: (r["points"], r["status"]) for n, r in book.items()}
    assert got == {
        "alice": ("21", "graded"),
        "bob": ("15", "graded"),
        "carol": ("21", "graded"),
        "dave": ("0", "empty"),
        "erin": ("0", "missing"),
        "frank": ("0", "graded"),
        "gina": ("21", "graded"),
    }
    assert "renamed" in book["frank"]["notes"] and "solution_v2.py" in book["gina"]["notes"]
    assert "ex01.ipynb" in book["carol"]["notes"]
    assert all(r["max_points"] == "21" for r in book.values())
    fb = (out / "feedback" / "bob.md").read_text()
    assert "15 / 21 points" in fb and "hidden check" in fb and "not implemented yet" in fb
    assert sorted(p.stem for p in (out / "feedback").glob("*.md")) == sorted(book)

    # idempotent: a second run writes the same gradebook and feedback
    before = {p: p.read_bytes() for p in [out / "gradebook.csv", *(out / "feedback").glob("*.md")]}
    autograde(subs, out, exercises_dir=EXERCISES, ids=["01"], jobs=2, limits=FAST, out=io.StringIO())
    assert {p: p.read_bytes() for p in before} == before

    # re-grading one student leaves everyone else's rows and files alone
    (subs / "bob" / "ex01.py").write_text((EX01 / "ex01.py").read_text())
    others = {
        p: (p.read_bytes(), p.stat().st_mtime_ns)
        for d in ("feedback", "results")
        for p in (out / d).iterdir()
        if not p.name.startswith("bob")
    }
    autograde(subs, out, exercises_dir=EXERCISES, ids=["01"], student="bob", limits=FAST, out=io.StringIO())
    after = _book(out)
    assert after["bob"]["points"] == "21"
    assert {n: r for n, r in after.items() if n != "bob"} == {n: r for n, r in book.items() if n != "bob"}
    assert {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in others} == others


def test_feedback_for_hidden_checks_shows_no_student_data():
    res = ExerciseResult("01", "t", 3).to_dict()
    res["checks"] = [
        {
            "name": "secret_edge_case",
            "title": "secret edge case",
            "hidden": True,
            "max_points": 1,
            "points": 0,
            "status": "not implemented",
            "summary": "not implemented [1, 2, 3] leaked",
            "detail": "inputs: [1, 2, 3]",
            "message": "Spans can touch.",
            "seconds": 0,
            "grader_note": "",
        },
        {
            "name": "secret_two",
            "title": "secret two",
            "hidden": True,
            "max_points": 2,
            "points": 0,
            "status": "error",
            "summary": "part_a_b() raised Tokens_1_2_3",
            "detail": "tokens=[1, 2, 3]",
            "message": "Use the ids.",
            "seconds": 0,
            "grader_note": "",
        },
        {
            "name": "secret_three",
            "title": "secret three",
            "hidden": True,
            "max_points": 2,
            "points": 0,
            "status": "crashed",
            "summary": "your code's process exited with code 123",
            "detail": "",
            "message": "Long texts.",
            "seconds": 0,
            "grader_note": "",
        },
    ]
    text = render_feedback("x", [res])
    assert "secret" not in text and "[1, 2, 3]" not in text and "Tokens_1_2_3" not in text and "123" not in text
    assert "Spans can touch." in text and "hidden check 2 (0/2): your code raised an exception" in text
    assert "hidden check 3 (0/2): your code's process stopped" in text


def test_feedback_file_names_are_unique_and_stable():
    names = [
        "alice",
        "Ann Lee",
        feedback_stem("Ann Lee"),
        os.fsdecode(b"caf\xe9"),
        "caf\\xe9",
        "x" * 300,
        ".hidden",
        "...",
        "..",
        "=1+1",
        "a/b",
    ]
    stems = [feedback_stem(n) for n in names]
    assert len(set(stems)) == len(names) and stems == [feedback_stem(n) for n in names]
    assert stems[0] == "alice" and all(len(s) <= 64 and s[0] != "." and "/" not in s for s in stems)


def test_text_from_students_is_made_safe_for_files_terminals_and_spreadsheets():
    assert printable(os.fsdecode(b"caf\xe9")) == "caf\\xe9"
    assert printable("a\x1b[31mb\u202ec\nd") == "a\\x1b[31mb\\u202ec\\nd"
    assert printable("line 1\nline 2", multiline=True) == "line 1\nline 2"
    assert [_cell(v) for v in ("=1+1", "+1", "-2", "@SUM(1)", "\tx", "\rx", "ok", "1-2")] == [
        "'=1+1",
        "'+1",
        "'-2",
        "'@SUM(1)",
        "'\\tx",
        "'\\rx",
        "ok",
        "1-2",
    ]


def test_locating_a_submission(tmp_path):
    ex = load_exercise(EX01, with_hidden=False)
    (tmp_path / "a" / "deep").mkdir(parents=True)
    (tmp_path / "a" / "deep" / "ex01.py").write_text("def part_a_b(): pass\n")
    assert locate_submission(tmp_path / "a", ex).status == "found"
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "ex01.py").write_text("")
    assert locate_submission(tmp_path / "b", ex).status == "empty"
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "helpers.py").write_text("x = 1\n")
    (tmp_path / "c" / "mine.py").write_text("def glm_mask(sep, T): pass\n")
    loc = locate_submission(tmp_path / "c", ex)
    assert loc.status == "renamed" and loc.path.name == "mine.py"
    (tmp_path / "d").mkdir()
    assert locate_submission(tmp_path / "d", ex).status == "missing"


def test_links_fifos_and_huge_files_are_refused_without_being_read(tmp_path):
    ex = load_exercise(EX01, with_hidden=False)
    secret = tmp_path / "secret.py"
    secret.write_text("def part_a_b(): return 'secret'\n")
    for name, make in {
        "link": lambda p: os.symlink(secret, p),
        "fifo": os.mkfifo,
        "huge": lambda p: open(p, "wb").truncate(3 << 30),
    }.items():
        (tmp_path / name).mkdir()
        make(tmp_path / name / "ex01.py")
        loc = locate_submission(tmp_path / name, ex)
        assert loc.status == "refused" and loc.source == "" and "secret" not in loc.note, (name, loc)
    assert "symbolic link" in locate_submission(tmp_path / "link", ex).note
    (tmp_path / "mixed").mkdir()  # a regular file is graded; the link beside it is not read
    (tmp_path / "mixed" / "ex01.py").write_text("def part_a_b(): pass\n")
    os.symlink(secret, tmp_path / "mixed" / "solution.py")
    loc = locate_submission(tmp_path / "mixed", ex)
    assert loc.status == "found" and loc.flags == ["symlink"] and "solution.py" in loc.note
    with pytest.raises(Refused, match="too large"):
        read_regular(tmp_path / "huge" / "ex01.py", 2_000_000)


def test_notebook_extraction_keeps_definitions_only():
    nb = {
        "cells": [
            {
                "cell_type": "code",
                "source": "import torch\n!pip install x\nprint('run me')\n"
                "def glm_mask(sep, T):\n    return 1\nglm_mask(1, 2)",
            }
        ]
    }
    src = notebook_to_source(json.dumps(nb))
    assert "import torch" in src and "def glm_mask" in src
    assert "print" not in src and "pip" not in src and "glm_mask(1, 2)" not in src


def test_static_reference_scan():
    mods = ["glmkit.blank_infilling"]
    assert reference_imports("from glmkit.blank_infilling import build_example\n", mods)
    assert reference_imports("import glmkit.blank_infilling as b\n", mods)
    assert reference_imports("from glmkit import blank_infilling\n", mods)
    assert reference_imports("import importlib\nm = importlib.import_module('glmkit.blank_infilling')\n", mods)
    assert reference_imports("import glmkit\nglmkit.blank_infilling.attention_mask\n", mods)
    assert not reference_imports('"""Do not import glmkit.blank_infilling."""\nimport torch\n', mods)


def test_wire_decoder_is_strict():
    t = decode_value({"__t__": "tensor", "dtype": "int64", "shape": [2, 2], "data": [1, 2, 3, 4]})
    assert type(t) is torch.Tensor and t.dtype == torch.int64 and t.tolist() == [[1, 2], [3, 4]]
    assert decode_value({"__t__": "tuple", "items": [1, [True, None]]}) == (1, [True, None])
    bad = [
        {"__t__": "pickle", "data": "gASV"},
        {"__t__": "tensor", "dtype": "int64", "shape": [3], "data": [1, 2]},
        {"__t__": "tensor", "dtype": "int64", "shape": [2], "data": [1, 2.5]},
        {"__t__": "tensor", "dtype": "bool", "shape": [1], "data": [1]},
        {"__t__": "tensor", "dtype": "int8", "shape": [1], "data": [1000]},
        {"__t__": "tensor", "dtype": "object", "shape": [1], "data": [1]},
        {"__t__": "tensor", "dtype": "int64", "shape": [10**9, 10**9], "data": []},
        {"x": 1},
    ]
    for v in bad:
        with pytest.raises(BadValue):
            decode_value(v)


@pytest.mark.parametrize("command", ["validate", "release", "check", "autograde"])
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as e:
        grading_main([command, "--help"])
    assert e.value.code == 0
    assert "usage:" in capsys.readouterr().out


def test_the_exercise_notebook_runs_top_to_bottom(released, tmp_path):
    nbclient = pytest.importorskip("nbclient")
    nbformat = pytest.importorskip("nbformat")
    out, _ = released
    d = tmp_path / "ex"
    shutil.copytree(out / "01_blank_infilling", d)
    shutil.copy(EX01 / "ex01.py", d / "ex01.py")  # a learner who finished
    nb = nbformat.read(d / "ex01.ipynb", as_version=4)
    nbclient.NotebookClient(nb, timeout=120, resources={"metadata": {"path": str(d)}}).execute()
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert "Public checks: 6 of 6 pass" in text and "hidden checks" in text
    assert "[MASK]" in text


def test_numpy_too_new_for_the_interpreter_is_named_before_grading():
    """The sandbox runs kernels under triton 3.6's interpreter, which fails under numpy >= 2.4 (seen on the
    GPU machine's numpy 2.5.2: every kernel check of exercise 04 errored). The grader says so up front."""
    from glmkit.grading.commands import numpy_warning

    w = numpy_warning("2.5.2")
    assert w is not None and "numpy 2.5.2" in w and "numpy>=1.24,<2.4" in w and "exercises 03, 04" in w
    assert numpy_warning("2.3.5") is None


def test_a_slow_sandbox_start_is_not_charged_to_the_learner(tmp_path, monkeypatch):
    """The sandbox's own start-up (before any learner code runs) can outlast a learner's whole budget on a loaded
    machine; the budget starts at the sandbox's hello, so a correct submission still gets every point."""
    import time

    from glmkit.grading import sandbox

    exchange = sandbox.Worker._exchange
    waited = []

    def slow_hello(self, data, deadline, during):
        if during == "while starting the sandbox":
            time.sleep(11.0)  # longer than the whole budget below
            waited.append(during)
        return exchange(self, data, deadline, during)

    monkeypatch.setattr(sandbox.Worker, "_exchange", slow_hello)
    subs = tmp_path / "subs"
    (subs / "alice").mkdir(parents=True)
    (subs / "alice" / "ex01.py").write_text((EX01 / "ex01.py").read_text())
    out = tmp_path / "out"
    limits = {"total_timeout": 10, "startup_timeout": 10}
    autograde(subs, out, exercises_dir=EXERCISES, ids=["01"], jobs=1, limits=limits, out=io.StringIO())
    row = _book(out)["alice"]
    assert waited and (row["points"], row["status"]) == ("21", "graded"), row
