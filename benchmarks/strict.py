"""Strict mode, the one rule shared by the tests (tests/expected.py) and the benchmarks (cli.py).

Where the environment is the full one (``bash scripts/test.sh`` / ``scripts/bench.sh`` set
``PREFOPT_STRICT=1``; CI sets ``CI``), a missing or broken component is a failure, not a
skip. ``PREFOPT_ALLOW_MISSING=a,b`` names the components whose absence is deliberate
(``all``: every one), which turns them back into skips. Names are distribution-style
(``liger-kernel``; ``liger_kernel`` is read the same).

Standard library only: the tests import it before anything else, and it must not import
``tests/`` (nor the benchmarks the tests).
"""

import os


def strict_mode() -> bool:
    """True where every component is expected: ``PREFOPT_STRICT`` set (not 0) or ``CI`` set
    (not 0 / false)."""
    return os.environ.get("PREFOPT_STRICT", "0") not in ("", "0") or os.environ.get("CI", "") not in ("", "0", "false")


def allowed_missing() -> set:
    """The names in ``PREFOPT_ALLOW_MISSING`` (comma-separated, ``_`` read as ``-``)."""
    return {a.strip().replace("_", "-") for a in os.environ.get("PREFOPT_ALLOW_MISSING", "").split(",") if a.strip()}


def may_be_missing(name: str) -> bool:
    """True if ``name`` is allowed to be missing (named in ``PREFOPT_ALLOW_MISSING``, or ``all``)."""
    allowed = allowed_missing()
    return "all" in allowed or name.replace("_", "-") in allowed


def must_exist(name: str) -> bool:
    """True if a missing ``name`` is a failure here: strict mode and not allowed to be missing."""
    return strict_mode() and not may_be_missing(name)
