"""Hostile submissions: each must end as a failure, timeout or flagged row for that student alone, with the
gradebook complete, every correct student graded correctly, nothing outside the student's folder changed and
no process left behind. The files are in tests/grading/hostile/; cases that are not a file (symbolic links, a 3 GiB
sparse file, a FIFO, odd folder names) are built here.

They need the namespaces sandbox (bubblewrap): where it is unavailable this file is skipped, and fails instead
when GLMKIT_REQUIRE_SANDBOX=1 (CI sets it). Processes and data are recognised by what this run owns only: the
uids its workers ran as (recorded in results/) and a marker and token unique to the run, so a grading run
beside it is never counted or touched. Limits are shrunk (12 s per submission) and four submissions are graded
at a time; the file takes about two minutes on 2 cores.
"""

from __future__ import annotations

import csv
import ctypes
import dataclasses
import hashlib
import io
import json
import os
import pty
import resource
import shutil
import socket
import threading
import time
import uuid
from pathlib import Path

import pytest

from glmkit.grading import isolation
from glmkit.grading.commands import _cell, autograde, feedback_stem, printable
from glmkit.grading.exercise import load_exercise

REPO = Path(__file__).resolve().parents[2]
EXERCISES = Path(os.environ.get("GLMKIT_EXERCISES") or REPO / "tests" / "grading" / "fixture_exercises")
EX01 = EXERCISES / "01_blank_infilling"
HOSTILE = Path(__file__).parent / "hostile"
LIMITS = {"total_timeout": 12, "startup_timeout": 12}
RUN = uuid.uuid4().hex[:12]
MARK, TOKEN = f"glmkit-hostile-{RUN}", f"glmkit-token-{RUN}"
FULL = 21
pytestmark = pytest.mark.slow  # about a minute: one class of ~45 submissions, then three small runs

# student -> (allowed statuses, points, flags that must be present)
EXPECTED = {
    "infinite_loop": ({"timeout"}, 0, set()),
    "sleep_forever": ({"timeout"}, 0, set()),
    "os_exit_import": ({"crashed"}, 0, set()),
    "sys_exit_import": ({"import-error"}, 0, set()),
    "raise_exits": ({"graded"}, 0, set()),
    "keyboard_interrupt_import": ({"import-error"}, 0, set()),
    "print_1gb": ({"output-limit"}, 0, set()),
    "memory_hog": ({"graded", "crashed", "timeout"}, 0, set()),  # MemoryError, or the budget spent zeroing
    "spawn_children": ({"graded"}, 0, {"blocked-actions"}),
    "read_instructor_files": ({"graded"}, 0, {"blocked-actions"}),
    # patching builtins.isinstance breaks its own worker's reply encoder: "crashed" is its own doing
    "monkeypatch_grader": ({"graded", "crashed"}, 0, set()),
    "lying_objects": ({"graded"}, 0, set()),
    "syntax_error": ({"import-error"}, 0, set()),
    # glmkit is not importable in the sandbox: the reference cannot be used at all, and trying is flagged
    "imports_reference": ({"import-error"}, 0, {"reference-import"}),
    "sneaky_reference": ({"import-error"}, 0, {"reference-import"}),
    "reference_wrapper": ({"import-error"}, 0, {"reference-import"}),
    "kill_grader": ({"graded"}, 0, {"blocked-actions"}),
    # issue 16
    "frame_leak": ({"graded"}, FULL, set()),
    "hidden_feedback_leak": ({"crashed"}, 0, set()),
    "pipe_flood": ({"timeout", "output-limit", "bad-reply", "graded"}, 0, set()),
    "surrogate_message": ({"graded"}, 0, set()),
    "fork_memory": ({"crashed"}, 0, {"blocked-actions"}),  # SIGSYS at the first fork
    "setsid_double_fork": ({"crashed"}, 0, {"blocked-actions"}),
    # built here
    "symlink_master": ({"refused"}, 0, {"symlink"}),
    "symlink_other_student": ({"refused"}, 0, {"symlink"}),
    "symlink_shadow": ({"refused"}, 0, {"symlink"}),
    "symlink_hidden_checks": ({"refused"}, 0, {"symlink"}),
    "symlink_kmsg": ({"refused"}, 0, {"symlink"}),
    "symlinked_folder": ({"refused"}, 0, {"symlink"}),
    "sparse_3gib": ({"refused"}, 0, set()),
    "fifo": ({"refused"}, 0, set()),
}
# correct submissions, some under names that broke the gradebook (Latin-1 bytes, 240 characters, formulas (the
# DDE payload with "\" for "/", which no folder name can hold), hidden-looking, another's file name)
GOOD = [
    "good_a",
    "good_b",
    "good_c",
    os.fsdecode(b"caf\xe9"),
    "L" * 240,
    "=cmd|' \\C calc'!A0",
    "=1+1",
    "@SUM(1+1)",
    "+1",
    "-2",
    ".hidden",
    "...",
    "Ann Lee",
]
COLLIDER = feedback_stem("Ann Lee")  # a folder named like "Ann Lee"'s feedback file: a wrong answer


def _placeholders(src: str, **extra) -> str:
    for k, v in {"__MARK__": MARK, "__TOKEN__": TOKEN, "__EXERCISE_DIR__": str(EX01), **extra}.items():
        src = src.replace(k, str(v))
    return src


@pytest.fixture(scope="module")
def sandbox():
    iso = isolation.detect()
    if iso.mode != "namespaces":
        msg = f"the grader's namespaces sandbox is unavailable here ({iso.note})"
        if os.environ.get("GLMKIT_REQUIRE_SANDBOX") == "1":
            pytest.fail(msg)
        pytest.skip(msg)
    return iso


def _tree(*roots: Path) -> dict:
    """Every entry under ``roots`` (links not followed) with its type and, for small files, a hash."""
    out = {}
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root):
            for name in dirnames + filenames:
                p = Path(dirpath, name)
                st = p.lstat()
                digest = (
                    hashlib.sha256(p.read_bytes()).hexdigest()
                    if p.is_file() and not p.is_symlink() and st.st_size < 1 << 24
                    else (os.readlink(p) if p.is_symlink() else st.st_size)
                )
                out[str(p)] = (st.st_mode, digest)
    return out


def _marked() -> list[int]:
    found = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                if MARK.encode() in Path(f"/proc/{d}/cmdline").read_bytes():
                    found.append(int(d))
            except OSError:
                pass
    return found


def _uids(out: Path) -> set[int]:
    return {
        u
        for p in (out / "results").glob("*.json")
        for r in json.loads(p.read_text())["exercises"]
        for u in r.get("sandbox", {}).get("uids", [])
    }


def _rows(out: Path) -> dict[str, dict]:
    return {r["student"]: r for r in csv.DictReader(io.StringIO((out / "gradebook.csv").read_text()))}


def _row_key(name: str) -> str:
    return _cell(printable(name))


@pytest.fixture(scope="module")
def graded(sandbox, tmp_path_factory):
    subs = tmp_path_factory.mktemp("submissions")
    out = tmp_path_factory.mktemp("grades")
    master = (EX01 / "ex01.py").read_text()
    reference = load_exercise(EX01).reference_modules[0]
    for f in sorted(HOSTILE.glob("*.py")):
        if f.stem in EXPECTED:
            (subs / f.stem).mkdir()
            src = f.read_text()
            src = master + "\n\n" + src if f.stem == "frame_leak" else src
            (subs / f.stem / "ex01.py").write_text(_placeholders(src, __REFERENCE__=reference))
    links = {
        "symlink_master": f"/proc/self/root{EX01 / 'ex01.py'}",
        "symlink_other_student": "../good_a/ex01.py",
        "symlink_shadow": "/etc/shadow",
        "symlink_hidden_checks": str(EX01 / "hidden_checks.py"),
        "symlink_kmsg": "/proc/kmsg",
    }
    for name, target in links.items():
        (subs / name).mkdir()
        os.symlink(target, subs / name / "ex01.py")
    os.symlink("good_a", subs / "symlinked_folder")
    (subs / "sparse_3gib").mkdir()
    with open(subs / "sparse_3gib" / "ex01.py", "wb") as f:
        f.write(master.encode())
        f.truncate(3 << 30)  # what a zip bomb unpacks to
    (subs / "fifo").mkdir()
    os.mkfifo(subs / "fifo" / "ex01.py")
    for name in GOOD:
        (subs / name).mkdir()
        (subs / name / "ex01.py").write_text(master)
    shutil.move(subs / "good_b" / "ex01.py", subs / "good_b" / "ex01 (2).py")  # renamed
    (subs / COLLIDER).mkdir()
    (subs / COLLIDER / "ex01.py").write_text(
        master.replace("return causal[None] | part_a", "return causal[None] & part_a")
    )
    before = _tree(subs, EXERCISES)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    log = io.StringIO()
    t0 = time.monotonic()
    rows = autograde(subs, out, exercises_dir=EXERCISES, ids=["01"], jobs=4, limits=LIMITS, out=log)
    seconds = time.monotonic() - t0
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss) / 1024
    return {
        "subs": subs,
        "out": out,
        "rows": rows,
        "log": log.getvalue(),
        "before": before,
        "seconds": seconds,
        "grown_mb": grown_mb,
    }


def test_gradebook_has_one_row_per_folder_and_good_students_are_unaffected(graded):
    book = _rows(graded["out"])
    folders = list(EXPECTED) + GOOD + [COLLIDER]
    assert sorted(book) == sorted(_row_key(n) for n in folders), graded["log"]
    assert len(graded["rows"]) == len(folders)
    for name in GOOD:
        row = book[_row_key(name)]
        assert (row["points"], row["status"], row["flags"]) == (str(FULL), "graded", ""), (name, row)
        assert row["isolation"] == "namespaces" or row["isolation"] == "namespaces+cgroup"
    assert book[COLLIDER]["points"] != str(FULL)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_each_hostile_submission_is_contained(graded, name):
    statuses, points, flags = EXPECTED[name]
    row = _rows(graded["out"])[name]
    assert row["status"] in statuses, (name, row)
    assert float(row["points"]) == points, (name, row)
    assert flags <= set(filter(None, row["flags"].split(";"))), (name, row)
    assert (graded["out"] / row["feedback"]).is_file()


def test_symlinks_are_refused_and_never_read(graded):
    out = graded["out"]
    master_lines = [ln for ln in (EX01 / "ex01.py").read_text().splitlines() if len(ln.strip()) > 30]
    hidden_lines = [ln for ln in (EX01 / "hidden_checks.py").read_text().splitlines() if len(ln.strip()) > 30]
    for name in [n for n in EXPECTED if n.startswith("symlink")]:
        text = (out / "feedback" / f"{name}.md").read_text()
        assert "symbolic link" in text, text
        assert not any(ln in text for ln in master_lines + hidden_lines), name
        assert "root:" not in text


def test_files_are_checked_before_they_are_read(graded):
    book = _rows(graded["out"])
    assert "too large" in book["sparse_3gib"]["notes"] and "not a regular file" in book["fifo"]["notes"]
    assert graded["grown_mb"] < 1024, graded["grown_mb"]  # the 3 GiB file was never read


def test_odd_names_get_their_own_row_and_feedback_file(graded):
    out, book = graded["out"], _rows(graded["out"])
    files = [book[_row_key(n)]["feedback"] for n in GOOD + [COLLIDER]]
    assert len(set(files)) == len(files) and all((out / f).is_file() for f in files)
    assert all(len(Path(f).name) < 100 for f in files)
    assert book["caf\\xe9"]["points"] == str(FULL)
    assert (out / book["caf\\xe9"]["feedback"]).read_text().startswith("# Feedback for caf\\xe9")
    assert sorted(p.name for p in (out / "feedback").iterdir()) == sorted(
        Path(r["feedback"]).name for r in book.values()
    )


def test_csv_cells_cannot_start_a_formula(graded):
    cells = [c for row in csv.reader(io.StringIO((graded["out"] / "gradebook.csv").read_text())) for c in row]
    assert not [c for c in cells if c[:1] in ("=", "+", "-", "@", "\t", "\r")]
    assert "'=cmd|' \\C calc'!A0" in cells and "'@SUM(1+1)" in cells and "'-2" in cells


def test_hidden_checks_feedback_carries_nothing_from_the_worker(graded):
    out = graded["out"]
    for name in ("frame_leak", "hidden_feedback_leak", "surrogate_message"):
        text = (out / "feedback" / f"{name}.md").read_text()
        hidden = text.split("### Hidden checks")[1]
        assert "LEAK" not in text.split("### Public checks")[0] and "LEAK" not in hidden, name
        assert "exit" not in hidden and "\\udce9" not in hidden and "caf" not in hidden, name
        for line in hidden.splitlines():
            assert not line.startswith("* FAIL") or line.split(": ", 1)[1] in {
                "wrong answer",
                "your code raised an exception",
                "your code's process stopped",
                "not run",
                "time limit reached",
                "your code's answer could not be read back",
            }, line
    assert _rows(out)["frame_leak"]["points"] == str(FULL)  # so its functions saw no caller frame


def test_a_switched_off_audit_hook_does_not_hide_a_process_start(graded):
    """fork_memory and setsid_double_fork switch the audit hook off first: the seccomp filter stops their fork
    (SIGSYS), and the grader, not the worker, records it."""
    for name in ("fork_memory", "setsid_double_fork"):
        rec = json.loads((graded["out"] / "results" / f"{name}.json").read_text())["exercises"][0]
        assert any(b.startswith("syscall:") for b in rec["blocked"]), rec["blocked"]
        assert not any(b.startswith("process:") for b in rec["blocked"]), rec["blocked"]  # the hook saw nothing
        assert "forbids" in (graded["out"] / "feedback" / f"{name}.md").read_text()


def test_the_run_finishes_and_nothing_outside_the_students_folders_changes(graded):
    assert graded["seconds"] < 400, graded["seconds"]
    assert _tree(graded["subs"], EXERCISES) == graded["before"]


def test_no_process_survives(graded):
    uids = _uids(graded["out"])
    assert len(uids) > len(EXPECTED) or os.geteuid() != 0  # as root: a fresh uid per worker
    assert [u for u in uids if isolation.processes_of_uid(u)] == [] and _marked() == []


def test_children_are_killed_with_the_pid_namespace(sandbox, tmp_path):
    """With the seccomp filter and the audit hook switched off, the children really start (a watcher sees
    them); killing the sandbox's pid namespace must still leave none of them."""
    subs = tmp_path / "subs"
    for name in ("spawn_children", "setsid_double_fork"):
        (subs / name).mkdir(parents=True)
        (subs / name / "ex01.py").write_text(_placeholders((HOSTILE / f"{name}.py").read_text()))
    seen, stop = set(), threading.Event()

    def watch():
        while not stop.is_set():
            seen.update(_marked())
            time.sleep(0.05)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        weak_inside = dataclasses.replace(sandbox, seccomp=False, audit_hook=False)
        autograde(
            subs,
            tmp_path / "out",
            exercises_dir=EXERCISES,
            ids=["01"],
            jobs=2,
            limits=LIMITS,
            isolation=weak_inside,
            out=io.StringIO(),
        )
    finally:
        stop.set()
        watcher.join()
    assert len(seen) >= 2, "the children never started: this test tests nothing"
    assert _marked() == [] and [u for u in _uids(tmp_path / "out") if isolation.processes_of_uid(u)] == []


def _add_user_key(secret: bytes) -> int | None:
    """Root's user keyring gets a key holding ``secret`` (its serial), or None where keyctl is unavailable."""
    libc = ctypes.CDLL(None, use_errno=True)
    serial = libc.syscall(248, b"user", f"glmkit-test-{RUN}".encode(), secret, len(secret), ctypes.c_long(-4))
    return serial if serial > 0 else None


def test_neighbours_and_the_host_are_out_of_reach(sandbox, tmp_path):
    """UDP between students, a Unix socket on the host, text typed into a pty, /etc/shadow, the root user
    keyring: none of it reaches a worker (four students at once, so sender and receiver overlap)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    host_udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # the same port on the host
    host_udp.bind(("127.0.0.1", port))
    host_udp.settimeout(0.1)
    unix_path = str(tmp_path / "host.sock")
    host_unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    host_unix.bind(unix_path)
    host_unix.listen()
    host_unix.settimeout(0.1)
    pty_secret, key_secret = f"typed-{RUN}".encode(), f"keyring-{RUN}".encode()
    master_fd, slave_fd = pty.openpty()
    os.write(master_fd, pty_secret + b"\n")
    key = _add_user_key(key_secret)
    subs = tmp_path / "subs"
    for name in ("udp_receiver", "udp_sender", "host_secrets"):
        (subs / name).mkdir(parents=True)
        (subs / name / "ex01.py").write_text(
            _placeholders((HOSTILE / f"{name}.py").read_text(), __PORT__=port, __UNIX_SOCKET__=unix_path)
        )
    (subs / "good").mkdir()
    (subs / "good" / "ex01.py").write_text((EX01 / "ex01.py").read_text())
    try:
        autograde(subs, tmp_path / "out", exercises_dir=EXERCISES, ids=["01"], jobs=4, limits=LIMITS, out=io.StringIO())
        reached = []
        for sock in (host_udp, host_unix):
            try:
                reached.append(sock.recv(100) if sock is host_udp else sock.accept())
            except OSError:
                pass
    finally:
        for sock in (host_udp, host_unix):
            sock.close()
        os.close(master_fd)
        os.close(slave_fd)
        if key is not None:
            ctypes.CDLL(None).syscall(250, 3, ctypes.c_long(key))  # KEYCTL_REVOKE
    out = tmp_path / "out"
    book = _rows(out)
    assert reached == [] and book["good"]["points"] == str(FULL)
    assert book["host_secrets"]["status"] == "crashed" and "blocked-actions" in book["host_secrets"]["flags"]
    assert "RECEIVED []" in (out / "feedback" / "udp_receiver.md").read_text()
    everything = "".join(p.read_text() for p in [*(out / "feedback").iterdir(), *(out / "results").iterdir()])
    assert "STOLEN" in everything and "uid: 1000" in everything  # it ran, as uid 1000
    assert TOKEN not in everything and pty_secret.decode() not in everything and key_secret.decode() not in everything
    shadow = Path("/etc/shadow").read_text().splitlines()[0] if os.access("/etc/shadow", os.R_OK) else "root:"
    assert shadow not in everything


def test_writing_grades_and_other_students_files_is_blocked(graded):
    subs, out = graded["subs"], graded["out"]
    victim_files = [
        out / "gradebook.csv",
        out / "results" / "good_a.json",
        out / "feedback" / "good_a.md",
        subs / "good_a" / "ex01.py",
    ]
    before = {p: p.read_bytes() for p in victim_files}
    src = (HOSTILE / "write_outside.py").read_text()
    for placeholder, p in zip(
        ["__GRADEBOOK__", "__VICTIM_RESULTS__", "__VICTIM_FEEDBACK__", "__VICTIM_SUBMISSION__"], victim_files
    ):
        src = src.replace(placeholder, str(p))
    (subs / "writer").mkdir()
    (subs / "writer" / "ex01.py").write_text(src)
    try:
        autograde(subs, out, exercises_dir=EXERCISES, ids=["01"], student="writer", limits=LIMITS, out=io.StringIO())
        for p in victim_files[1:]:
            assert p.read_bytes() == before[p], p
        book = _rows(out)
        old = {r["student"]: r for r in csv.DictReader(io.StringIO(before[victim_files[0]].decode()))}
        for name, row in old.items():
            assert book[name] == row, name
        assert book["writer"]["points"] == "0" and "blocked-actions" in book["writer"]["flags"], book["writer"]
    finally:
        shutil.rmtree(subs / "writer")
