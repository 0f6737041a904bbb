#!/usr/bin/env bash
# Lint and run the whole test suite in the environment made by scripts/setup.sh.
# Extra arguments go to pytest, for example: bash scripts/test.sh -k camera
set -euo pipefail

cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}

"$VENV/bin/ruff" check .
"$VENV/bin/python" -m pytest "$@"
