#!/usr/bin/env bash
# Set-up shared by the README's commands: torch (CPU build), prefopt_fast with its native CPU
# extension, the test / benchmark extras and the benchmark peers, into the current Python
# environment. Idempotent.
#
#   PREFOPT_DEPS=tested (default)  the versions in constraints.txt: what CI tested
#   PREFOPT_DEPS=latest            the newest versions pip resolves (upgrading what is installed),
#                                  torch excepted: it stays the pinned CPU build
#   PREFOPT_DEPS=oldest            the oldest supported torch / Triton / transformers
#                                  (constraints-oldest.txt; torch 2.11.0 from PyPI is a CUDA
#                                  build, ~4.6 GB with its nvidia-* libraries): use a fresh
#                                  virtual environment, e.g. `bash scripts/test_oldest.sh`
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
DEPS=${PREFOPT_DEPS:-tested}

# A plain `torch` requirement with no torch installed would pull the multi-GB CUDA build: the
# pinned CPU build goes first, in both modes (on this kind of machine pip finds it on local
# disk; elsewhere add PyTorch's CPU wheel index beside PyPI: PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu).
TORCH_PIN=$(grep -m1 -E "^torch==" constraints.txt)
TMP_CONSTRAINTS=$(mktemp)
trap 'rm -f "$TMP_CONSTRAINTS"' EXIT
case "$DEPS" in
  tested) CONSTRAINTS=constraints.txt; UPGRADE=() ;;
  latest) echo "$TORCH_PIN" > "$TMP_CONSTRAINTS"; CONSTRAINTS=$TMP_CONSTRAINTS
          UPGRADE=(--upgrade --upgrade-strategy eager) ;;
  oldest) CONSTRAINTS=constraints-oldest.txt; TORCH_PIN=$(grep -m1 -E "^torch==" "$CONSTRAINTS"); UPGRADE=() ;;
  *) echo "PREFOPT_DEPS=$DEPS: expected 'tested', 'latest' or 'oldest'" >&2; exit 2 ;;
esac
pip_install() { "$PY" -m pip install --quiet -c "$CONSTRAINTS" "$@"; }

pip_install "$TORCH_PIN" "setuptools>=68" wheel
# --no-build-isolation: build against the torch installed above instead of fetching another
# one into an isolated build environment. With a CUDA toolkit present the CUDA kernels are
# compiled too (sm_80 + sm_90 + PTX for editable builds; PREFOPT_CUDA=0 skips).
if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then export CUDA_HOME=/usr/local/cuda; fi
# A native extension that does not build fails the set-up here (a plain `pip install` goes on
# without it and says why in prefopt_fast.build_info()).
export PREFOPT_REQUIRE_EXTENSION=${PREFOPT_REQUIRE_EXTENSION:-1}
# The extras hold the test tools, TRL / PEFT / transformers and the benchmark peers
# (Liger-Kernel and cut-cross-entropy, which need torch and triton only: torch is the pinned
# one above, whatever the mode).
pip_install "${UPGRADE[@]}" --no-build-isolation -e ".[test,bench]"
"$PY" -m pip check >/dev/null || { "$PY" -m pip check >&2 || true; echo "note: pip check reports the conflicts above" >&2; }
"$PY" - <<'EOF'
import importlib.metadata as md
names = ["torch", "triton", "transformers", "trl", "peft", "kernels", "datasets", "liger-kernel", "cut-cross-entropy"]
print("prefopt_fast set-up:", ", ".join(f"{n} {md.version(n)}" for n in names))
EOF
