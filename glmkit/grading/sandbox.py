"""Running one submission in its own process: limits, the wire format, and cleaning up after it.

The grader side of ``_worker.py``. A :class:`Worker` copies ONE student file into a fresh temporary
directory, starts ``python -I -B -c <worker source>`` there with a minimal environment, resource limits
(CPU seconds, address space, file size, no core files, process count where the kernel applies it), its
own session and process group, and talks to it over pipes with JSON lines. Everything that comes back is
parsed by :func:`decode_value`, a strict decoder for a tiny format (None/bool/int/float/str, lists, tagged
tuples and tagged tensors with dtype, shape and flat data), into *fresh* plain torch tensors built here.
Nothing from the student process is ever unpickled or executed in the grader.

When a submission is done (or times out, or prints too much) the whole process group is killed, and then
every process still carrying this worker's session, process group or job marker is hunted down in /proc
and killed too, so children that call setsid() do not outlive the grading.
"""

from __future__ import annotations

import json
import math
import os
import resource
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import torch

WORKER_SOURCE = (Path(__file__).with_name("_worker.py")).read_text()
JOB_ENV = "GLMKIT_GRADE_JOB"          # marker in every student process's environment (for the sweep)

_DTYPES = {"bool": torch.bool, "uint8": torch.uint8, "int8": torch.int8, "int16": torch.int16,
           "int32": torch.int32, "int64": torch.int64, "float16": torch.float16,
           "bfloat16": torch.bfloat16, "float32": torch.float32, "float64": torch.float64}
MAX_ELEMENTS = 20_000_000              # no answer of an exercise is bigger; refuse to build anything larger


@dataclass
class Limits:
    """Per-submission limits. ``exercise.toml``'s [limits] table fills these (see the instructor guide)."""

    startup_timeout: float = 60.0      # s: start Python + torch, import the student's file
    total_timeout: float = 120.0       # s: everything for one submission of one exercise
    cpu_seconds: int = 120             # RLIMIT_CPU of the student process (then SIGXCPU/SIGKILL)
    memory_mb: int = 3072              # RLIMIT_AS: address space (torch alone maps ~0.7 GB)
    file_size_mb: int = 16             # RLIMIT_FSIZE: the largest file it may write (in its own folder)
    output_kb: int = 256               # stdout+stderr beyond this: the process is killed
    max_message_mb: int = 64           # one reply on the protocol pipe beyond this: killed

    @classmethod
    def from_dict(cls, d: dict) -> "Limits":
        known = set(cls.__dataclass_fields__)
        bad = set(d) - known
        if bad:
            raise ValueError(f"unknown [limits] keys {sorted(bad)}; known: {sorted(known)}")
        return cls(**d)

    def scaled(self, factor: float) -> "Limits":
        return Limits(self.startup_timeout * factor, self.total_timeout * factor,
                      int(math.ceil(self.cpu_seconds * factor)), self.memory_mb, self.file_size_mb,
                      self.output_kb, self.max_message_mb)


class WorkerError(Exception):
    """The student process stopped answering. ``kind``: timeout | crashed | output-limit | protocol."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind, self.message = kind, message


class BadValue(ValueError):
    """The reply did not parse as the wire format (a malformed or forged reply)."""


# ---------------------------------------------------------------------------------------------------------
# the wire format

def encode_value(v, depth: int = 0):
    """Grader -> worker: inputs for a student function (trusted data built by a check)."""
    if depth > 20:
        raise ValueError("inputs nested too deeply")
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    if isinstance(v, torch.Tensor):
        name = str(v.dtype).replace("torch.", "")
        if name not in _DTYPES:
            raise TypeError(f"cannot send a tensor of dtype {v.dtype}")
        flat = v.detach().cpu().reshape(-1)
        if v.dtype in (torch.float16, torch.bfloat16):
            flat = flat.float()
        return {"__t__": "tensor", "dtype": name, "shape": list(v.shape), "data": flat.tolist()}
    if isinstance(v, tuple):
        return {"__t__": "tuple", "items": [encode_value(x, depth + 1) for x in v]}
    if isinstance(v, list):
        return [encode_value(x, depth + 1) for x in v]
    if isinstance(v, dict):
        return {"__t__": "dict", "items": [[str(k), encode_value(x, depth + 1)] for k, x in v.items()]}
    raise TypeError(f"cannot send a {type(v).__name__} to the worker")


class Unsupported:
    """A value the student returned that the wire format cannot carry (e.g. a custom object)."""

    def __init__(self, type_name: str):
        self.type_name = type_name

    def __repr__(self) -> str:
        return f"<a {self.type_name} object>"


def decode_value(v, depth: int = 0):
    """Worker -> grader, strictly: only the documented shapes of data; anything else raises BadValue."""
    if depth > 24:
        raise BadValue("nesting too deep")
    if v is None or type(v) in (bool, int, float, str):
        if type(v) is str and len(v) > 100_000:
            raise BadValue("string too long")
        return v
    if type(v) is list:
        return [decode_value(x, depth + 1) for x in v]
    if type(v) is not dict:
        raise BadValue(f"unexpected JSON value {type(v).__name__}")
    tag = v.get("__t__")
    if tag == "tuple" and type(v.get("items")) is list:
        return tuple(decode_value(x, depth + 1) for x in v["items"])
    if tag == "unsupported":
        return Unsupported(str(v.get("type"))[:100])
    if tag == "tensor":
        return _decode_tensor(v)
    raise BadValue(f"unknown tag {str(tag)[:40]!r}")


def _decode_tensor(v: dict) -> torch.Tensor:
    dtype = _DTYPES.get(v.get("dtype")) if type(v.get("dtype")) is str else None
    shape, data = v.get("shape"), v.get("data")
    if dtype is None:
        raise BadValue("tensor with an unknown dtype")
    if type(shape) is not list or not all(type(s) is int and 0 <= s <= MAX_ELEMENTS for s in shape) \
            or len(shape) > 8:
        raise BadValue("tensor with a malformed shape")
    n = math.prod(shape)
    if n > MAX_ELEMENTS or type(data) is not list or len(data) != n:
        raise BadValue("tensor whose data does not match its shape")
    if dtype is torch.bool:
        ok = all(type(x) is bool for x in data)
    elif dtype.is_floating_point:
        ok = all(type(x) in (int, float) for x in data)
    else:
        info = torch.iinfo(dtype)
        ok = all(type(x) is int and info.min <= x <= info.max for x in data)
    if not ok:
        raise BadValue(f"tensor data that is not {v['dtype']}")
    return torch.tensor(data, dtype=dtype).reshape(shape)


# ---------------------------------------------------------------------------------------------------------
# processes

def _user_task_count() -> int:
    uid, n = os.getuid(), 0
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                if os.stat(f"/proc/{d}").st_uid == uid:
                    n += len(os.listdir(f"/proc/{d}/task"))
            except OSError:
                pass
    return n


def _limit_preexec(limits: Limits, nproc: int | None):
    cpu = int(limits.cpu_seconds)
    mem = int(limits.memory_mb) << 20
    fsize = int(limits.file_size_mb) << 20

    def preexec():  # runs in the child between fork and exec: only setrlimit calls
        resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 2))
        resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
        resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        if nproc is not None:   # counts all of the user's tasks; not enforced for root (see the guide)
            resource.setrlimit(resource.RLIMIT_NPROC, (nproc, nproc))

    return preexec


def _proc_stat(pid: str):
    with open(f"/proc/{pid}/stat", "rb") as f:
        s = f.read().decode(errors="replace")
    rest = s[s.rindex(")") + 2:].split()
    return int(rest[1]), int(rest[2]), int(rest[3])  # ppid, pgrp, session


def stray_processes(token: str | None = None, sid: int | None = None) -> list[int]:
    """PIDs in this worker's session/process group, or whose environment carries its job marker
    (``token=None``: any grading job's marker). The grader's own PID is never listed."""
    me, found = os.getpid(), []
    marker = f"{JOB_ENV}={token}".encode() if token else f"{JOB_ENV}=".encode()
    for d in os.listdir("/proc"):
        if not d.isdigit() or int(d) == me:
            continue
        try:
            _, pgrp, session = _proc_stat(d)
            hit = sid is not None and (session == sid or pgrp == sid)
            if not hit:
                with open(f"/proc/{d}/environ", "rb") as f:
                    hit = marker in f.read()
            if hit:
                found.append(int(d))
        except (OSError, ValueError):
            pass
    return found


def kill_job(token: str, sid: int | None) -> int:
    """Kill the process group, then sweep /proc until nothing of this job is left. Returns #killed."""
    killed: set[int] = set()
    if sid is not None:
        try:
            os.killpg(sid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    for _ in range(20):
        pids = stray_processes(token, sid)
        if not pids:
            break
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
                killed.add(pid)
            except (ProcessLookupError, PermissionError):
                pass
        time.sleep(0.02)
    return len(killed)


@dataclass
class StartInfo:
    ok: bool
    functions: dict = field(default_factory=dict)
    sandbox: dict = field(default_factory=dict)
    events: list = field(default_factory=list)
    reference_names: list = field(default_factory=list)
    reference_used: list = field(default_factory=list)
    import_error: dict | None = None


class Worker:
    """One student process for one submission of one exercise. Use as a context manager."""

    _nproc: int | None = None

    def __init__(self, source: str, module: str, functions: list[str], limits: Limits,
                 reference_modules: list[str] = (), landlock: bool = True, audit_hook: bool = True):
        self.source, self.module, self.functions = source, module, list(functions)
        self.limits, self.reference_modules = limits, list(reference_modules)
        self.landlock, self.audit_hook = landlock, audit_hook
        self.proc: subprocess.Popen | None = None
        self.workdir: str | None = None
        self.token = uuid.uuid4().hex
        self.output = bytearray()       # the first output_kb of what the student printed
        self.output_total = 0
        self._buf = bytearray()
        self.killed_strays = 0
        self.exit_description: str | None = None

    # -- lifecycle --------------------------------------------------------------------------------------
    def start(self, deadline: float) -> StartInfo:
        self.workdir = tempfile.mkdtemp(prefix="glmkit-grade-")
        os.chmod(self.workdir, 0o700)
        Path(self.workdir, f"{self.module}.py").write_text(self.source, encoding="utf-8")
        env = {"PATH": "/usr/bin:/bin", "HOME": self.workdir, "TMPDIR": self.workdir, "LANG": "C.UTF-8",
               "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", JOB_ENV: self.token}
        if os.getuid() != 0 and Worker._nproc is None:
            Worker._nproc = _user_task_count() + 512
        self.proc = subprocess.Popen(
            [sys.executable, "-I", "-B", "-c", WORKER_SOURCE], cwd=self.workdir, env=env,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            start_new_session=True, close_fds=True,
            preexec_fn=_limit_preexec(self.limits, None if os.getuid() == 0 else Worker._nproc))
        for f in (self.proc.stdout, self.proc.stderr):
            os.set_blocking(f.fileno(), False)
        self._send({"module": self.module, "file": f"{self.module}.py", "functions": self.functions,
                    "reference_modules": self.reference_modules, "landlock": self.landlock,
                    "audit_hook": self.audit_hook})
        msg = self._receive(deadline, "while starting Python and importing your file")
        if "import_error" in msg:
            return StartInfo(False, sandbox=msg.get("sandbox", {}), events=msg.get("events", []),
                             import_error=msg["import_error"])
        if not msg.get("ready"):
            raise WorkerError("protocol", "the worker's first reply was not understood")
        return StartInfo(True, functions=dict(msg.get("functions", {})), sandbox=msg.get("sandbox", {}),
                         events=msg.get("events", []), reference_names=msg.get("reference_names", []),
                         reference_used=msg.get("reference_used", []))

    def call(self, function: str, args: list, kwargs: dict, deadline: float) -> dict:
        self._send({"op": "call", "function": function, "args": encode_value(list(args)),
                    "kwargs": encode_value(dict(kwargs))})
        msg = self._receive(deadline, f"while running {function}()")
        if msg.get("ok") is True:
            try:
                msg["value"] = decode_value(msg.get("value"))
            except BadValue as e:
                raise WorkerError("protocol", f"the value returned by {function}() could not be read back "
                                              f"({e})") from None
        return msg

    def close(self) -> None:
        if self.proc is not None:
            sid = self.proc.pid
            self.killed_strays = kill_job(self.token, sid)
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
            for f in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
                try:
                    f.close()
                except Exception:  # noqa: BLE001
                    pass
            self.proc = None
        if self.workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    # -- pipes ------------------------------------------------------------------------------------------
    def _send(self, obj) -> None:
        try:
            self.proc.stdin.write((json.dumps(obj) + "\n").encode())
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            pass  # it died; _receive reports how

    def _died(self, during: str) -> WorkerError:
        try:
            rc = self.proc.wait(timeout=2)
        except subprocess.TimeoutExpired:
            rc = None
        if rc is None:
            why = "closed its connection to the grader"
        elif rc < 0:
            sig = signal.Signals(-rc).name if -rc in signal.Signals._value2member_map_ else str(-rc)
            hint = {"SIGXCPU": " (CPU time limit)", "SIGKILL": " (killed: CPU or memory limit?)",
                    "SIGXFSZ": " (file size limit)", "SIGSEGV": " (crashed in native code)"}.get(sig, "")
            why = f"was ended by signal {sig}{hint}"
        else:
            why = f"exited with code {rc} (sys.exit/os._exit in your code?)"
        self.exit_description = why
        return WorkerError("crashed", f"your code's process {why} {during}")

    def _receive(self, deadline: float, during: str) -> dict:
        sel = selectors.DefaultSelector()
        out_fd, err_fd = self.proc.stdout.fileno(), self.proc.stderr.fileno()
        sel.register(out_fd, selectors.EVENT_READ)
        sel.register(err_fd, selectors.EVENT_READ)
        cap, max_msg = self.limits.output_kb * 1024, self.limits.max_message_mb << 20
        try:
            while True:
                nl = self._buf.find(b"\n")
                if nl >= 0:
                    line = bytes(self._buf[:nl])
                    del self._buf[:nl + 1]
                    try:
                        msg = json.loads(line)
                    except (ValueError, RecursionError):
                        raise WorkerError("protocol", f"an unreadable reply came back {during}") from None
                    if type(msg) is not dict:
                        raise WorkerError("protocol", f"an unreadable reply came back {during}")
                    return msg
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise WorkerError("timeout", f"time limit reached {during}")
                events = sel.select(timeout=min(remaining, 0.5))
                if not events and not self.alive and not self._drain(out_fd):
                    raise self._died(during)
                for key, _ in events:
                    try:
                        chunk = os.read(key.fd, 1 << 16)
                    except BlockingIOError:
                        continue
                    if key.fd == err_fd:
                        if chunk:
                            self.output_total += len(chunk)
                            room = cap - len(self.output)
                            if room > 0:
                                self.output += chunk[:room]
                            if self.output_total > cap:
                                raise WorkerError("output-limit", f"your code printed more than "
                                                  f"{self.limits.output_kb} KiB {during}; it was stopped")
                        else:
                            sel.unregister(err_fd)
                    else:
                        if not chunk:
                            raise self._died(during)
                        self._buf += chunk
                        if len(self._buf) > max_msg:
                            raise WorkerError("output-limit", f"a reply larger than "
                                              f"{self.limits.max_message_mb} MiB came back {during}")
        finally:
            sel.close()

    def _drain(self, fd: int) -> bool:
        try:
            chunk = os.read(fd, 1 << 16)
        except (BlockingIOError, OSError):
            return False
        self._buf += chunk
        return bool(chunk)
