"""Backend selection: one backend module per call, by name, env var or device."""

import importlib
import os
from types import ModuleType
from typing import Dict, List, Optional

import torch

ENV_VAR = "PREFOPT_BACKEND"
BACKENDS: Dict[str, str] = {
    "torch": "prefopt_fast.backends.torch_backend",
    "cpu": "prefopt_fast.backends.cpu",
    "triton": "prefopt_fast.backends.triton",
    "cuda": "prefopt_fast.backends.cuda",
}
# auto selection, first that can serve the inputs wins
AUTO_ORDER = {"cuda": ("cuda", "triton", "torch"), "cpu": ("cpu", "torch")}

_loaded: Dict[str, Optional[ModuleType]] = {}
_load_errors: Dict[str, str] = {}


def load_backend(name: str) -> Optional[ModuleType]:
    """The backend module ``name`` (a key of ``BACKENDS``), imported once; None if it cannot be
    imported (the reason: ``why_unavailable``). No availability or device check."""
    if name not in _loaded:
        try:
            _loaded[name] = importlib.import_module(BACKENDS[name])
        except ImportError as exc:  # not built / dependency missing
            _loaded[name] = None
            _load_errors[name] = f"{type(exc).__name__}: {exc}"
    return _loaded[name]


def why_unavailable(name: str) -> Optional[str]:
    """None if backend ``name`` can run in this process, else the reason it cannot."""
    mod = load_backend(name)
    if mod is None:
        return f"it could not be imported ({_load_errors[name]})"
    if not mod.is_available():
        return mod.unavailable_reason()
    return None


def available_backends() -> List[str]:
    """Names of the backends usable in this process, e.g. ``['torch', 'cpu']``."""
    return [name for name in BACKENDS if why_unavailable(name) is None]


def resolve_backend(backend: str, logits: torch.Tensor, need_kl: bool = False) -> ModuleType:
    """The backend module serving ``logits`` for ``backend`` ("auto" or a name).

    ``need_kl``: the call uses the exact-KL extension of the row kernels.
    """
    return load_backend(_resolve_name(backend, str(logits.device), logits.dtype, need_kl))


def _cannot_serve(mod: ModuleType, logits: torch.Tensor, need_kl: bool) -> Optional[str]:
    if need_kl and not getattr(mod, "SUPPORTS_KL", False):
        return "it does not implement the exact-KL statistic yet"
    return mod.supports(logits)


# Evaluated once at trace time under torch.compile (imports can't be traced), so the
# choice of backend is a constant of the compiled graph.
@torch.compiler.assume_constant_result
def _resolve_name(backend: str, device: str, dtype: torch.dtype, need_kl: bool) -> str:
    logits = torch.empty(0, dtype=dtype, device=device)  # what supports() looks at: device and dtype
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a str, one of 'auto', {', '.join(map(repr, BACKENDS))}; got {backend!r}")
    source = "backend"
    if backend == "auto":
        env = os.environ.get(ENV_VAR, "").strip()
        if env and env != "auto":
            backend, source = env, f"the {ENV_VAR} environment variable"
    if backend == "auto":
        order = AUTO_ORDER.get(logits.device.type, ("torch",))
        for name in order:
            if why_unavailable(name) is None and _cannot_serve(load_backend(name), logits, need_kl) is None:
                return name
        raise RuntimeError(f"no backend can serve logits on {device} with dtype {dtype}")
    if backend not in BACKENDS:
        raise ValueError(f"{source} must be 'auto' or one of {', '.join(map(repr, BACKENDS))}; got {backend!r}")
    why = why_unavailable(backend)
    if why is not None:
        raise RuntimeError(f"backend {backend!r} (from {source}) is not available: {why}")
    mod = load_backend(backend)
    why = _cannot_serve(mod, logits, need_kl)
    if why is not None:
        raise ValueError(
            f"backend {backend!r} (from {source}) cannot serve logits on {device} with dtype {logits.dtype}: {why}"
        )
    return backend
