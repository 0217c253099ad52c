"""The ``cpu`` backend: the row kernels in native C++ (``csrc/``, ``prefopt_fast._C``).

Multi-threaded through torch's thread pool, vectorised (AVX-512 / AVX2+FMA / SSE2
variants chosen at load time), fp32 math for fp32 / bf16 / fp16 logits, any strides
in the leading dimensions (no copies). The kernels are the torch.library ops

    prefopt_fast::row_forward(logits, labels, inv_temp, ignore_index, stats, ref_logits=None) -> Tensor
    prefopt_fast::row_backward(logits, labels, inv_temp, lse, lse_lo, entropy, grad_logp, grad_entropy,
                               ignore_index, grad_kl=None, ref_logits=None, ref_lse=None, kl=None) -> Tensor
    prefopt_fast::row_backward_(...same...) -> ()      (writes the gradient over logits)

registered by the extension for CPU tensors, with the fake (meta) implementations
below so ``torch.compile(fullgraph=True)`` traces through them. Semantics: see
``prefopt_fast._rows``.

A fresh gradient is a new N x V buffer whose first-touch page faults can cost more than
the kernel itself; the extension asks the kernel for transparent huge pages on it
(madvise; 2.5-4x cheaper first touch measured here). ``PREFOPT_CPU_THP=0`` disables
the hint. ``inplace=True`` avoids the allocation altogether.
"""

from typing import Optional

import torch

from .._build_info import import_error_text
from .._rows import N_OUT

NAME = "cpu"
SUPPORTS_KL = True  # the exact-KL extension of the row contract (ref_logits, STAT_KL)

try:
    from .. import _C  # noqa: F401  (importing registers the ops)

    _IMPORT_ERROR: Optional[str] = None
except ImportError as exc:  # not built, or built for an incompatible torch
    _C = None
    _IMPORT_ERROR = import_error_text(exc)

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def is_available() -> bool:
    return _C is not None


def unavailable_reason() -> str:
    if _C is None:
        return (
            f"the native extension prefopt_fast._C could not be imported ({_IMPORT_ERROR}); "
            "build it with `pip install -e . --no-build-isolation`"
        )
    return ""


def supports(logits: torch.Tensor) -> Optional[str]:
    """None if the cpu kernels can serve ``logits``, else the reason."""
    if logits.device.type != "cpu":
        return f"the cpu backend needs CPU tensors, got logits on {logits.device}"
    if logits.dtype not in _DTYPES:
        return f"the cpu backend takes float32, bfloat16 or float16 logits, got {logits.dtype}"
    return None


if _C is not None:

    @torch.library.register_fake("prefopt_fast::row_forward")
    def _row_forward_fake(logits, labels, inv_temp, ignore_index, stats, ref_logits=None):
        return logits.new_empty((N_OUT, labels.shape[0]), dtype=torch.float32)

    @torch.library.register_fake("prefopt_fast::row_backward")
    def _row_backward_fake(
        logits,
        labels,
        inv_temp,
        lse,
        lse_lo,
        entropy,
        grad_logp,
        grad_entropy,
        ignore_index,
        grad_kl=None,
        ref_logits=None,
        ref_lse=None,
        kl=None,
    ):
        return logits.new_empty(logits.shape)  # contiguous, logits.dtype

    @torch.library.register_fake("prefopt_fast::row_backward_")
    def _row_backward_inplace_fake(
        logits,
        labels,
        inv_temp,
        lse,
        lse_lo,
        entropy,
        grad_logp,
        grad_entropy,
        ignore_index,
        grad_kl=None,
        ref_logits=None,
        ref_lse=None,
        kl=None,
    ):
        return None


def row_forward(
    logits: torch.Tensor,
    labels: torch.Tensor,
    inv_temp: torch.Tensor,
    ignore_index: int,
    stats: int,
    ref_logits: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """fp32 [N_OUT, N] row statistics of ``logits [..., V]`` (see ``prefopt_fast._rows``)."""
    return torch.ops.prefopt_fast.row_forward(logits, labels, inv_temp, ignore_index, stats, ref_logits)


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
    """Gradient w.r.t. ``logits`` in logits.dtype: a fresh contiguous tensor, or ``logits``
    itself overwritten when ``inplace`` (see ``prefopt_fast._rows``)."""
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
        torch.ops.prefopt_fast.row_backward_(*args)
        # ops bound through the stable ABI get no ADInplaceOrView kernel: bump the version
        # counter by hand, so autograd refuses anything that saved the overwritten logits
        # (e.g. a second backward through them)
        torch.autograd.graph.increment_version(logits)
        return logits
    return torch.ops.prefopt_fast.row_backward(*args)
