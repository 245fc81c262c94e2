"""Every lesson, run for real: JupyterLab in headless Chromium, as a learner would see it.

For each lessons/*.ipynb (found at collection time, so new lessons are covered): open it in JupyterLab,
clear it, run all cells (JupyterLab's own `notebook:run-all-cells` command, the one behind Run ▸ Run All
Cells), wait until the kernel is idle and every code cell has an execution count, then check that
  * no cell shows an error output, and the kernel sent no error message (widget callbacks included);
  * every widget output rendered (no "Loading widget..." / "Error displaying widget");
  * an explorer (`.glm-explorer`, required in lesson 01) reacts: typing new spans into its "spans"
    text box changes its mask picture;
  * every result the lesson states and checks in the run (`course.claim`) holds: a "[DOES NOT HOLD]" line
    in any output fails the test, so a screenshot never shows a run that contradicts its lesson's text;
and save a screenshot of the whole notebook to GLMKIT_SCREENSHOTS (default build/screenshots/).
The lessons run with GLMKIT_FAST=1 (claims that need a full run then say "[not checked in a fast run]"),
or in full with GLMKIT_BROWSER_FULL=1 (how docs/screenshots is made: every claim is then checked); they are
never saved (autosave is off; the test checks the files are byte-for-byte unchanged afterwards).

Run:  .ci/browser-setup.sh && .venv/bin/python -m pytest -m browser tests/browser -v
"""

from __future__ import annotations

import json
import os
import re
import socket
import time
from pathlib import Path

import pytest
from browser_support import discover_lessons, screenshots_dir

pytestmark = pytest.mark.browser

FULL = os.environ.get("GLMKIT_BROWSER_FULL") == "1"
LESSON_TIMEOUT_S = float(os.environ.get("GLMKIT_BROWSER_TIMEOUT", "900" if FULL else "420"))
FAILED_CLAIM = "[DOES NOT HOLD]"  # glmkit.course.claims.FAILS
HELD_CLAIM = "[holds]"
WIDGET_MIME = "application/vnd.jupyter.widget-view+json"
FAILED_CLAIM_JS, HELD_CLAIM_JS = "[DOES NOT HOLD]", "[holds]"  # glmkit.course.claims' verdicts
ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")

# --- JavaScript run in the page (window.jupyterapp exists because of LabApp.expose_app_in_browser) ---

JS_FIND_PANEL = """
window.__glmkitPanel = (path) => {
  const app = window.jupyterapp;
  if (!app) return null;
  return Array.from(app.shell.widgets('main')).find(w => w.context && w.context.path === path) || null;
};
"""

JS_READY = """(path) => {
  const panel = window.__glmkitPanel && window.__glmkitPanel(path);
  if (!panel || !panel.context.isReady) return false;
  const kernel = panel.sessionContext.session && panel.sessionContext.session.kernel;
  return !!kernel && kernel.status === 'idle' && panel.content.model.cells.length > 0;
}"""

JS_RUN_ALL = """async (path) => {
  const app = window.jupyterapp;
  const panel = window.__glmkitPanel(path);
  app.shell.activateById(panel.id);
  if (app.shell.collapseLeft) app.shell.collapseLeft();
  if (app.shell.collapseRight) app.shell.collapseRight();
  // Every error message the kernel sends, including those from widget callbacks (which JupyterLab
  // shows in its log console, not in a cell).
  window.__glmkitErrors = [];
  const hook = (kernel) => kernel && kernel.iopubMessage.connect((_, msg) => {
    if (msg.header.msg_type === 'error') {
      window.__glmkitErrors.push({ename: msg.content.ename, evalue: msg.content.evalue,
                                  traceback: (msg.content.traceback || []).join('\\n')});
    }
  });
  hook(panel.sessionContext.session.kernel);
  panel.sessionContext.kernelChanged.connect((_, change) => hook(change.newValue));
  // Start from a clean notebook (a lesson saved with outputs would otherwise look already run).
  await app.commands.execute('notebook:clear-all-cell-outputs');
  app.commands.execute('notebook:run-all-cells');   // not awaited: polled from Python
  return true;
}"""

JS_STATE = (
    """(path) => {
  const panel = window.__glmkitPanel(path);
  const kernel = panel.sessionContext.session && panel.sessionContext.session.kernel;
  const cells = panel.content.model.cells;
  const st = {kernel: kernel ? kernel.status : 'none', code: 0, executed: 0, running: 0,
              unexecuted: [], errors: [], widgetOutputs: 0, claimLines: [],
              iopubErrors: window.__glmkitErrors || []};
  for (let i = 0; i < cells.length; i++) {
    const c = cells.get(i);
    if (c.type !== 'code' || !c.sharedModel.getSource().trim()) continue;
    st.code++;
    if (c.executionCount !== null && c.executionCount !== undefined) st.executed++;
    else st.unexecuted.push(i);
    if (c.executionState === 'running') st.running++;
    for (let j = 0; j < c.outputs.length; j++) {
      const o = c.outputs.get(j);
      if (o.type === 'stream') {
        const text = [].concat(o.toJSON().text || []).join('');
        for (const line of text.split('\\n')) {
          if (line.includes('"""
    + FAILED_CLAIM_JS
    + """') || line.includes('"""
    + HELD_CLAIM_JS
    + """')) {
            st.claimLines.push({cell: i, line: line.trim()});
          }
        }
      }
      if (o.type === 'error') {
        const e = o.toJSON();
        st.errors.push({cell: i, ename: e.ename, evalue: e.evalue, traceback: (e.traceback || []).join('\\n')});
      }
      if (o.data && o.data['"""
    + WIDGET_MIME
    + """']) st.widgetOutputs++;
    }
  }
  return st;
}"""
)

JS_DOM = """(path) => {
  const node = window.__glmkitPanel(path).node;
  // Top-level outputs of the cells (not those nested inside an Output widget).
  const outs = Array.from(node.querySelectorAll(
      '.jp-Cell-outputArea > .jp-OutputArea-child > .jp-OutputArea-output'));
  const isWidget = o => o.classList.contains('jupyter-widgets') || o.querySelector('.jupyter-widgets');
  const text = node.innerText;
  return {
    renderedWidgetViews: outs.filter(
      o => isWidget(o) && !/^(Loading widget|Error displaying widget)/.test(o.textContent)).length,
    widgetNodes: node.querySelectorAll('.jupyter-widgets').length,
    explorers: node.querySelectorAll('.glm-explorer').length,
    loading: /Loading widget/.test(text),
    widgetErrors: text.match(/Error displaying widget[^\\n]*/g) || [],
    errorOutputs: node.querySelectorAll('[data-mime-type="application/vnd.jupyter.error"]').length,
  };
}"""

JS_FIT_VIEWPORT = """(path) => {
  // How much taller than the viewport the notebook's content is (to its last cell, not the
  // scroll-past-end padding).
  const panel = window.__glmkitPanel(path);
  const scroller = panel.content.node.querySelector('.jp-WindowedPanel-outer') || panel.content.node;
  scroller.scrollTop = 0;
  const cells = panel.content.node.querySelectorAll('.jp-Cell');
  const last = cells.length ? cells[cells.length - 1].getBoundingClientRect().bottom : 0;
  return Math.max(0, Math.ceil(last - scroller.getBoundingClientRect().bottom) + 40);
}"""

# Fingerprint of the pictures in an element: SHA-256 of each <img>'s bytes (blob:/data: URLs alike).
JS_IMAGES = """async (el) => {
  const out = [];
  for (const img of (el.tagName === 'IMG' ? [el] : el.querySelectorAll('img'))) {
    const buf = await (await fetch(img.src)).arrayBuffer();
    const digest = await crypto.subtle.digest('SHA-256', buf);
    out.push(Array.from(new Uint8Array(digest)).map(b => b.toString(16).padStart(2, '0')).join('')
             + ':' + buf.byteLength + ':' + img.naturalWidth + 'x' + img.naturalHeight);
  }
  return out;
}"""


def _check(ok, message: str) -> None:
    """Fail with just the message (the lesson's traceback, not this test's)."""
    if not ok:
        pytest.fail(message, pytrace=False)


def _fmt_errors(errors) -> str:
    return "\n\n".join(
        f"cell {e.get('cell', '?')}: {e['ename']}: {e['evalue']}\n{ANSI.sub('', e.get('traceback', ''))[-3000:]}"
        for e in errors
    )


# --------------------------------------------------------------------------------------------------
# The server is configured for a local learner
# --------------------------------------------------------------------------------------------------


def _listening(port: int) -> list[str]:
    """Local addresses listening on `port`, from /proc/net/tcp{,6} (hex, as the kernel writes them)."""
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            local, state = line.split()[1], line.split()[3]
            addr, p = local.split(":")
            if int(p, 16) == port and state == "0A":  # 0A = LISTEN
                found.append(addr)
    return found


def test_server_is_loopback_only_and_needs_token(lab_server):
    s = lab_server
    # With the token: the API answers.
    assert s.request("/api/contents")[0] == 200
    # Without the token, or with a wrong one: refused (API 403; pages redirect to the login form).
    status, _, _ = s.request("/api/contents", token=False)
    assert status == 403, f"API without token answered {status}"
    status, headers, _ = s.request("/lab", token=False)
    assert status in (302, 403), f"/lab without token answered {status}"
    if status == 302:
        assert "/login" in headers.get("Location", ""), headers
    status, _, _ = s.request(f"/api/contents?token={'0' * len(s.token)}", token=False)
    assert status == 403, f"API with a wrong token answered {status}"

    # Bound to 127.0.0.1 only: never 0.0.0.0 / :: (all interfaces).
    addrs = _listening(s.port)
    assert addrs, f"nothing listens on port {s.port}"
    loopback4, loopback6 = "0100007F", "00000000000000000000000001000000"
    assert all(a in (loopback4, loopback6) for a in addrs), f"port {s.port} listens on {addrs} (hex), not only loopback"
    # And from this machine's other addresses the port is closed.
    try:
        others = {ai[4][0] for ai in socket.getaddrinfo(socket.gethostname(), None, socket.AF_INET)}
    except OSError:
        others = set()
    for ip in others - {"127.0.0.1"}:
        if ip.startswith("127."):
            continue
        with socket.socket() as sock:
            sock.settimeout(2)
            assert sock.connect_ex((ip, s.port)) != 0, f"JupyterLab reachable on {ip}:{s.port}"


# --------------------------------------------------------------------------------------------------
# Each lesson, run in the browser
# --------------------------------------------------------------------------------------------------

LESSONS = discover_lessons()


def _wait(fn, timeout: float, what: str, interval: float = 0.5):
    deadline = time.monotonic() + timeout
    while True:
        value = fn()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def _fit_viewport(page, path: str) -> None:
    extra = page.evaluate(JS_FIT_VIEWPORT, path)
    if extra > 0:
        size = page.viewport_size
        page.set_viewport_size({"width": size["width"], "height": min(size["height"] + extra, 30_000)})
    page.wait_for_timeout(1000)


def _explorer_reacts(page, explorer, shots: Path, stem: str, path: str) -> dict:
    """Type new spans into the explorer's 'spans' box and check that its mask picture changes."""
    from playwright.sync_api import expect

    explorer.scroll_into_view_if_needed()
    text_boxes = explorer.locator(".widget-text").filter(
        has=page.locator(".widget-label", has_text=re.compile(r"span", re.I))
    )
    _check(text_boxes.count() >= 1, "the explorer has no text box described 'spans'")
    box = text_boxes.first.locator("input")
    if box.is_disabled():
        # Spans only apply in a "manual" mode: pick it in the explorer's mode dropdown, as a learner would.
        manual = None
        for select in explorer.locator("select").all():
            labels = [o.strip() for o in select.locator("option").all_inner_texts()]
            manual = next((label for label in labels if "manual" in label.lower()), None)
            if manual:
                select.select_option(label=manual)
                break
        _check(manual is not None, "the spans box is disabled and the explorer has no 'manual' mode to pick")
        _wait(box.is_enabled, 30, "the spans box to be enabled after choosing the manual mode")
    # The mask picture: the image marked .glm-mask-image, else every picture in the explorer.
    pictures = explorer.locator("img.glm-mask-image, .glm-mask-image img")
    if pictures.count() == 0:
        pictures = explorer.locator("img")
    _check(pictures.count() >= 1, "the explorer shows no picture (<img>)")
    _wait(lambda: pictures.first.evaluate("i => i.complete && i.naturalWidth > 0"), 30, "the mask picture to load")

    def fingerprint():
        return [h for p in pictures.all() for h in p.evaluate(JS_IMAGES)]

    before, old_value = fingerprint(), box.input_value()
    explorer.screenshot(path=str(shots / f"{stem}.explorer-before.png"))
    candidates = ["2:3, 4:6", "1:2", "3:5", "0:1"]
    new_value = next(c for c in candidates if c.replace(" ", "") != old_value.replace(" ", ""))
    box.fill(new_value)
    box.press("Enter")
    box.blur()

    def changed_or_failed():
        errors = page.evaluate(JS_STATE, path)["iopubErrors"]
        _check(not errors, f"the explorer raised after spans {new_value!r}:\n" + _fmt_errors(errors))
        return fingerprint() != before

    try:
        _wait(changed_or_failed, 60, f"the mask picture to change after spans {new_value!r}")
    finally:
        explorer.screenshot(path=str(shots / f"{stem}.explorer-after.png"))
    expect(box).to_have_value(new_value)
    _check(
        explorer.locator('[data-mime-type="application/vnd.jupyter.error"]').count() == 0,
        f"the explorer shows an error after spans {new_value!r}",
    )
    warning = re.search(r"⚠[^\n]*", explorer.inner_text())
    _check(warning is None, f"the explorer reports a problem after spans {new_value!r}: {warning and warning.group(0)}")
    return {"spans_before": old_value, "spans_after": new_value, "images_before": before, "images_after": fingerprint()}


@pytest.mark.timeout(LESSON_TIMEOUT_S + 180)
@pytest.mark.parametrize("lesson", LESSONS, ids=[p.stem for p in LESSONS])
def test_lesson_runs_in_jupyterlab(lesson: Path, chromium, lab_server):
    t0 = time.monotonic()
    rel = lesson.relative_to(lab_server.root).as_posix()
    stem = lesson.stem
    shots = screenshots_dir()
    original = lesson.read_bytes()
    report: dict = {"lesson": rel}
    console_errors: list[str] = []

    context = chromium.new_context(viewport={"width": 1280, "height": 900}, device_scale_factor=1)
    context.add_init_script(JS_FIND_PANEL)
    page = context.new_page()
    page.on("pageerror", lambda exc: console_errors.append(f"pageerror: {exc}"))
    page.on("console", lambda m: m.type == "error" and console_errors.append(f"console: {m.text}"))
    page.set_default_timeout(60_000)
    try:
        # ?reset: a fresh workspace, only this lesson open. The token authenticates the page (cookie).
        page.goto(lab_server.url(f"/lab/tree/{rel}?reset"), wait_until="domcontentloaded")
        page.wait_for_function("() => window.jupyterapp && window.jupyterapp.shell", timeout=120_000)
        page.wait_for_function(JS_READY, arg=rel, timeout=120_000, polling=500)
        lab_server.remember_kernels()
        t_open = time.monotonic()

        page.evaluate(JS_RUN_ALL, rel)
        idle_polls, last = 0, {}

        def finished():
            nonlocal idle_polls, last
            st = last = page.evaluate(JS_STATE, rel)
            _check(
                st["kernel"] not in ("dead", "autorestarting", "restarting"),
                f"{rel}: the kernel died ({st['kernel']}) after {st['executed']}/{st['code']} code cells"
                f"{' (out of memory?)' if st['kernel'] != 'dead' else ''}\n{lab_server.log_tail(20)}",
            )
            done = (
                st["kernel"] == "idle"
                and st["running"] == 0
                and (st["executed"] == st["code"] or st["errors"] or st["iopubErrors"])
            )
            idle_polls = idle_polls + 1 if done else 0
            return st if idle_polls >= 3 else None

        try:
            state = _wait(finished, LESSON_TIMEOUT_S, f"{rel} to finish running", interval=1.0)
        except AssertionError as e:
            pytest.fail(
                f"{e} (GLMKIT_BROWSER_TIMEOUT); kernel {last.get('kernel')}, "
                f"{last.get('executed')}/{last.get('code')} code cells done, "
                f"not run: cells {last.get('unexecuted')}",
                pytrace=False,
            )
        report["run_s"] = round(time.monotonic() - t_open, 1)
        _check(not state["errors"], f"{rel}: error output:\n" + _fmt_errors(state["errors"]))
        _check(not state["iopubErrors"], f"{rel}: the kernel reported errors:\n" + _fmt_errors(state["iopubErrors"]))
        failed = [c for c in state["claimLines"] if FAILED_CLAIM in c["line"]]
        report["claims"] = [c["line"] for c in state["claimLines"]]
        report["mode"] = "full" if FULL else "fast"
        _check(
            not failed,
            f"{rel}: stated results that do not hold in this run:\n"
            + "\n".join(f"cell {c['cell']}: {c['line']}" for c in failed),
        )
        _check(
            state["executed"] == state["code"],
            (
                f"{rel}: {state['code'] - state['executed']} code cells have no execution count "
                f"(cells {state['unexecuted']})"
            ),
        )

        # A viewport as tall as the notebook: every output on screen at once (element screenshots of
        # the explorer and the final full-page screenshot are then not clipped by Lab's scroller).
        _fit_viewport(page, rel)

        # Widgets: every widget output in the notebook model is rendered as a live widget view.
        def widgets_rendered():
            dom = page.evaluate(JS_DOM, rel)
            ok = not dom["loading"] and dom["renderedWidgetViews"] >= state["widgetOutputs"]
            return dom if ok or dom["widgetErrors"] else None

        try:
            dom = _wait(widgets_rendered, 60, f"{state['widgetOutputs']} widget outputs to render")
        except AssertionError as e:
            dom = page.evaluate(JS_DOM, rel)
            pytest.fail(f"{rel}: {e}; DOM: {dom}", pytrace=False)
        _check(not dom["widgetErrors"], f"{rel}: {dom['widgetErrors']}")
        _check(dom["errorOutputs"] == 0, f"{rel}: {dom['errorOutputs']} error outputs on the page")
        report.update(
            code_cells=state["code"],
            widget_outputs=state["widgetOutputs"],
            rendered_widget_views=dom["renderedWidgetViews"],
            widget_nodes=dom["widgetNodes"],
            explorers=dom["explorers"],
        )

        # Lesson 01's explorer (and any later lesson's) must react to its input.
        if stem.startswith("01_"):
            _check(dom["explorers"] >= 1, f"{rel}: no .glm-explorer widget found")
        explorers = page.locator(".glm-explorer")
        report["interaction"] = [
            _explorer_reacts(page, explorers.nth(i), shots, stem if i == 0 else f"{stem}.{i}", rel)
            for i in range(explorers.count())
        ]
    finally:
        try:
            # The whole notebook in one picture: a viewport as tall as the notebook, then a screenshot.
            _fit_viewport(page, rel)
            page.screenshot(path=str(shots / f"{stem}.png"), full_page=True)
        except Exception as e:  # noqa: BLE001 - the screenshot must never hide the real failure
            console_errors.append(f"screenshot failed: {e}")
        context.close()
        lab_server.remember_kernels()
        lab_server.shutdown_sessions()  # free the kernel (2 cores) before the next lesson
        report["total_s"] = round(time.monotonic() - t0, 1)
        report["browser_errors"] = console_errors[:50]
        (shots / f"{stem}.json").write_text(json.dumps(report, indent=2))
        print(f"\n[browser] {rel}: {json.dumps(report)}")
        if lesson.read_bytes() != original:  # never leave a lesson modified by the run
            lesson.write_bytes(original)
            pytest.fail(f"{rel} was modified on disk by the browser run (restored)")
