"""Test helper: on PYTHONPATH, makes the modules named in PREFOPT_TEST_BLOCK (comma-separated,
with their submodules) fail to import, as after an uninstall or a broken build. Used by
tests/test_environment.py to check that the test command then fails with the reason."""

import os
import sys

_BLOCKED = tuple(m.strip() for m in os.environ.get("PREFOPT_TEST_BLOCK", "").split(",") if m.strip())


class _Blocker:
    @staticmethod
    def find_spec(name, path=None, target=None):
        if any(name == b or name.startswith(b + ".") for b in _BLOCKED):
            raise ImportError(f"No module named {name!r} (blocked by tests/simulate_missing)", name=name)
        return None


if _BLOCKED:
    sys.meta_path.insert(0, _Blocker)
