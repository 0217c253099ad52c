#!/usr/bin/env bash
# Build the prefopt_fast wheel for one CUDA version, e.g.
#   dist/prefopt_fast-0.1.0+cu130-cp310-abi3-linux_x86_64.whl
# (one wheel for every CPython >= 3.10 and every torch >= 2.13 build whose driver runs
# that CUDA version; see docs/cuda.md).
#
#   scripts/build_wheel.sh                # the toolkit of $CUDA_HOME (else nvcc on PATH, /usr/local/cuda)
#   scripts/build_wheel.sh --cuda 13.2    # CUDA 13.2's nvcc, headers and runtime from PyPI,
#                                         # installed into build/toolkits/cu13.2 (13.x only)
#   scripts/build_wheel.sh --cpu          # the CPU-only wheel (no local version)
#
# Environment: PREFOPT_CUDA_ARCHS (default "80;86;89;90;100;120+PTX"), PREFOPT_LOCAL_VERSION
# (default "cuXYZ"; "" for none, e.g. for a package index that refuses local versions),
# PYTHON, OUT_DIR (default dist). torch >= 2.13 (the CPU build is enough) and setuptools
# must be installed in $PYTHON's environment: the build is not isolated.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT_DIR=${OUT_DIR:-dist}
MODE=toolkit
CUDA_VER=

while [ $# -gt 0 ]; do
  case "$1" in
    --cuda) CUDA_VER=$2; MODE=pypi; shift 2 ;;
    --cpu) MODE=cpu; shift ;;
    -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
    *) echo "unknown argument: $1 (see --help)" >&2; exit 2 ;;
  esac
done

case "$MODE" in
  cpu)
    export PREFOPT_CUDA=0
    ;;
  pypi)
    case "$CUDA_VER" in
      13.*) ;;
      *) echo "--cuda $CUDA_VER: only CUDA 13.x toolkits install from PyPI with a working nvcc" >&2; exit 2 ;;
    esac
    TK="build/toolkits/cu$CUDA_VER"
    if [ ! -x "$TK/nvidia/cu13/bin/nvcc" ]; then
      "$PY" -m pip install --quiet --target "$TK" \
        "nvidia-cuda-nvcc==$CUDA_VER.*" "nvidia-cuda-crt==$CUDA_VER.*" "nvidia-nvvm==$CUDA_VER.*" \
        "nvidia-cuda-runtime==$CUDA_VER.*" "nvidia-cuda-cccl==$CUDA_VER.*"
    fi
    export CUDA_HOME="$PWD/$TK/nvidia/cu13"
    export PREFOPT_CUDA=1
    ;;
  toolkit)
    export PREFOPT_CUDA=1
    ;;
esac
export PREFOPT_CUDA_ARCHS=${PREFOPT_CUDA_ARCHS:-80;86;89;90;100;120+PTX}

mkdir -p "$OUT_DIR"
"$PY" -m pip wheel --no-build-isolation --no-deps --wheel-dir "$OUT_DIR" .
wheel=$(cd "$OUT_DIR" && ls -t prefopt_fast-*.whl | head -1)
echo
echo "built $OUT_DIR/$wheel"
"$PY" - "$OUT_DIR/$wheel" <<'EOF'
import sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z:
    for i in z.infolist():
        if not i.filename.endswith(".py"):
            print(f"  {i.file_size:>10}  {i.filename}")
    print(f"  ({sum(1 for i in z.infolist() if i.filename.endswith('.py'))} Python files)")
EOF
