#!/usr/bin/env bash
# The main job end to end on the embedded sample world (local mode).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/bootstrap.sh
exec .venv/bin/umair demo --config pipelines/configs/demo.yaml "$@"
