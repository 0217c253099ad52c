#!/usr/bin/env bash
# The README's main job: set up (scripts/setup.sh: the tested versions of constraints.txt, or
# the newest with PREFOPT_DEPS=latest), then run the benchmark suite on the default device.
# Extra arguments go to `python -m benchmarks` (e.g. --quick, --full, --dtypes bf16).
# Strict: a peer the set-up installed (TRL, Liger-Kernel, cut-cross-entropy) that fails to
# import fails the run, naming it; peers that cannot run on this device (CUDA-only kernels)
# are skipped with a note. PREFOPT_ALLOW_MISSING=name[,...] relaxes it.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PREFOPT_STRICT=1
exec "${PYTHON:-python3}" -m benchmarks "$@"
