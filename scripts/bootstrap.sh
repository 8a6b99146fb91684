#!/usr/bin/env bash
# Creates .venv if missing and installs the project with its pinned dependencies.
# Re-installs only when pyproject.toml or requirements.lock changed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-$(command -v python3.11 || command -v python3)}"
if [ ! -x .venv/bin/python ]; then
  echo "[bootstrap] creating .venv with $PY"
  "$PY" -m venv .venv
fi
want="$(cat pyproject.toml requirements.lock | sha256sum | cut -c1-16)"
if [ "$(cat .venv/.install-stamp 2>/dev/null || true)" != "$want" ]; then
  echo "[bootstrap] installing umair and its pinned dependencies (first time: ~2-3 min)"
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -c requirements.lock -e ".[dev]"
  echo "$want" > .venv/.install-stamp
fi
