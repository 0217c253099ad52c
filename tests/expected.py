"""What the test environment is expected to hold, and what happens when something is missing.

`bash scripts/test.sh` installs (or builds) every component below, so there a missing one is
a broken install, not a reason to skip: with ``PREFOPT_STRICT=1`` (set by scripts/test.sh)
or ``CI`` set, a test that needs a missing component FAILS with the reason. Whoever runs a
deliberate subset relaxes it by name: ``PREFOPT_ALLOW_MISSING=trl,peft`` (or ``all``). Outside
strict mode (a bare ``pytest`` in a development environment) the same tests skip, with the
reason. Hardware is not a component: GPU-only tests skip on machines without a GPU.

    from expected import require, require_module
    trl = require_module("trl")              # the module, or fail / skip with the reason
    require("cpu-extension")                 # the native CPU backend built and importable
"""

import importlib
import importlib.util
import os
import shutil
import sys
from pathlib import Path
from typing import Callable, Optional

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import strict as _strict  # noqa: E402  (the strict-mode rule, shared with the benchmarks)


def _import_problem(module: str) -> Optional[str]:
    try:
        importlib.import_module(module)
    except Exception as exc:  # an ImportError, or a crash while importing: both are broken
        return f"`import {module}` failed: {type(exc).__name__}: {exc}"
    return None


def _cpu_extension() -> Optional[str]:
    from prefopt_fast.backends import cpu

    why = cpu.unavailable_reason()  # "" when available
    return None if not why else f"the native CPU extension prefopt_fast._C is unavailable: {why}"


def _triton() -> Optional[str]:
    problem = _import_problem("triton")
    if problem:
        return problem
    from prefopt_fast.backends import triton as tb

    why = tb.unavailable_reason()
    if why and os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        return f"the Triton backend is unavailable under TRITON_INTERPRET=1: {why}"
    return None


def _hf_kernels() -> Optional[str]:
    problem = _import_problem("kernels")
    if problem:
        return problem
    import kernels

    where = Path(kernels.__file__ or next(iter(kernels.__path__))).resolve()
    if ROOT in where.parents:
        return f"`import kernels` gives this repository's folder {where}, not Hugging Face's distribution"
    return None


def _cuobjdump() -> Optional[str]:
    # lists the CUDA extension's fatbinary (tests/test_cuda_build.py); PATH or the PyPI
    # package nvidia-cuda-cuobjdump, as tools/cuda_build_check.py looks for it
    if shutil.which("cuobjdump"):
        return None
    try:
        import nvidia

        if any(Path(b).glob("cu*/bin/cuobjdump") for b in nvidia.__path__):
            return None
    except ImportError:
        pass
    return "no cuobjdump on PATH nor from the nvidia-cuda-cuobjdump package"


# component -> a check returning None when present, else the reason it is not
COMPONENTS: dict[str, Callable[[], Optional[str]]] = {
    "cpu-extension": _cpu_extension,
    "triton": _triton,
    "trl": lambda: _import_problem("trl"),
    "peft": lambda: _import_problem("peft"),
    "transformers": lambda: _import_problem("transformers"),
    "datasets": lambda: _import_problem("datasets"),
    "kernels": _hf_kernels,  # Hugging Face's hub kernels, which transformers imports
    "liger-kernel": lambda: _import_problem("liger_kernel"),
    "cut-cross-entropy": lambda: _import_problem("cut_cross_entropy"),
    "pytest-benchmark": lambda: _import_problem("pytest_benchmark"),
    "cuobjdump": _cuobjdump,
    # verl 0.9 (--no-deps, scripts/setup.sh): the modules prefopt_fast.integrations.verl patches
    "verl": lambda: (
        _import_problem("verl.models.transformers.monkey_patch") or _import_problem("verl.trainer.ppo.core_algos")
    ),
    # located, not imported: importing deepspeed sets up its accelerator in this process; the
    # ZeRO-3 tests import it in their own processes, where a broken install fails them
    "deepspeed": lambda: None if importlib.util.find_spec("deepspeed") else "`deepspeed` is not installed",
}
# the module a component is imported as, for require_module
MODULES = {
    "trl": "trl",
    "peft": "peft",
    "transformers": "transformers",
    "datasets": "datasets",
    "kernels": "kernels",
    "liger-kernel": "liger_kernel",
    "cut-cross-entropy": "cut_cross_entropy",
    "pytest-benchmark": "pytest_benchmark",
    "triton": "triton",
    "verl": "verl",
}


def strict() -> bool:
    """True where every component is expected (scripts/test.sh, CI): benchmarks/strict.py."""
    return _strict.strict_mode()


def allowed_missing() -> set:
    return _strict.allowed_missing()


_cache: dict = {}


def problem(component: str) -> Optional[str]:
    """None if ``component`` is present and works here, else why not (cached per process)."""
    if component not in COMPONENTS:
        raise KeyError(f"unknown component {component!r}; known: {', '.join(COMPONENTS)}")
    if component not in _cache:
        _cache[component] = COMPONENTS[component]()
    return _cache[component]


def missing(component: str, reason: str):
    """Fail (strict) or skip (otherwise) the current test: ``component`` is absent."""
    if _strict.must_exist(component):
        pytest.fail(
            f"{component} is expected in this environment but {reason}. Install it (bash "
            f"scripts/test.sh does), or set PREFOPT_ALLOW_MISSING={component} to skip deliberately.",
            pytrace=False,
        )
    pytest.skip(f"{component}: {reason}", allow_module_level=True)  # also from a module-level require


def require(component: str) -> None:
    """Return if ``component`` is present, else fail (strict) or skip with the reason."""
    why = problem(component)
    if why is not None:
        missing(component, why)


def require_module(component: str, module: Optional[str] = None):
    """``require(component)``, then the imported ``module`` (default: the component's)."""
    require(component)
    return importlib.import_module(module or MODULES[component])
