"""An exercise folder: its settings, checks, solution markers, and finding a student's file for it.

Layout (instructor side, ``exercises/NN_name/``)::

    exercise.toml      id, title, the student's file and functions, points total, [limits]
    exNN.py            master source; every solution is between ``# BEGIN SOLUTION`` / ``# END SOLUTION``
    exNN.ipynb         the learner's notebook (imports exNN.py, runs ``self_check()``)
    checks.py          public checks (shipped)
    hidden_checks.py   hidden checks (never shipped)

``release`` ships exercise.toml, the stubbed exNN.py, the notebook and checks.py — an explicit list; no
other file of the folder is ever copied.
"""

from __future__ import annotations

import ast
import errno
import importlib.util
import json
import os
import re
import stat
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the same parser from PyPI (tomli; python_version < '3.11')
    import tomli as tomllib

from glmkit.grading.api import Check
from glmkit.grading.sandbox import Limits

BEGIN, END = "# BEGIN SOLUTION", "# END SOLUTION"
PUBLIC_FILE, HIDDEN_FILE, SETTINGS_FILE = "checks.py", "hidden_checks.py", "exercise.toml"


# CPython 3.11's ast constructor keeps a recursion counter that is not thread-safe: two threads parsing at
# once can fail with "SystemError: AST constructor recursion depth mismatch". autograde grades students on
# a thread pool, so every parse here goes through one lock.
_AST_LOCK = threading.Lock()


def _parse(source, filename="<unknown>"):
    """ast.parse; a source it cannot take at all (null bytes, nesting too deep) is a SyntaxError too."""
    with _AST_LOCK:
        try:
            return ast.parse(source, filename)
        except (ValueError, RecursionError, MemoryError) as e:
            raise SyntaxError(f"{type(e).__name__}: {e}") from None


class ExerciseError(Exception):
    """An exercise folder is malformed (bad markers, settings or checks)."""


@dataclass
class Exercise:
    path: Path
    id: str
    title: str
    student_file: str  # e.g. "ex01.py"
    notebook: str | None
    functions: list[str]
    reference_modules: list[str]
    points: float
    limits: Limits
    public: list[Check] = field(default_factory=list)
    hidden: list[Check] = field(default_factory=list)

    @property
    def module(self) -> str:
        return Path(self.student_file).stem

    @property
    def checks(self) -> list[Check]:
        return self.public + self.hidden

    @property
    def public_points(self) -> float:
        return sum(c.points for c in self.public)


def load_checks(path: Path, *, expect_hidden: bool) -> list[Check]:
    """Import a checks file (by path, under a private module name) and collect its Check objects."""
    name = f"_glmkit_checks_{abs(hash(str(path.resolve())))}"
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    try:
        spec.loader.exec_module(mod)
    except Exception as e:
        raise ExerciseError(f"{path}: could not be imported: {type(e).__name__}: {e}") from e
    checks = [v for v in vars(mod).values() if isinstance(v, Check)]
    for c in checks:
        if c.fn is None:
            raise ExerciseError(f"{path}: a Check(...) was not applied to a function")
        if c.hidden != expect_hidden:
            where = HIDDEN_FILE if c.hidden else PUBLIC_FILE
            raise ExerciseError(f"{path}: check {c.name!r} has hidden={c.hidden}; it belongs in {where}")
        if not c.points > 0 or not c.timeout > 0 or not c.message.strip():
            raise ExerciseError(f"{path}: check {c.name!r} needs points > 0, timeout > 0 and a message")
    return checks


def load_sibling(file: str, name: str):
    """For a checks file: import a sibling file of its exercise folder (e.g. hidden_checks.py reusing
    the input generators of checks.py) without putting the folder on sys.path."""
    path = Path(file).with_name(name)
    key = f"_glmkit_sibling_{abs(hash(str(path.resolve())))}"
    if key in sys.modules:
        return sys.modules[key]
    spec = importlib.util.spec_from_file_location(key, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[key] = mod
    spec.loader.exec_module(mod)
    return mod


def load_exercise(path: Path, *, with_hidden: bool = True) -> Exercise:
    path = Path(path)
    settings_path = path / SETTINGS_FILE
    if not settings_path.is_file():
        raise ExerciseError(f"{path}: no {SETTINGS_FILE}")
    try:
        cfg = tomllib.loads(settings_path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ExerciseError(f"{settings_path}: {e}") from e
    try:
        ex = Exercise(
            path=path,
            id=str(cfg["id"]),
            title=cfg["title"],
            student_file=cfg["student_file"],
            notebook=cfg.get("notebook"),
            functions=list(cfg["functions"]),
            reference_modules=list(cfg.get("reference_modules", [])),
            points=float(cfg["points"]),
            limits=Limits.from_dict(cfg.get("limits", {})),
        )
    except KeyError as e:
        raise ExerciseError(f"{settings_path}: missing key {e}") from e
    if (path / PUBLIC_FILE).is_file():
        ex.public = load_checks(path / PUBLIC_FILE, expect_hidden=False)
    if with_hidden and (path / HIDDEN_FILE).is_file():
        ex.hidden = load_checks(path / HIDDEN_FILE, expect_hidden=True)
    names = [c.name for c in ex.checks]
    if len(set(names)) != len(names):
        raise ExerciseError(f"{path}: check names must be unique across public and hidden checks")
    return ex


def find_exercises(root: Path, ids: list[str] | None = None, *, with_hidden: bool = True) -> list[Exercise]:
    """Every ``NN_name/`` folder with an exercise.toml under ``root``, or only those whose id or folder
    name is in ``ids`` (an unknown id is an error)."""
    root = Path(root)
    dirs = sorted(p for p in root.iterdir() if p.is_dir() and (p / SETTINGS_FILE).is_file()) if root.is_dir() else []
    exercises = [load_exercise(d, with_hidden=with_hidden) for d in dirs]
    if ids:
        wanted = {str(i) for i in ids}
        chosen = [e for e in exercises if e.id in wanted or e.path.name in wanted]
        missing = wanted - {e.id for e in chosen} - {e.path.name for e in chosen}
        if missing:
            raise ExerciseError(f"no exercise {sorted(missing)} under {root} (have: {[e.id for e in exercises]})")
        exercises = chosen
    return exercises


# ---------------------------------------------------------------------------------------------------------
# solution markers


@dataclass
class Region:
    start: int  # line index of BEGIN
    end: int  # line index of END
    function: str  # the enclosing function


def solution_regions(source: str, filename: str = "<master>") -> list[Region]:
    lines = source.splitlines()
    tree = _parse(source, filename)
    funcs = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
    regions, open_at = [], None
    for i, line in enumerate(lines):
        s = line.strip()
        if s.startswith(BEGIN):
            if open_at is not None:
                raise ExerciseError(f"{filename}:{i + 1}: {BEGIN} inside another solution region")
            open_at = i
        elif s.startswith(END):
            if open_at is None:
                raise ExerciseError(f"{filename}:{i + 1}: {END} without {BEGIN}")
            inside = [f for f in funcs if f.lineno - 1 < open_at < f.end_lineno]
            if not inside:
                raise ExerciseError(f"{filename}:{open_at + 1}: a solution region must be inside a function")
            fn = max(inside, key=lambda f: f.lineno)
            regions.append(Region(open_at, i, fn.name))
            open_at = None
    if open_at is not None:
        raise ExerciseError(f"{filename}:{open_at + 1}: {BEGIN} without {END}")
    return regions


def stub_source(source: str, module: str, filename: str = "<master>") -> str:
    """The student version: each solution region becomes one ``raise NotImplementedError(...)``."""
    lines = source.splitlines()
    out, last = [], 0
    for r in solution_regions(source, filename):
        out += lines[last : r.start]
        indent = lines[r.start][: len(lines[r.start]) - len(lines[r.start].lstrip())]
        out.append(f"{indent}# YOUR CODE HERE (replace the line below)")
        out.append(
            f'{indent}raise NotImplementedError("{module}.{r.function}: not implemented yet — '
            f'write this function, then run the checks")'
        )
        last = r.end + 1
    out += lines[last:]
    text = "\n".join(out) + "\n"
    _parse(text, filename)
    return text


def solution_lines(source: str) -> list[str]:
    """Distinctive lines of the solutions (for the release's no-leak verification)."""
    lines = source.splitlines()
    found = []
    for r in solution_regions(source):
        for line in lines[r.start + 1 : r.end]:
            s = line.strip()
            if len(s) >= 16 and not s.startswith("#"):
                found.append(s)
    return found


# ---------------------------------------------------------------------------------------------------------
# finding a student's file


def _norm(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


def notebook_to_source(text: str, references: list[str] = ()) -> str:
    """The definitions of a notebook: imports, defs, classes and simple assignments of its code cells.
    Anything else (calls, magics, shell lines, the check cell) is dropped, so grading never runs a cell. So are
    the notebook's own imports of glmkit (its demo and self-check cells; glmkit is not available to graded
    code), except those of the ``references``, which stay to be flagged."""
    nb = json.loads(text)
    keep = []
    for cell in nb.get("cells", []):
        if cell.get("cell_type") != "code":
            continue
        src = cell.get("source", "")
        src = "".join(src) if isinstance(src, list) else str(src)
        src = "\n".join(line for line in src.splitlines() if not line.lstrip().startswith(("%", "!")))
        try:
            tree = _parse(src)
        except SyntaxError:
            continue
        for node in tree.body:
            if isinstance(node, (ast.Import, ast.ImportFrom)) and not reference_imports(ast.unparse(node), references):
                mods = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                if any(m == "glmkit" or m.startswith("glmkit.") for m in mods):
                    continue
            if isinstance(
                node,
                (
                    ast.Import,
                    ast.ImportFrom,
                    ast.FunctionDef,
                    ast.ClassDef,
                    ast.Assign,
                    ast.AnnAssign,
                    ast.AsyncFunctionDef,
                ),
            ):
                keep.append(ast.get_source_segment(src, node) or "")
    return "\n\n".join(keep) + "\n"


def defined_functions(source: str) -> set[str]:
    try:
        tree = _parse(source)
    except SyntaxError:
        return set()
    return {n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}


MAX_SOURCE_BYTES = 2_000_000  # a student's .py larger than this is refused without being read
MAX_NOTEBOOK_BYTES = 20_000_000  # the same for a notebook (outputs make them bigger)
MAX_ENTRIES = 10_000  # entries looked at in one student's folder (an archive bomb has millions)
MAX_DEPTH = 12


class Refused(Exception):
    """A file the grader will not read; the message says why (a symbolic link, not a regular file, too large)."""


def read_regular(path: Path, limit: int) -> bytes:
    """The bytes of ``path`` if it is a regular file of at most ``limit`` bytes, checked on the open file before
    reading, and never through a symbolic link (O_NOFOLLOW) or into a FIFO or device (O_NONBLOCK, fstat)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        raise Refused("is a symbolic link" if e.errno == errno.ELOOP else f"could not be read ({e.strerror})") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise Refused("is not a regular file")
        if st.st_size > limit:
            raise Refused(f"is too large ({st.st_size} bytes; the limit is {limit})")
        data = bytearray()
        while len(data) <= limit and (chunk := os.read(fd, min(1 << 20, limit + 1 - len(data)))):
            data += chunk
        if len(data) > limit:
            raise Refused(f"is too large (more than {limit} bytes)")
        return bytes(data)
    finally:
        os.close(fd)


@dataclass
class Scan:
    """A student's folder, walked without following any link: regular files with their mtimes, symbolic links
    and special files (FIFOs, sockets, devices), as paths relative to the folder. Hidden entries and
    __pycache__ are skipped; past MAX_ENTRIES or MAX_DEPTH the walk stops (``truncated``)."""

    files: list = field(default_factory=list)
    links: list = field(default_factory=list)
    special: list = field(default_factory=list)
    truncated: bool = False


def scan_folder(folder: Path) -> Scan:
    scan, stack, seen = Scan(), [(Path(), 0)], 0
    while stack:
        rel, depth = stack.pop()
        try:
            with os.scandir(folder / rel) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError:
            continue
        for e in entries:
            seen += 1
            if seen > MAX_ENTRIES:
                scan.truncated = True
                return scan
            if e.name.startswith(".") or e.name == "__pycache__":
                continue
            try:
                if e.is_symlink():
                    scan.links.append(rel / e.name)
                elif e.is_dir(follow_symlinks=False):
                    if depth < MAX_DEPTH:
                        stack.append((rel / e.name, depth + 1))
                    else:
                        scan.truncated = True
                elif e.is_file(follow_symlinks=False):
                    scan.files.append((rel / e.name, e.stat(follow_symlinks=False).st_mtime))
                else:
                    scan.special.append(rel / e.name)
            except OSError:
                continue
    return scan


@dataclass
class Located:
    status: str  # found | renamed | notebook | missing | empty | refused
    source: str = ""
    path: Path | None = None  # relative to the student's folder
    note: str = ""
    flags: list = field(default_factory=list)


def locate_submission(folder: Path, ex: Exercise) -> Located:
    """The student's file for ``ex`` in ``folder`` (searched recursively, links never followed):
    1. the expected name (e.g. ex01.py); 2. a .py whose name looks like it (Ex01 (1).py, ex01-final.py);
    3. the .py defining most of the required functions; 4. the same inside .ipynb files (definitions only).
    Ties among candidates are broken by the newest modification time. Every step taken is noted. A symbolic
    link is never read: one where the expected file should be is refused, any other is noted and flagged."""
    folder = Path(folder)
    scan = scan_folder(folder)
    loc = _locate(folder, ex, scan)
    if scan.links:
        loc.flags.append("symlink")
        shown = ", ".join(str(p) for p in scan.links[:5]) + (", ..." if len(scan.links) > 5 else "")
        loc.note = _join(loc.note, f"symbolic links are never followed; ignored {len(scan.links)}: {shown}")
    if scan.truncated:
        loc.note = _join(
            loc.note,
            f"the folder is too big or too deep: only {MAX_ENTRIES} entries, {MAX_DEPTH} levels deep, were looked at",
        )
    return loc


def _join(a: str, b: str) -> str:
    return f"{a}; {b}" if a else b


def _locate(folder: Path, ex: Exercise, scan: Scan) -> Located:
    expected = ex.student_file
    newest = lambda cands: max(cands, key=lambda c: (c[1], str(c[0])))[0]  # noqa: E731
    exact = [c for c in scan.files if c[0].name == expected]
    if exact:
        p = newest(exact)
        return _read(folder, p, "found", "" if p.parent == Path() else f"found {p}")
    fake = [p for p in scan.links + scan.special if p.name == expected]
    if fake:
        what = "a symbolic link" if fake[0] in scan.links else "not a regular file"
        return Located(
            "refused",
            path=fake[0],
            note=f"{fake[0]} is {what}: the grader reads only regular files, "
            f"so it was not graded; submit the file itself",
        )
    if not scan.files:
        return Located("missing", note=f"no files in the submission folder (expected {expected})")
    stem = _norm(Path(expected).stem)
    pys = [c for c in scan.files if c[0].suffix == ".py"]
    alike = [c for c in pys if _norm(c[0].stem).startswith(stem)]
    if alike:
        p = newest(alike)
        return _read(folder, p, "renamed", f"graded {p} as {expected} (renamed file)")
    want = set(ex.functions)
    sources = {}
    for p, _ in pys:
        try:
            sources[p] = read_regular(folder / p, MAX_SOURCE_BYTES).decode("utf-8", errors="replace")
        except Refused:
            continue
    scored = [(len(defined_functions(src) & want), mtime, p) for (p, mtime) in pys if (src := sources.get(p))]
    scored = [x for x in scored if x[0] > 0]
    if scored:
        n, _, p = max(scored, key=lambda x: (x[0], x[1], str(x[2])))
        return _read(folder, p, "renamed", f"no {expected}; graded {p}, which defines {n} of the {len(want)} functions")
    cands = []
    for p, mtime in scan.files:
        if p.suffix == ".ipynb":
            try:
                src = notebook_to_source(
                    read_regular(folder / p, MAX_NOTEBOOK_BYTES).decode("utf-8", "replace"), ex.reference_modules
                )
            except (Refused, ValueError, TypeError, AttributeError, RecursionError):
                continue
            if n := len(defined_functions(src) & want):
                cands.append((n, mtime, p, src))
    if cands:
        _, _, p, src = max(cands, key=lambda c: (c[0], c[1], str(c[2])))
        return Located("notebook", src, p, f"no {expected}; graded the definitions in {p}")
    if len(pys) == 1:
        return _read(folder, pys[0][0], "renamed", f"no {expected}; graded the only .py file, {pys[0][0]}")
    names = ", ".join(str(p) for p, _ in scan.files[:5])
    return Located("missing", note=f"no {expected} and no file defining {', '.join(ex.functions)} (found: {names})")


def _read(folder: Path, p: Path, status: str, note: str) -> Located:
    try:
        src = read_regular(folder / p, MAX_SOURCE_BYTES).decode("utf-8", errors="replace")
    except Refused as e:
        return Located("refused", path=p, note=_join(note, f"{p} {e}: not graded"))
    if not src.strip() or not _has_code(src):
        return Located("empty", src, p, _join(note, f"{p} has no code"))
    return Located(status, src, p, note)


def _has_code(src: str) -> bool:
    try:
        tree = _parse(src)
    except SyntaxError:
        return True  # a syntax error is code (graded: it fails to import, and says why)
    return bool(tree.body)


# ---------------------------------------------------------------------------------------------------------
# static scan for the reference implementation


def reference_imports(source: str, reference_modules: list[str]) -> list[str]:
    """Lines of ``source`` that import (or name, as a string) a module the learner must not use."""
    hits = []
    try:
        tree = _parse(source)
    except SyntaxError:
        return hits
    for node in ast.walk(tree):
        line = getattr(node, "lineno", 0)
        for mod in reference_modules:
            parent, _, leaf = mod.rpartition(".")
            if isinstance(node, ast.Import) and any(a.name == mod or a.name.startswith(mod + ".") for a in node.names):
                hits.append(f"line {line}: import {mod}")
            elif isinstance(node, ast.ImportFrom) and node.module:
                if node.module == mod or node.module.startswith(mod + "."):
                    hits.append(f"line {line}: from {node.module} import ...")
                elif node.module == parent and any(a.name == leaf for a in node.names):
                    hits.append(f"line {line}: from {parent} import {leaf}")
            elif isinstance(node, ast.Call) and any(
                isinstance(a, ast.Constant) and isinstance(a.value, str) and mod in a.value for a in node.args
            ):
                hits.append(f"line {line}: a call with the string {mod!r}")
            elif (
                isinstance(node, ast.Attribute)
                and node.attr == leaf
                and isinstance(node.value, ast.Name)
                and node.value.id == parent.rpartition(".")[2]
            ):
                hits.append(f"line {line}: {parent}.{leaf}")
    return sorted(set(hits))
