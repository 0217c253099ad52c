#!/usr/bin/env bash
# The README's test command: set up, then run the whole test suite (pytest), including the
# Triton interpreter tests, the Triton ahead-of-time compile check and the slow tests.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -m "not slow"`.
#
#   PREFOPT_DEPS=latest bash scripts/test.sh     the same against the newest versions pip
#                                                resolves (constraints.txt ignored; torch stays pinned)
#   bash scripts/test_oldest.sh                  the same against the oldest supported versions
#                                                (PREFOPT_DEPS=oldest in a venv of its own)
#   PREFOPT_ALLOW_MISSING=trl,peft ...           skip, instead of fail, what needs these
#                                                (names: tests/expected.py; `all` for every one)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export TRITON_INTERPRET=1
# strict: a component the set-up installs (the native extension, Triton, TRL, PEFT, the
# benchmark peers, ...) that is missing or broken fails its tests with the reason
export PREFOPT_STRICT=1
exec "${PYTHON:-python3}" -m pytest tests -ra "$@"
