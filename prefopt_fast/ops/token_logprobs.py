"""token_logprobs: per-token log-probs (and row statistics) straight from the logits."""
from typing import NamedTuple, Optional

import torch

from .. import _validate
from .._dispatch import _load, resolve_backend
from .._rows import OUT_ARGMAX, OUT_ENTROPY, OUT_LOGP, OUT_LSE, OUT_LSSP, OUT_MEAN, STATS

STAT_NAMES = tuple(STATS)


class TokenLogProbs(NamedTuple):
    """Per-token outputs, each shaped like ``labels``; fields not asked for are None."""

    logprobs: torch.Tensor
    entropy: Optional[torch.Tensor] = None
    log_sum_sq_probs: Optional[torch.Tensor] = None
    mean_logit: Optional[torch.Tensor] = None
    is_argmax: Optional[torch.Tensor] = None


class TokenLogProbsFunction(torch.autograd.Function):
    """Row forward kernel in ``forward``, row backward kernel in ``backward``.

    Inputs are flat: labels int64 [N], inv_temp fp32 [N]. Outputs: logp [N], entropy [N]
    (differentiable) and the non-differentiable stats [4, N] (LSSP, MEAN, ARGMAX rows).
    """

    @staticmethod
    def forward(ctx, logits, labels, inv_temp, ignore_index: int, stats: int, inplace: bool, backend: str):
        out = _load(backend).row_forward(logits, labels, inv_temp, ignore_index, stats)
        logp, lse, entropy = out[OUT_LOGP].clone(), out[OUT_LSE].clone(), out[OUT_ENTROPY].clone()
        extra = out[OUT_LSSP:].clone()
        ctx.set_materialize_grads(False)
        ctx.mark_non_differentiable(extra)
        ctx.save_for_backward(logits, labels, inv_temp, lse, entropy)
        ctx.meta = (ignore_index, inplace, backend)
        return logp, entropy, extra

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy, _grad_extra):
        if grad_logp is None and grad_entropy is None:
            return (None,) * 7
        logits, labels, inv_temp, lse, entropy = ctx.saved_tensors
        ignore_index, inplace, backend = ctx.meta
        if grad_logp is None:
            grad_logp = torch.zeros_like(lse)
        grad_logp = grad_logp.to(lse.dtype).contiguous()
        if grad_entropy is not None:
            grad_entropy = grad_entropy.to(lse.dtype).contiguous()
        grad = _load(backend).row_backward(
            logits, labels, inv_temp, lse, entropy, grad_logp, grad_entropy, ignore_index, inplace
        )
        return grad, None, None, None, None, None, None


def token_logprobs(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    ignore_index: int = -100,
    temperature=1.0,
    stats=(),
    inplace_backward: bool = False,
    backend: str = "auto",
):
    """Log-probabilities of ``labels`` under ``softmax(logits / temperature)``, fused.

    Never materializes the softmax: one read of the logits forward, one read and one
    write backward.

    Args:
        logits: ``[..., V]`` float32 / bfloat16 / float16 (float64 on the torch backend).
            The last dimension must have stride 1; any other strides are read in place,
            so ``logits[:, :-1]`` costs no copy.
        labels: integer tensor of shape ``logits.shape[:-1]``; entries equal to
            ``ignore_index`` give 0 and no gradient.
        temperature: float > 0, or a tensor broadcastable to ``labels.shape`` (per token
            or per sequence). Treated as a constant (no gradient).
        stats: extra per-token outputs computed in the same pass, any of
            ``"entropy"`` (differentiable), ``"log_sum_sq_probs"``, ``"mean_logit"``
            (mean of logits / temperature), ``"is_argmax"`` (label is the first argmax).
        inplace_backward: write the gradient over the logits buffer instead of a fresh
            tensor (no N x V allocation; the logits are destroyed by the backward).
        backend: ``"auto"``, ``"torch"``, ``"cpu"``, ``"triton"`` or ``"cuda"``
            (``PREFOPT_BACKEND`` overrides ``"auto"``).

    Returns:
        float32 log-probs shaped like ``labels`` (float64 for float64 logits) when
        ``stats`` is empty, else a :class:`TokenLogProbs` named tuple.
    """
    _validate.check_logits(logits)
    ignore_index = _validate.check_int(ignore_index, "ignore_index")
    _validate.check_labels(labels, logits, ignore_index)
    names = _validate.parse_names(stats, STAT_NAMES, "stats")
    if not isinstance(inplace_backward, bool):
        raise TypeError(f"inplace_backward must be a bool; got {type(inplace_backward).__name__}")
    inv_temp = _validate.inverse_temperature(
        temperature, labels, torch.float64 if logits.dtype == torch.float64 else torch.float32
    )
    be = resolve_backend(backend, logits)

    mask = 0
    for name in names:
        mask |= STATS[name][0]
    flat_labels = labels.reshape(-1).to(torch.int64)
    logp, entropy, extra = TokenLogProbsFunction.apply(
        logits, flat_labels, inv_temp, ignore_index, mask, inplace_backward, be.NAME
    )
    shape = labels.shape
    logp = logp.reshape(shape)
    if not names:
        return logp
    rows = {
        "entropy": entropy,
        "log_sum_sq_probs": extra[OUT_LSSP - OUT_LSSP],
        "mean_logit": extra[OUT_MEAN - OUT_LSSP],
        "is_argmax": extra[OUT_ARGMAX - OUT_LSSP] != 0,
    }
    return TokenLogProbs(logp, **{n: rows[n].reshape(shape) for n in names})
