"""Where a worker runs: a bubblewrap sandbox with its own namespaces, or (only when accepted) plain processes.

``namespaces`` (what ``autograde`` requires): each worker is one bubblewrap (``bwrap``) sandbox with
  * its own user, pid, mount, network, IPC, UTS and cgroup namespaces, and no further user namespaces inside;
  * an unprivileged uid: run as root, the grader gives every worker a fresh random uid (no passwd entry), so
    nothing on the host is its own and RLIMIT_NPROC counts that worker alone; run as another user, the worker
    keeps that user's uid inside the namespaces;
  * a file-system view of the Python environment only (read-only: /usr, the interpreter's prefixes,
    /etc/ld.so.cache), a private /proc and /dev, and a size-capped tmpfs /tmp whose /tmp/work holds the one
    copy of the submission; / and /dev are read-only;
  * a seccomp filter: starting a process, or a namespace, mount, keyring, ptrace, bpf, perf, userfaultfd,
    io_uring or kernel-module call, kills the worker with SIGSYS (the grader reports and flags it, so a
    switched-off audit hook cannot hide it); memfd and SysV shared-memory calls fail with EPERM;
  * rlimits (CPU seconds, address space, file size, open files, tasks), set before bwrap starts;
  * a cgroup v2 per worker (memory.max, memory.swap.max = 0, pids.max) where the host offers one.
Killing the outer bwrap kills the sandbox's pid 1 (``--die-with-parent``) and with it its whole pid namespace;
the grader then waits for that pid 1 to be gone and, as root, for no process of the worker's uid to be left.

A process of a fresh uid cannot resolve paths under a 0700 home (e.g. a pyenv under /root), so as root a small
launcher first bind-mounts each source of the view onto an empty staging folder in a private mount namespace
of its own, then drops to the worker's uid and executes bwrap, which builds the sandbox from those copies.

``weak``: the process-level isolation of earlier versions (rlimits, Landlock, audit hook, a session killed
and swept at the end) for hosts without namespaces; ``autograde`` uses it only with --allow-weak-isolation.
"""

from __future__ import annotations

import atexit
import json
import os
import platform
import secrets
import selectors
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass

WORKDIR = "/tmp/work"  # the worker's folder inside the sandbox (cwd, HOME, TMPDIR)
SANDBOX_UID = 1000  # its uid as seen inside
UID_RANGE = (1_900_000_000, 2_100_000_000)  # fresh uids outside, one per worker (as root)
JOB_ENV = "GLMKIT_GRADE_JOB"  # weak mode: marker in every worker's environment, for the sweep


class SandboxUnavailable(RuntimeError):
    """The namespaces sandbox cannot be built on this host (the message says why)."""


@dataclass(frozen=True)
class Isolation:
    """How workers are isolated. ``mode``: namespaces | weak. The switches exist for the grader's own tests."""

    mode: str
    bwrap: str = ""
    cgroup: str = ""  # the cgroup v2 under which every worker gets its own; "" = none
    note: str = ""  # what is missing, and why
    seccomp: bool = True
    landlock: bool = True
    audit_hook: bool = True

    @property
    def label(self) -> str:
        """What the gradebook's ``isolation`` column records."""
        return "weak" if self.mode == "weak" else "namespaces+cgroup" if self.cgroup else "namespaces"

    def exposed(self, paths) -> list[str]:
        """Those of ``paths`` that a worker could see (inside the Python environment the sandbox binds)."""
        if self.mode == "weak":
            return []
        roots = [src for src, _ in _view()]
        out = []
        for p in paths:
            rp = os.path.realpath(p)
            if any(rp == r or rp.startswith(r.rstrip("/") + "/") for r in roots):
                out.append(str(p))
        return out


WEAK = Isolation("weak", note="process-level isolation only (accepted by the caller)")
_detected: Isolation | None = None
_lock = threading.Lock()


def detect() -> Isolation:
    """The strongest isolation this host allows, probed once per process (a trivial sandbox is started)."""
    global _detected
    with _lock:
        if _detected is None:
            _detected = _probe()
        return _detected


def require(allow_weak: bool = False) -> Isolation:
    """The namespaces sandbox, or SandboxUnavailable; with ``allow_weak``, the weak mode in its place."""
    iso = detect()
    if iso.mode == "namespaces" or allow_weak:
        return iso
    raise SandboxUnavailable(
        f"autograde refused: workers cannot run in their own namespaces here ({iso.note}). "
        f"Install bubblewrap (`bash .ci/sandbox-setup.sh`, or `apt-get install bubblewrap`), "
        f"or pass --allow-weak-isolation to grade with process-level isolation only (the "
        f"gradebook's isolation column then says 'weak')."
    )


def _probe() -> Isolation:
    if not sys.platform.startswith("linux"):
        return Isolation("weak", note=f"{sys.platform} has no Linux namespaces")
    bwrap = shutil.which("bwrap") or ("/usr/bin/bwrap" if os.access("/usr/bin/bwrap", os.X_OK) else "")
    if not bwrap:
        return Isolation("weak", note="bubblewrap (bwrap) is not installed")
    cgroup, why = _cgroup_parent()
    iso = Isolation("namespaces", bwrap=bwrap, cgroup=cgroup, note=why and f"no cgroup: {why}")
    box = Box(iso, _probe_limits(), {})
    try:
        proc = box.spawn([sys.executable, "-I", "-S", "-c", "import os; print(os.getcwd(), os.getuid())"], {})
        out, err = proc.communicate(timeout=30)
    except (OSError, subprocess.SubprocessError) as e:
        out, err = b"", str(e).encode()
    finally:
        box.kill()
    if out.split() != [WORKDIR.encode(), str(SANDBOX_UID).encode()]:
        why = err.decode(errors="replace").strip().splitlines()[-1:] or ["no output"]
        return Isolation("weak", note=f"bubblewrap could not start a sandbox: {why[0][:300]}")
    return iso


def _probe_limits():
    from glmkit.grading.sandbox import Limits

    return Limits()


# ---------------------------------------------------------------------------------------------------------
# the sandbox's file-system view

_stage: dict[str, str] = {}  # source -> its empty stand-in in the staging folder (root only)
_stage_lock = threading.Lock()


def _view() -> list[tuple[str, str]]:
    """(source, destination) of every read-only bind: /usr, the interpreter's prefixes, ld.so.cache, and any
    top-level folder such as /lib that is a real folder rather than merged-usr's symlink."""
    srcs = {"/usr", sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix}
    srcs |= {p for p in ("/lib", "/lib64", "/lib32", "/bin", "/sbin") if os.path.isdir(p) and not os.path.islink(p)}
    srcs = sorted({os.path.realpath(s) for s in srcs if os.path.exists(s)})
    dirs = [s for s in srcs if not any(s != o and s.startswith(o.rstrip("/") + "/") for o in srcs)]
    files = [f for f in ("/etc/ld.so.cache",) if os.path.isfile(f)]
    return [(s, s) for s in dirs + files]


def _staged(src: str) -> str:
    """Root only: the staging stand-in for ``src``, an empty folder or file in a private 0755 folder."""
    with _stage_lock:
        if not _stage:
            top = tempfile.mkdtemp(prefix="glmkit-grade-stage-")
            os.chmod(top, 0o755)
            atexit.register(shutil.rmtree, top, True)
            for i, (s, _) in enumerate(_view()):
                stand_in = os.path.join(top, str(i))
                os.mkdir(stand_in) if os.path.isdir(s) else open(stand_in, "x").close()
                _stage[s] = stand_in
        return _stage[src]


# The launcher runs as `python -I -S -c LAUNCHER <json>` between the grader and the worker (or bwrap): rlimits,
# the cgroup, (root) the staging binds in a private mount namespace and the switch to the worker's uid, then exec.
LAUNCHER = r"""
import json, os, resource, sys
c = json.loads(sys.argv[1])
for name, (soft, hard) in c["rlimits"].items():
    resource.setrlimit(getattr(resource, name), (soft, hard))
if c["cgroup"]:
    with open(c["cgroup"], "w") as f:
        f.write(str(os.getpid()))
if c["stage"]:
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    def ok(r, what):
        if r != 0:
            raise OSError(ctypes.get_errno(), what)
    ok(libc.unshare(0x00020000), "unshare(CLONE_NEWNS)")
    ok(libc.mount(b"none", b"/", None, 0x40000 | 0x4000, None), "mount --make-rprivate /")
    for src, dst in c["stage"]:
        ok(libc.mount(os.fsencode(src), os.fsencode(dst), None, 0x1000 | 0x4000, None), "bind " + src)
if c["uid"] is not None:
    os.setgroups([])
    os.setgid(c["uid"])
    os.setuid(c["uid"])
os.execv(c["argv"][0], c["argv"])
"""


# ---------------------------------------------------------------------------------------------------------
# seccomp

_NR = {  # name: (x86_64, aarch64) syscall numbers (asm/unistd_64.h, asm-generic/unistd.h)
    "fork": (57, None),
    "vfork": (58, None),
    "clone": (56, 220),
    "clone3": (435, 435),
    "ptrace": (101, 117),
    "keyctl": (250, 219),
    "add_key": (248, 217),
    "request_key": (249, 218),
    "unshare": (272, 97),
    "setns": (308, 268),
    "mount": (165, 40),
    "umount2": (166, 39),
    "pivot_root": (155, 41),
    "chroot": (161, 51),
    "bpf": (321, 280),
    "perf_event_open": (298, 241),
    "userfaultfd": (323, 282),
    "io_uring_setup": (425, 425),
    "memfd_create": (319, 279),
    "shmget": (29, 194),
    "msgget": (68, 186),
    "kexec_load": (246, 104),
    "init_module": (175, 105),
    "finit_module": (313, 273),
    "delete_module": (176, 106),
}
_EPERM = ["memfd_create", "shmget", "msgget"]  # memory outside the address-space limit: refused
_KILLED = [n for n in _NR if n not in _EPERM + ["clone", "clone3"]]  # never made by numeric code: fatal
_ARCH = {"x86_64": (0xC000003E, 0), "aarch64": (0xC00000B7, 1)}
_KILL, _ERRNO, _ALLOW, CLONE_THREAD = 0x80000000, 0x00050000, 0x7FFF0000, 0x10000


def seccomp_program(machine: str | None = None) -> bytes | None:
    """The worker's seccomp filter as classic BPF (``struct sock_filter[]``), or None on another architecture.
    Another ABI (i386, x32), creating a process and the _KILLED calls (namespaces, mounts, keyrings, ptrace,
    bpf, perf, userfaultfd, io_uring, kernel modules) kill the process with SIGSYS, which the grader sees and
    flags whatever the worker's own audit hook says; clone3 says ENOSYS (glibc then creates threads with clone,
    whose CLONE_THREAD flag the filter can see); the _EPERM calls fail with EPERM."""
    arch = _ARCH.get(machine or platform.machine())
    if arch is None:
        return None
    audit, col = arch
    nr = {k: v[col] for k, v in _NR.items()}
    prog = [("ld", 4), ("jeq", audit, 0, "kill"), ("ld", 0)]
    if col == 0:
        prog.append(("jge", 0x40000000, "kill", 0))  # x32 system calls
    prog.append(("jeq", nr["clone"], "clone", 0))
    prog += [("jeq", nr[n], "kill", 0) for n in _KILLED if nr[n] is not None]
    prog += [("jeq", nr[n], "eperm", 0) for n in _EPERM] + [("jeq", nr["clone3"], "enosys", 0)]
    prog += [
        ("ret", _ALLOW),
        "clone",
        ("ld", 16),
        ("jset", CLONE_THREAD, "allow", "kill"),
        "kill",
        ("ret", _KILL),
        "eperm",
        ("ret", _ERRNO | 1),
        "enosys",
        ("ret", _ERRNO | 38),
        "allow",
        ("ret", _ALLOW),
    ]
    labels, at = {}, 0
    for ins in prog:
        if isinstance(ins, str):
            labels[ins] = at
        else:
            at += 1
    code = {"ld": 0x20, "jeq": 0x15, "jge": 0x35, "jset": 0x45, "ret": 0x06}
    out, i = [], 0
    for ins in prog:
        if isinstance(ins, str):
            continue
        op, k, *jumps = ins
        jt, jf = (labels[j] - i - 1 if isinstance(j, str) else j for j in (jumps or [0, 0]))
        out.append(struct.pack("=HBBI", code[op], jt, jf, k))
        i += 1
    return b"".join(out)


# ---------------------------------------------------------------------------------------------------------
# cgroup v2


def _cgroup_parent() -> tuple[str, str]:
    """The cgroup v2 under which each worker gets its own, or ("", why there is none). As root, a
    ``glmkit-grade`` child of the hierarchy's root; else $GLMKIT_GRADE_CGROUP (an empty, delegated cgroup)."""
    base = os.environ.get("GLMKIT_GRADE_CGROUP", "")
    if not base:
        try:
            with open("/proc/self/mountinfo") as f:
                mount = next((ln.split(" - ")[0].split()[4] for ln in f if " - cgroup2 " in ln), "")
        except OSError:
            mount = ""
        if not mount:
            return "", "no cgroup v2 hierarchy is mounted"
        if os.geteuid() != 0:
            return "", "not root, and GLMKIT_GRADE_CGROUP names no delegated cgroup v2"
        base = os.path.join(mount, "glmkit-grade")
    up = os.path.dirname(base.rstrip("/"))
    try:
        have = set(_read(os.path.join(up, "cgroup.controllers")).split())
        if not {"memory", "pids"} <= have:
            return "", (
                f"the cgroup v2 at {up} offers no memory and pids controllers (it has: "
                f"{' '.join(sorted(have)) or 'none'}; on this host they are probably bound to cgroup v1)"
            )
        if not {"memory", "pids"} <= set(_read(os.path.join(up, "cgroup.subtree_control")).split()):
            _write(os.path.join(up, "cgroup.subtree_control"), "+memory +pids")
        os.makedirs(base, exist_ok=True)
        _write(os.path.join(base, "cgroup.subtree_control"), "+memory +pids")
    except OSError as e:
        return "", f"cannot set up the cgroup {base}: {e.strerror or e}"
    return base, ""


def _read(path: str) -> str:
    with open(path) as f:
        return f.read()


def _write(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


class Cgroup:
    """One worker's cgroup v2: memory (no swap) and task caps for the whole tree, and a kill switch."""

    def __init__(self, parent: str, name: str, memory_mb: int, tasks: int):
        self.path = os.path.join(parent, name)
        os.mkdir(self.path)
        _write(os.path.join(self.path, "memory.max"), str(int(memory_mb) << 20))
        if os.path.exists(os.path.join(self.path, "memory.swap.max")):
            _write(os.path.join(self.path, "memory.swap.max"), "0")
        _write(os.path.join(self.path, "pids.max"), str(int(tasks)))

    @property
    def procs(self) -> str:
        return os.path.join(self.path, "cgroup.procs")

    def oom_kills(self) -> int:
        try:
            return int(
                dict(ln.split() for ln in _read(os.path.join(self.path, "memory.events")).splitlines()).get(
                    "oom_kill", 0
                )
            )
        except (OSError, ValueError):
            return 0

    def kill(self) -> None:
        """SIGKILL every process in it (cgroup.kill where the kernel has it, else one by one)."""
        try:
            if os.path.exists(os.path.join(self.path, "cgroup.kill")):
                _write(os.path.join(self.path, "cgroup.kill"), "1")
            for pid in _read(self.procs).split():
                _signal(int(pid))
        except (OSError, ValueError):
            pass

    def remove(self) -> None:
        for _ in range(250):
            try:
                os.rmdir(self.path)
                return
            except FileNotFoundError:
                return
            except OSError:
                self.kill()
                time.sleep(0.02)


# ---------------------------------------------------------------------------------------------------------
# one worker's processes


def _signal(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def processes_of_uid(uid: int) -> list[int]:
    """PIDs of every live (not zombie) process whose real, effective, saved or file-system uid is ``uid``."""
    found, want = [], str(uid).encode()
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/status", "rb") as f:
                    status = dict(ln.split(b":", 1) for ln in f.read().splitlines() if b":" in ln)
                if want in status[b"Uid"].split() and not status[b"State"].strip().startswith(b"Z"):
                    found.append(int(d))
            except (OSError, KeyError, ValueError):
                pass
    return found


def _session_strays(token: str, sid: int) -> list[int]:
    """Weak mode: PIDs in this worker's session or process group, or carrying its job marker."""
    me, found, marker = os.getpid(), [], f"{JOB_ENV}={token}".encode()
    for d in os.listdir("/proc") if os.path.isdir("/proc") else []:  # no /proc: the process group only
        if not d.isdigit() or int(d) == me:
            continue
        try:
            with open(f"/proc/{d}/stat", "rb") as f:
                rest = f.read().rsplit(b")", 1)[1].split()
            hit = sid in (int(rest[2]), int(rest[3]))
            if not hit:
                with open(f"/proc/{d}/environ", "rb") as f:
                    hit = marker in f.read()
            if hit:
                found.append(int(d))
        except (OSError, ValueError, IndexError):
            pass
    return found


class Box:
    """The processes of one worker. :meth:`spawn` starts ``argv`` inside (with ``files`` in its working
    folder), :meth:`kill` kills everything that was started inside and waits until nothing is left."""

    def __init__(self, iso: Isolation, limits, files: dict[str, bytes]):
        self.iso, self.limits, self.files = iso, limits, files
        self.proc: subprocess.Popen | None = None
        self.token = secrets.token_hex(8)
        self.uid: int | None = None
        self.cgroup: Cgroup | None = None
        self.workdir: str | None = None
        self.pidfd: int | None = None
        self._info: int | None = None

    @property
    def facts(self) -> dict:
        """What the grader itself knows about this worker's isolation (recorded in results/)."""
        return {
            "isolation": self.iso.label,
            "uid": self.uid,
            "cgroup": bool(self.cgroup),
            "seccomp": self.iso.mode == "namespaces" and self.iso.seccomp and seccomp_program() is not None,
            "note": self.iso.note,
        }

    def _rlimits(self) -> dict:
        lim = self.limits
        out = {
            "RLIMIT_CPU": (int(lim.cpu_seconds), int(lim.cpu_seconds) + 2),
            "RLIMIT_AS": ((int(lim.memory_mb) << 20,) * 2),
            "RLIMIT_FSIZE": ((int(lim.file_size_mb) << 20,) * 2),
            "RLIMIT_CORE": (0, 0),
            "RLIMIT_NOFILE": (256, 256),
        }
        if self.uid is not None:  # a fresh uid: the count is this worker's alone (root is not limited)
            out["RLIMIT_NPROC"] = (int(lim.tasks), int(lim.tasks))
        return out

    def spawn(self, argv: list[str], env: dict) -> subprocess.Popen:
        cfg = {"cgroup": "", "stage": [], "uid": None}
        fds: list[int] = []
        try:
            if self.iso.mode == "weak":
                self.workdir = tempfile.mkdtemp(prefix="glmkit-grade-")
                os.chmod(self.workdir, 0o700)
                for name, data in self.files.items():
                    fd = os.open(
                        os.path.join(self.workdir, name), os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600
                    )
                    with os.fdopen(fd, "wb") as f:
                        f.write(data)
                env = {**env, JOB_ENV: self.token, "HOME": self.workdir, "TMPDIR": self.workdir}
                cwd = self.workdir
            else:
                if os.geteuid() == 0:
                    while self.uid is None or processes_of_uid(self.uid):  # one no process has now
                        self.uid = UID_RANGE[0] + secrets.randbelow(UID_RANGE[1] - UID_RANGE[0])
                    cfg["uid"] = self.uid
                    cfg["stage"] = [(src, _staged(src)) for src, _ in _view()]
                if self.iso.cgroup:
                    self.cgroup = Cgroup(self.iso.cgroup, f"w-{self.token}", self.limits.memory_mb, self.limits.tasks)
                    cfg["cgroup"] = self.cgroup.procs
                argv = self._bwrap(argv, fds)
                env = {**env, "HOME": WORKDIR, "TMPDIR": WORKDIR}
                cwd = "/"
            cfg["rlimits"], cfg["argv"] = self._rlimits(), argv
            self.proc = subprocess.Popen(
                [sys.executable, "-I", "-S", "-c", LAUNCHER, json.dumps(cfg)],
                cwd=cwd,
                env=env,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                pass_fds=fds,
                start_new_session=True,
            )
            return self.proc
        finally:
            for fd in fds:
                os.close(fd)

    def _bwrap(self, argv: list[str], fds: list[int]) -> list[str]:
        def memfd(data: bytes) -> str:
            fd = os.memfd_create("glmkit-grade")
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.lseek(fd, 0, os.SEEK_SET)
            fds.append(fd)
            return str(fd)

        lim = self.limits
        args = [
            self.iso.bwrap,
            "--unshare-user",
            "--unshare-pid",
            "--unshare-net",
            "--unshare-ipc",
            "--unshare-uts",
            "--unshare-cgroup-try",
            "--disable-userns",
            "--die-with-parent",
            "--new-session",
            "--uid",
            str(SANDBOX_UID),
            "--gid",
            str(SANDBOX_UID),
            "--hostname",
            "sandbox",
        ]
        for src, dest in _view():
            args += ["--ro-bind", _staged(src) if self.uid is not None else src, dest]
        for top in ("/lib", "/lib64", "/lib32", "/bin", "/sbin"):
            if os.path.islink(top):
                args += ["--symlink", os.readlink(top), top]
        args += [
            "--proc",
            "/proc",
            "--dev",
            "/dev",
            "--size",
            str(int(lim.tmp_mb) << 20),
            "--tmpfs",
            "/tmp",
            "--dir",
            WORKDIR,
        ]
        for name, data in self.files.items():
            args += ["--perms", "0644", "--file", memfd(data), f"{WORKDIR}/{name}"]
        args += ["--remount-ro", "/dev", "--remount-ro", "/", "--chdir", WORKDIR]
        program = seccomp_program() if self.iso.seccomp else None
        if program:
            args += ["--seccomp", memfd(program)]
        read, write = os.pipe()
        os.set_blocking(read, False)
        self._info = read
        fds.append(write)
        return args + ["--info-fd", str(write), "--", *argv]

    def attach(self) -> None:
        """Namespaces mode, once the worker has said hello: hold a pidfd on the sandbox's pid 1 (whose exit
        means its whole pid namespace is gone), after checking that it is the outer bwrap's own child."""
        if self._info is None or self.proc is None:
            return
        try:
            info = json.loads(os.read(self._info, 4096) or b"{}")
            pid = int(info["child-pid"])
            fd = os.pidfd_open(pid)
            with open(f"/proc/{pid}/stat", "rb") as f:
                ppid = int(f.read().rsplit(b")", 1)[1].split()[1])
            if ppid == self.proc.pid:
                self.pidfd = fd
            else:
                os.close(fd)
        except (OSError, ValueError, KeyError, TypeError):
            pass

    def kill(self) -> None:
        """Kill every process of this worker and wait until none is left."""
        if self.cgroup is not None:
            self.cgroup.kill()
        if self.proc is not None:
            sid = self.proc.pid
            if self.iso.mode == "weak":
                try:
                    os.killpg(sid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
            _signal(sid)
            if self.pidfd is not None:
                try:
                    signal.pidfd_send_signal(self.pidfd, signal.SIGKILL)
                except OSError:
                    pass
                with selectors.DefaultSelector() as sel:
                    sel.register(self.pidfd, selectors.EVENT_READ)
                    sel.select(timeout=5)  # readable once pid 1, so its namespace, is gone
            for _ in range(250):
                pids = (
                    processes_of_uid(self.uid)
                    if self.uid is not None
                    else _session_strays(self.token, sid)
                    if self.iso.mode == "weak"
                    else []
                )
                pids = [p for p in pids if p != sid]
                if not pids:
                    break
                for pid in pids:
                    _signal(pid)
                time.sleep(0.02)
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
            for f in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
                try:
                    f.close()
                except OSError:
                    pass
        for fd in (self.pidfd, self._info):
            if fd is not None:
                os.close(fd)
        self.pidfd = self._info = None
        if self.cgroup is not None:
            self.cgroup.remove()
        if self.workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir = None
