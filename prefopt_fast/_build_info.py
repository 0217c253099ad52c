"""What the installed native extension carries: ``prefopt_fast.build_info()``.

Read from the extension itself (C symbols of ``prefopt_fast._C`` through ctypes), so it
describes the binary that is actually loaded, not what a build script meant to produce.
"""

import ctypes
import functools
import json
import os
from typing import Any, Dict, Optional

import torch

from ._version import __version__


def import_error_text(exc: ImportError) -> str:
    """The reason prefopt_fast._C is missing: the import error, plus the reason setup.py left
    in ``_C.skipped`` where it installed without the extension (a torch older than the
    stable ABI the binding needs, a failed compile)."""
    text = f"{type(exc).__name__}: {exc}"
    try:
        with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "_C.skipped")) as f:
            skipped = f.read().strip()
    except OSError:
        skipped = ""
    return f"{text}; at install time: {skipped}" if skipped else text


@functools.lru_cache(maxsize=None)
def extension_library() -> "tuple[Optional[ctypes.CDLL], Optional[str]]":
    """(the loaded prefopt_fast._C as a ctypes library, or None; the import error)."""
    try:
        from . import _C  # noqa: F401  (registers the ops)
    except ImportError as exc:
        return None, import_error_text(exc)
    try:
        # dlopen of an already loaded path returns the same handle: no second copy
        return ctypes.CDLL(_C.__file__), None
    except OSError as exc:  # pragma: no cover - the module was just imported
        return None, f"OSError: {exc}"


def cuda_symbol(name: str):
    """A C function of the extension's CUDA part, or None (no extension / CPU-only build)."""
    lib, _ = extension_library()
    if lib is None:
        return None
    try:
        return getattr(lib, name)
    except AttributeError:
        return None


def _version(v: int) -> Optional[str]:
    return f"{v // 1000}.{v % 1000 // 10}" if v > 0 else None


def _cuda_part() -> Optional[Dict[str, Any]]:
    fn = cuda_symbol("prefopt_fast_cuda_build_info")
    if fn is None:
        return None
    fn.restype = ctypes.c_char_p
    return json.loads(fn().decode())


def build_info() -> Dict[str, Any]:
    """What this installation of prefopt_fast carries, e.g.::

        {'version': '0.1.0', 'distribution_version': '0.1.0+cu130', 'extension': True,
         'extension_error': None, 'cuda': '13.0',
         'cuda_archs': ['sm_80', 'sm_90', 'compute_90'], 'cuda_runtime': '13.0',
         'cuda_driver': None, 'torch': '2.13.0+cpu', 'torch_cuda': None}

    ``cuda`` is the CUDA version the extension's kernels were compiled with (None: a
    CPU-only build), ``cuda_archs`` the SASS (sm_XX) and PTX (compute_XX) targets in
    its fatbinary, ``cuda_driver`` the CUDA version the installed driver supports (None
    without a driver). The kernels run where the driver's version is at least the
    extension's CUDA major.minor (or a compatible minor of the same major) and the GPU's
    architecture has SASS here, or is newer than a PTX target.
    """
    try:
        from importlib.metadata import PackageNotFoundError, version

        dist_version: Optional[str] = version("prefopt_fast")
    except PackageNotFoundError:  # a source checkout on sys.path
        dist_version = None
    lib, err = extension_library()
    cuda = _cuda_part() if lib is not None else None
    archs = cuda["archs"] if cuda else ""
    return {
        "version": __version__,
        "distribution_version": dist_version,
        "extension": lib is not None,
        "extension_error": err,
        "cuda": _version(cuda["cuda_built"]) if cuda else None,
        "cuda_archs": [a for a in archs.split(",") if a] if cuda else [],
        "cuda_runtime": _version(cuda["cuda_runtime"]) if cuda else None,
        "cuda_driver": _version(cuda["cuda_driver"]) if cuda else None,
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
    }
