#!/usr/bin/env bash
# Style kept by a tool: ruff's linter and formatter, configured in pyproject.toml ([tool.ruff]).
# CI runs it after the tests. `python3 -m ruff format . && python3 -m ruff check --fix .` applies
# both; ruff comes with the test extra (bash scripts/setup.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
"$PY" -m ruff check .
"$PY" -m ruff format --check .
