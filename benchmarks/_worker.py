"""One (provider, shape) job in a fresh process: ``python -m benchmarks._worker`` (JSON on stdin)."""

from .measure import worker_main

if __name__ == "__main__":
    worker_main()
