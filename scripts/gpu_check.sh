#!/usr/bin/env bash
# Offline check on a machine with a GPU, torch / Triton / nvcc preinstalled and no network:
# builds prefopt_fast._C in this tree for the local GPU (python setup.py build_ext --inplace),
# runs the GPU tests, the Triton tests on the GPU, compute-sanitizer memcheck / racecheck and
# the benchmark suite, and writes logs, JSON results and summary.txt into OUTDIR.
#
#   bash scripts/gpu_check.sh OUTDIR [--arch 90] [--skip benchmark,...] [--budget 450]
#
# PYTHON=... picks the interpreter (default python3). Details: scripts/gpu_check.py, docs/cuda.md.
set -euo pipefail
exec "${PYTHON:-python3}" "$(dirname "$0")/gpu_check.py" "$@"
