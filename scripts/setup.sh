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
# DeepSpeed (the test extra, for tests/test_zero3.py) ships as a source distribution: build it
# pure-Python (its C++ / CUDA ops are compiled on first use, which the tests never ask for);
# --no-build-isolation below builds it against the pinned torch too.
export DS_BUILD_OPS=${DS_BUILD_OPS:-0}
# A native extension that does not build fails the set-up here (a plain `pip install` goes on
# without it and says why in prefopt_fast.build_info()).
export PREFOPT_REQUIRE_EXTENSION=${PREFOPT_REQUIRE_EXTENSION:-1}
# The extras hold the test tools, TRL / PEFT / transformers and the benchmark peers
# (Liger-Kernel and cut-cross-entropy, which need torch and triton only: torch is the pinned
# one above, whatever the mode).
pip_install "${UPGRADE[@]}" --no-build-isolation -e ".[test,bench]"
# verl (prefopt_fast.integrations.verl; tests/test_verl_integration.py) goes in --no-deps, with
# tensordict (in verl 0.9's own range): their requirements (torchdata, tensordict's torch, ...)
# could pull a second torch stack; and pyvers, tensordict's, whose packaging<26 pin is stricter
# than its code (it imports and runs with the packaging pinned here). Then the pure-Python packages that the verl modules the
# integration patches really import (ray brings its own: msgpack, protobuf, jsonschema, requests).
# verl's wheel also installs a top-level `tests` package: the tests import `expected`, never
# `tests.expected`.
pip_install "${UPGRADE[@]}" --no-deps "verl>=0.9,<0.10" "tensordict>=0.8,<=0.10,!=0.9.0" "pyvers>=0.1,<0.2"
pip_install "${UPGRADE[@]}" ray colorama omegaconf codetiming orjson cloudpickle
# pip check: the requirements skipped on purpose above (verl's and tensordict's, and pyvers'
# packaging pin) are not conflicts to report
if ! "$PY" -m pip check >/dev/null 2>&1; then
  CONFLICTS=$("$PY" -m pip check 2>&1 | grep -Ev '^(verl|tensordict|pyvers) ' || true)
  if [ -n "$CONFLICTS" ]; then echo "$CONFLICTS" >&2; echo "note: pip check reports the conflicts above" >&2; fi
fi
"$PY" - <<'EOF'
import importlib.metadata as md
names = ["torch", "triton", "transformers", "trl", "peft", "kernels", "datasets", "liger-kernel", "cut-cross-entropy",
         "deepspeed"]
names += ["verl", "tensordict", "ray"]
print("prefopt_fast set-up:", ", ".join(f"{n} {md.version(n)}" for n in names))
EOF
