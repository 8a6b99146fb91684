#!/usr/bin/env bash
# The whole test suite. Extra arguments go to pytest (e.g. -m "not slow" locally).
set -uo pipefail
cd "$(dirname "$0")/.."
./scripts/bootstrap.sh || exit 1
echo "[lint] ruff check + ruff format --check"
.venv/bin/ruff check umair pipelines tests bench || exit 1
.venv/bin/ruff format --check umair pipelines tests bench || exit 1
.venv/bin/python -m pytest "$@"
rc=$?
if [ "$rc" -eq 5 ]; then
  echo "ERROR: pytest collected no tests; refusing to pass an empty run." >&2
fi
exit "$rc"
