#!/usr/bin/env bash
# Set-up shared by the README's commands: torch (CPU build) and prefopt_fast with its
# native CPU extension, into the current Python environment. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

# A plain `torch` requirement with no torch installed would pull the multi-GB CUDA build:
# pin the CPU build first (on this kind of machine pip finds it on local disk; elsewhere
# add PyTorch's CPU wheel index with --index-url).
if ! "$PY" -c "import torch, sys; v = tuple(int(x) for x in torch.__version__.split('+')[0].split('.')[:2]); sys.exit(v < (2, 13))" 2>/dev/null; then
  "$PY" -m pip install --quiet "torch==2.13.0"
fi
# Optional peers and test extras (small, pure Python or already wheels here).
"$PY" -m pip install --quiet "setuptools>=68" wheel pytest hypothesis numpy ${PREFOPT_EXTRAS:-}
# --no-build-isolation: build against the torch installed above instead of fetching
# another one into an isolated build environment. With a CUDA toolkit present the CUDA
# kernels are compiled too (sm_80 + sm_90 + PTX for editable builds; PREFOPT_CUDA=0 skips).
if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then export CUDA_HOME=/usr/local/cuda; fi
"$PY" -m pip install --quiet --no-build-isolation -e .
