"""Every notebook in lessons/ runs top to bottom without an error (GLMKIT_FAST=1 sizes), is committed
clean, states the run time that lessons/TIMINGS.md records, keeps its code lines readable (<= 100 characters),
ends with a summary, questions with answers to reveal, references and a pointer to its exercise, never shows a
graded exercise's master solution (in its source, its committed outputs, or what it prints when run), and every
result it states with ``course.claim`` holds in the run (a fast run skips the claims marked full_only).

New notebooks are picked up automatically (lessons/*.ipynb). The default (non-fast) runs are too long for
CI; they are timed by hand with nbclient or `jupyter nbconvert --execute` and recorded in TIMINGS.md.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import pytest

from glmkit.course.claims import failed_claims
from glmkit.course.course_map import LESSONS as LESSON_MAP
from glmkit.grading.exercise import solution_lines

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

LESSONS = Path(__file__).resolve().parents[2] / "lessons"
NOTEBOOKS = sorted(LESSONS.glob("[0-9][0-9]_*.ipynb"))
# The second-edition standard (readable code lines, a recap with questions and references, the glossary) holds
# for every lesson the course map calls built; a lesson being written meets it before it is flipped to built.
BUILT = [p for p in NOTEBOOKS if p.name[:2] in {les.number for les in LESSON_MAP if les.built}]
TIMEOUT_S = int(os.environ.get("GLMKIT_NOTEBOOK_TIMEOUT", "600"))  # per notebook, fast mode
EXERCISES = LESSONS.parent / "exercises"
MAX_CODE_LINE = 100  # JupyterLab cuts longer lines off at the default width
MIN_LEAK = 24  # characters: a shorter solution line is not distinctive enough to count as shown


def _ids(paths):
    return [p.stem for p in paths]


def _norm(line: str) -> str:
    return " ".join(line.split())


def _master_solution_lines() -> dict[str, str]:
    """Every distinctive line of every exercise master's solutions (whitespace-normalised) -> the exercise. Lines
    under MIN_LEAK characters ("B, H, T, D = q.shape") are common code, not a solution."""
    out = {}
    for master in sorted(EXERCISES.glob("*/ex[0-9][0-9].py")):
        for line in solution_lines(master.read_text()):
            if len(_norm(line)) >= MIN_LEAK:
                out[_norm(line)] = master.parent.name
    return out


def _leaks(text: str) -> list[str]:
    sol = _master_solution_lines()
    return sorted({f"{sol[_norm(ln)]}: {ln.strip()[:80]}" for ln in text.splitlines() if _norm(ln) in sol})


def _outputs_text(nb) -> str:
    parts = []
    for c in nb.cells:
        if c.cell_type != "code":
            continue
        for o in c.get("outputs", []):
            if "text" in o:
                parts.append(o["text"] if isinstance(o["text"], str) else "".join(o["text"]))
            for v in o.get("data", {}).values():
                if isinstance(v, str):
                    parts.append(v)
    return "\n".join(parts)


def _timings() -> dict[str, list[dict]]:
    """Rows of the TIMINGS.md table, by lesson number."""
    rows: dict[str, list[dict]] = {}
    path = LESSONS / "TIMINGS.md"
    if not path.exists():
        return rows
    header = None
    for line in path.read_text().splitlines():
        if not line.startswith("|") or set(line.replace("|", "").strip()) <= set("-: "):
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if header is None:
            header = [c.lower() for c in cells]
            continue
        row = dict(zip(header, cells))
        rows.setdefault(row.get("lesson", ""), []).append(row)
    return rows


def test_there_are_lessons():
    assert NOTEBOOKS, f"no notebooks in {LESSONS}"
    assert NOTEBOOKS[0].name.startswith("00_")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids(NOTEBOOKS))
def test_notebook_is_committed_clean(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    assert nb.metadata.get("kernelspec", {}).get("name") == "python3", "kernelspec must be python3"
    dirty = [i for i, c in enumerate(nb.cells) if c.cell_type == "code" and (c.outputs or c.execution_count)]
    assert not dirty, f"cells {dirty} carry outputs: clear them before committing"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids(NOTEBOOKS))
def test_header_states_objectives_and_recorded_run_time(path):
    nb = nbformat.read(path, as_version=4)
    head = nb.cells[0].source
    assert re.search(r"you will learn|learning objectives", head, re.I), "first cell must list the objectives"
    assert re.search(r"expected run time", head, re.I), "first cell must state the expected run time"
    number = path.name[:2]
    rows = [r for r in _timings().get(number, []) if r.get("run", "").startswith("default")]
    assert rows, f"lessons/TIMINGS.md has no default-run timing for lesson {number}"
    for r in rows:
        stated = r.get("header says", "")
        assert stated and stated in head, f"header must say {stated!r} (TIMINGS.md, {r.get('machine')})"
        measured = float(r.get("measured (s)", "nan"))
        if "cpu" in r.get("machine", "").lower():
            assert measured <= 600, f"lesson {number}'s default CPU run ({measured} s) exceeds 10 minutes"


def test_the_leak_check_sees_solution_lines():
    """The leak test below would catch a lesson that prints a master solution (here: exercise 04's kernel line)."""
    sol = _master_solution_lines()
    assert len(sol) > 40 and {Path(p).name for p in EXERCISES.glob("*/ex[0-9][0-9].py")} <= {
        f"ex{v[:2]}.py" for v in sol.values()
    }
    line = next(k for k, v in sol.items() if v.startswith("04"))
    assert _leaks(f"some output\n        {line}\nmore") and not _leaks("no solution here")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids(NOTEBOOKS))
def test_no_lesson_shows_a_master_solution(path):
    nb = nbformat.read(path, as_version=4)
    text = "\n".join(c.source for c in nb.cells) + "\n" + _outputs_text(nb)
    leaks = _leaks(text)
    assert not leaks, f"{path.name} contains lines of a graded exercise's master solution: {leaks}"


@pytest.mark.parametrize("path", BUILT, ids=_ids(BUILT))
def test_code_lines_fit_the_notebook(path):
    nb = nbformat.read(path, as_version=4)
    long = [
        (i, len(line))
        for i, c in enumerate(nb.cells)
        if c.cell_type == "code"
        for line in c.source.splitlines()
        if len(line) > MAX_CODE_LINE
    ]
    assert not long, f"{path.name}: (cell, length) of code lines over {MAX_CODE_LINE} characters: {long}"


@pytest.mark.parametrize("path", BUILT, ids=_ids(BUILT))
def test_lesson_ends_with_summary_questions_references_and_exercise(path):
    nb = nbformat.read(path, as_version=4)
    tail = "\n".join(c.source for c in nb.cells[-6:] if c.cell_type == "markdown")
    assert re.search(r"^#+ .*summary", tail, re.I | re.M), "no summary section near the end"
    questions = re.findall(r"<details>", tail)
    assert 3 <= len(questions) <= 5, f"{len(questions)} questions with answers to reveal (<details>), want 3-5"
    assert re.search(r"^#+ .*references", tail, re.I | re.M), "no references section near the end"
    assert "arxiv.org/abs/" in tail, "the references name no paper (arXiv link)"
    assert "exercises/" in tail, "no pointer to the exercise"
    assert "GLOSSARY.md" in "\n".join(c.source for c in nb.cells), "the lesson does not point to the glossary"


@pytest.mark.slow
@pytest.mark.timeout(TIMEOUT_S + 60)
@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids(NOTEBOOKS))
def test_notebook_runs_top_to_bottom(path, monkeypatch):
    monkeypatch.setenv("GLMKIT_FAST", "1")
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(
        nb, timeout=TIMEOUT_S, kernel_name="python3", resources={"metadata": {"path": str(LESSONS)}}
    )
    t0 = time.perf_counter()
    try:
        client.execute()
    except nbclient.exceptions.CellExecutionError as e:
        pytest.fail(f"{path.name} failed:\n{str(e)[-3000:]}")
    elapsed = time.perf_counter() - t0
    errors = [
        (i, o.get("ename"), o.get("evalue"))
        for i, c in enumerate(nb.cells)
        if c.cell_type == "code"
        for o in c.get("outputs", [])
        if o.get("output_type") == "error"
    ]
    assert not errors, f"{path.name}: error outputs {errors}"
    stderr = [
        (i, o.get("text", "")[:300])
        for i, c in enumerate(nb.cells)
        if c.cell_type == "code"
        for o in c.get("outputs", [])
        if o.get("name") == "stderr" and "Traceback" in o.get("text", "")
    ]
    assert not stderr, f"{path.name}: tracebacks on stderr {stderr}"
    out = _outputs_text(nb)
    assert not failed_claims(out), f"{path.name}: stated results that do not hold: {failed_claims(out)}"
    leaks = _leaks(out)
    assert not leaks, f"{path.name} printed lines of a graded exercise's master solution: {leaks}"
    print(f"{path.name}: {elapsed:.1f} s in fast mode")
