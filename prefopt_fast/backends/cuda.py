"""The ``cuda`` backend: the row kernels in CUDA C++ (``csrc/cuda/``, inside ``prefopt_fast._C``).

The same torch.library ops as the cpu backend, with CUDA implementations:

    prefopt_fast::row_forward(logits, labels, inv_temp, ignore_index, stats, ref_logits=None) -> Tensor
    prefopt_fast::row_backward(logits, labels, inv_temp, lse, lse_lo, entropy, grad_logp, grad_entropy,
                               ignore_index, grad_kl=None, ref_logits=None, ref_lse=None, kl=None) -> Tensor
    prefopt_fast::row_backward_(...same...) -> ()      (writes the gradient over logits)

(their fake implementations are registered by ``backends/cpu.py``). They run on the
current stream of the logits' device, fp32 / bf16 / fp16 logits with any strides in
the leading dimensions. Semantics: ``prefopt_fast._rows``.

Availability needs an extension built with the CUDA kernels (a CUDA toolkit at build
time), a CUDA device, and kernels that load on it: the driver must support the CUDA
version the extension was built with and the wheel must carry code for the GPU's
architecture (``prefopt_fast.build_info()``). Where that fails while a GPU is present,
auto selection falls back to Triton and says why, once, with a warning. The first
availability check on a GPU machine initializes CUDA (it loads the kernels and makes one
tiny launch); its result is cached per device.
"""

import ctypes
import functools
import math
import warnings
from typing import Optional, Tuple

import torch

from .. import _build_info
from . import cpu as _cpu  # imports the extension, registers the fake implementations

NAME = "cuda"
# the exact-KL extension (ref_logits with STAT_KL forward; grad_kl, ref_logits, ref_lse, kl backward)
SUPPORTS_KL = True

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_warned = False


def _build_hint() -> str:
    return (
        "build it with a CUDA toolkit: `CUDA_HOME=/usr/local/cuda pip install --no-build-isolation .` "
        "(see docs/cuda.md)"
    )


@functools.lru_cache(maxsize=None)
def _extension_reason() -> str:
    """Why the extension cannot serve CUDA tensors at all ("" if it has CUDA kernels)."""
    lib, err = _build_info.extension_library()
    if lib is None:
        return f"the native extension prefopt_fast._C could not be imported ({err}); {_build_hint()}"
    if _build_info.cuda_symbol("prefopt_fast_cuda_probe") is None:
        return (
            "the native extension was built without CUDA kernels (no CUDA toolkit at build time, "
            f"or PREFOPT_CUDA=0); {_build_hint()}"
        )
    return ""


def _driver_note() -> str:
    info = _build_info.build_info()
    drv = info["cuda_driver"]
    return f" (extension built with CUDA {info['cuda']} for {', '.join(info['cuda_archs'])}; " + (
        f"the driver supports CUDA {drv})" if drv else "no NVIDIA driver installed)"
    )


@functools.lru_cache(maxsize=None)
def _device_reason(index: int) -> str:
    """Why the kernels cannot run on cuda:<index> ("" if they can): module load, then one launch."""
    probe = _build_info.cuda_symbol("prefopt_fast_cuda_probe")
    probe.restype = ctypes.c_int
    probe.argtypes = (ctypes.c_int, ctypes.POINTER(ctypes.c_int), ctypes.c_char_p, ctypes.c_int)
    arch = ctypes.c_int(0)
    msg = ctypes.create_string_buffer(256)
    if probe(index, ctypes.byref(arch), msg, len(msg)) != 0:
        return f"the CUDA kernels cannot load on cuda:{index}: {msg.value.decode()}{_driver_note()}"
    try:  # one real launch through the op, on the current stream
        dev = torch.device("cuda", index)
        with torch.cuda.device(dev):
            x = torch.zeros(1, 8, device=dev)
            out = torch.ops.prefopt_fast.row_forward(
                x, torch.zeros(1, dtype=torch.int64, device=dev), torch.ones(1, device=dev), -100, 0, None
            )
            logp = float(out[0, 0])  # synchronizes
    except Exception as exc:  # launch failure of any kind: report it, do not raise
        return f"a test launch on cuda:{index} failed: {type(exc).__name__}: {exc}{_driver_note()}"
    if not math.isclose(logp, -math.log(8.0), rel_tol=1e-5):
        return f"a test launch on cuda:{index} computed {logp} instead of -log(8)"
    return ""


def _current_device() -> Optional[int]:
    try:
        return torch.cuda.current_device() if torch.cuda.is_available() else None
    except Exception:
        return None


def _status(index: Optional[int] = None) -> Tuple[str, bool]:
    """(reason the backend cannot run, "" if it can; whether a CUDA device is present)."""
    reason = _extension_reason()
    gpu = _current_device() is not None
    if reason:
        return reason, gpu
    if not gpu:
        built = torch.version.cuda
        return (
            "no CUDA device (torch "
            + torch.__version__
            + (" is a CPU-only build)" if built is None else f", built with CUDA {built}, sees none)")
        ), False
    return _device_reason(_current_device() if index is None else index), True


def _warn_fallback(reason: str) -> None:
    global _warned
    if _warned:
        return
    _warned = True
    warnings.warn(
        f"prefopt_fast: the cuda backend cannot run here: {reason}. Auto selection uses the "
        "triton backend (or torch) for CUDA tensors instead; PREFOPT_BACKEND=triton silences this.",
        RuntimeWarning,
        stacklevel=3,
    )


def unavailable_reason() -> str:
    """Why this backend cannot run here ("" if it can)."""
    try:
        return _status()[0]
    except Exception as exc:  # never raise from availability checks
        return f"availability check failed: {type(exc).__name__}: {exc}"


def is_available() -> bool:
    try:
        reason, gpu = _status()
    except Exception:
        return False
    if reason and gpu:  # a GPU the compiled kernels cannot serve: the fallback matters
        _warn_fallback(reason)
    return reason == ""


def supports(logits: torch.Tensor) -> Optional[str]:
    """None if the cuda kernels can serve ``logits``, else the reason."""
    if logits.device.type != "cuda":
        return f"the cuda backend needs CUDA tensors, got logits on {logits.device}"
    if logits.dtype not in _DTYPES:
        return f"the cuda backend takes float32, bfloat16 or float16 logits, got {logits.dtype}"
    index = logits.device.index if logits.device.index is not None else _current_device()
    reason = _status(index)[0]
    return reason or None


# The same torch.library ops serve both devices (the dispatcher picks the CUDA kernels for
# CUDA tensors), so the cpu backend's wrappers are the cuda backend's too.
row_forward = _cpu.row_forward
row_backward = _cpu.row_backward
