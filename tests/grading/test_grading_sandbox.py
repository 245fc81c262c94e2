"""The grader's sandbox itself (glmkit.grading.isolation): what a worker sees and may do inside it, the seccomp
filter's effects, the cgroup v2 set-up, and the refusal to autograde without namespaces unless the instructor
accepts the weaker isolation (which the gradebook then records). Hostile submissions are in
test_grading_hostile.py. Tests that start a sandbox are skipped where it is unavailable, and fail instead when
GLMKIT_REQUIRE_SANDBOX=1 (CI)."""

from __future__ import annotations

import csv
import io
import os
import signal
import struct
import sys
from pathlib import Path

import pytest

from glmkit.grading import isolation, main
from glmkit.grading.commands import autograde
from glmkit.grading.isolation import WORKDIR, Box, Cgroup, Isolation, SandboxUnavailable, seccomp_program
from glmkit.grading.sandbox import Limits

REPO = Path(__file__).resolve().parents[2]
EXERCISES = Path(os.environ.get("GLMKIT_EXERCISES") or REPO / "tests" / "grading" / "fixture_exercises")


@pytest.fixture(scope="module")
def sandbox():
    iso = isolation.detect()
    if iso.mode != "namespaces":
        msg = f"the grader's namespaces sandbox is unavailable here ({iso.note})"
        if os.environ.get("GLMKIT_REQUIRE_SANDBOX") == "1":
            pytest.fail(msg)
        pytest.skip(msg)
    return iso


def _inside(iso: Isolation, code: str, limits: Limits | None = None) -> tuple[int, str, str]:
    """Run ``code`` with the sandbox's Python (-I -S) in a fresh box; (exit status, stdout, stderr)."""
    box = Box(iso, limits or Limits(), {"note.txt": b"mine"})
    try:
        proc = box.spawn([sys.executable, "-I", "-S", "-c", code], {"PATH": "/usr/bin:/bin"})
        out, err = proc.communicate(timeout=60)
        return proc.returncode, out.decode(), err.decode()
    finally:
        box.kill()


def test_the_worker_sees_only_the_python_environment_and_its_own_folder(sandbox):
    code = r"""
import os, socket
print(os.getuid(), os.getcwd(), sorted(os.listdir(".")), socket.gethostname())
print([p for p in ("/etc/shadow", "/etc/passwd", "/root/.ssh", "/home", "/var", "/sys", EXERCISES, GLMKIT)
       if os.path.exists(p)])
print(sorted(int(p) for p in os.listdir("/proc") if p.isdigit()))
print(sorted(os.listdir("/dev/pts")), sorted(i[1] for i in socket.if_nameindex()))
for path in ("/x", "/dev/x", "/usr/x", PREFIX_X):
    try:
        open(path, "w").write("x")
        print("wrote", path)
    except OSError as e:
        print("refused", path, e.errno)
open("big", "wb").write(b"x" * (8 << 20))
try:
    open("bigger", "wb").write(b"x" * (8 << 20))
except OSError as e:
    print("tmp full", e.errno)
""".replace("EXERCISES", repr(str(EXERCISES))).replace("GLMKIT", repr(str(REPO / "glmkit")))
    code = code.replace("PREFIX_X", repr(sys.prefix + "/x"))
    rc, out, err = _inside(sandbox, code, Limits(tmp_mb=12))
    lines = out.splitlines()
    assert rc == 0, err
    assert lines[0] == f"1000 {WORKDIR} ['note.txt'] sandbox"
    assert lines[1] == "[]"  # no host secrets, no exercises, no glmkit
    assert len(eval(lines[2])) <= 3  # its own pid namespace: bwrap's pid 1 and itself
    assert lines[3] == "['ptmx'] ['lo']"  # no host ptys, no network but loopback
    assert [ln.split()[0] for ln in lines[4:8]] == ["refused"] * 4  # read-only outside its tmpfs
    assert lines[8].startswith("tmp full")  # /tmp is size-capped


def test_as_root_every_worker_has_a_fresh_unprivileged_uid_and_nothing_of_it_outlives_the_kill(sandbox):
    if os.geteuid() != 0:
        pytest.skip("only root can give workers uids of their own")
    box = Box(sandbox, Limits(), {})
    proc = box.spawn(
        [sys.executable, "-I", "-S", "-c", "import time; print('up', flush=True); time.sleep(60)"],
        {"PATH": "/usr/bin:/bin"},
    )
    assert proc.stdout.readline() == b"up\n"
    assert isolation.UID_RANGE[0] <= box.uid < isolation.UID_RANGE[1]
    assert len(isolation.processes_of_uid(box.uid)) >= 3  # outer bwrap, its pid 1, the worker
    box.kill()
    assert isolation.processes_of_uid(box.uid) == [] and proc.poll() is not None


def test_the_seccomp_filter_kills_process_creation_and_escapes_but_allows_threads(sandbox):
    ok = "import threading; t = threading.Thread(target=print, args=('thread ok',)); t.start(); t.join()"
    assert _inside(sandbox, ok)[:2] == (0, "thread ok\n")
    sigsys = 128 + signal.SIGSYS  # bwrap reports a signal N as 128 + N
    for code in (
        "import os; os.fork()",
        "import subprocess; subprocess.run(['/bin/true'])",
        "import ctypes; ctypes.CDLL(None).syscall(250, 0, -4, 0)",  # keyctl
        "import ctypes; ctypes.CDLL(None).syscall(272, 0x10000000)",
    ):  # unshare(CLONE_NEWUSER)
        assert _inside(sandbox, code)[0] == sigsys, code
    rc, out, _ = _inside(sandbox, "import os\ntry:\n    os.memfd_create('x')\nexcept OSError as e:\n    print(e.errno)")
    assert (rc, out) == (0, "1\n")  # EPERM: memory outside its address space


def test_the_seccomp_program_is_valid_bpf_for_each_architecture():
    for machine in ("x86_64", "aarch64"):
        prog = seccomp_program(machine)
        ins = [struct.unpack("=HBBI", prog[i : i + 8]) for i in range(0, len(prog), 8)]
        assert len(prog) % 8 == 0 and 10 < len(ins) < 256
        assert all(i + 1 + max(jt, jf) < len(ins) for i, (code, jt, jf, k) in enumerate(ins) if code & 0x07 == 5)
        assert ins[-1] == (0x06, 0, 0, 0x7FFF0000) and (0x06, 0, 0, 0x80000000) in ins
    assert seccomp_program("riscv64") is None


def test_a_cgroup_gets_memory_and_task_limits(tmp_path, monkeypatch):
    """On a fake cgroupfs (this course's CI host has its memory and pids controllers on cgroup v1)."""
    parent = tmp_path / "delegated" / "grading"
    parent.mkdir(parents=True)
    (tmp_path / "delegated" / "cgroup.controllers").write_text("cpu io memory pids\n")
    (tmp_path / "delegated" / "cgroup.subtree_control").write_text("")
    monkeypatch.setenv("GLMKIT_GRADE_CGROUP", str(parent))
    assert isolation._cgroup_parent() == (str(parent), "")
    assert (parent / "cgroup.subtree_control").read_text() == "+memory +pids"
    (tmp_path / "delegated" / "cgroup.controllers").write_text("cpu io\n")
    assert "no memory and pids" in isolation._cgroup_parent()[1]
    cg = Cgroup(str(parent), "w-1", memory_mb=3072, tasks=64)
    assert (parent / "w-1" / "memory.max").read_text() == str(3072 << 20)
    assert (parent / "w-1" / "pids.max").read_text() == "64"
    (parent / "w-1" / "memory.events").write_text("low 0\nhigh 0\nmax 3\noom 1\noom_kill 1\n")
    assert cg.oom_kills() == 1


def test_the_exposed_paths_check_protects_exercises_and_grades(sandbox, tmp_path):
    assert sandbox.exposed([tmp_path, EXERCISES]) == []
    assert sandbox.exposed([Path(sys.prefix) / "grades"]) == [str(Path(sys.prefix) / "grades")]


def _one_student(tmp_path: Path) -> Path:
    subs = tmp_path / "subs"
    (subs / "alice").mkdir(parents=True)
    (subs / "alice" / "ex01.py").write_text((EXERCISES / "01_blank_infilling" / "ex01.py").read_text())
    return subs


def test_autograde_refuses_without_namespaces_unless_the_instructor_accepts_weak_isolation(
    tmp_path, monkeypatch, capsys
):
    monkeypatch.setattr(isolation, "_detected", Isolation("weak", note="test: no user namespaces"))
    subs = _one_student(tmp_path)
    with pytest.raises(SandboxUnavailable, match="no user namespaces.*--allow-weak-isolation"):
        autograde(subs, tmp_path / "out", exercises_dir=EXERCISES, ids=["01"], out=io.StringIO())
    assert not (tmp_path / "out").exists()
    args = [
        "autograde",
        str(subs),
        "--out",
        str(tmp_path / "out"),
        "--exercises-dir",
        str(EXERCISES),
        "--exercises",
        "01",
        "--limit",
        "total_timeout=60",
    ]
    assert main(args) == 2 and "autograde refused" in capsys.readouterr().err
    assert main(args + ["--allow-weak-isolation"]) == 0
    rows = list(csv.DictReader(io.StringIO((tmp_path / "out" / "gradebook.csv").read_text())))
    assert [(r["student"], r["points"], r["isolation"]) for r in rows] == [("alice", "21", "weak")]
