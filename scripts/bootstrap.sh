#!/usr/bin/env bash
# Creates .venv if missing and installs the project with its pinned dependencies.
# Re-installs only when pyproject.toml or requirements.lock changed. What apt and pip
# print goes to outputs/logs/setup-<time>.log (its path is printed; its end on a failure).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-$(command -v python3.11 || command -v python3)}"
mkdir -p outputs/logs
LOG="outputs/logs/setup-$(date -u +%Y%m%d-%H%M%S).log"

quietly() {  # run "$@" with its output in $LOG; on failure show the end of it
  if ! "$@" >>"$LOG" 2>&1; then
    echo "[bootstrap] ERROR: '$*' failed; the end of $LOG:" >&2
    tail -n 40 "$LOG" >&2
    return 1
  fi
}

if [ ! -x .venv/bin/python ]; then
  echo "[bootstrap] creating .venv with $PY"
  quietly "$PY" -m venv .venv
fi
# Debian's chromium: the headless browser tests/test_report.py opens the HTML report in
# (driven by Playwright on this executable; Playwright never downloads a browser here).
# Idempotent; root installs it with apt, anyone else is told how. UMAIR_NO_BROWSER=1 skips
# the install (for a demo-only machine); the browser test then fails, it does not skip.
if ! command -v chromium >/dev/null 2>&1 && [ "${UMAIR_NO_BROWSER:-0}" != "1" ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "[bootstrap] ERROR: chromium is missing; install it as root:" \
      "apt-get update && apt-get install -y --no-install-recommends chromium fonts-dejavu-core" >&2
    exit 1
  fi
  echo "[bootstrap] installing Debian's chromium (headless browser for tests/test_report.py); apt's output: $LOG"
  export DEBIAN_FRONTEND=noninteractive
  quietly apt-get -o DPkg::Lock::Timeout=300 update -q \
    || { echo "[bootstrap] ERROR: apt-get update failed (network or apt lock?)" >&2; exit 1; }
  quietly apt-get -o DPkg::Lock::Timeout=300 install -y -q --no-install-recommends chromium fonts-dejavu-core \
    || { echo "[bootstrap] ERROR: apt-get could not install chromium" >&2; exit 1; }
  command -v chromium >/dev/null 2>&1 || { echo "[bootstrap] ERROR: chromium still not on PATH" >&2; exit 1; }
fi
want="$(cat pyproject.toml requirements.lock | sha256sum | cut -c1-16)"
if [ "$(cat .venv/.install-stamp 2>/dev/null || true)" != "$want" ]; then
  echo "[bootstrap] installing umair and its pinned dependencies (first time: ~2-3 min); pip's output: $LOG"
  quietly .venv/bin/python -m pip install -q --upgrade pip
  quietly .venv/bin/python -m pip install -q -c requirements.lock -e ".[dev]"
  echo "$want" > .venv/.install-stamp
fi
