"""Triton backend: the row kernels of ``kernels/`` (installed as ``prefopt_fast.kernels``).

Runs on CUDA (and ROCm) tensors, or on CPU tensors under ``TRITON_INTERPRET=1`` (slow:
tests only). The launches are ``torch.library`` custom ops with fake implementations so
``torch.compile(fullgraph=True)`` traces through them:

    prefopt_fast::triton_row_forward(logits, labels, inv_temp, ignore_index, stats,
                                     ref_logits?) -> out
    prefopt_fast::triton_row_backward(logits, labels, inv_temp, lse, lse_lo, entropy, grad_logp,
                                      grad_entropy?, ignore_index, grad_kl?, ref_logits?,
                                      ref_lse?, kl?) -> grad
    prefopt_fast::triton_row_backward_inplace(...same...) -> ()   mutates logits

Triton and the kernels are imported on first use, so importing this module is cheap and
``TRITON_INTERPRET`` may be set any time before the first launch.
Semantics: ``prefopt_fast._rows``.
"""

import contextlib
import functools
import os
import sys
from typing import Optional

import torch

from prefopt_fast import _rows

NAME = "triton"

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _interpret() -> bool:
    # the values Triton itself reads as true
    return os.environ.get("TRITON_INTERPRET", "").strip().lower() in ("1", "true", "on", "yes")


@functools.lru_cache(maxsize=None)
def _triton_import_error() -> str:
    try:
        import triton  # noqa: F401
    except Exception as exc:  # a broken install must not break the package
        return f"triton is not importable ({type(exc).__name__}: {exc})"
    return ""


def unavailable_reason() -> str:
    """Why this backend cannot run here ("" if it can)."""
    err = _triton_import_error()
    if err:
        return err
    if _interpret() or torch.cuda.is_available():
        return ""
    return "no CUDA device (TRITON_INTERPRET=1 runs the Triton kernels on CPU tensors, slowly)"


def is_available() -> bool:
    try:
        return unavailable_reason() == ""
    except Exception:
        return False


def supports(logits: torch.Tensor) -> Optional[str]:
    """None if this backend can serve ``logits``, else the reason."""
    reason = unavailable_reason()
    if reason:
        return reason
    if logits.dtype not in _DTYPES:
        return f"logits dtype {logits.dtype} (expected float32, float16 or bfloat16)"
    if logits.device.type == "cuda":
        return None
    if logits.device.type == "cpu":
        if not _interpret():
            return "CPU tensors need TRITON_INTERPRET=1"
        k = sys.modules.get("prefopt_fast.kernels.row_forward")
        if k is not None and type(k.row_forward_kernel).__name__ != "InterpretedFunction":
            return "the Triton kernels were compiled for the GPU before TRITON_INTERPRET=1 was set"
        return None
    return f"device {logits.device} (expected a CUDA device)"


def kernel_modules():
    """(config, row_forward, row_backward) modules of prefopt_fast.kernels, imported on first use."""
    from prefopt_fast.kernels import config, row_backward, row_forward

    return config, row_forward, row_backward


def _device_guard(t: torch.Tensor):
    # Triton launches on the current device's current stream
    if t.device.type == "cuda":
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()


def _check_rows(logits, labels, inv_temp, *vectors):
    # O(1) checks that keep the kernels in bounds (values are the caller's business)
    if logits.dim() == 0 or logits.stride(-1) != 1 and logits.shape[-1] > 1:
        raise ValueError(
            f"logits: expected [..., V] with last stride 1, got shape {tuple(logits.shape)} strides {logits.stride()}"
        )
    if logits.dtype not in _DTYPES:
        raise ValueError(f"logits: expected float32/float16/bfloat16, got {logits.dtype}")
    n = _rows.num_rows(logits)
    for name, t, dtype in (("labels", labels, torch.int64), ("inv_temp", inv_temp, torch.float32)) + vectors:
        if t is None:
            raise ValueError(f"{name}: required here, got None")
        if t.dtype != dtype or t.numel() != n or not t.is_contiguous() or t.device != logits.device:
            raise ValueError(
                f"{name}: expected a contiguous {dtype} tensor of {n} elements on "
                f"{logits.device}, got {t.dtype} shape {tuple(t.shape)} on {t.device}"
            )


def _check_ref(logits, ref_logits):
    if ref_logits is None:
        raise ValueError("ref_logits: required for the KL statistic and its gradient, got None")
    if (
        ref_logits.shape != logits.shape
        or ref_logits.dtype != logits.dtype
        or ref_logits.device != logits.device
        or ref_logits.stride(-1) != 1
        and ref_logits.shape[-1] > 1
    ):
        raise ValueError(
            f"ref_logits: expected shape {tuple(logits.shape)}, dtype {logits.dtype}, "
            f"device {logits.device} and last stride 1, got {tuple(ref_logits.shape)}, "
            f"{ref_logits.dtype}, {ref_logits.device}, strides {ref_logits.stride()}"
        )


@torch.library.custom_op("prefopt_fast::triton_row_forward", mutates_args=())
def _forward_op(
    logits: torch.Tensor,
    labels: torch.Tensor,
    inv_temp: torch.Tensor,
    ignore_index: int,
    stats: int,
    ref_logits: Optional[torch.Tensor],
) -> torch.Tensor:
    _check_rows(logits, labels, inv_temp)
    config, fwd, _ = kernel_modules()
    flags = fwd.stats_variant(stats)
    kl = bool(flags & _rows.STAT_KL)
    if kl:
        _check_ref(logits, ref_logits)
    # O(N): rows of statistics not computed read 0, not stale memory (deterministic output)
    out = torch.zeros((_rows.N_OUT, labels.numel()), dtype=torch.float32, device=logits.device)
    cfg = config.forward_config(logits.dtype)
    align = config.row_alignment(logits)
    if kl:
        align = min(align, config.row_alignment(ref_logits))
    with _device_guard(logits):
        fwd.launch(
            logits,
            _rows.row_offsets(logits),
            labels,
            inv_temp,
            out,
            ignore_index,
            flags,
            block_v=cfg.block_v,
            num_warps=cfg.num_warps,
            align=align,
            ref_logits=ref_logits if kl else None,
            ref_row_off=_rows.row_offsets(ref_logits) if kl else None,
        )
    return out


@_forward_op.register_fake
def _(logits, labels, inv_temp, ignore_index, stats, ref_logits):
    return logits.new_empty((_rows.N_OUT, labels.numel()), dtype=torch.float32)


def _launch_backward(
    logits,
    grad,
    labels,
    inv_temp,
    lse,
    lse_lo,
    entropy,
    grad_logp,
    grad_entropy,
    ignore_index,
    grad_kl,
    ref_logits,
    ref_lse,
    kl,
):
    f32 = torch.float32
    vectors = (("lse", lse, f32), ("lse_lo", lse_lo, f32), ("entropy", entropy, f32), ("grad_logp", grad_logp, f32))
    if grad_entropy is not None:
        vectors += (("grad_entropy", grad_entropy, f32),)
    # no reference logits, no KL term (whatever grad_kl says)
    has_kl = grad_kl is not None and ref_logits is not None
    if has_kl:
        _check_ref(logits, ref_logits)
        vectors += (("grad_kl", grad_kl, f32), ("ref_lse", ref_lse, f32), ("kl", kl, f32))
    _check_rows(logits, labels, inv_temp, *vectors)
    config, _, bwd = kernel_modules()
    cfg = config.backward_config(logits.dtype)
    align = config.row_alignment(logits, with_contiguous_copy=grad is not None)
    kl_args = {}
    if has_kl:
        align = min(align, config.row_alignment(ref_logits))
        kl_args = dict(
            ref_logits=ref_logits, ref_row_off=_rows.row_offsets(ref_logits), ref_lse=ref_lse, kl=kl, grad_kl=grad_kl
        )
    with _device_guard(logits):
        bwd.launch(
            logits,
            _rows.row_offsets(logits),
            grad,
            labels,
            inv_temp,
            lse,
            lse_lo,
            entropy,
            grad_logp,
            grad_entropy,
            ignore_index,
            block_v=cfg.block_v,
            num_warps=cfg.num_warps,
            align=align,
            **kl_args,
        )


@torch.library.custom_op("prefopt_fast::triton_row_backward", mutates_args=())
def _backward_op(
    logits: torch.Tensor,
    labels: torch.Tensor,
    inv_temp: torch.Tensor,
    lse: torch.Tensor,
    lse_lo: torch.Tensor,
    entropy: torch.Tensor,
    grad_logp: torch.Tensor,
    grad_entropy: Optional[torch.Tensor],
    ignore_index: int,
    grad_kl: Optional[torch.Tensor],
    ref_logits: Optional[torch.Tensor],
    ref_lse: Optional[torch.Tensor],
    kl: Optional[torch.Tensor],
) -> torch.Tensor:
    grad = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    _launch_backward(
        logits,
        grad,
        labels,
        inv_temp,
        lse,
        lse_lo,
        entropy,
        grad_logp,
        grad_entropy,
        ignore_index,
        grad_kl,
        ref_logits,
        ref_lse,
        kl,
    )
    return grad


@_backward_op.register_fake
def _(logits, *args):
    return logits.new_empty(logits.shape)


@torch.library.custom_op("prefopt_fast::triton_row_backward_inplace", mutates_args=("logits",))
def _backward_inplace_op(
    logits: torch.Tensor,
    labels: torch.Tensor,
    inv_temp: torch.Tensor,
    lse: torch.Tensor,
    lse_lo: torch.Tensor,
    entropy: torch.Tensor,
    grad_logp: torch.Tensor,
    grad_entropy: Optional[torch.Tensor],
    ignore_index: int,
    grad_kl: Optional[torch.Tensor],
    ref_logits: Optional[torch.Tensor],
    ref_lse: Optional[torch.Tensor],
    kl: Optional[torch.Tensor],
) -> None:
    _launch_backward(
        logits,
        None,
        labels,
        inv_temp,
        lse,
        lse_lo,
        entropy,
        grad_logp,
        grad_entropy,
        ignore_index,
        grad_kl,
        ref_logits,
        ref_lse,
        kl,
    )


@_backward_inplace_op.register_fake
def _(logits, *args):
    return None


# The exact-KL extension: ref_logits with STAT_KL forward; grad_kl with ref_logits,
# ref_lse and kl backward (a grad_kl without ref_logits is ignored: no KL was computed).
SUPPORTS_KL = True


def row_forward(
    logits: torch.Tensor,
    labels: torch.Tensor,
    inv_temp: torch.Tensor,
    ignore_index: int,
    stats: int,
    ref_logits: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """fp32 [N_OUT, N]; see ``prefopt_fast._rows``."""
    return torch.ops.prefopt_fast.triton_row_forward(logits, labels, inv_temp, ignore_index, stats, ref_logits)


def row_backward(
    logits: torch.Tensor,
    labels: torch.Tensor,
    inv_temp: torch.Tensor,
    lse: torch.Tensor,
    lse_lo: torch.Tensor,
    entropy: torch.Tensor,
    grad_logp: torch.Tensor,
    grad_entropy: Optional[torch.Tensor],
    ignore_index: int,
    inplace: bool,
    grad_kl: Optional[torch.Tensor] = None,
    ref_logits: Optional[torch.Tensor] = None,
    ref_lse: Optional[torch.Tensor] = None,
    kl: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Gradient shaped like logits in logits.dtype (``logits`` itself when inplace)."""
    args = (
        logits,
        labels,
        inv_temp,
        lse,
        lse_lo,
        entropy,
        grad_logp,
        grad_entropy,
        ignore_index,
        grad_kl,
        ref_logits,
        ref_lse,
        kl,
    )
    if inplace:
        torch.ops.prefopt_fast.triton_row_backward_inplace(*args)
        return logits
    return torch.ops.prefopt_fast.triton_row_backward(*args)
