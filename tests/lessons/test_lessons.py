"""Every notebook in lessons/ runs top to bottom without an error (GLMKIT_FAST=1 sizes), is committed
clean, and states the run time that lessons/TIMINGS.md records.

New notebooks are picked up automatically (lessons/*.ipynb). The default (non-fast) runs are too long for
CI; they are timed by hand with nbclient or `jupyter nbconvert --execute` and recorded in TIMINGS.md.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

LESSONS = Path(__file__).resolve().parents[2] / "lessons"
NOTEBOOKS = sorted(LESSONS.glob("[0-9][0-9]_*.ipynb"))
TIMEOUT_S = int(os.environ.get("GLMKIT_NOTEBOOK_TIMEOUT", "600"))  # per notebook, fast mode


def _ids(paths):
    return [p.stem for p in paths]


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
    print(f"{path.name}: {elapsed:.1f} s in fast mode")
