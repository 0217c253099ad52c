#!/usr/bin/env bash
# The README's main job: set up, then run the benchmark suite on the default device.
# Extra arguments go to `python -m benchmarks` (e.g. --quick, --full, --dtypes bf16).
set -euo pipefail
cd "$(dirname "$0")/.."
PREFOPT_EXTRAS="trl==1.16.0 matplotlib ${PREFOPT_EXTRAS:-}" bash scripts/setup.sh
exec "${PYTHON:-python3}" -m benchmarks "$@"
