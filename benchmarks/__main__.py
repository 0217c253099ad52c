"""``python -m benchmarks``: the benchmark suite's command line (``--help`` for options)."""

import sys

from .cli import main

sys.exit(main())
