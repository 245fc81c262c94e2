#!/usr/bin/env bash
# Installs what the real-browser lesson test (tests/browser/) needs on a fresh Debian-like machine:
#   * Debian's Chromium (/usr/bin/chromium) and a font set, via apt-get (Playwright cannot download
#     its own browser here; it drives the system Chromium through executable_path);
#   * the Playwright Python package, into the course venv.
# Idempotent, and fast when everything is already there (no apt-get update, no pip call).
# Environment: GLMKIT_VENV (default .venv), PLAYWRIGHT_SPEC (default 'playwright>=1.45,<2').
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${GLMKIT_VENV:-.venv}
PLAYWRIGHT_SPEC=${PLAYWRIGHT_SPEC:-'playwright>=1.45,<2'}
say() { printf '\033[1m[browser-setup]\033[0m %s\n' "$*"; }
die() { printf '\033[1;31m[browser-setup] error:\033[0m %s\n' "$*" >&2; exit 1; }

[ -x "$VENV/bin/python" ] || die "no virtual environment at $VENV: run ./course setup first"

# --- Chromium and fonts (apt) --------------------------------------------------------------------
need_apt=()
[ -x /usr/bin/chromium ] || need_apt+=(chromium)
# Without a real font set, JupyterLab's text renders as boxes in the screenshots.
fc-list 2>/dev/null | grep -qi 'DejaVuSans' || need_apt+=(fonts-dejavu-core fontconfig)
if [ ${#need_apt[@]} -gt 0 ]; then
  command -v apt-get >/dev/null || die "no apt-get: install Chromium yourself (set GLMKIT_CHROMIUM=/path/to/chromium)"
  SUDO=""
  if [ "$(id -u)" != 0 ]; then
    command -v sudo >/dev/null || die "need root (or sudo) to apt-get install ${need_apt[*]}"
    SUDO=sudo
  fi
  say "apt-get install ${need_apt[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
fi
/usr/bin/chromium --version >/dev/null 2>&1 || die "/usr/bin/chromium is installed but does not run"

# --- Playwright (pip, into the venv; no browser download) ----------------------------------------
if ! "$VENV/bin/python" -c 'import playwright.sync_api' 2>/dev/null; then
  say "pip install $PLAYWRIGHT_SPEC into $VENV"
  "$VENV/bin/python" -m pip install --disable-pip-version-check -q "$PLAYWRIGHT_SPEC"
fi
say "ready: $(/usr/bin/chromium --version 2>/dev/null | head -1), playwright $("$VENV/bin/python" -c 'from importlib.metadata import version; print(version("playwright"))')"
