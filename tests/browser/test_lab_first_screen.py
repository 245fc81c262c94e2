"""The first screen of `./course lab`: JupyterLab started the way the `course` script starts it (the course's lab
settings on JUPYTER_CONFIG_PATH, glmkit/course/lab/) opens lesson 00 with no "receive official Jupyter news?"
pop-up and with the file browser showing lessons/. The same server without the course's settings shows the
pop-up: the control that makes this a test that can fail.

Screenshot: GLMKIT_SCREENSHOTS/lab-first-screen.png (and lab-first-screen-without-course-settings.png)."""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
from browser_support import REPO, screenshots_dir

pytestmark = pytest.mark.browser

LAB_SETTINGS = REPO / "glmkit" / "course" / "lab"
FIRST = "lessons/00_setup_and_triton_primer.ipynb"
NEWS = "official Jupyter news"


def _course_script_line(name: str) -> str:
    return next(line for line in (REPO / "course").read_text().splitlines() if name in line)


def test_the_course_script_uses_the_lab_settings():
    assert "glmkit/course/lab" in _course_script_line("JUPYTER_CONFIG_PATH")
    assert f"default_url=/lab/tree/{FIRST}" in _course_script_line("default_url")


def _start(home: Path, with_course_settings: bool):
    """JupyterLab as `./course lab` runs it, in throwaway Jupyter dirs (no user settings at all)."""
    from conftest import free_port

    env = dict(os.environ)
    for k, sub in (
        ("JUPYTER_CONFIG_DIR", "config"),
        ("JUPYTER_DATA_DIR", "data"),
        ("JUPYTER_RUNTIME_DIR", "runtime"),
        ("JUPYTERLAB_SETTINGS_DIR", "settings"),
        ("JUPYTERLAB_WORKSPACES_DIR", "workspaces"),
    ):
        (home / sub).mkdir(parents=True, exist_ok=True)
        env[k] = str(home / sub)
    env.pop("JUPYTER_CONFIG_PATH", None)
    if with_course_settings:
        env["JUPYTER_CONFIG_PATH"] = str(LAB_SETTINGS)
    port, token = free_port(), secrets.token_hex(16)
    cmd = [
        sys.executable,
        "-m",
        "jupyterlab",
        "--no-browser",
        "--ip=127.0.0.1",
        f"--port={port}",
        f"--IdentityProvider.token={token}",
        f"--ServerApp.root_dir={REPO}",
        f"--LabApp.default_url=/lab/tree/{FIRST}",
        f"--FileCheckpoints.checkpoint_dir={home / 'checkpoints'}",
    ]
    if os.geteuid() == 0:
        cmd.append("--allow-root")
    proc = subprocess.Popen(
        cmd, env=env, stdout=open(home / "server.log", "wb"), stderr=subprocess.STDOUT, start_new_session=True
    )
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        try:
            req = urllib.request.Request(f"http://127.0.0.1:{port}/api/status")
            req.add_header("Authorization", f"token {token}")
            if urllib.request.urlopen(req, timeout=2).status == 200:
                return proc, port, token
        except OSError:
            time.sleep(0.5)
    proc.kill()
    pytest.fail(f"JupyterLab did not start:\n{(home / 'server.log').read_text()[-2000:]}", pytrace=False)


@pytest.mark.timeout(240)
@pytest.mark.parametrize("with_course_settings", [True, False], ids=["course-settings", "control"])
def test_first_screen(chromium, with_course_settings):
    try:
        import jupyterlab  # noqa: F401
    except ImportError:
        pytest.skip("jupyterlab is not installed")
    home = Path(tempfile.mkdtemp(prefix="glmkit-first-screen-"))
    proc, port, token = _start(home, with_course_settings)
    context = chromium.new_context(viewport={"width": 1280, "height": 800})
    try:
        page = context.new_page()
        # the URL `./course lab` prints: the default URL, lesson 00, with the token
        page.goto(f"http://127.0.0.1:{port}/lab/tree/{FIRST}?token={token}", wait_until="domcontentloaded")
        try:
            page.wait_for_selector(".jp-NotebookPanel", timeout=120_000)
        except Exception:
            page.screenshot(path=str(screenshots_dir() / "lab-first-screen-failed.png"))
            raise
        page.wait_for_timeout(8000)  # the news question comes a few seconds after the page
        news = page.get_by_text(NEWS).count()
        crumbs = page.locator(".jp-BreadCrumbs").first.inner_text()
        listing = page.locator(".jp-DirListing-content").first.inner_text()
        name = "lab-first-screen" + ("" if with_course_settings else "-without-course-settings")
        page.screenshot(path=str(screenshots_dir() / f"{name}.png"))
        if with_course_settings:
            assert news == 0, "the news pop-up is shown despite the course's settings"
            assert "lessons" in crumbs and "00_setup_and_triton_primer" in listing, (crumbs, listing[:300])
        else:
            assert news >= 1, "without the course's settings the news pop-up should appear (the control)"
    finally:
        context.close()
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        shutil.rmtree(home, ignore_errors=True)
