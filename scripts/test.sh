#!/usr/bin/env bash
# The README's test command: set up, then run the whole test suite (pytest), including the
# Triton interpreter tests, the Triton ahead-of-time compile check and the slow tests.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -m "not slow"`.
set -euo pipefail
cd "$(dirname "$0")/.."
PREFOPT_EXTRAS="triton==3.9.0 trl==1.16.0 peft nvidia-cuda-cuobjdump ${PREFOPT_EXTRAS:-}" bash scripts/setup.sh
export TRITON_INTERPRET=1
exec "${PYTHON:-python3}" -m pytest tests -ra "$@"
