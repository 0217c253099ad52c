"""pytest settings of the benchmark folder (``pytest benchmarks/ --benchmark-only``).

The cases marked ``slow`` (each op's default-preset shape, compiling providers) take hours
in all on a small CPU: they are skipped unless the ``-m`` expression names them
(``-m slow``, or ``-m "slow and token_logprobs"``).
"""

import pytest


def pytest_collection_modifyitems(config, items):
    if "slow" in (config.getoption("markexpr") or ""):
        return
    skip = pytest.mark.skip(reason="slow: the default preset's shape or a compiling provider (run with -m slow)")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
