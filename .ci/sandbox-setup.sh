#!/usr/bin/env bash
# The grader's sandbox needs bubblewrap (bwrap) and user namespaces (docs/instructor-guide.md §6). Idempotent:
# installs Debian/Ubuntu's `bubblewrap` package when it is missing and this runs as root with apt-get, then
# checks that a sandbox starts. Without root or apt it prints what to do and exits 0, because learners do not
# need the sandbox (their self-check runs without it); with --require (CI) any problem is an error.
set -euo pipefail
require=0; [ "${1:-}" = "--require" ] && require=1
say() { printf '\033[1m[sandbox]\033[0m %s\n' "$*"; }
fail() { say "$*"; [ "$require" = 1 ] && exit 1; exit 0; }

if ! command -v bwrap >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    say "installing bubblewrap (the autograder's sandbox)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -q bubblewrap >/dev/null 2>&1 \
      || { apt-get update -q >/dev/null && apt-get install -y -q bubblewrap >/dev/null; } \
      || fail "could not install bubblewrap with apt-get"
  else
    fail "bubblewrap is not installed; to autograde, install it (Debian/Ubuntu: sudo apt-get install bubblewrap)"
  fi
fi
# a trivial sandbox with the namespaces the grader uses (user namespaces may be disabled by sysctl or AppArmor)
if ! out=$(bwrap --unshare-user --unshare-pid --unshare-net --unshare-ipc --unshare-uts --disable-userns \
                 --ro-bind /usr /usr --symlink usr/lib /lib --symlink usr/lib64 /lib64 --symlink usr/bin /bin \
                 --proc /proc --dev /dev -- /bin/true 2>&1); then
  fail "bubblewrap is installed but cannot create namespaces here: $out"
fi
say "bubblewrap $(bwrap --version | cut -d' ' -f2): sandbox OK"
