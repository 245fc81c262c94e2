"""Tables in the lessons, and the committed GPU benchmark results read from their files.

    table(headers, rows)            a Markdown table that renders in a notebook and prints as aligned text;
                                    numbers are formatted by ``fmt`` (one format string per column, or one for all)
    read_benchmark(name)            a file of benchmarks/results/ split into its title, ``- key: value`` lines and
                                    sections (each with its Markdown tables)
    show_benchmark(name, ...)       displays the title, where it was measured, and the chosen sections' tables;
                                    ``plot="ratios"`` also draws the "Ratios vs targets" table as bars

How it differs from before: the lessons built their Markdown tables from f-strings and parsed the result files
inside cells (lesson 02 section 9, lessons 03 and 04); the cells now say which file and which section, no more.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from pathlib import Path

from glmkit.course.course_map import repo_root

RESULTS = Path("benchmarks") / "results"


class Table:
    """A table that shows as Markdown in a notebook (``_repr_markdown_``) and as aligned text in ``print``."""

    def __init__(self, headers: Sequence[str], rows: Sequence[Sequence], fmt: str | Sequence[str | None] | None = None):
        self.headers = [str(h) for h in headers]
        width = len(self.headers)
        fmts = [fmt] * width if fmt is None or isinstance(fmt, str) else list(fmt)
        if len(fmts) != width:
            raise ValueError(f"fmt has {len(fmts)} entries for {width} columns")
        self.rows = []
        for r in rows:
            if len(r) != width:
                raise ValueError(f"row {list(r)!r} has {len(r)} cells, the table has {width} columns")
            self.rows.append([_cell(v, f) for v, f in zip(r, fmts)])

    def markdown(self) -> str:
        lines = ["| " + " | ".join(self.headers) + " |", "|" + "---|" * len(self.headers)]
        lines += ["| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in self.rows]
        return "\n".join(lines)

    def _repr_markdown_(self) -> str:
        return self.markdown()

    def __repr__(self) -> str:
        cols = [self.headers, *self.rows]
        w = [max(len(r[j]) for r in cols) for j in range(len(self.headers))]
        return "\n".join("  ".join(c.ljust(w[j]) for j, c in enumerate(r)).rstrip() for r in cols)


def _cell(v, f: str | None) -> str:
    if f is not None and isinstance(v, (int, float)) and not isinstance(v, bool):
        return format(v, f)
    return str(v)


def table(headers: Sequence[str], rows: Sequence[Sequence], fmt: str | Sequence[str | None] | None = None) -> Table:
    """A ``Table``: the last expression of a cell renders it; ``display(table(...))`` anywhere else."""
    return Table(headers, rows, fmt)


# ----------------------------------------------------------------------------------------------------
# Benchmark result files


@dataclasses.dataclass
class Benchmark:
    path: Path
    title: str
    meta: dict[str, str]
    sections: dict[str, str]  # heading -> its text (the part before the first heading is under "")

    def tables(self, section: str = "") -> list[str]:
        """The Markdown tables (each a block of '|' lines) of ``section``."""
        text = self.section(section)
        blocks, cur = [], []
        for line in text.splitlines():
            if line.strip().startswith("|"):
                cur.append(line.strip())
            elif cur:
                blocks.append("\n".join(cur))
                cur = []
        if cur:
            blocks.append("\n".join(cur))
        return blocks

    def section(self, name: str) -> str:
        for heading, text in self.sections.items():
            if heading.lower() == name.lower():
                return text
        for heading, text in self.sections.items():
            if heading.lower().startswith(name.lower()):
                return text
        raise KeyError(f"{self.path.name} has no section {name!r}; it has {list(self.sections)}")


def _results_path(name: str) -> Path:
    p = Path(name)
    if p.exists():
        return p
    return repo_root() / RESULTS / name


def read_benchmark(name: str) -> Benchmark:
    """Read ``benchmarks/results/<name>``: its title (first heading), the ``- key: value`` lines before its first
    table, and its sections by heading."""
    path = _results_path(name)
    text = path.read_text()
    lines = text.splitlines()
    title = next((ln.lstrip("# ").strip() for ln in lines if ln.startswith("#")), path.stem)
    meta: dict[str, str] = {}
    for ln in lines:
        if ln.strip().startswith("|"):
            break
        m = re.match(r"^- ([A-Za-z][\w ./()-]*?):\s*(.+)$", ln.strip())
        if m and m.group(1) not in meta:
            meta[m.group(1)] = m.group(2).strip()
    sections: dict[str, str] = {}
    heading, buf = "", []
    for ln in lines[1:] if lines and lines[0].startswith("#") else lines:
        m = re.match(r"^#{2,6}\s+(.*)$", ln)
        if m:
            sections[heading] = "\n".join(buf)
            heading, buf = m.group(1).strip(), []
        else:
            buf.append(ln)
    sections[heading] = "\n".join(buf)
    return Benchmark(path=path, title=title, meta=meta, sections=sections)


def show_benchmark(name: str, sections: Sequence[str] = ("",), first_table_only: bool = False, plot: str | None = None):
    """Display a committed benchmark result: its title, where and when it ran, and the tables of ``sections``
    (headings, or their beginnings; "" = the part before the first heading). ``plot="ratios"`` draws the
    "Ratios vs targets" table as bars (lesson 04). Says so, and returns None, when the file is not in this
    checkout; else returns the ``Benchmark`` (end a cell with ``;`` to keep Jupyter from printing it)."""
    from IPython.display import Markdown, display

    path = _results_path(name)
    if not path.exists():
        print(f"benchmarks/results/{name} is not in this checkout (the benchmarks ship with the repository)")
        return None
    b = read_benchmark(name)
    where = ", ".join(f"{k}: {v}" for k, v in b.meta.items() if k.lower() in ("date", "gpu", "versions", "torch"))
    parts = [f"**{b.title}** (`benchmarks/results/{path.name}`{'; ' + where if where else ''})"]
    for s in sections:
        blocks = b.tables(s)
        if first_table_only:
            blocks = blocks[:1]
        if s:
            parts.append(f"*{s}*")
        parts += blocks
    display(Markdown("\n\n".join(parts)))
    if plot == "ratios":
        import matplotlib.pyplot as plt

        from glmkit.course.viz_moe import parse_bench, plot_speedups

        ratios = parse_bench(path.read_text())["ratios"]
        n = sum(r["unit"] == "×" for r in ratios)
        _, ax = plt.subplots(figsize=(10, 0.45 * n + 1.6))
        plot_speedups(ratios, ax=ax, title=f"{b.title}: speed-up over each baseline (black tick: target)")
        plt.tight_layout()
        plt.show()
    return b


__all__ = ["Table", "table", "Benchmark", "read_benchmark", "show_benchmark"]
