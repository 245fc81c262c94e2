"""``python -m glmkit doctor``: is this machine ready for the course? Each problem comes with its fix.

What it checks (each is a ``Check(name, ok, detail, fix, blocking)``):
    python, torch, numpy, triton versions   (numpy < 2.4 matters when kernels run under the interpreter)
    device                                  GPU name and compute capability, or CPU and its cores
    bf16                                    whether bfloat16 maths works here
    kernel mode / kernel runs               native or the Triton CPU interpreter, and whether the lesson-00
                                            primer kernel actually launches and matches torch
    jupyterlab, widgets                     JupyterLab installed; ipywidgets and jupyterlab_widgets present,
                                            of matching major versions, with the lab extension installed;
                                            inside a kernel, whether it is a Jupyter kernel that can show them

``run_checks()`` returns the list (tests and lesson 00 use it); ``main()`` prints it as a table with the
exact ``pip`` command for each problem, and exits with status 1 when a blocking check fails. A check that
is not blocking (no GPU, say) is a warning: the course still runs.
"""

from __future__ import annotations

import dataclasses
import html
import importlib
import importlib.metadata
import os
import platform
import shlex
import shutil
import sys
import time

TORCH_RANGE = ((2, 6), (2, 14))  # torch >= 2.6, < 2.14 (pyproject)
NUMPY_INTERP_MAX = (2, 4)  # triton 3.6's interpreter breaks on numpy 2.4


@dataclasses.dataclass
class Check:
    name: str
    ok: bool
    detail: str
    fix: str = ""  # the exact command (or step) that fixes it; empty when ok
    blocking: bool = True  # a failed blocking check makes `doctor` exit nonzero

    @property
    def status(self) -> str:
        return "ok" if self.ok else ("FAIL" if self.blocking else "warn")


def _pip(*specs: str, extra: str = "") -> str:
    """The exact pip command for this interpreter (the venv's python, not whatever `pip` is on PATH)."""
    args = " ".join(shlex.quote(s) for s in specs)
    return f"{shlex.quote(sys.executable)} -m pip install {args}{extra}"


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _vtuple(v: str) -> tuple[int, ...]:
    out = []
    for part in v.split("+")[0].split("."):
        digits = "".join(ch for ch in part if ch.isdigit())
        if not digits:
            break
        out.append(int(digits))
        if not part.isdigit():
            break
    return tuple(out)


# ---------------------------------------------------------------------------------------------------
# Individual checks. Each takes what it inspects as arguments (defaults: this machine), so tests can
# feed it a broken machine and see the fix.


def check_python(version: tuple[int, int, int] | None = None) -> Check:
    v = version or tuple(sys.version_info[:3])
    ok = v >= (3, 10)
    return Check(
        "python",
        ok,
        f"Python {'.'.join(map(str, v))} ({sys.executable})",
        "" if ok else "install Python 3.10 or newer, then rerun: PYTHON=python3.11 ./course setup",
    )


def check_torch(version: str | None = "auto") -> Check:
    if version == "auto":
        version = _version("torch")
    cpu_fix = _pip("torch>=2.6,<2.14", extra=" --index-url https://download.pytorch.org/whl/cpu")
    gpu_fix = _pip("torch>=2.6,<2.14")
    fix = gpu_fix if shutil.which("nvidia-smi") else cpu_fix
    if version is None:
        return Check("torch", False, "PyTorch is not installed", fix)
    lo, hi = TORCH_RANGE
    ok = lo <= _vtuple(version)[:2] < hi
    return Check("torch", ok, f"torch {version}" + ("" if ok else " (glmkit needs >= 2.6, < 2.14)"), "" if ok else fix)


def check_numpy(version: str | None = "auto", interpreter: bool | None = None) -> Check:
    if version == "auto":
        version = _version("numpy")
    if interpreter is None:
        interpreter = _interpreter_mode()
    if version is None:
        return Check("numpy", False, "numpy is not installed", _pip("numpy>=1.24,<2.4"))
    too_new = _vtuple(version)[:2] >= NUMPY_INTERP_MAX
    if too_new and interpreter:
        return Check(
            "numpy",
            False,
            f"numpy {version}: the Triton CPU interpreter (triton 3.6) fails under numpy >= 2.4",
            _pip("numpy>=1.24,<2.4"),
        )
    if too_new:
        return Check(
            "numpy",
            False,
            f"numpy {version}: fine natively on the GPU, but the CPU interpreter needs numpy < 2.4",
            _pip("numpy>=1.24,<2.4"),
            blocking=False,
        )
    return Check("numpy", True, f"numpy {version}")


def _interpreter_mode() -> bool:
    """Kernels run under the interpreter when TRITON_INTERPRET is set, or (as glmkit.kernels arranges)
    whenever CUDA is not available."""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        return True
    try:
        import torch

        return not torch.cuda.is_available()
    except Exception:
        return True


def check_triton(version: str | None = "auto") -> Check:
    if version == "auto":
        version = _version("triton")
    if version is None:
        if platform.system() != "Linux":
            return Check(
                "triton",
                False,
                f"triton has no wheels for {platform.system()}: the course runs its "
                "torch paths, and kernel cells are skipped",
                "use Linux (or WSL2) for the kernels",
                blocking=False,
            )
        return Check("triton", False, "triton is not installed: kernels cannot run", _pip("triton>=3.6,<3.7"))
    try:
        import torch

        cuda = torch.cuda.is_available()
    except Exception:
        cuda = False
    ok = cuda or _vtuple(version)[:2] == (3, 6)
    detail = f"triton {version}"
    if not ok:
        detail += " (the CPU interpreter is tested with 3.6.x, the GPU machine's version)"
    return Check("triton", ok, detail, "" if ok else _pip("triton>=3.6,<3.7"), blocking=False)


def check_device() -> Check:
    import torch

    if torch.cuda.is_available():
        i = torch.cuda.current_device()
        cap = ".".join(map(str, torch.cuda.get_device_capability(i)))
        mem = torch.cuda.get_device_properties(i).total_memory / 2**30
        return Check(
            "device", True, f"GPU: {torch.cuda.get_device_name(i)} (sm {cap}, {mem:.0f} GiB), CUDA {torch.version.cuda}"
        )
    cpu = platform.processor() or platform.machine()
    detail = f"CPU: {cpu}, {os.cpu_count()} cores, torch threads={torch.get_num_threads()} (no CUDA)"
    if shutil.which("nvidia-smi") and torch.version.cuda is None:
        return Check(
            "device",
            False,
            detail + "; nvidia-smi sees a GPU but this torch is a CPU build",
            _pip("--force-reinstall", "torch>=2.6,<2.14"),
            blocking=False,
        )
    return Check("device", True, detail + ": lessons use their CPU sizes, kernels the interpreter")


def check_bf16() -> Check:
    import torch

    if torch.cuda.is_available():
        ok = torch.cuda.is_bf16_supported()
        return Check(
            "bf16",
            ok,
            "bfloat16 supported on the GPU"
            if ok
            else "this GPU has no bf16 (pre-Ampere): bf16 tests are skipped, use fp16",
            "",
            blocking=False,
        )
    try:
        a = torch.ones(4, 4, dtype=torch.bfloat16)
        ok = bool(((a @ a).float() == 4).all())
    except Exception as e:  # pragma: no cover - very old torch
        return Check("bf16", False, f"bfloat16 maths failed on the CPU: {e}", "", blocking=False)
    return Check("bf16", ok, "bfloat16 works on the CPU (emulated, slower than fp32)", "", blocking=False)


def check_kernel_mode() -> Check:
    interp = _interpreter_mode()
    if interp:
        return Check(
            "kernel mode",
            True,
            "Triton interpreter (TRITON_INTERPRET=1): kernels run on the CPU in "
            "numpy, exact but slow — lessons use small shapes",
        )
    return Check("kernel mode", True, "native: kernels compile for the GPU")


def check_kernel_runs() -> Check:
    """Launch the lesson-00 primer kernel on a small odd-sized tensor and compare it with torch."""
    try:
        import torch

        from glmkit.kernels import primer  # importing glmkit.kernels selects the interpreter without CUDA
        from glmkit.testing import poisoned, rel_err
    except Exception as e:
        return Check(
            "kernel runs",
            False,
            f"could not import the primer kernel: {type(e).__name__}: {e}",
            _pip("triton>=3.6,<3.7") if "triton" in str(e) else _pip("-e", ".[cpu,lab,dev]"),
        )
    device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(37, generator=g).to(device)  # 37: not a multiple of the block
        b = torch.randn(37, generator=g).to(device)
        t = time.perf_counter()
        y = primer.scale_add(x, b, 2.0, out=poisoned((37,), device=device), block=16)
        if device == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t
        err = rel_err(primer.scale_add_reference(x, b, 2.0), y)
    except Exception as e:
        fix = (
            _pip("numpy>=1.24,<2.4")
            if _interpreter_mode()
            else "check that torch's CUDA build and triton match: " + _pip("--force-reinstall", "torch>=2.6,<2.14")
        )
        return Check("kernel runs", False, f"the primer kernel failed: {type(e).__name__}: {e}"[:300], fix)
    ok = err <= 1e-6
    where = "under the interpreter" if _interpreter_mode() else "natively on the GPU"
    return Check(
        "kernel runs",
        ok,
        f"primer kernel ran {where} in {dt * 1000:.0f} ms (incl. compile), rel. error vs torch {err:.1e}",
        "" if ok else "report this: the kernel gave wrong numbers",
    )


def check_jupyterlab(version: str | None = "auto") -> Check:
    if version == "auto":
        version = _version("jupyterlab")
    if version is None:
        return Check(
            "jupyterlab",
            False,
            "JupyterLab is not installed (needed to open the lessons)",
            _pip("jupyterlab>=4.2", "ipykernel>=6.29"),
        )
    ok = _vtuple(version)[:1] >= (4,)
    return Check("jupyterlab", ok, f"jupyterlab {version}", "" if ok else _pip("jupyterlab>=4.2"))


# ipywidgets major version → the jupyterlab_widgets major version that renders it
_WIDGET_PAIRS = {8: 3, 7: 1}


def check_widgets(
    ipywidgets: str | None = "auto", lab_widgets: str | None = "auto", labextension_dir: str | None = "auto"
) -> Check:
    if ipywidgets == "auto":
        ipywidgets = _version("ipywidgets")
    if lab_widgets == "auto":
        lab_widgets = _version("jupyterlab_widgets")
    if labextension_dir == "auto":
        labextension_dir = _find_widget_labextension()
    fix_all = _pip("ipywidgets>=8.1", "jupyterlab_widgets>=3,<4")
    if ipywidgets is None:
        return Check("widgets", False, "ipywidgets is not installed: the explorers cannot be shown", fix_all)
    if lab_widgets is None:
        return Check(
            "widgets",
            False,
            f"ipywidgets {ipywidgets}, but jupyterlab_widgets (the JupyterLab side) is missing: widgets show as text",
            fix_all,
        )
    want = _WIDGET_PAIRS.get(_vtuple(ipywidgets)[0])
    if want is None or _vtuple(lab_widgets)[0] != want or _vtuple(ipywidgets)[0] < 8:
        return Check(
            "widgets",
            False,
            f"ipywidgets {ipywidgets} with jupyterlab_widgets {lab_widgets}: the "
            "course needs ipywidgets 8 with jupyterlab_widgets 3",
            fix_all,
        )
    if labextension_dir is None:
        return Check(
            "widgets",
            False,
            f"ipywidgets {ipywidgets}, jupyterlab_widgets {lab_widgets}, but the lab "
            "extension @jupyter-widgets/jupyterlab-manager is not in any Jupyter data path",
            _pip("--force-reinstall", "jupyterlab_widgets>=3,<4"),
        )
    detail = f"ipywidgets {ipywidgets} + jupyterlab_widgets {lab_widgets} (lab extension installed)"
    kernel = _kernel_kind()
    if kernel == "kernel":
        detail += "; running in a Jupyter kernel: widgets render when this notebook is open in JupyterLab"
    elif kernel == "terminal":
        detail += "; running in a terminal IPython: widgets need JupyterLab"
    return Check("widgets", True, detail)


def _find_widget_labextension() -> str | None:
    try:
        from jupyter_core.paths import jupyter_path
    except ImportError:
        candidates = [os.path.join(sys.prefix, "share", "jupyter")]
    else:
        candidates = jupyter_path()
    for base in candidates:
        d = os.path.join(base, "labextensions", "@jupyter-widgets", "jupyterlab-manager")
        if os.path.isdir(d):
            return d
    return None


def _kernel_kind() -> str:
    """'kernel' inside a Jupyter kernel, 'terminal' in terminal IPython, '' in plain Python."""
    try:
        from IPython import get_ipython
    except ImportError:
        return ""
    ip = get_ipython()
    if ip is None:
        return ""
    return "kernel" if getattr(ip, "kernel", None) is not None else "terminal"


CHECKS = (
    check_python,
    check_torch,
    check_numpy,
    check_triton,
    check_device,
    check_bf16,
    check_kernel_mode,
    check_kernel_runs,
    check_jupyterlab,
    check_widgets,
)


def run_checks() -> list[Check]:
    """Run every check on this machine. A check that itself crashes is reported as a failed check."""
    results = []
    for fn in CHECKS:
        try:
            results.append(fn())
        except Exception as e:
            name = fn.__name__.removeprefix("check_").replace("_", " ")
            results.append(
                Check(
                    name,
                    False,
                    f"the check crashed: {type(e).__name__}: {e}",
                    _pip("-e", ".[cpu,lab,dev]") + "  (from the repository root)",
                )
            )
    return results


def blocking_problems(checks: list[Check]) -> list[Check]:
    return [c for c in checks if not c.ok and c.blocking]


def format_table(checks: list[Check]) -> str:
    """The checks as a plain-text table, then one 'fix:' line per problem."""
    w = max(len(c.name) for c in checks)
    lines = [f"{c.status:>4}  {c.name:<{w}}  {c.detail}" for c in checks]
    problems = [c for c in checks if not c.ok]
    if problems:
        lines.append("")
        for c in problems:
            lines.append(f"fix ({c.name}): {c.fix or 'see the detail above'}")
    bad = blocking_problems(checks)
    lines.append("")
    lines.append(
        "ready for the course."
        if not bad
        else f"{len(bad)} blocking problem(s): run the fix line(s) above, then `python -m glmkit doctor` again."
    )
    return "\n".join(lines)


def to_html(checks: list[Check]) -> str:
    """The checks as an HTML table (lesson 00 shows it with IPython.display.HTML)."""
    colour = {"ok": "#1a7f37", "warn": "#9a6700", "FAIL": "#cf222e"}
    rows = []
    for c in checks:
        fix = f"<code>{html.escape(c.fix)}</code>" if c.fix and not c.ok else ""
        rows.append(
            f"<tr><td style='color:{colour[c.status]};font-weight:bold'>{c.status}</td>"
            f"<td style='text-align:left'>{html.escape(c.name)}</td>"
            f"<td style='text-align:left'>{html.escape(c.detail)}</td><td style='text-align:left'>{fix}</td></tr>"
        )
    head = (
        "<tr><th></th><th style='text-align:left'>check</th><th style='text-align:left'>detail</th>"
        "<th style='text-align:left'>fix</th></tr>"
    )
    return f"<table class='glm-doctor'><thead>{head}</thead><tbody>{''.join(rows)}</tbody></table>"


def main(argv: list[str] | None = None) -> int:
    """Print the checks and fixes; return 1 if a blocking problem exists, else 0."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m glmkit doctor", description="Check that this machine is ready for the glmkit course."
    )
    parser.add_argument("--json", action="store_true", help="print the checks as JSON")
    args = parser.parse_args(argv)
    checks = run_checks()
    if args.json:
        import json

        print(json.dumps([dict(dataclasses.asdict(c), status=c.status) for c in checks], indent=2))
    else:
        print(format_table(checks))
    return 1 if blocking_problems(checks) else 0


__all__ = ["Check", "run_checks", "blocking_problems", "format_table", "to_html", "main"] + [f.__name__ for f in CHECKS]
