"""Build a class of exercise-01 submissions to time the grader on (docs/instructor-guide.md §6, "run time"):

    python tests/grading/hostile/build_class.py CLASS_DIR [--size 50]
    time python -m glmkit.grading autograde CLASS_DIR --out GRADES --exercises 01 --jobs 2

Roughly 40% correct (as ex01.py, renamed, in a notebook), 15% wrong or unfinished, and every hostile
submission of this folder plus the cases that are not a file (symbolic links, a 3 GiB sparse file, a FIFO),
under ordinary and odd folder names alike. Placeholders get harmless values.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
EX01 = HERE.parent.parent / "fixture_exercises" / "01_blank_infilling"  # the grader tests' frozen copy


def build(root: Path, size: int) -> None:
    sys.path.insert(0, str(HERE.parents[2]))
    from glmkit.grading.exercise import stub_source

    master = (EX01 / "ex01.py").read_text()
    hostile = {p.stem: p.read_text() for p in sorted(HERE.glob("*.py")) if p.stem != "build_class"}
    hostile["frame_leak"] = master + "\n\n" + hostile["frame_leak"]
    wrong = {
        "stub": stub_source(master, "ex01"),
        "and_mask": master.replace("causal[None] | part_a", "causal[None] & part_a"),
        "no_mask": master.replace("    i = torch.arange(T)\n", "    raise NotImplementedError('todo')\n"),
    }
    notebook = {
        "cells": [{"cell_type": "code", "metadata": {}, "outputs": [], "execution_count": None, "source": master}],
        "metadata": {},
        "nbformat": 4,
        "nbformat_minor": 5,
    }
    odd = [os.fsdecode(b"caf\xe9"), "L" * 240, "=1+1", "@SUM(1+1)", ".hidden", "..."]
    files: list[tuple[str, str, str | None]] = []  # (folder, file name, text; None: built below)
    for name, src in hostile.items():
        for k, v in {
            "__MARK__": "class-child",
            "__TOKEN__": "class-token",
            "__PORT__": "47001",
            "__EXERCISE_DIR__": str(EX01),
            "__UNIX_SOCKET__": "/run/nothing.sock",
            "__REFERENCE__": "glmkit.data.blank_infilling",
        }.items():
            src = src.replace(k, v)
        files.append((f"hostile_{name}", "ex01.py", src))
    files += [(f"special_{k}", "ex01.py", None) for k in ("symlink", "sparse", "fifo")]
    n_wrong = max(3, size * 15 // 100)
    files += [(f"wrong_{i:02d}", "ex01.py", list(wrong.values())[i % len(wrong)]) for i in range(n_wrong)]
    i = 0
    while len(files) < size:
        name = odd[i] if i < len(odd) else f"student_{i:02d}"
        kind = i % 3
        files.append(
            (name, ["ex01.py", "Ex01 (1).py", "ex01.ipynb"][kind], json.dumps(notebook) if kind == 2 else master)
        )
        i += 1
    for folder, fname, text in files[:size]:
        d = root / folder
        d.mkdir(parents=True)
        if text is not None:
            (d / fname).write_text(text)
        elif folder.endswith("symlink"):
            os.symlink(EX01 / "ex01.py", d / fname)
        elif folder.endswith("sparse"):
            with open(d / fname, "wb") as f:
                f.truncate(3 << 30)
        else:
            os.mkfifo(d / fname)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("root", type=Path)
    ap.add_argument("--size", type=int, default=50)
    args = ap.parse_args()
    build(args.root, args.size)
    print(f"{args.size} submissions in {args.root}")
