"""`python -m glmkit doctor`: every check returns a Check; each problem carries a concrete fix; the exit
status is nonzero exactly when a blocking problem exists."""

from __future__ import annotations

import subprocess
import sys

import pytest

from glmkit.__main__ import main as cli_main
from glmkit.course import doctor
from glmkit.course.doctor import Check


def test_run_checks_returns_named_checks():
    checks = doctor.run_checks()
    names = {c.name for c in checks}
    assert {
        "python",
        "torch",
        "numpy",
        "triton",
        "device",
        "bf16",
        "kernel mode",
        "kernel runs",
        "jupyterlab",
        "widgets",
    } <= names
    for c in checks:
        assert isinstance(c, Check) and isinstance(c.ok, bool) and c.detail
        if not c.ok:
            assert c.fix, f"{c.name} failed without a fix"


def test_the_primer_kernel_actually_runs_here():
    c = doctor.check_kernel_runs()
    assert c.ok, c.detail
    assert "rel. error" in c.detail


def test_numpy_24_under_the_interpreter_is_blocking_with_pip_fix():
    c = doctor.check_numpy("2.4.0", interpreter=True)
    assert not c.ok and c.blocking
    assert "pip install" in c.fix and "numpy" in c.fix and "<2.4" in c.fix
    assert doctor.check_numpy("2.4.1", interpreter=False).blocking is False
    assert doctor.check_numpy("2.3.5", interpreter=True).ok


def test_torch_out_of_range_and_missing():
    assert doctor.check_torch("2.13.0+cpu").ok
    assert doctor.check_torch("2.11.0+cu128").ok
    for v in ("2.5.1", "2.14.0", None):
        c = doctor.check_torch(v)
        assert not c.ok and "pip install" in c.fix and "torch" in c.fix


@pytest.mark.parametrize(
    "ipyw, labw, ext, ok",
    [
        ("8.1.5", "3.0.13", "/x", True),
        ("8.1.5", "1.1.0", "/x", False),  # lab side too old for ipywidgets 8
        ("7.8.1", "1.1.7", "/x", False),  # the course needs ipywidgets 8
        (None, "3.0.13", "/x", False),
        ("8.1.5", None, "/x", False),
        ("8.1.5", "3.0.13", None, False),  # lab extension missing from every Jupyter path
    ],
)
def test_widgets_compatibility(ipyw, labw, ext, ok):
    c = doctor.check_widgets(ipyw, labw, ext)
    assert c.ok is ok
    if not ok:
        assert "pip install" in c.fix and "jupyterlab_widgets" in c.fix


def test_missing_pieces_have_fixes():
    assert "jupyterlab" in doctor.check_jupyterlab(None).fix
    assert not doctor.check_python((3, 9, 18)).ok
    c = doctor.check_triton(None)
    assert not c.ok and ("triton" in c.fix or "Linux" in c.fix)


def test_exit_status_follows_blocking_problems(monkeypatch, capsys):
    good = [Check("a", True, "fine"), Check("b", False, "meh", "do x", blocking=False)]
    monkeypatch.setattr(doctor, "run_checks", lambda: good)
    assert doctor.main([]) == 0
    out = capsys.readouterr().out
    assert "warn" in out and "fix (b): do x" in out
    monkeypatch.setattr(doctor, "run_checks", lambda: good + [Check("c", False, "broken", "pip install c")])
    assert cli_main(["doctor"]) == 1
    out = capsys.readouterr().out
    assert "FAIL" in out and "fix (c): pip install c" in out and "blocking" in out


def test_a_crashing_check_is_reported_not_raised(monkeypatch):
    def boom():
        raise RuntimeError("kaput")

    monkeypatch.setattr(doctor, "CHECKS", (boom,))
    (c,) = doctor.run_checks()
    assert not c.ok and "kaput" in c.detail and c.fix


def test_html_table_and_json(capsys, monkeypatch):
    checks = [Check("x", False, "a <b>", "pip install 'y<2'")]
    h = doctor.to_html(checks)
    assert "&lt;b&gt;" in h and "FAIL" in h and "pip install" in h
    monkeypatch.setattr(doctor, "run_checks", lambda: checks)
    assert doctor.main(["--json"]) == 1
    assert '"status": "FAIL"' in capsys.readouterr().out


def test_cli_runs_as_a_module():
    r = subprocess.run([sys.executable, "-m", "glmkit", "doctor"], capture_output=True, text=True, timeout=120)
    assert "kernel runs" in r.stdout and "widgets" in r.stdout
    assert r.returncode in (0, 1)
    assert (r.returncode == 0) == ("ready for the course" in r.stdout)


def test_cli_help_and_unknown_command(capsys):
    assert cli_main([]) == 2
    assert "doctor" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        cli_main(["frobnicate"])
