"""The command-line tool: validate, release, check, autograde (``python -m glmkit.grading --help``).

``autograde`` trusts nothing in a submission: every folder gets exactly one row per exercise (whatever its
name: undecodable bytes, 240 characters, a spreadsheet formula, a leading dot), a unique and stable feedback
file, and a ``grader-error`` row rather than a stopped run if anything goes wrong with it; the gradebook's
cells are escaped against formula injection; names and messages are made printable before they are written.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import importlib.metadata
import io
import json
import os
import re
import secrets
import shlex
import shutil
import sys
import threading
import time
import traceback
import unicodedata
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from glmkit.grading.exercise import (
    BEGIN,
    END,
    HIDDEN_FILE,
    PUBLIC_FILE,
    SETTINGS_FILE,
    Exercise,
    ExerciseError,
    find_exercises,
    load_exercise,
    locate_submission,
    solution_lines,
    solution_regions,
    stub_source,
)
from glmkit.grading.isolation import Isolation, SandboxUnavailable, require
from glmkit.grading.runner import (
    CRASHED,
    ERROR,
    FAILED,
    MISSING_FN,
    NOT_IMPLEMENTED,
    NOT_RUN,
    OUTPUT_LIMIT,
    PASSED,
    PROTOCOL,
    TIMEOUT,
    ExerciseResult,
    run_checks,
)
from glmkit.grading.sandbox import Limits

GRADEBOOK_COLUMNS = ["student", "exercise", "points", "max_points", "status", "flags", "notes", "isolation", "feedback"]


def default_exercises_dir() -> Path:
    """$GLMKIT_EXERCISES, else the repository's exercises/ (next to the glmkit package), else ./exercises."""
    if os.environ.get("GLMKIT_EXERCISES"):
        return Path(os.environ["GLMKIT_EXERCISES"])
    import glmkit

    repo = Path(glmkit.__file__).resolve().parent.parent / "exercises"
    return repo if repo.is_dir() else Path.cwd() / "exercises"


def numpy_warning(version: str | None = "auto") -> str | None:
    """A warning when numpy is too new for the Triton interpreter: the sandboxed workers run learners'
    ``@triton.jit`` code under it (their address-space limit keeps CUDA out), and triton 3.6's interpreter
    fails under numpy >= 2.4, so every kernel check would report an error instead of a grade."""
    if version == "auto":
        try:
            version = importlib.metadata.version("numpy")
        except importlib.metadata.PackageNotFoundError:
            return None
    parts = [int(m.group()) for m in (re.match(r"\d+", x) for x in version.split("+")[0].split(".")[:2]) if m]
    if tuple(parts) < (2, 4):
        return None
    return (
        f"WARNING: numpy {version}: the Triton CPU interpreter (triton 3.6) fails under numpy >= 2.4. The "
        f"grader runs Triton kernels under that interpreter, so checks of @triton.jit code (exercises 03, 04) "
        f"will fail with errors. Fix: {shlex.quote(sys.executable)} -m pip install 'numpy>=1.24,<2.4'"
    )


def _fmt(x: float) -> str:
    return f"{x:g}"


def _atomic_write(path: Path, text: str) -> None:
    """Write UTF-8 text (a stray surrogate becomes a backslash escape instead of an error) via a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    tmp.write_bytes(text.encode("utf-8", "backslashreplace"))
    os.replace(tmp, path)


_BIDI = set("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


def printable(s: str, multiline: bool = False) -> str:
    """``s`` as safe text for a terminal, a CSV cell or Markdown: undecodable bytes (surrogates), control
    characters (but newlines, with ``multiline``) and bidirectional overrides become backslash escapes."""
    s = s.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    return "".join(
        c.encode("unicode_escape").decode()
        if (unicodedata.category(c) in ("Cc", "Cs") or c in _BIDI) and not (multiline and c == "\n")
        else c
        for c in s
    )


# ---------------------------------------------------------------------------------------------------------
# validate


def validate(
    exercises_dir: Path, ids: list[str] | None = None, *, out=sys.stdout, limits: dict | None = None
) -> list[str]:
    """Check every exercise (or ``ids``): markers, points, the master passing every public and hidden
    check, the stub failing every check with 'not implemented yet'. Returns the problems found."""
    problems: list[str] = []
    try:
        exercises = find_exercises(exercises_dir, ids)
    except ExerciseError as e:
        return [str(e)]
    if not exercises:
        return [f"no exercises (folders with {SETTINGS_FILE}) under {exercises_dir}"]
    seed = secrets.token_hex(4)
    print(f"validating {len(exercises)} exercise(s) under {exercises_dir} (seed {seed})", file=out)
    if (warning := numpy_warning()) is not None:
        print(warning, file=out)
    for ex in exercises:
        problems += _validate_one(ex, seed, out, limits or {})
    print(
        "OK: every master passes all its checks and every stub fails them"
        if not problems
        else f"{len(problems)} problem(s):\n  " + "\n  ".join(problems),
        file=out,
    )
    return problems


def _validate_one(ex: Exercise, seed: str, out, limits: dict) -> list[str]:
    tag = f"exercise {ex.id}"
    print(f"\n{tag}: {ex.title}", file=out)
    master_path = ex.path / ex.student_file
    if not master_path.is_file():
        return [f"{tag}: the master source {master_path} is missing"]
    master = master_path.read_text()
    problems = []
    try:
        regions = solution_regions(master, str(master_path))
        stub = stub_source(master, ex.module, str(master_path))
    except (ExerciseError, SyntaxError) as e:
        return [f"{tag}: {e}"]
    without = [f for f in ex.functions if f not in {r.function for r in regions}]
    if without:
        problems.append(f"{tag}: no {BEGIN} region in {', '.join(without)} (the release would ship the solution)")
    if not ex.public:
        problems.append(f"{tag}: no public checks ({PUBLIC_FILE}): learners could not check their work")
    total = sum(c.points for c in ex.checks)
    if abs(total - ex.points) > 1e-9:
        problems.append(
            f"{tag}: the checks' points add up to {_fmt(total)}, but {SETTINGS_FILE} says points = {_fmt(ex.points)}"
        )
    if ex.notebook and not (ex.path / ex.notebook).is_file():
        problems.append(f"{tag}: the notebook {ex.notebook} is missing")
    lim = _limits(ex, limits)
    res = run_checks(ex, master, ex.checks, seed=seed, limits=lim)
    print(f"  master {ex.student_file}: {_fmt(res.points)}/{_fmt(res.max_points)} points", file=out)
    for c in res.checks:
        print(
            f"    {'hidden' if c.hidden else 'public'}  {c.name:32s} {_fmt(c.points)}/{_fmt(c.max_points)}"
            f"  {c.status} ({c.seconds:.1f} s)",
            file=out,
        )
        if c.status != PASSED:
            why = "; ".join(x for x in (c.summary, c.detail, c.grader_note) if x)[:800]
            problems.append(f"{tag}: check {c.name} fails on the master solution: {c.status}: {why}")
    stub_res = run_checks(ex, stub, ex.checks, seed=seed, limits=lim)
    wrong = [c for c in stub_res.checks if c.status != NOT_IMPLEMENTED]
    for c in wrong:
        problems.append(
            f"{tag}: check {c.name} on the stub ended '{c.status}', not 'not implemented'"
            + (" — it passes without the learner's code" if c.status == PASSED else "")
        )
    print(
        f"  stub: {_fmt(stub_res.points)}/{_fmt(stub_res.max_points)} points, "
        f"{len(stub_res.checks) - len(wrong)}/{len(stub_res.checks)} checks say 'not implemented yet'",
        file=out,
    )
    return problems


def _limits(ex: Exercise, overrides: dict) -> Limits:
    if not overrides:
        return ex.limits
    d = dict(ex.limits.__dict__)
    d.update(overrides)
    return Limits.from_dict(d)


# ---------------------------------------------------------------------------------------------------------
# release


def release(
    exercises_dir: Path,
    out_dir: Path,
    ids: list[str] | None = None,
    *,
    force: bool = False,
    out=sys.stdout,
    limits: dict | None = None,
) -> list[str]:
    """Validate, then write the student version of the chosen exercises to ``out_dir`` and verify it.
    Returns the problems (empty = released)."""
    problems = validate(exercises_dir, ids, out=out, limits=limits)
    if problems:
        print("\nrelease REFUSED: fix the problems above first (nothing was written)", file=out)
        return problems
    exercises = find_exercises(exercises_dir, ids)
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not force:
        msg = f"{out_dir} exists and is not empty; pass --force to replace the exercises in it"
        print(f"\nrelease REFUSED: {msg}", file=out)
        return [msg]
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for ex in exercises:
        dest = out_dir / ex.path.name
        if dest.exists():
            shutil.rmtree(dest)
        dest.mkdir()
        written.append(dest)
        master = (ex.path / ex.student_file).read_text()
        header = (
            f"# Exercise {ex.id}: {ex.title}\n# Write the functions below, save, then run the checks "
            f"(the notebook's last cell, or `python -m glmkit.grading check` here).\n"
        )
        (dest / ex.student_file).write_text(header + stub_source(master, ex.module))
        shutil.copy2(ex.path / SETTINGS_FILE, dest / SETTINGS_FILE)
        shutil.copy2(ex.path / PUBLIC_FILE, dest / PUBLIC_FILE)
        if ex.notebook:
            (dest / ex.notebook).write_text(_clean_notebook((ex.path / ex.notebook).read_text()))
    (out_dir / "README.md").write_text(_release_readme(exercises))
    problems = verify_release(out_dir, exercises)
    if problems:
        for d in written:
            shutil.rmtree(d, ignore_errors=True)
        print("\nrelease REFUSED: the student version would leak:\n  " + "\n  ".join(problems), file=out)
        return problems
    print(f"\nreleased {len(exercises)} exercise(s) to {out_dir}:", file=out)
    for d in written:
        print(f"  {d.name}/: " + ", ".join(sorted(p.name for p in d.iterdir())), file=out)
    print("verified: no solution code, no hidden check, no solution markers in the release", file=out)
    return []


def _clean_notebook(text: str) -> str:
    nb = json.loads(text)
    for cell in nb.get("cells", []):
        if cell.get("cell_type") == "code":
            cell["outputs"], cell["execution_count"] = [], None
    return json.dumps(nb, indent=1, ensure_ascii=False) + "\n"


def _release_readme(exercises: list[Exercise]) -> str:
    lines = [
        "# Exercises",
        "",
        "Each folder is one exercise. Open its notebook in JupyterLab, write the "
        "functions in its `.py` file, save, and run the notebook's check cell — or, in the folder:",
        "",
        "    python -m glmkit.grading check",
        "",
        "The check runs the *public* checks only. When your work is graded, hidden checks are run "
        "as well, so passing every public check does not guarantee full marks.",
        "",
    ]
    for ex in exercises:
        lines.append(
            f"* `{ex.path.name}/` — exercise {ex.id}: {ex.title} ({_fmt(ex.points)} points; submit `{ex.student_file}`)"
        )
    return "\n".join(lines) + "\n"


def verify_release(out_dir: Path, exercises: list[Exercise]) -> list[str]:
    """The release holds exactly the shipped files, and no solution line, marker or hidden check."""
    problems = []
    for ex in exercises:
        dest = Path(out_dir) / ex.path.name
        allowed = {ex.student_file, SETTINGS_FILE, PUBLIC_FILE} | ({ex.notebook} if ex.notebook else set())
        files = {str(p.relative_to(dest)) for p in dest.rglob("*") if p.is_file()}
        for extra in sorted(files - allowed):
            problems.append(f"{dest.name}/{extra}: not a file a release may contain")
        texts = {f: (dest / f).read_text(errors="replace") for f in files}
        master = (ex.path / ex.student_file).read_text()
        public_src = (ex.path / PUBLIC_FILE).read_text() if (ex.path / PUBLIC_FILE).exists() else ""
        public_lines = {s.strip() for s in public_src.splitlines()}
        hidden_src = (ex.path / HIDDEN_FILE).read_text() if (ex.path / HIDDEN_FILE).exists() else ""
        hidden_lines = [
            s.strip()
            for s in hidden_src.splitlines()
            if len(s.strip()) >= 25 and not s.strip().startswith("#") and s.strip() not in public_lines
        ]
        sol = solution_lines(master)
        for f, text in texts.items():
            stripped = {line.strip() for line in text.splitlines()}
            if f.endswith(".ipynb"):
                stripped |= {s.strip().strip('",').replace('\\"', '"').replace("\\n", "") for s in text.splitlines()}
            for marker in (BEGIN, END):
                if marker in text:
                    problems.append(f"{dest.name}/{f}: contains the marker {marker!r}")
            for line in sol:
                if line in stripped:
                    problems.append(f"{dest.name}/{f}: contains solution code: {line[:60]!r}")
            for c in ex.hidden:
                if re.search(rf"\b{re.escape(c.name)}\b", text):
                    problems.append(f"{dest.name}/{f}: names the hidden check {c.name!r}")
            for line in hidden_lines:
                if line in stripped:
                    problems.append(f"{dest.name}/{f}: contains hidden-check source: {line[:60]!r}")
    return problems


# ---------------------------------------------------------------------------------------------------------
# check (the learner's self-check)


def _find_exercise_dir(path: Path) -> Path | None:
    path = Path(path).resolve()
    if path.is_file():
        path = path.parent
    for p in [path, *path.parents][:4]:
        if (p / SETTINGS_FILE).is_file():
            return p
    return None


def self_check(path=None, *, seed=None, out=None, limits: dict | None = None) -> bool:
    out = out or sys.stdout
    exdir = _find_exercise_dir(Path(path or "."))
    if exdir is None:
        print(
            f"No exercise here: run this in an exercise folder (one with {SETTINGS_FILE}), e.g. next to ex01.ipynb.",
            file=out,
        )
        return False
    ex = load_exercise(exdir, with_hidden=False)  # a learner's check never loads hidden checks
    target = Path(path) if path and Path(path).is_file() else exdir / ex.student_file
    if not target.is_file():
        print(f"{target.name} is missing from {exdir}: it is the file you write your code in.", file=out)
        return False
    seed = secrets.randbelow(10**6) if seed is None else seed
    print(f"Exercise {ex.id} — {ex.title}", file=out)
    if (warning := numpy_warning()) is not None:
        print(warning + "\n", file=out)
    print(
        f"Checking {target.name} as saved on disk (save your edits first). Seed {seed}: "
        f"`python -m glmkit.grading check --seed {seed}` repeats these inputs.\n",
        file=out,
    )

    def show(cr):
        mark = "PASS" if cr.status == PASSED else "FAIL"
        print(
            f"  {mark}  {cr.title:34s} {_fmt(cr.points)}/{_fmt(cr.max_points)}"
            + ("" if cr.status == PASSED else f"   {cr.summary}"),
            file=out,
        )
        if cr.status != PASSED:
            if cr.status != NOT_IMPLEMENTED:
                print(f"        hint: {cr.message}", file=out)
            if cr.detail:
                print("        " + cr.detail.replace("\n", "\n        "), file=out)
        out.flush()

    res = run_checks(
        ex, target.read_text(errors="replace"), ex.public, seed=seed, limits=_limits(ex, limits or {}), on_check=show
    )
    passed = sum(c.status == PASSED for c in res.checks)
    for n in res.notes:
        print(f"\nNote: {n}", file=out)
    hidden_points = ex.points - ex.public_points
    print(
        f"\nPublic checks: {passed} of {len(res.checks)} pass ({_fmt(res.points)} of {_fmt(res.max_points)} points).",
        file=out,
    )
    print(
        f"These are only the public checks. When your work is graded, hidden checks worth "
        f"{_fmt(hidden_points)} more points ({_fmt(ex.points)} in all) are run as well, so passing every "
        f"public check does not guarantee full marks.",
        file=out,
    )
    return passed == len(res.checks)


# ---------------------------------------------------------------------------------------------------------
# autograde


def feedback_stem(name: str) -> str:
    """A unique, stable file name stem for a student folder ``name``: the name itself when it is plain (letters,
    digits, ``._-``, at most 64, not starting with a dot, not ending like a hashed stem), else a sanitised prefix
    plus 12 hex digits of the SHA-256 of the name's bytes on disk. A plain name never ends in ``-<12 hex>``, so
    it never equals a hashed stem, and two different names never share a stem."""
    if re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", name) and not re.search(r"-[0-9a-f]{12}$", name):
        return name
    prefix = re.sub(r"[^A-Za-z0-9._-]", "_", name)[:48].lstrip(".") or "student"
    return f"{prefix}-{hashlib.sha256(os.fsencode(name)).hexdigest()[:12]}"


def autograde(
    submissions: Path,
    out_dir: Path,
    *,
    exercises_dir: Path | None = None,
    ids: list[str] | None = None,
    student: str | None = None,
    jobs: int = 2,
    seed: str | None = None,
    new_seed: bool = False,
    limits: dict | None = None,
    isolation: Isolation | None = None,
    allow_weak_isolation: bool = False,
    out=sys.stdout,
) -> list[dict]:
    """Grade every student folder of ``submissions`` (or one ``student``) against every exercise (or
    ``ids``); write gradebook.csv, feedback/<stem>.md and results/<stem>.json under ``out_dir``. Workers run
    in the namespaces sandbox; without one, SandboxUnavailable, unless ``allow_weak_isolation``. Returns the
    gradebook rows. Whatever a submission contains, it gets exactly one row per exercise."""
    submissions, out_dir = Path(submissions), Path(out_dir)
    exercises_dir = Path(exercises_dir or default_exercises_dir())
    exercises = find_exercises(exercises_dir, ids)
    if not exercises:
        raise ExerciseError("no exercises to grade")
    if not submissions.is_dir():
        raise FileNotFoundError(f"no submissions folder {submissions}")
    iso = isolation or require(allow_weak_isolation)
    exposed = iso.exposed([exercises_dir, submissions, out_dir])
    if exposed:
        raise SandboxUnavailable(
            f"autograde refused: {', '.join(exposed)} would be visible inside the sandbox, "
            f"which shows the workers the Python environment; keep exercises, submissions "
            f"and grades outside {sys.prefix} and /usr"
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results").mkdir(exist_ok=True)
    (out_dir / "feedback").mkdir(exist_ok=True)
    seed_file = out_dir / "grading-seed"
    if seed is None:
        if seed_file.is_file() and not new_seed:
            seed = seed_file.read_text().strip()
        else:
            seed = secrets.token_hex(8)
    _atomic_write(seed_file, seed + "\n")
    with os.scandir(submissions) as it:  # every folder is a student, hidden-looking names included
        entries = sorted(it, key=lambda e: e.name)
    links = {e.name for e in entries if e.is_symlink()}
    students = [e.name for e in entries if e.name in links or e.is_dir(follow_symlinks=False)]
    if student is not None:
        if student not in students:
            raise FileNotFoundError(f"no submission folder {submissions / student}")
        students = [student]
    t0 = time.monotonic()
    print(
        f"grading {len(students)} student(s) x {len(exercises)} exercise(s) with {jobs} job(s), seed {seed}, "
        f"isolation: {iso.label}" + (f" ({iso.note})" if iso.note else ""),
        file=out,
    )
    if (warning := numpy_warning()) is not None:
        print(warning, file=out)

    def grade_student(name: str) -> dict:
        stem, shown = feedback_stem(name), printable(name)
        record = {"student": shown, "stem": stem, "seed": seed, "isolation": iso.label, "exercises": []}
        try:
            for ex in exercises:
                if name in links:
                    r = ExerciseResult(
                        ex.id,
                        ex.title,
                        ex.points,
                        status="refused",
                        flags=["symlink"],
                        notes=["the submission folder is a symbolic link: it was not followed"],
                    )
                else:
                    r = _grade_one(submissions / name, stem, ex, seed, _limits(ex, limits or {}), iso)
                record["exercises"].append(r.to_dict())
                print(
                    f"  {shown[:40]:20s} {r.exercise}  {_fmt(r.points):>5s}/{_fmt(r.max_points):<4s} {r.status}"
                    + (f"  [{', '.join(r.flags)}]" if r.flags else ""),
                    file=out,
                )
                out.flush()
            _atomic_write(out_dir / "results" / f"{stem}.json", json.dumps(record, indent=1) + "\n")
            _atomic_write(out_dir / "feedback" / f"{stem}.md", render_feedback(shown, record["exercises"]))
        except Exception as e:  # noqa: BLE001 - the run never stops for one submission
            done = {r["exercise"] for r in record["exercises"]}
            record["exercises"] += [_grader_error(ex, e).to_dict() for ex in exercises if ex.id not in done]
            print(f"  {shown[:40]:20s} grader-error: {type(e).__name__}", file=out)
            try:
                _atomic_write(out_dir / "results" / f"{stem}.json", json.dumps(record, indent=1) + "\n")
            except Exception:  # noqa: BLE001 - kept in memory for the gradebook below
                pass
        return record

    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        records = list(pool.map(grade_student, students))
    if student is None:  # a full run: drop what belongs to students no longer in the folder
        keep = {feedback_stem(s) for s in students}
        for sub, ext in (("results", ".json"), ("feedback", ".md")):
            for p in (out_dir / sub).glob(f"*{ext}"):
                if p.stem not in keep:
                    p.unlink()
    rows = write_gradebook(out_dir, records)
    print(
        f"done in {time.monotonic() - t0:.1f} s: {out_dir / 'gradebook.csv'} ({len(rows)} rows), "
        f"feedback in {out_dir / 'feedback'}",
        file=out,
    )
    return rows


def _grader_error(ex: Exercise, e: BaseException) -> ExerciseResult:
    r = ExerciseResult(
        ex.id,
        ex.title,
        ex.points,
        status="grader-error",
        notes=[f"the grader failed on this submission ({type(e).__name__}); your instructor has the details"],
    )
    r.output_excerpt = "".join(traceback.format_exception(type(e), e, e.__traceback__))[-4000:]
    return r


def _grade_one(folder: Path, stem: str, ex: Exercise, seed: str, limits: Limits, iso: Isolation) -> ExerciseResult:
    try:
        loc = locate_submission(folder, ex)
        if loc.status in ("missing", "empty", "refused"):
            r = ExerciseResult(ex.id, ex.title, ex.points, status=loc.status, flags=list(loc.flags))
        else:
            r = run_checks(ex, loc.source, ex.checks, seed=f"{seed}:{stem}", limits=limits, isolation=iso)
            r.flags = list(dict.fromkeys(r.flags + loc.flags))
        r.file = printable(str(loc.path)) if loc.path else ""
        if loc.note:
            r.notes.insert(0, printable(loc.note))
        r.max_points, r.isolation = ex.points, iso.label
        return r
    except Exception as e:  # noqa: BLE001 - this submission's row says so; the others are graded
        return _grader_error(ex, e)


def _cell(v) -> str:
    """A CSV cell safe from formula injection (OWASP): text starting with = + - @ tab or CR gets a leading '."""
    v = str(v)
    return ("'" if v[:1] in ("=", "+", "-", "@", "\t", "\r") else "") + printable(v)


def write_gradebook(out_dir: Path, records: list[dict] = ()) -> list[dict]:
    """Rebuild gradebook.csv from every results/*.json (so re-grading one student keeps the others), plus the
    in-memory ``records`` whose results file could not be written."""
    recs = {r["stem"]: r for r in records}
    for p in sorted((out_dir / "results").glob("*.json")):
        try:
            rec = json.loads(p.read_text(encoding="utf-8", errors="replace"))
            recs[p.stem] = {**rec, "stem": p.stem}
        except (OSError, ValueError):
            recs.setdefault(
                p.stem,
                {
                    "student": p.stem,
                    "stem": p.stem,
                    "exercises": [
                        {
                            "exercise": "?",
                            "points": 0,
                            "max_points": 0,
                            "status": "grader-error",
                            "flags": [],
                            "notes": [f"results/{p.name} could not be read"],
                            "isolation": "",
                        }
                    ],
                },
            )
    rows = []
    for stem, rec in recs.items():
        for r in rec["exercises"]:
            rows.append(
                {
                    "student": rec["student"],
                    "exercise": r["exercise"],
                    "points": _fmt(r["points"]),
                    "max_points": _fmt(r["max_points"]),
                    "status": r["status"],
                    "flags": ";".join(r["flags"]),
                    "notes": " | ".join(r["notes"])[:500],
                    "isolation": r.get("isolation") or rec.get("isolation", ""),
                    "feedback": f"feedback/{stem}.md",
                }
            )
    rows.sort(key=lambda r: (r["student"], r["exercise"], r["feedback"]))
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(GRADEBOOK_COLUMNS)
    w.writerows([_cell(r[c]) for c in GRADEBOOK_COLUMNS] for r in rows)
    _atomic_write(out_dir / "gradebook.csv", buf.getvalue())
    return rows


# what a learner sees for a failed hidden check besides its teaching message: its status in a fixed word or two
_HIDDEN_SAYS = {
    FAILED: "wrong answer",
    ERROR: "your code raised an exception",
    NOT_IMPLEMENTED: "not implemented yet",
    MISSING_FN: "a function it calls is missing",
    TIMEOUT: "time limit reached",
    CRASHED: "your code's process stopped",
    OUTPUT_LIMIT: "your code printed too much",
    PROTOCOL: "your code's answer could not be read back",
    NOT_RUN: "not run",
}


def render_feedback(student: str, results: list) -> str:
    """The learner's feedback file. A hidden check shows its teaching message and a fixed status word only:
    nothing the student's code returned, raised, printed or reported reaches it."""
    lines = [f"# Feedback for {printable(student)}", ""]
    for r in results:
        r = r if isinstance(r, dict) else r.to_dict()
        lines += [
            f"## Exercise {r['exercise']} — {r['title']}: {_fmt(r['points'])} / {_fmt(r['max_points'])} "
            f"points ({r['status']})",
            "",
        ]
        if r.get("file"):
            lines.append(f"Graded file: `{printable(r['file'])}`")
        for n in r["notes"]:
            lines.append(f"* {printable(n)}")
        if "reference-import" in r["flags"]:
            lines.append(
                "* This submission was FLAGGED for review: it uses glmkit's reference implementation "
                "of a function you were asked to write. Your instructor will look at it."
            )
        checks = r["checks"]
        if not checks:
            lines += ["", "No checks were run.", ""]
            continue
        for title, group in (
            ("Public checks", [c for c in checks if not c["hidden"]]),
            ("Hidden checks", [c for c in checks if c["hidden"]]),
        ):
            if not group:
                continue
            ok = sum(c["status"] == PASSED for c in group)
            pts, mx = sum(c["points"] for c in group), sum(c["max_points"] for c in group)
            lines += ["", f"### {title}: {ok} of {len(group)} passed ({_fmt(pts)} / {_fmt(mx)} points)", ""]
            for k, c in enumerate(group, 1):
                label = c["title"] if not c["hidden"] else f"hidden check {k}"
                if c["status"] == PASSED:
                    lines.append(f"* PASS {label} ({_fmt(c['points'])}/{_fmt(c['max_points'])})")
                    continue
                summary = _HIDDEN_SAYS.get(c["status"], "failed") if c["hidden"] else printable(c["summary"])
                lines.append(f"* FAIL {label} (0/{_fmt(c['max_points'])}): {summary}")
                lines.append(f"  * what this checks: {c['message']}")
                if not c["hidden"] and c["detail"]:
                    lines += ["  * detail:", "", "    " + printable(c["detail"], True).replace("\n", "\n    "), ""]
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


# ---------------------------------------------------------------------------------------------------------
# the command line


def _parse_limits(items: list[str]) -> dict:
    d = {}
    for it in items or []:
        k, _, v = it.partition("=")
        if not v:
            raise SystemExit(f"--limit expects KEY=VALUE, got {it!r}")
        d[k.strip()] = float(v) if "." in v else int(v)
    return d


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m glmkit.grading",
        description="Graded exercises: validate and release (instructor), check (learner), autograde "
        "(instructor). Also available as `glmkit grade <command>`.",
    )
    sub = p.add_subparsers(dest="command", metavar="command", required=True)

    def add_common(sp, exercises=True):
        sp.add_argument(
            "--exercises-dir",
            type=Path,
            default=None,
            help="folder of exercise masters (default: $GLMKIT_EXERCISES or the repo's exercises/)",
        )
        if exercises:
            sp.add_argument(
                "--exercises",
                nargs="+",
                metavar="ID",
                help="only these exercises (id like 01, or folder name); default: all",
            )
        sp.add_argument(
            "--limit",
            action="append",
            metavar="KEY=VALUE",
            default=[],
            help="override an exercise.toml [limits] value, e.g. --limit total_timeout=30",
        )

    v = sub.add_parser(
        "validate",
        help="every master passes all public+hidden checks; every stub fails them",
        description="Run every check of every exercise against its master solution (all must "
        "pass) and against its stub (all must say 'not implemented yet'), and "
        "check markers and points. Exit status 1 if anything is wrong.",
    )
    add_common(v)
    r = sub.add_parser(
        "release",
        help="write the student version (stubs, public checks, notebook) to --out",
        description="Validate, then write the student version of the exercises to OUT: each "
        "master with its solutions replaced by stubs, exercise.toml, the public "
        "checks and the notebook — never hidden checks or instructor files — and "
        "verify the result leaks no solution line and no hidden check. A failing "
        "master refuses the release (exit status 1) with the reason.",
    )
    add_common(r)
    r.add_argument("--out", type=Path, required=True, help="folder to write the release to")
    r.add_argument("--force", action="store_true", help="replace exercises already in a non-empty --out")
    rs = sub.add_parser(
        "release-solutions",
        help="after the deadline: write the master solutions (never the hidden checks) to --out",
        description="Write OUT/<exercise>/<module>_solution.py, the master without its solution markers, for "
        "every chosen exercise whose exercise.toml deadline (a date-time with its time zone) has passed. "
        "Refuses, writing nothing, while any deadline is ahead or missing (--before-deadline overrides).",
    )
    add_common(rs)
    rs.add_argument("--out", type=Path, required=True, help="folder to write the solutions to")
    rs.add_argument("--now", default=None, help="the time to compare with the deadlines (ISO, with time zone)")
    rs.add_argument("--before-deadline", action="store_true", help="release even if a deadline is ahead or missing")
    c = sub.add_parser(
        "check",
        help="learner self-check: run the public checks on your saved file",
        description="Run the public checks of the exercise in PATH (default: this folder) on "
        "the saved student file. Hidden checks run only when work is graded.",
    )
    c.add_argument("path", nargs="?", default=".", help="exercise folder or your .py file (default: .)")
    c.add_argument("--seed", type=int, default=None, help="repeat a previous run's random inputs")
    c.add_argument("--limit", action="append", metavar="KEY=VALUE", default=[], help=argparse.SUPPRESS)
    a = sub.add_parser(
        "autograde",
        help="grade a folder of submissions: gradebook.csv + feedback files",
        description="Grade SUBMISSIONS (one sub-folder per student) against every exercise's "
        "public and hidden checks, each submission in its own bubblewrap sandbox. "
        "Writes OUT/gradebook.csv (student, exercise, points, max_points, status, "
        "flags, notes), OUT/feedback/<student>.md for the learner and "
        "OUT/results/<student>.json for you. Re-running gives the same result "
        "(the seed is kept in OUT/grading-seed); --student re-grades one student "
        "and leaves everyone else's rows and files alone.",
    )
    add_common(a)
    a.add_argument("submissions", type=Path, help="folder with one sub-folder per student")
    a.add_argument("--out", type=Path, required=True, help="folder for the gradebook, feedback and results")
    a.add_argument("--student", help="grade only this student (a sub-folder name)")
    a.add_argument(
        "--jobs",
        type=int,
        default=max(1, min(4, os.cpu_count() or 1)),
        help="submissions graded in parallel (default: min(4, CPUs))",
    )
    a.add_argument("--seed", default=None, help="the inputs' seed (default: OUT/grading-seed, else new)")
    a.add_argument("--new-seed", action="store_true", help="draw fresh inputs instead of reusing the seed")
    a.add_argument(
        "--allow-weak-isolation",
        action="store_true",
        help="where workers cannot have their own namespaces (no bubblewrap, no user namespaces), grade "
        "anyway with process-level isolation only; the gradebook's isolation column says 'weak'",
    )
    return p


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "check":
            return 0 if self_check(args.path, seed=args.seed, limits=_parse_limits(args.limit)) else 1
        exdir = args.exercises_dir or default_exercises_dir()
        limits = _parse_limits(args.limit)
        if args.command == "validate":
            return 1 if validate(exdir, args.exercises, limits=limits) else 0
        if args.command == "release":
            return 1 if release(exdir, args.out, args.exercises, force=args.force, limits=limits) else 0
        if args.command == "release-solutions":
            import datetime as dt

            from glmkit.grading.solutions import release_solutions

            now = dt.datetime.fromisoformat(args.now) if args.now else None
            if now is not None and now.tzinfo is None:
                print("error: --now needs a time zone, e.g. 2026-12-16T09:00:00+01:00", file=sys.stderr)
                return 2
            return 1 if release_solutions(exdir, args.out, args.exercises, now=now, early=args.before_deadline) else 0
        if args.command == "autograde":
            autograde(
                args.submissions,
                args.out,
                exercises_dir=exdir,
                ids=args.exercises,
                student=args.student,
                jobs=args.jobs,
                seed=args.seed,
                new_seed=args.new_seed,
                limits=limits,
                allow_weak_isolation=args.allow_weak_isolation,
            )
            return 0
    except (ExerciseError, FileNotFoundError, SandboxUnavailable) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 2
