#!/usr/bin/env bash
# The test suite against the oldest supported versions (constraints-oldest.txt: torch 2.11.0,
# Triton 3.6.0, transformers 5.17.0), in a virtual environment of its own so that the
# environment you work in keeps its torch. Extra arguments go to pytest, e.g.
#
#   bash scripts/test_oldest.sh -m "not slow"
#
#   PREFOPT_OLDEST_VENV=dir   where the environment lives (default: build/venv-oldest; made
#                             if missing, reused after)
#
# Cost: PyPI's torch 2.11.0 is a CUDA build (it runs on a CPU, but imports its nvidia-*
# libraries): about 3.3 GB downloaded, 4.6 GB installed. The editable install rebuilds
# prefopt_fast._C in the source tree against torch 2.11's stable ABI; that build also loads
# into every later torch. Not part of CI (scripts/test.sh): run it before a release and
# after changing what the package needs from torch or Triton.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${PREFOPT_OLDEST_VENV:-build/venv-oldest}
# not --system-site-packages: the oldest versions must not mix with what the system has
[ -x "$VENV/bin/python" ] || "${PYTHON:-python3}" -m venv "$VENV"
PYTHON="$VENV/bin/python" PREFOPT_DEPS=oldest exec bash scripts/test.sh "$@"
