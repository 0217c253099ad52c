#!/usr/bin/env bash
# The README's main job: set up, then run the benchmark suite on the default device.
# Extra arguments go to `python -m benchmarks` (e.g. --quick, --full, --dtypes bf16).
set -euo pipefail
cd "$(dirname "$0")/.."
PREFOPT_EXTRAS="trl==1.16.0 matplotlib tqdm ${PREFOPT_EXTRAS:-}" bash scripts/setup.sh
# The peers Liger-Kernel and cut-cross-entropy (the "bench" extra): --no-deps, so that their
# torch / triton requirements never replace the torch installed above. A peer that does not
# install or import is skipped by the suite with a note.
"${PYTHON:-python3}" -m pip install --quiet --no-deps "liger-kernel==0.8.5" "cut-cross-entropy==25.1.1" \
  || echo "note: liger-kernel / cut-cross-entropy not installed; the suite skips them" >&2
exec "${PYTHON:-python3}" -m benchmarks "$@"
