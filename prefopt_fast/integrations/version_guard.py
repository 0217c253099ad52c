"""Version guards for integrations that rely on a trainer's internals (TRL, and any other).

An integration states the versions it was tested with and the internals it touches. Outside
the tested range it still runs, with one warning naming the range; a missing internal is an
error naming it, raised before any training step instead of deep inside one.
"""

import importlib
import threading
import warnings
from typing import Iterable, Optional, Tuple

from packaging.version import Version


class UntestedVersionWarning(UserWarning):
    """The installed trainer version is outside the range an integration was tested with."""


_warned: set = set()
_lock = threading.Lock()


def in_range(installed: str, tested: Tuple[str, str]) -> bool:
    """Whether ``installed`` is in ``[tested[0], tested[1])`` (pre-releases of the upper bound excluded)."""
    v = Version(installed)
    return Version(tested[0]) <= v < Version(tested[1]) and not (
        v.is_prerelease and v.release >= Version(tested[1]).release
    )


def warn_if_untested(
    integration: str, package: str, installed: str, tested: Tuple[str, str], stacklevel: int = 3
) -> None:
    """Warn once per (package, version) when ``installed`` is outside ``tested``."""
    if in_range(installed, tested):
        return
    key = (package, installed)
    with _lock:
        if key in _warned:
            return
        _warned.add(key)
    warnings.warn(
        f"{integration} was tested with {package} >= {tested[0]}, < {tested[1]}; {package} {installed} "
        f"is installed. It relies on {package} internals that may have changed: check the results "
        f"against {package}'s own, or install a tested version (pip install '{package}>={tested[0]},"
        f"<{tested[1]}').",
        UntestedVersionWarning,
        stacklevel=stacklevel,
    )


def resolve(dotted: str) -> Optional[object]:
    """The object at ``dotted`` ("pkg.module.attr.attr"), or None if any part is missing."""
    parts = dotted.split(".")
    obj, i = None, len(parts)
    while i > 0:  # the longest importable module prefix
        try:
            obj = importlib.import_module(".".join(parts[:i]))
            break
        except Exception:  # absent, or failing to import: either way not there to rely on
            i -= 1
    if obj is None:
        return None
    for name in parts[i:]:
        obj = getattr(obj, name, None)
        if obj is None:
            return None
    return obj


def missing_internals(names: Iterable[str]) -> list:
    """The dotted names among ``names`` that do not resolve."""
    return [n for n in names if resolve(n) is None]


def require_internals(
    integration: str, package: str, installed: str, tested: Tuple[str, str], names: Iterable[str], error=RuntimeError
) -> None:
    """Raise ``error`` naming every internal of ``names`` missing from the installed package."""
    missing = missing_internals(names)
    if missing:
        raise error(
            f"{integration} needs {', '.join(missing)}, which {package} {installed} does not have "
            f"(tested with {package} >= {tested[0]}, < {tested[1]}): install a tested version "
            f"(pip install '{package}>={tested[0]},<{tested[1]}')."
        )


def require_attributes(
    integration: str, parent: str, obj, names: Iterable[str], package: str, installed: str, tested: Tuple[str, str]
) -> None:
    """Raise RuntimeError naming the attributes of ``names`` that ``obj`` (an instance of a
    subclass of ``parent``, e.g. a trainer) lacks."""
    missing = [n for n in names if not hasattr(obj, n)]
    if missing:
        raise RuntimeError(
            f"{integration}: {parent} of {package} {installed} sets no {', '.join(missing)} "
            f"(tested with {package} >= {tested[0]}, < {tested[1]}): install a tested version "
            f"(pip install '{package}>={tested[0]},<{tested[1]}')."
        )
