"""Talking to one submission's worker: its limits, the wire format, and pipes with deadlines.

The grader side of ``_worker.py``. A :class:`Worker` starts ``python -I -B -c <worker source>`` in a
:class:`~glmkit.grading.isolation.Box` (a bubblewrap sandbox, see :mod:`.isolation`) holding ONE copy of the
student's file, and talks to it over its stdin/stdout with JSON lines; what it prints on stderr is kept up to
``output_kb``. Every pipe is non-blocking and every exchange has a deadline: a worker that stops reading,
floods replies or never answers is killed at the deadline, and the grading thread never blocks on it.

Everything that comes back is parsed by :func:`decode_value`, a strict decoder for a tiny format
(None/bool/int/float/str, lists, tagged tuples and tagged tensors with dtype, shape and flat data), into
*fresh* plain torch tensors built here. Nothing from the student process is ever unpickled or executed in the
grader, and nothing it says is trusted: the runner keeps its text out of hidden checks' feedback.
"""

from __future__ import annotations

import json
import math
import os
import selectors
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from glmkit.grading.isolation import Box, Isolation, detect

WORKER_SOURCE = (Path(__file__).with_name("_worker.py")).read_text()

_DTYPES = {
    "bool": torch.bool,
    "uint8": torch.uint8,
    "int8": torch.int8,
    "int16": torch.int16,
    "int32": torch.int32,
    "int64": torch.int64,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
    "float64": torch.float64,
}
MAX_ELEMENTS = 20_000_000  # no answer of an exercise is bigger; refuse to build anything larger
# s: how long the grader waits for a new sandbox's hello (the sandbox and a bare interpreter, before any student code
# runs). It is the grader's own start-up, so it is not charged to the student: on a loaded machine (a class graded
# with several jobs beside hostile submissions) it can take longer than a student's whole budget.
HELLO_TIMEOUT = 60.0


@dataclass
class Limits:
    """Per-submission limits. ``exercise.toml``'s [limits] table fills these (see the instructor guide)."""

    startup_timeout: float = 60.0  # s: start Python + torch, import the student's file
    total_timeout: float = 120.0  # s: everything for one submission of one exercise
    cpu_seconds: int = 120  # RLIMIT_CPU of the student process (then SIGXCPU/SIGKILL)
    memory_mb: int = 3072  # RLIMIT_AS of the worker, and its cgroup's memory.max where there is one
    file_size_mb: int = 16  # RLIMIT_FSIZE: the largest file it may write (in its own tmpfs)
    tmp_mb: int = 64  # size of the sandbox's private /tmp (its working folder is in it)
    tasks: int = 64  # threads + processes: RLIMIT_NPROC of its fresh uid, its cgroup's pids.max
    output_kb: int = 256  # stdout+stderr beyond this: the process is killed
    max_message_mb: int = 64  # replies waiting on the protocol pipe beyond this: killed

    @classmethod
    def from_dict(cls, d: dict) -> Limits:
        known = set(cls.__dataclass_fields__)
        bad = set(d) - known
        if bad:
            raise ValueError(f"unknown [limits] keys {sorted(bad)}; known: {sorted(known)}")
        return cls(**d)


class WorkerError(Exception):
    """The student process stopped answering. ``kind``: timeout | crashed | output-limit | protocol, or
    sandbox when the sandbox itself did not start (before any student code ran: a grader error)."""

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
    if type(shape) is not list or not all(type(s) is int and 0 <= s <= MAX_ELEMENTS for s in shape) or len(shape) > 8:
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
# the worker


@dataclass
class StartInfo:
    ok: bool
    functions: dict = field(default_factory=dict)
    sandbox: dict = field(default_factory=dict)
    events: list = field(default_factory=list)
    glmkit_imports: list = field(default_factory=list)
    import_error: dict | None = None


_SIGNAL_HINTS = {
    "SIGXCPU": " (CPU time limit)",
    "SIGKILL": " (killed: CPU or memory limit?)",
    "SIGXFSZ": " (file size limit)",
    "SIGSEGV": " (crashed in native code)",
    "SIGSYS": " (the sandbox stopped a forbidden system call, such as starting a process)",
}


class Worker:
    """One student process for one submission of one exercise. Use as a context manager."""

    def __init__(
        self,
        source: str,
        module: str,
        functions: list[str],
        limits: Limits,
        reference_modules: list[str] = (),
        isolation: Isolation | None = None,
    ):
        self.source, self.module, self.functions = source, module, list(functions)
        self.limits, self.reference_modules = limits, list(reference_modules)
        self.iso = isolation or detect()
        self.box: Box | None = None
        self.proc: subprocess.Popen | None = None
        self.output = bytearray()  # the first output_kb of what the student printed
        self.output_total = 0
        self._buf = bytearray()
        self.exit_signal: str | None = None  # the signal that ended it, if one did
        self.hello_seconds = 0.0  # how long the sandbox took to say hello (not charged to the student)

    # -- lifecycle --------------------------------------------------------------------------------------
    def start(self, deadline: float) -> StartInfo:
        """Start the sandbox, wait for its hello (up to HELLO_TIMEOUT), then import the student's file by
        ``deadline`` moved on by the time the hello took."""
        t0 = time.monotonic()
        self.box = Box(self.iso, self.limits, {f"{self.module}.py": self.source.encode("utf-8", "replace")})
        env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        self.proc = self.box.spawn([sys.executable, "-I", "-B", "-c", WORKER_SOURCE], env)
        for f in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            os.set_blocking(f.fileno(), False)
        try:  # the worker says hello before any student code can run
            hello = self._exchange(b"", max(deadline, t0 + HELLO_TIMEOUT), "while starting the sandbox")
        except WorkerError as e:
            said = self.output.decode(errors="replace").strip()[-600:]
            raise WorkerError("sandbox", f"the grader's sandbox did not start ({e.message}): {said}") from None
        self.hello_seconds = time.monotonic() - t0
        deadline += self.hello_seconds
        if hello.get("hello") is not True:
            raise WorkerError("sandbox", "the worker's first message was not its hello")
        self.box.attach()
        setup = {
            "module": self.module,
            "file": f"{self.module}.py",
            "functions": self.functions,
            "reference_modules": self.reference_modules,
            "landlock": self.iso.landlock,
            "audit_hook": self.iso.audit_hook,
        }
        msg = self._exchange(_line(setup), deadline, "while starting Python and importing your file")
        if "import_error" in msg:
            return StartInfo(
                False,
                sandbox=msg.get("sandbox", {}),
                events=msg.get("events", []),
                glmkit_imports=msg.get("glmkit_imports", []),
                import_error=msg["import_error"],
            )
        if not msg.get("ready"):
            raise WorkerError("protocol", "the worker's first reply was not understood")
        return StartInfo(
            True,
            functions=dict(msg.get("functions", {})),
            sandbox=msg.get("sandbox", {}),
            events=msg.get("events", []),
            glmkit_imports=msg.get("glmkit_imports", []),
        )

    def call(self, function: str, args: list, kwargs: dict, deadline: float) -> dict:
        request = _line(
            {"op": "call", "function": function, "args": encode_value(list(args)), "kwargs": encode_value(dict(kwargs))}
        )
        msg = self._exchange(request, deadline, f"while running {function}()")
        if msg.get("ok") is True:
            try:
                msg["value"] = decode_value(msg.get("value"))
            except BadValue as e:
                raise WorkerError(
                    "protocol", f"the value returned by {function}() could not be read back ({e})"
                ) from None
        return msg

    def close(self) -> None:
        if self.box is not None:
            self.box.kill()
            self.box = self.proc = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def facts(self) -> dict:
        return self.box.facts if self.box is not None else {}

    # -- pipes ------------------------------------------------------------------------------------------
    def _died(self, during: str) -> WorkerError:
        try:
            rc = self.proc.wait(timeout=2)
        except subprocess.TimeoutExpired:
            rc = None
        # bwrap reports a command killed by signal N as exit status 128 + N
        signum = (
            -rc
            if rc is not None and rc < 0
            else rc - 128
            if rc is not None and rc > 128 and self.iso.mode == "namespaces"
            else None
        )
        if rc is None:
            why = "closed its connection to the grader"
        elif signum:
            sig = signal.Signals(signum).name if signum in signal.Signals._value2member_map_ else str(signum)
            self.exit_signal = sig
            hint = _SIGNAL_HINTS.get(sig, "")
            if self.box is not None and self.box.cgroup is not None and self.box.cgroup.oom_kills():
                hint = " (the sandbox's memory limit)"
            why = f"was ended by signal {sig}{hint}"
        else:
            why = f"exited with code {rc} (sys.exit/os._exit in your code?)"
        return WorkerError("crashed", f"your code's process {why} {during}")

    def _exchange(self, request: bytes, deadline: float, during: str) -> dict:
        """Send ``request`` (all of it) and return the next reply line, reading the student's output all the
        while; never blocks past ``deadline`` (the caller then kills the worker)."""
        todo = memoryview(request)
        in_fd, out_fd, err_fd = self.proc.stdin.fileno(), self.proc.stdout.fileno(), self.proc.stderr.fileno()
        cap, max_msg = self.limits.output_kb * 1024, self.limits.max_message_mb << 20
        with selectors.DefaultSelector() as sel:
            sel.register(out_fd, selectors.EVENT_READ)
            sel.register(err_fd, selectors.EVENT_READ)
            if todo:
                sel.register(in_fd, selectors.EVENT_WRITE)
            open_out = True
            while True:
                if not todo:
                    msg = self._next_line(during)
                    if msg is not None:
                        return msg
                if not open_out:
                    raise self._died(during)
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise WorkerError("timeout", f"time limit reached {during}")
                events = sel.select(timeout=min(remaining, 0.5))
                if not events and not self.alive:  # gone: keep what it wrote last, then report how
                    try:
                        last = os.read(out_fd, 1 << 16)
                    except OSError:
                        last = b""
                    self._buf += last
                    open_out = bool(last)
                    continue
                for key, _ in events:
                    if key.fd == in_fd:
                        try:
                            todo = todo[os.write(in_fd, todo[: 1 << 16]) :]
                        except BlockingIOError:
                            continue
                        except OSError:
                            raise WorkerError(
                                "protocol", f"your code's process stopped reading from the grader {during}"
                            ) from None
                        if not todo:
                            sel.unregister(in_fd)
                        continue
                    try:
                        chunk = os.read(key.fd, 1 << 16)
                    except BlockingIOError:
                        continue
                    if key.fd == err_fd:
                        if not chunk:
                            sel.unregister(err_fd)
                            continue
                        self.output_total += len(chunk)
                        self.output += chunk[: max(0, cap - len(self.output))]
                        if self.output_total > cap:
                            raise WorkerError(
                                "output-limit",
                                f"your code printed more than {self.limits.output_kb} KiB {during}; it was stopped",
                            )
                    elif not chunk:
                        sel.unregister(out_fd)
                        open_out = False
                    else:
                        self._buf += chunk
                        if len(self._buf) > max_msg:
                            raise WorkerError(
                                "output-limit",
                                f"more than {self.limits.max_message_mb} MiB of replies came back {during}",
                            )

    def _next_line(self, during: str) -> dict | None:
        nl = self._buf.find(b"\n")
        if nl < 0:
            return None
        line = bytes(self._buf[:nl])
        del self._buf[: nl + 1]
        try:
            msg = json.loads(line)
        except (ValueError, RecursionError):
            msg = None
        if type(msg) is not dict:
            raise WorkerError("protocol", f"an unreadable reply came back {during}")
        return msg


def _line(obj) -> bytes:
    return (json.dumps(obj) + "\n").encode()
