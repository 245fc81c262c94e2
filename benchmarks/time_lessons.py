"""Time lessons top to bottom, the way a learner's *Run All* does, and print rows for lessons/TIMINGS.md.

    python benchmarks/time_lessons.py                       # every lesson, default (full) run
    GLMKIT_FAST=1 python benchmarks/time_lessons.py 01 02   # the CI-sized run of lessons 01 and 02
    python benchmarks/time_lessons.py --smoke               # checks the script: times a one-cell notebook
    python benchmarks/time_lessons.py 07 --save $OUT        # also writes the executed notebooks (outputs) there

Each notebook runs in a fresh kernel (nbclient, kernel start included) from lessons/ as the working folder.
A lesson with an error output is reported as failed, with the error, and its time is not a valid timing.
The load average before and after is printed with each row: on a shared machine it explains slow figures.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

LESSONS = Path(__file__).resolve().parent.parent / "lessons"
HEADER = "| lesson | run | machine | date | measured (s) | notes |\n|---|---|---|---|---|---|"


def machine() -> str:
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return f"{os.cpu_count()}-core CPU ({platform.machine()})"


def time_one(path: Path, timeout: int = 1800, save: Path | None = None) -> tuple[float, list[str]]:
    nb = nbformat.read(path, as_version=4)
    start = time.perf_counter()
    client = NotebookClient(
        nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}
    )
    try:
        client.execute()
    except Exception as exc:  # nbclient raises on the first failing cell
        return time.perf_counter() - start, [f"{type(exc).__name__}: {str(exc)[-400:]}"]
    finally:
        if save is not None:  # the executed notebook, outputs included (also when a cell failed)
            save.mkdir(parents=True, exist_ok=True)
            nbformat.write(nb, save / path.name)
    errors = [
        f"{o.get('ename')}: {o.get('evalue')}"
        for c in nb.cells
        if c.cell_type == "code"
        for o in c.get("outputs", [])
        if o.get("output_type") == "error"
    ]
    return time.perf_counter() - start, errors


def smoke_notebook(folder: Path) -> Path:
    """A one-cell notebook (imports glmkit, says which backend runs) standing in for a lesson: it checks nbclient,
    the kernel and this script, not the lessons."""
    nb = nbformat.v4.new_notebook()
    nb.cells.append(nbformat.v4.new_code_cell("import glmkit.backend\nprint(glmkit.backend.describe())"))
    path = folder / "00_smoke.ipynb"
    nbformat.write(nb, path)
    return path


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("lessons", nargs="*", help="two-digit lesson numbers (default: all)")
    ap.add_argument("--smoke", action="store_true", help="time a one-cell notebook instead of the lessons")
    ap.add_argument("--save", type=Path, help="write each executed notebook, with its outputs, into this folder")
    args = ap.parse_args(argv)
    run = "fast" if os.environ.get("GLMKIT_FAST") == "1" else "default"
    today = datetime.date.today().isoformat()
    failed = 0
    with tempfile.TemporaryDirectory() as tmp:
        if args.smoke:
            run = "smoke"
            paths = [smoke_notebook(Path(tmp))]
        else:
            wanted = set(args.lessons)
            paths = sorted(p for p in LESSONS.glob("[0-9][0-9]_*.ipynb") if not wanted or p.name[:2] in wanted)
        print(HEADER, flush=True)
        for path in paths:
            load0 = os.getloadavg()[0]
            seconds, errors = time_one(path, save=args.save)
            load1 = os.getloadavg()[0]
            status = "ok" if not errors else "FAILED: " + "; ".join(errors)
            failed += bool(errors)
            print(
                f"| {path.name[:2]} | {run} | {machine()} | {today} | {seconds:.0f} | load {load0:.1f}->{load1:.1f} "
                f"{status} |",
                flush=True,
            )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
