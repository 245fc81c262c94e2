"""The grading worker: the only code that runs in the same process as a student's file.

Self-contained on purpose (stdlib + torch, no glmkit import): the grader passes this file's text with
``python -I -c``. In the namespaces sandbox (see isolation.py) it runs as an unprivileged uid in its own
namespaces, seeing only the Python environment and a private /tmp whose /tmp/work holds one copy of the
student's file; in the weak mode, in a fresh temporary folder holding that copy.

Once the student's file is imported, everything in this process is the student's: this code is a convenience
and a tripwire, not a boundary. The grader trusts nothing it says: replies are data, parsed strictly; their
text never reaches a hidden check's feedback; blocked actions are named in feedback only by a fixed category.

Protocol (one JSON object per line): the worker writes ``{"hello": true}`` first, before any student code can
run (so the grader can tell a sandbox that failed to start from a crash); the grader writes requests on the
worker's stdin, the worker answers on a private duplicate of its stdout. Before any student code runs, fds
0/1 are pointed at /dev/null and the output pipe (stderr), so a ``print`` cannot corrupt a reply by accident.

Order of events:
  1. say hello, read the setup request (module and file name, reference modules, sandbox switches);
  2. import torch; refuse ``glmkit`` imports from now on (the references are not available to submissions;
     an attempt is reported, so the grader can flag it);
  3. Landlock (read-only access to the interpreter and libraries, read-write to the working folder only, no
     TCP, no signals or abstract sockets outside), no-new-privileges, all capabilities dropped when running
     as root (weak mode), then a Python audit hook that refuses process creation, ctypes, rlimit changes,
     signals, sockets and file access outside the allowed roots and records each attempt by category;
  4. import the student's file and report which functions exist;
  5. serve ``call`` requests until stdin closes, each call on a fresh thread whose first Python frame is the
     student's function: it has no caller frame to walk to.
"""

import _thread
import functools
import importlib.abc
import importlib.util
import itertools
import json
import os
import sys
import time
import traceback
import types


def _safe_str(e):
    try:
        return str(e)[:2000]
    except BaseException:  # noqa: BLE001 - a student exception whose __str__ itself fails
        return "<the exception's message could not be printed>"


def _send(stream, obj):
    stream.write(json.dumps(obj, allow_nan=True, separators=(",", ":")) + "\n")
    stream.flush()


# ---------------------------------------------------------------------------------------------------------
# encoding values (trusted direction: grader -> worker) and results (worker -> grader, parsed strictly there)

_DTYPES = ("bool", "uint8", "int8", "int16", "int32", "int64", "float16", "bfloat16", "float32", "float64")


def _decode(v, torch):
    if isinstance(v, list):
        return [_decode(x, torch) for x in v]
    if isinstance(v, dict):
        t = v.get("__t__")
        if t == "tuple":
            return tuple(_decode(x, torch) for x in v["items"])
        if t == "tensor":
            dtype = getattr(torch, v["dtype"])
            return torch.tensor(v["data"], dtype=dtype).reshape(v["shape"])
        if t == "dict":
            return {k: _decode(x, torch) for k, x in v["items"]}
        raise ValueError(f"unknown tag {t!r}")
    return v


def _encode(v, torch, depth=0):
    if depth > 20:
        return {"__t__": "unsupported", "type": "nesting deeper than 20"}
    if v is None or type(v) in (bool, str):
        return v
    if isinstance(v, bool):
        return bool(v)
    if isinstance(v, int):
        return int.__index__(v)
    if isinstance(v, float):
        return float.__float__(v)
    if isinstance(v, torch.Tensor):
        base = torch.Tensor.as_subclass(v, torch.Tensor).detach().to("cpu")
        name = str(base.dtype).replace("torch.", "")
        if name not in _DTYPES:
            return {"__t__": "unsupported", "type": f"tensor of dtype {name}"}
        flat = base.reshape(-1)
        if name in ("float16", "bfloat16"):
            flat = flat.to(torch.float32)
        return {
            "__t__": "tensor",
            "dtype": name,
            "shape": list(base.shape),
            "data": flat.tolist(),
            "subclass": type(v).__name__ if type(v) is not torch.Tensor else None,
        }
    if isinstance(v, tuple):
        return {"__t__": "tuple", "items": [_encode(x, torch, depth + 1) for x in tuple.__iter__(v)]}
    if isinstance(v, list):
        return [_encode(x, torch, depth + 1) for x in list.__iter__(v)]
    return {"__t__": "unsupported", "type": type(v).__name__}


# ---------------------------------------------------------------------------------------------------------
# sandbox (inside the namespaces sandbox these only add to it; in the weak mode they are all there is)


def _landlock(read_roots, rw_roots, rw_files):
    """Kernel-enforced file-system, network and signal restrictions; returns the ABI version used (0 = none)."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    # landlock_create_ruleset/add_rule/restrict_self: 444/445/446 on every architecture (post-424 numbering).
    abi = libc.syscall(444, None, ctypes.c_size_t(0), ctypes.c_uint32(1))  # LANDLOCK_CREATE_RULESET_VERSION
    if abi < 1:
        return 0
    fs_all = (1 << 13) - 1  # EXECUTE .. MAKE_SYM (ABI 1)
    if abi >= 2:
        fs_all |= 1 << 13  # REFER
    if abi >= 3:
        fs_all |= 1 << 14  # TRUNCATE
    if abi >= 5:
        fs_all |= 1 << 15  # IOCTL_DEV
    file_rights = 1 | 2 | 4 | (1 << 14) | (1 << 15)  # rights that apply to a single file
    read_rights = 1 | 4 | 8  # EXECUTE | READ_FILE | READ_DIR

    class Attr(ctypes.Structure):
        _fields_ = [("fs", ctypes.c_uint64), ("net", ctypes.c_uint64), ("scoped", ctypes.c_uint64)]

    class PathBeneath(ctypes.Structure):
        _pack_ = 1
        _fields_ = [("allowed", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]

    net = 1 | 2 if abi >= 4 else 0  # BIND_TCP | CONNECT_TCP, with no rule: no TCP at all
    scoped = 1 | 2 if abi >= 6 else 0  # abstract unix sockets and signals stay inside the sandbox
    size = 8 if abi < 4 else (16 if abi < 6 else 24)
    attr = Attr(fs_all, net, scoped)
    fd = libc.syscall(444, ctypes.byref(attr), ctypes.c_size_t(size), ctypes.c_uint32(0))
    if fd < 0:
        return 0
    rules = (
        [(p, read_rights) for p in read_roots]
        + [(p, fs_all) for p in rw_roots]
        + [(p, (2 | 4) & file_rights & fs_all) for p in rw_files]
    )
    for path, rights in rules:
        try:
            pfd = os.open(path, os.O_PATH | os.O_CLOEXEC)
        except OSError:
            continue
        if not os.path.isdir(path):
            rights &= file_rights
        pb = PathBeneath(rights & fs_all, pfd)
        libc.syscall(445, ctypes.c_int(fd), ctypes.c_int(1), ctypes.byref(pb), ctypes.c_uint32(0))
        os.close(pfd)
    libc.prctl(38, 1, 0, 0, 0)  # PR_SET_NO_NEW_PRIVS
    ok = libc.syscall(446, ctypes.c_int(fd), ctypes.c_uint32(0)) == 0
    os.close(fd)
    return abi if ok else 0


def _drop_capabilities():
    """As root: empty the bounding, permitted and effective capability sets (no raising rlimits again)."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(38, 1, 0, 0, 0)  # PR_SET_NO_NEW_PRIVS
    for cap in range(64):
        libc.prctl(24, cap, 0, 0, 0)  # PR_CAPBSET_DROP (fails harmlessly past the last cap)

    class Header(ctypes.Structure):
        _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]

    class Data(ctypes.Structure):
        _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]

    return libc.capset(ctypes.byref(Header(0x20080522, 0)), (Data * 2)()) == 0


def _install_audit_hook(events, read_roots, write_roots):
    real = os.path.realpath
    under = lambda p, roots: any(p == r or p.startswith(r.rstrip("/") + "/") for r in roots)  # noqa: E731
    refused = {  # audit event -> (category the grader shows, what it says in the PermissionError)
        "os.fork": ("process", "start a process"),
        "os.forkpty": ("process", "start a process"),
        "os.posix_spawn": ("process", "start a process"),
        "os.spawn": ("process", "start a process"),
        "os.exec": ("process", "start a program"),
        "os.system": ("process", "run a shell command"),
        "subprocess.Popen": ("process", "start a process"),
        "pty.spawn": ("process", "start a process"),
        "os.kill": ("signal", "send a signal"),
        "os.killpg": ("signal", "send a signal"),
        "signal.pthread_kill": ("signal", "send a signal"),
        "resource.setrlimit": ("limits", "change resource limits"),
        "resource.prlimit": ("limits", "change resource limits"),
        "ctypes.dlopen": ("native", "load native code with ctypes"),
        "ctypes.dlsym": ("native", "load native code with ctypes"),
        "ctypes.call_function": ("native", "call native code with ctypes"),
        "socket.connect": ("network", "open a network connection"),
        "socket.bind": ("network", "open a socket"),
        "socket.sendto": ("network", "send network packets"),
        "sys.addaudithook": ("audit", "install an audit hook"),
    }
    path_events = {
        "open",
        "os.listdir",
        "os.scandir",
        "os.remove",
        "os.rename",
        "os.rmdir",
        "os.mkdir",
        "os.chmod",
        "os.chown",
        "os.truncate",
        "os.utime",
        "os.symlink",
        "os.link",
        "shutil.rmtree",
    }
    state = {"busy": False}

    def record(kind, what):
        if len(events) < 50:
            events.append({"kind": kind, "what": what})

    def hook(event, args):
        if state["busy"]:
            return
        if event in refused:
            kind, what = refused[event]
            state["busy"] = True
            try:
                record(kind, what)
            finally:
                state["busy"] = False
            raise PermissionError(f"the grader does not allow submissions to {what} ({event})")
        if event in path_events and args:
            path = args[0]
            if isinstance(path, int) or path is None:
                return
            state["busy"] = True
            try:
                try:
                    p = real(os.fsdecode(path))
                except Exception:
                    return
                writing = event != "open" and event not in ("os.listdir", "os.scandir")
                if event == "open" and len(args) > 1:
                    mode, flags = args[1], args[2] if len(args) > 2 else 0
                    writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or bool(
                        isinstance(flags, int) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT)
                    )
                allowed = under(p, write_roots) if writing else under(p, read_roots + write_roots)
                if not allowed:
                    record("write" if writing else "read", p)
            finally:
                state["busy"] = False
            if not allowed:
                raise PermissionError(
                    f"the grader does not allow submissions to "
                    f"{'write' if writing else 'read'} files outside their folder: {p}"
                )

    sys.addaudithook(hook)


class _GlmkitGate(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """``glmkit`` is not available to submissions. The packages above a reference module (``glmkit``,
    ``glmkit.data``) import as empty ones, so that the name recorded is the reference's own, then refused."""

    def __init__(self, attempts, references):
        self.attempts = attempts
        self.packages = {r.rsplit(".", k)[0] for r in references for k in range(1, r.count(".") + 1)}

    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] != "glmkit":
            return None
        if len(self.attempts) < 20:
            self.attempts.append(name)
        if name in self.packages or name == "glmkit":
            return importlib.util.spec_from_loader(name, self, is_package=True)
        raise ModuleNotFoundError(
            f"No module named {name!r}: glmkit is not available to exercise files when "
            f"they are checked or graded (write the code yourself; torch is available)",
            name=name,
        )

    def create_module(self, spec):
        return None

    def exec_module(self, module):
        module.__path__ = []


def _describe(e):
    """An exception as data. Student code may run here (``__str__``), so this is called on the student's thread."""
    try:
        tb = "".join(traceback.format_exception(type(e), e, e.__traceback__)[-6:])[-4000:]
    except BaseException:  # noqa: BLE001
        tb = ""
    return {"ok": False, "type": _safe_str(type(e).__name__)[:100], "message": _safe_str(e), "traceback": tb}


def _call_fresh(fn, args, kwargs, encode):
    """``encode(fn(*args, **kwargs))`` on a new thread started from C: the student's function is that thread's
    first Python frame (``sys._getframe(1)`` raises), so no caller frame leads back to this worker, and
    whatever student code runs while the value is encoded or an exception described runs there too.
    Returns the reply: {"ok": True, "value": ...} or {"ok": False, "type", "message", "traceback"}."""
    out, errors = [], []
    sys.unraisablehook = lambda u: errors.append(_describe(u.exc_value))
    call = map(encode, itertools.starmap(functools.partial(fn, **kwargs), [tuple(args)]))
    if hasattr(_thread, "start_joinable_thread"):  # Python >= 3.13
        _thread.start_joinable_thread(functools.partial(out.extend, call)).join()
    else:  # the thread's sentinel lock is released when its state is deleted; we hold it before it may end
        gate = _thread.allocate_lock()
        gate.acquire()
        _thread.start_new_thread(
            out.extend,
            (
                itertools.chain(
                    itertools.starmap(_thread._set_sentinel, [()]), itertools.starmap(gate.acquire, [()]), call
                ),
            ),
        )
        while not out:
            time.sleep(0.0002)
        out[0].acquire()
        gate.release()
        out.pop(0).acquire()  # returns once that thread has ended
        out.pop(0)
    if out:
        return {"ok": True, "value": out[0]}
    return errors[0] if errors else {"ok": False, "type": "SystemExit", "message": "", "traceback": ""}


# ---------------------------------------------------------------------------------------------------------


def main():
    proto_in = os.fdopen(os.dup(0), "r", encoding="utf-8")
    proto_out = os.fdopen(os.dup(1), "w", encoding="utf-8")
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    os.dup2(2, 1)  # student prints go to the (capped) output pipe
    sys.stdin = open(os.devnull)
    _send(proto_out, {"hello": True})
    setup = json.loads(proto_in.readline())
    workdir = os.getcwd()

    import torch

    torch.set_num_threads(1)
    attempts = []
    sys.meta_path.insert(
        0, _GlmkitGate(attempts, [r for r in setup.get("reference_modules", []) if isinstance(r, str)])
    )

    # what the student process may read: the interpreter and its libraries
    read_roots = {
        sys.prefix,
        sys.base_prefix,
        sys.exec_prefix,
        sys.base_exec_prefix,
        "/usr",
        "/lib",
        "/lib64",
        "/bin",
        "/etc",
        "/proc",
        "/sys",
        "/dev",
    }
    read_roots |= {p for p in sys.path if p and os.path.isdir(p)}
    read_roots = sorted({os.path.realpath(p) for p in read_roots if os.path.exists(p)})
    write_roots = [os.path.realpath(workdir), "/dev/null"]
    sandbox = {"landlock": 0, "capabilities_dropped": False, "audit_hook": False}
    if setup.get("landlock", True):
        try:
            sandbox["landlock"] = _landlock(read_roots, [workdir], ["/dev/null"])
        except Exception:
            sandbox["landlock"] = 0
    if os.geteuid() == 0:
        try:
            sandbox["capabilities_dropped"] = bool(_drop_capabilities())
        except Exception:
            pass
    events = []
    if setup.get("audit_hook", True):
        _install_audit_hook(events, read_roots, write_roots)
        sandbox["audit_hook"] = True

    module_name, filename = setup["module"], setup["file"]
    spec = importlib.util.spec_from_file_location(module_name, os.path.join(workdir, filename))
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    imported = _call_fresh(spec.loader.exec_module, [module], {}, lambda _: None)  # no frame of ours either
    if not imported["ok"]:  # SystemExit/KeyboardInterrupt at import are the student's too
        del imported["ok"]
        _send(proto_out, {"import_error": imported, "sandbox": sandbox, "events": events, "glmkit_imports": attempts})
        os._exit(0)

    functions = {f: type(vars(module).get(f)) is types.FunctionType for f in setup.get("functions", [])}
    _send(
        proto_out,
        {"ready": True, "functions": functions, "sandbox": sandbox, "events": events, "glmkit_imports": attempts},
    )
    while True:
        line = proto_in.readline()
        if not line:
            break
        try:
            req = json.loads(line)
            fn = vars(module).get(req["function"])
            args = _decode(req.get("args", []), torch)
            kwargs = _decode(req.get("kwargs", {"__t__": "dict", "items": []}), torch)
        except Exception as e:  # noqa: BLE001 - a grader bug; answer instead of dying
            _send(proto_out, {"ok": False, "type": "GraderProtocolError", "message": _safe_str(e), "events": []})
            continue
        if not callable(fn):
            _send(proto_out, {"ok": False, "missing": True, "events": []})
            continue
        del events[:]
        reply = _call_fresh(fn, args, kwargs, functools.partial(_encode, torch=torch))
        reply["events"], reply["glmkit_imports"] = list(events), list(attempts)
        try:
            _send(proto_out, reply)
        except BaseException as e:  # noqa: BLE001 - e.g. an unencodable value
            _send(
                proto_out, {"ok": False, "type": "GraderEncodingError", "message": _safe_str(e), "events": list(events)}
            )
    os._exit(0)


if __name__ == "__main__":
    main()
