"""Fixtures for the real-browser lesson test: a throwaway JupyterLab server and headless Chromium.

The server is configured the way a local learner's should be: bound to 127.0.0.1 only, a fresh random
token required, no browser opened. Everything JupyterLab writes (config, runtime, data, user settings,
workspaces, IPython profile) goes to a temporary folder, so the user's own Jupyter setup is neither
read nor touched. The lessons' kernel is the interpreter running pytest (the course venv's python).

Missing pieces (Chromium, Playwright, JupyterLab) skip the test with the reason; set
GLMKIT_REQUIRE_BROWSER=1 (CI does) to turn those skips into failures.

Environment:
  GLMKIT_CHROMIUM      Chromium/Chrome binary (default: /usr/bin/chromium, else `chromium` on PATH)
  GLMKIT_LESSONS_DIR   where the lessons are (default: <repo>/lessons)
  GLMKIT_SCREENSHOTS   where screenshots and report.json go (default: <repo>/build/screenshots)
  GLMKIT_REQUIRE_BROWSER=1   fail instead of skip when the browser stack is missing
  GLMKIT_BROWSER_FULL=1      run the lessons in full (no GLMKIT_FAST), as the committed screenshots are
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from browser_support import REPO, discover_lessons, lessons_dir

SETUP_HINT = "run .ci/browser-setup.sh (apt chromium + pip playwright into the venv)"


def pytest_configure(config):
    # Also belongs in pyproject.toml's markers; registering here keeps --strict-markers happy meanwhile.
    config.addinivalue_line("markers", "browser: drives JupyterLab in headless Chromium (needs .ci/browser-setup.sh)")


def _missing(reason: str):
    if os.environ.get("GLMKIT_REQUIRE_BROWSER") == "1":
        pytest.fail(f"GLMKIT_REQUIRE_BROWSER=1 but {reason}", pytrace=False)
    pytest.skip(reason)


def find_chromium() -> str | None:
    env = os.environ.get("GLMKIT_CHROMIUM")
    if env:
        return env if os.access(env, os.X_OK) else None
    for cand in ("/usr/bin/chromium", "chromium", "chromium-browser"):
        path = shutil.which(cand)
        if path:
            return path
    return None


# --------------------------------------------------------------------------------------------------
# JupyterLab server
# --------------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _children(pid: int) -> list[int]:
    """All descendants of `pid` (from /proc), deepest last; kernels run in their own sessions."""
    by_parent: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        by_parent.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        kids = by_parent.get(todo.pop(), [])
        out += kids
        todo += kids
    return out


def _kill(pids, sig) -> None:
    for p in pids:
        try:
            os.kill(p, sig)
        except (ProcessLookupError, PermissionError):
            pass


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (exited, not yet reaped by its parent) counts as gone.
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@dataclass
class LabServer:
    root: Path
    port: int
    token: str
    proc: subprocess.Popen
    home: Path
    log_path: Path
    kernel_pids: set[int] = field(default_factory=set)

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def url(self, path: str, token: bool = True) -> str:
        sep = "&" if "?" in path else "?"
        return f"{self.base}{path}{sep}token={self.token}" if token else f"{self.base}{path}"

    def request(self, path: str, method: str = "GET", token: bool = True, timeout: float = 10):
        """(status, headers, body) without following redirects; the token goes in the header."""

        class NoRedirect(urllib.request.HTTPRedirectHandler):
            def redirect_request(self, *a, **k):
                return None

        req = urllib.request.Request(self.base + path, method=method)
        if token:
            req.add_header("Authorization", f"token {self.token}")
        opener = urllib.request.build_opener(NoRedirect)
        try:
            with opener.open(req, timeout=timeout) as r:
                return r.status, dict(r.headers), r.read()
        except urllib.error.HTTPError as e:
            return e.code, dict(e.headers), e.read()

    def log_tail(self, n: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no server log)"

    def remember_kernels(self) -> None:
        """Note the current kernel processes, so stray ones can be killed at the end."""
        self.kernel_pids.update(_children(self.proc.pid))

    def shutdown_sessions(self) -> None:
        status, _, body = self.request("/api/sessions")
        if status != 200:
            return
        for s in json.loads(body):
            self.request(f"/api/sessions/{s['id']}", method="DELETE", timeout=30)

    def stop(self) -> None:
        self.remember_kernels()
        if self.proc.poll() is None:
            try:
                self.request("/api/shutdown", method="POST", timeout=10)
            except OSError:
                pass
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.send_signal(signal.SIGTERM)
                try:
                    self.proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait(timeout=10)
        # Kernels are started in sessions of their own: kill any the server left behind, by pid.
        stray = [p for p in self.kernel_pids if _alive(p)]
        _kill(stray, signal.SIGTERM)
        deadline = time.monotonic() + 5
        while stray and time.monotonic() < deadline:
            time.sleep(0.1)
            stray = [p for p in stray if _alive(p)]
        _kill(stray, signal.SIGKILL)


def _write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2))


def _prepare_home(home: Path, lessons: list[Path]) -> dict[str, str]:
    """Throwaway Jupyter dirs, kernelspecs pointing at this interpreter, and test-friendly settings."""
    dirs = {
        "JUPYTER_CONFIG_DIR": home / "config",
        "JUPYTER_DATA_DIR": home / "data",
        "JUPYTER_RUNTIME_DIR": home / "runtime",
        "JUPYTERLAB_SETTINGS_DIR": home / "config" / "lab" / "user-settings",
        "JUPYTERLAB_WORKSPACES_DIR": home / "config" / "lab" / "workspaces",
        "IPYTHONDIR": home / "ipython",
        "MPLCONFIGDIR": home / "matplotlib",
    }
    for d in dirs.values():
        d.mkdir(parents=True, exist_ok=True)

    # Every kernel name the lessons ask for (and python3) runs this interpreter: no kernel picker dialog,
    # and the kernel is the course venv's python even if the user has other kernels installed.
    names = {"python3"}
    for nb in lessons:
        try:
            names.add(json.loads(nb.read_text())["metadata"]["kernelspec"]["name"])
        except (KeyError, ValueError, OSError):
            pass
    for name in names:
        _write_json(
            dirs["JUPYTER_DATA_DIR"] / "kernels" / name / "kernel.json",
            {
                "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
                "display_name": f"Python 3 ({Path(sys.prefix).name}, test kernel)",
                "language": "python",
                "metadata": {"debugger": False},
            },
        )

    settings = dirs["JUPYTERLAB_SETTINGS_DIR"] / "@jupyterlab"
    # Never write the lessons back to disk: the test runs them in place.
    _write_json(settings / "docmanager-extension" / "plugin.jupyterlab-settings", {"autosave": False})
    # Attach every cell to the DOM, so widgets below the fold render and can be checked and screenshot.
    _write_json(settings / "notebook-extension" / "tracker.jupyterlab-settings", {"windowingMode": "none"})
    # No "receive Jupyter news?" toast and no update check (the network is closed anyway).
    _write_json(
        settings / "apputils-extension" / "notification.jupyterlab-settings",
        {"fetchNews": "false", "checkForUpdates": False, "doNotDisturbMode": True},
    )
    env = {k: str(v) for k, v in dirs.items()}
    return env


@pytest.fixture(scope="session")
def lab_server():
    try:
        import jupyterlab  # noqa: F401
    except ImportError:
        _missing("jupyterlab is not installed in this interpreter (./course setup installs it)")

    lessons = discover_lessons()
    root = REPO if lessons_dir().is_relative_to(REPO) else lessons_dir().parent
    home = Path(tempfile.mkdtemp(prefix="glmkit-browser-"))
    env = dict(os.environ)
    env.update(_prepare_home(home, lessons))
    # Lessons take their CI-sized path, unless GLMKIT_BROWSER_FULL=1 asks for full runs (the screenshots in
    # docs/screenshots are of full runs: their stated results are then checked at full size).
    if os.environ.get("GLMKIT_BROWSER_FULL") == "1":
        env.pop("GLMKIT_FAST", None)
    else:
        env["GLMKIT_FAST"] = "1"
    env["PYTHONUNBUFFERED"] = "1"
    env["JUPYTER_PREFER_ENV_PATH"] = "0"  # our kernelspecs (this interpreter) before the venv's own
    env.pop("JUPYTER_PATH", None)
    env.pop("JUPYTER_TOKEN", None)

    port, token = free_port(), secrets.token_hex(24)
    cmd = [
        sys.executable,
        "-m",
        "jupyterlab",
        "--no-browser",
        "--ServerApp.ip=127.0.0.1",
        f"--ServerApp.port={port}",
        "--ServerApp.port_retries=0",
        f"--IdentityProvider.token={token}",
        "--ServerApp.allow_remote_access=False",
        f"--ServerApp.root_dir={root}",
        # JupyterLab checkpoints a notebook when it opens it: keep those out of the repo too.
        f"--FileCheckpoints.checkpoint_dir={home / 'checkpoints'}",
        # window.jupyterapp, so the test can reach the command registry and the notebook model.
        "--LabApp.expose_app_in_browser=True",
        "--LabApp.news_url=",
        "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
    ]
    if os.geteuid() == 0:  # CI containers run as root; JupyterLab refuses root without this
        cmd.append("--allow-root")
    log_path = home / "server.log"
    log = open(log_path, "wb")
    proc = subprocess.Popen(
        cmd,
        cwd=root,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
    )
    server = LabServer(root=root, port=port, token=token, proc=proc, home=home, log_path=log_path)
    try:
        deadline = time.monotonic() + 90
        while True:
            if proc.poll() is not None:
                pytest.fail(f"JupyterLab exited with {proc.returncode}:\n{server.log_tail()}", pytrace=False)
            try:
                if server.request("/api/status", timeout=2)[0] == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"JupyterLab did not answer within 90 s:\n{server.log_tail()}", pytrace=False)
            time.sleep(0.3)
        yield server
    finally:
        server.stop()
        log.close()
        if os.environ.get("GLMKIT_KEEP_LAB_HOME") == "1":
            print(f"\n[browser] JupyterLab dirs and server.log kept in {home}")
        else:
            shutil.rmtree(home, ignore_errors=True)


# --------------------------------------------------------------------------------------------------
# Headless Chromium through Playwright
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def chromium():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _missing(f"playwright is not installed ({SETUP_HINT})")
    exe = find_chromium()
    if exe is None:
        _missing(f"no Chromium found (set GLMKIT_CHROMIUM, or {SETUP_HINT})")
    pw = sync_playwright().start()
    try:
        # Flags seen to work on these machines: no sandbox as root, and no background networking
        # (the network is closed; Chromium would otherwise keep trying to reach Google's hosts).
        browser = pw.chromium.launch(
            executable_path=exe,
            headless=True,
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--disable-dev-shm-usage",
            ],
        )
        yield browser
        browser.close()
    finally:
        pw.stop()
