"""Paths shared by the browser test and its fixtures (a plain module: `import conftest` is ambiguous)."""

from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def lessons_dir() -> Path:
    return Path(os.environ.get("GLMKIT_LESSONS_DIR", REPO / "lessons")).resolve()


def discover_lessons() -> list[Path]:
    """Every lesson notebook, so lessons added later are covered without editing the test."""
    return sorted(p for p in lessons_dir().glob("*.ipynb") if not p.name.startswith("."))


def screenshots_dir() -> Path:
    d = Path(os.environ.get("GLMKIT_SCREENSHOTS", REPO / "build" / "screenshots")).resolve()
    d.mkdir(parents=True, exist_ok=True)
    return d
