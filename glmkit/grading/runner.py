"""Running an exercise's checks against one source file, in one sandboxed worker process.

The check functions run HERE, in the grading process; only ``ctx.call(...)`` crosses into the student's
process. A check that times out, or whose student process crashes or prints too much, ends that check; the
worker is restarted (in a fresh sandbox) for the next check while the submission's total time budget lasts.
Public checks run before hidden ones, so nothing a worker learnt from a hidden check's inputs can reach a
public check's detail. What the worker reports (blocked actions, glmkit imports) is accepted only as one of
a fixed set of categories and names; its free text goes to the instructor's results file, never to feedback.
"""

from __future__ import annotations

import hashlib
import re
import time
import traceback
from dataclasses import asdict, dataclass, field

from glmkit.grading.api import Check, CheckFailed, Ctx, StudentError
from glmkit.grading.exercise import Exercise, reference_imports
from glmkit.grading.isolation import Isolation
from glmkit.grading.sandbox import Limits, Unsupported, Worker, WorkerError

# what a blocked action is called in feedback: the worker reports a category; anything else is "other"
BLOCKED = {
    "process": "start a process",
    "signal": "send a signal",
    "native": "load native code",
    "limits": "change its resource limits",
    "network": "use the network",
    "audit": "install an audit hook",
    "read": "read a file outside its folder",
    "write": "write a file outside its folder",
    "syscall": "make a system call the sandbox forbids (the process was stopped)",
}

# statuses of one check
PASSED, FAILED, NOT_IMPLEMENTED, ERROR, MISSING_FN = "passed", "failed", "not implemented", "error", "missing function"
TIMEOUT, CRASHED, OUTPUT_LIMIT, PROTOCOL, NOT_RUN = "timeout", "crashed", "output-limit", "bad reply", "not run"


@dataclass
class CheckResult:
    name: str
    title: str
    hidden: bool
    max_points: float
    points: float = 0.0
    status: str = NOT_RUN
    summary: str = ""  # what is wrong, without data (safe for hidden checks)
    detail: str = ""  # data: values, indices, inputs, tracebacks (public checks / instructor only)
    message: str = ""  # the check's teaching message
    seconds: float = 0.0
    grader_note: str = ""  # instructor only: e.g. a check that itself raised


@dataclass
class ExerciseResult:
    exercise: str
    title: str
    max_points: float
    points: float = 0.0
    status: str = "graded"
    notes: list[str] = field(default_factory=list)
    flags: list[str] = field(default_factory=list)
    checks: list[CheckResult] = field(default_factory=list)
    sandbox: dict = field(default_factory=dict)  # instructor only: how it was isolated
    isolation: str = ""
    output_excerpt: str = ""  # instructor only: what the student's code printed (never in feedback)
    blocked: list[str] = field(default_factory=list)  # instructor only: blocked actions, with paths
    file: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


def check_seed(seed: str | int, exercise: str, check: str) -> int:
    """Per-check seed: the same run seed gives the same inputs (a grade can be reproduced)."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{exercise}:{check}".encode()).digest()[:8], "little")


def run_checks(
    ex: Exercise,
    source: str,
    checks: list[Check],
    *,
    seed: str | int,
    limits: Limits | None = None,
    isolation: Isolation | None = None,
    on_check=None,
) -> ExerciseResult:
    limits = limits or ex.limits
    checks = [c for c in checks if not c.hidden] + [c for c in checks if c.hidden]
    res = ExerciseResult(ex.id, ex.title, sum(c.points for c in checks))
    static = reference_imports(source, ex.reference_modules)
    runtime_ref: set[str] = set()
    blocked: list[str] = []
    uids: list[int] = []
    # the submission's budget ends at t_end, moved on by each sandbox's start-up (``Worker.hello_seconds``)
    state = {"worker": None, "start_failure": None, "t_end": time.monotonic() + limits.total_timeout, "hello": 0.0}

    def note_events(evts):
        for e in evts if isinstance(evts, list) else []:
            if isinstance(e, dict) and len(blocked) < 20:
                kind = e.get("kind") if e.get("kind") in BLOCKED else "other"
                blocked.append(f"{kind}: {str(e.get('what'))[:300]}")

    def note_imports(names):
        for n in names if isinstance(names, list) else []:
            runtime_ref.update(
                m for m in ex.reference_modules if isinstance(n, str) and (n == m or n.startswith(m + "."))
            )

    def stop_worker():
        w = state["worker"]
        if w is not None:
            res.output_excerpt = (res.output_excerpt + w.output.decode(errors="replace"))[-20000:]
            if w.exit_signal == "SIGSYS":
                blocked.append("syscall: a forbidden system call (SIGSYS)")
            w.close()
        state["worker"] = None

    def ensure_worker():
        if state["worker"] is not None and state["worker"].alive:
            return state["worker"]
        stop_worker()
        w = Worker(source, ex.module, ex.functions, limits, ex.reference_modules, isolation)
        state["worker"] = w
        try:
            info = w.start(min(time.monotonic() + limits.startup_timeout, state["t_end"]))
        except WorkerError as e:
            info = e
        state["hello"] = w.hello_seconds
        state["t_end"] += w.hello_seconds
        res.sandbox, res.isolation = {**w.facts, "uids": uids}, w.iso.label
        if w.box is not None and w.box.uid is not None:
            uids.append(w.box.uid)
        if isinstance(info, WorkerError):
            stop_worker()
            state["start_failure"] = (info.kind, info.message, "")
            raise StudentError(NOT_RUN if info.kind == "sandbox" else info.kind, info.message)
        res.sandbox["worker_report"] = info.sandbox
        note_events(info.events)
        note_imports(info.glmkit_imports)
        if not info.ok:
            err = info.import_error or {}
            stop_worker()
            msg = f"your file could not be imported: {err.get('type')}: {err.get('message')}"
            state["start_failure"] = ("import-error", msg, _clean_tb(str(err.get("traceback", "")), ex))
            raise StudentError("import-error", msg, state["start_failure"][2])
        return w

    for check in checks:
        cr = CheckResult(check.name, check.title, check.hidden, check.points, message=check.message)
        res.checks.append(cr)
        if state["start_failure"] is not None:
            kind, msg, tb = state["start_failure"]
            cr.status = {"import-error": ERROR, "sandbox": NOT_RUN}.get(kind, kind)
            cr.summary, cr.detail = msg, tb
            continue
        if time.monotonic() >= state["t_end"]:
            cr.status, cr.summary = NOT_RUN, "not run: the submission's total time budget was used up"
            continue
        t0 = time.monotonic()
        notes: list[str] = []

        def caller(function, args, kwargs, _check=check, _t0=t0):
            if function not in ex.functions:
                raise RuntimeError(f"check {_check.name} calls {function}, which is not in exercise.toml")
            state["hello"] = 0.0
            w = ensure_worker()
            deadline = min(_t0 + state["hello"] + _check.timeout, state["t_end"])
            reply = w.call(function, args, kwargs, deadline)
            note_events(reply.get("events"))
            note_imports(reply.get("glmkit_imports"))
            if reply.get("missing"):
                raise StudentError(MISSING_FN, f"{ex.module}.{function} is not defined in your file")
            if reply.get("ok") is True:
                value = reply["value"]
                if isinstance(value, Unsupported):
                    raise CheckFailed(
                        f"{function}() returned an object the grader cannot read",
                        f"it returned {value!r}; return tensors, ints, tuples or lists",
                    )
                return value
            etype, emsg = str(reply.get("type")), str(reply.get("message"))
            if etype == "NotImplementedError" and "not implemented" in emsg:
                raise StudentError(NOT_IMPLEMENTED, emsg)
            if not re.fullmatch(r"\w{1,60}", etype):
                etype = "an exception"
            raise StudentError(
                ERROR,
                f"{function}() raised {etype}",
                f"{etype}: {emsg}\n{_clean_tb(str(reply.get('traceback', '')), ex)}",
            )

        ctx = Ctx(caller, check_seed(seed, ex.id, check.name), notes.append)
        try:
            check.fn(ctx)
            cr.status, cr.points = PASSED, check.points
        except CheckFailed as e:
            cr.status, cr.summary, cr.detail = FAILED, e.summary, e.detail
        except StudentError as e:
            cr.status, cr.summary, cr.detail = e.status, e.summary, e.detail
        except WorkerError as e:
            cr.status = {"timeout": TIMEOUT, "crashed": CRASHED, "output-limit": OUTPUT_LIMIT, "sandbox": NOT_RUN}.get(
                e.kind, PROTOCOL
            )
            cr.summary = e.message
            stop_worker()
        except Exception as e:  # noqa: BLE001 - the check could not digest the student's value
            cr.status, cr.summary = FAILED, "the returned value does not have the expected form"
            cr.grader_note = "".join(traceback.format_exception(type(e), e, e.__traceback__))[-3000:]
        if cr.status not in (PASSED, NOT_IMPLEMENTED, MISSING_FN) and notes:
            cr.detail = (cr.detail + "\n" if cr.detail else "") + "inputs: " + "; ".join(notes)
        cr.seconds = round(time.monotonic() - t0, 3)
        if on_check:
            on_check(cr)
    stop_worker()

    res.points = round(sum(c.points for c in res.checks), 4)
    first = next((c.status for c in res.checks if c.status in (TIMEOUT, CRASHED, OUTPUT_LIMIT, PROTOCOL)), None)
    if state["start_failure"] is not None and state["start_failure"][0] == "sandbox":
        res.status = "grader-error"
        res.notes.append(f"the grader's sandbox failed: {state['start_failure'][1][:300]}")
    elif state["start_failure"] is not None and state["start_failure"][0] == "import-error" and res.points == 0:
        res.status = "import-error"
    elif first:  # the first abnormal ending names the status (later ones are often its consequences)
        res.status = first.replace(" ", "-")
    if static or runtime_ref:
        res.flags.append("reference-import")
        what = "; ".join(static + [f"tried to import {x} at run time" for x in sorted(runtime_ref)])
        res.notes.append(f"FLAGGED: uses glmkit's reference implementation ({what})")
    if blocked:
        res.flags.append("blocked-actions")
        res.blocked = list(dict.fromkeys(blocked))  # with paths: instructor only
        kinds = dict.fromkeys(BLOCKED.get(b.split(":")[0], "do something the grader forbids") for b in res.blocked)
        res.notes.append("the grader blocked what your code tried to do: " + "; ".join(kinds))
    return res


def _clean_tb(tb: str, ex: Exercise) -> str:
    """A traceback of the student's own code, with the temporary folder's path removed."""
    return re.sub(r'File "[^"]*/glmkit-grade-[^/"]*/', 'File "', tb)[-3000:]
