"""logits_dpo_loss: the DPO family in one call from the logits of the [chosen; rejected] batch.

(Named by what it takes: the from-hidden-states twin is :func:`prefopt_fast.linear_dpo_loss`.)

The vocabulary is touched only by the row kernels (through ``sequence_logprobs``); the
loss head is :func:`dpo_loss` on ``[B]`` vectors. Nothing of size N x V is allocated
besides the logits gradient (none with ``inplace_backward=True``).
"""

from typing import Dict, Optional, Tuple

import torch
from torch import Tensor

from .. import _validate
from ..distributed import check_vocab_parallel_options, is_dtensor
from ..ops.sequence_logprobs import sequence_logprobs_and_lengths
from .dpo import DPOLoss, check_average, dpo_loss

__all__ = ["logits_dpo_loss", "LogitsDPOLoss", "pair_logprobs"]


def pair_logprobs(
    logits: Tensor,
    labels: Tensor,
    *,
    ref_chosen_logps: Optional[Tensor] = None,
    ref_rejected_logps: Optional[Tensor] = None,
    ref_logits: Optional[Tensor] = None,
    ignore_index: int = -100,
    temperature=1.0,
    cu_seqlens: Optional[Tensor] = None,
    inplace_backward: bool = False,
    backend: str = "auto",
    process_group=None,
    vocab_start: Optional[int] = None,
    vocab_size: Optional[int] = None,
    average: bool = False,
) -> Dict[str, Optional[Tensor]]:
    """Summed completion log-probs of the stacked batch, split into the DPO inputs.

    Returns a dict with ``chosen_logps``, ``rejected_logps``, ``ref_chosen_logps``,
    ``ref_rejected_logps`` (None when reference-free) and ``chosen_lengths``,
    ``rejected_lengths`` (int64 counts of real labels), all ``[B]``. With ``average=True``
    the log-probs (the reference's computed here too) are per-length means, as
    ``sequence_logprobs(average=True)``; precomputed ``ref_*_logps`` are passed through as given.
    """
    kw = dict(
        average=average,
        ignore_index=ignore_index,
        temperature=temperature,
        cu_seqlens=cu_seqlens,
        backend=backend,
        process_group=process_group,
        vocab_start=vocab_start,
        vocab_size=vocab_size,
    )
    if ref_logits is not None:
        # checked here, before either pass: the reference pass would report a bad ref_logits as `logits`
        if ref_chosen_logps is not None or ref_rejected_logps is not None:
            raise ValueError("pass either ref_logits or ref_chosen_logps / ref_rejected_logps, not both")
        shard = process_group is not None or vocab_start is not None or vocab_size is not None or is_dtensor(logits)
        if shard:
            _validate.check_tensor(logits, "logits")
        else:
            _validate.check_logits(logits)
        _validate.check_like(ref_logits, logits, "ref_logits", empty_vocab=shard)
    sums, counts = sequence_logprobs_and_lengths(logits, labels, inplace_backward=inplace_backward, **kw)
    if sums.dim() != 1 or sums.shape[0] % 2:
        raise ValueError(
            "logits must hold the stacked [chosen; rejected] batch: 2B sequences, padded [2B, T, V] or "
            f"packed with cu_seqlens of 2B + 1 entries; got {tuple(sums.shape)} sequences"
        )
    B = sums.shape[0] // 2
    if ref_logits is not None:
        with torch.no_grad():
            ref_sums, _ = sequence_logprobs_and_lengths(ref_logits.detach(), labels, **kw)
        ref_chosen_logps, ref_rejected_logps = ref_sums[:B], ref_sums[B:]
    return dict(
        chosen_logps=sums[:B],
        rejected_logps=sums[B:],
        ref_chosen_logps=ref_chosen_logps,
        ref_rejected_logps=ref_rejected_logps,
        chosen_lengths=counts[:B],
        rejected_lengths=counts[B:],
    )


def logits_dpo_loss(
    logits: Tensor,
    labels: Tensor,
    *,
    ref_chosen_logps: Optional[Tensor] = None,
    ref_rejected_logps: Optional[Tensor] = None,
    ref_logits: Optional[Tensor] = None,
    ignore_index: int = -100,
    temperature=1.0,
    cu_seqlens: Optional[Tensor] = None,
    inplace_backward: bool = False,
    backend: str = "auto",
    process_group=None,
    vocab_start: Optional[int] = None,
    vocab_size: Optional[int] = None,
    average: bool = False,
    **dpo_kwargs,
) -> Tuple[Tensor, Dict[str, Tensor]]:
    """DPO-family loss straight from the policy logits of the stacked batch.

    Args:
        logits: ``[2B, T, V]`` (rows 0..B-1 chosen, B..2B-1 rejected) or packed
            ``[total_tokens, V]`` with ``cu_seqlens`` of ``2B + 1`` entries; fp32/bf16/fp16.
        labels: shifted completion labels, ``ignore_index`` on prompt and padding.
        ref_chosen_logps, ref_rejected_logps: precomputed ``[B]`` reference log-probs, or
        ref_logits: the reference model's logits (same layout), evaluated under no_grad
            here; or neither, for reference-free training.
        process_group, vocab_start, vocab_size: vocabulary-parallel ``logits`` and ``ref_logits``
            (each rank holds a vocabulary shard), as in :func:`prefopt_fast.token_logprobs`.
        average: per-length mean log-probs instead of sums (not with ``ipo``, ``sigmoid_norm``,
            ``sft``, which divide by the lengths themselves).
        dpo_kwargs: everything :func:`dpo_loss` takes (beta, loss_type, label_smoothing,
            reduction, ...). Completion lengths default to the counts of real labels.

    Returns:
        ``(loss, metrics)`` as :func:`dpo_loss`.
    """
    check_average(average, dpo_kwargs.get("loss_type", "sigmoid"))
    logps = pair_logprobs(
        logits,
        labels,
        ref_chosen_logps=ref_chosen_logps,
        ref_rejected_logps=ref_rejected_logps,
        ref_logits=ref_logits,
        ignore_index=ignore_index,
        temperature=temperature,
        cu_seqlens=cu_seqlens,
        inplace_backward=inplace_backward,
        backend=backend,
        process_group=process_group,
        vocab_start=vocab_start,
        vocab_size=vocab_size,
        average=average,
    )
    for k in ("chosen_lengths", "rejected_lengths"):
        if dpo_kwargs.get(k) is not None:
            logps.pop(k)
    return dpo_loss(**logps, **dpo_kwargs)


class LogitsDPOLoss(DPOLoss):
    """Config-only module: :class:`DPOLoss`'s hyper-parameters plus the sequence options of
    :func:`logits_dpo_loss` (``process_group``, ``vocab_start``, ``vocab_size``:
    vocabulary-parallel logits, as there).

    ``forward(logits, labels, ref_chosen_logps=None, ref_rejected_logps=None, *,
    ref_logits=None, cu_seqlens=None, pair_weights=None) -> (loss, metrics)``.
    """

    def __init__(
        self,
        beta: float = 0.1,
        loss_type="sigmoid",
        *,
        ignore_index: int = -100,
        temperature: float = 1.0,
        inplace_backward: bool = False,
        backend: str = "auto",
        process_group=None,
        vocab_start: Optional[int] = None,
        vocab_size: Optional[int] = None,
        average: bool = False,
        **dpo_config,
    ):
        super().__init__(beta, loss_type, **dpo_config)
        self.average = check_average(average, self._cfg.loss_types)
        self.ignore_index = _validate.check_int(ignore_index, "ignore_index")
        self.temperature = _validate.check_positive_float(temperature, "temperature")
        self.inplace_backward = _validate.check_bool(inplace_backward, "inplace_backward")
        if not isinstance(backend, str):
            raise TypeError(f"backend must be a str; got {type(backend).__name__}")
        self.backend = backend
        self.process_group, self.vocab_start, self.vocab_size = check_vocab_parallel_options(
            process_group, vocab_start, vocab_size
        )

    def forward(
        self,
        logits: Tensor,
        labels: Tensor,
        ref_chosen_logps: Optional[Tensor] = None,
        ref_rejected_logps: Optional[Tensor] = None,
        *,
        ref_logits: Optional[Tensor] = None,
        cu_seqlens: Optional[Tensor] = None,
        pair_weights: Optional[Tensor] = None,
    ):
        logps = pair_logprobs(
            logits,
            labels,
            ref_chosen_logps=ref_chosen_logps,
            ref_rejected_logps=ref_rejected_logps,
            ref_logits=ref_logits,
            ignore_index=self.ignore_index,
            temperature=self.temperature,
            cu_seqlens=cu_seqlens,
            inplace_backward=self.inplace_backward,
            backend=self.backend,
            process_group=self.process_group,
            vocab_start=self.vocab_start,
            vocab_size=self.vocab_size,
            average=self.average,
        )
        return super().forward(**logps, pair_weights=pair_weights)
