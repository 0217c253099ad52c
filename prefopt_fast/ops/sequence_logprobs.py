"""sequence_logprobs: per-sequence sums (or means) of token log-probs, padded or packed.

Causal shift convention: the logits at position t predict token t + 1. Shift the LABELS
(``labels = input_ids[:, 1:]`` padded with ``ignore_index`` at the end, or the prompt and
padding set to ``ignore_index``), never the logits: ``logits[:, :-1]`` is accepted without a
copy in the forward, but its backward goes through PyTorch's slice, which allocates a full
``[B, T, V]`` zero gradient for the unsliced tensor.
"""

from typing import Optional, Tuple

import torch
from torch import nn

from .. import _validate
from ..distributed import check_vocab_parallel_options
from .token_logprobs import token_logprobs


def _check_cu_seqlens(cu_seqlens, total: int, device, of: str = "labels") -> torch.Tensor:
    """cu_seqlens as int64 ``[B + 1]``, on ``device`` (the device of ``of``)."""
    _validate.check_tensor(cu_seqlens, "cu_seqlens")
    if cu_seqlens.dtype.is_floating_point or cu_seqlens.dtype.is_complex or cu_seqlens.dtype == torch.bool:
        raise TypeError(f"cu_seqlens must be an integer tensor [B + 1]; got {cu_seqlens.dtype}")
    if cu_seqlens.dim() != 1:
        raise ValueError(f"cu_seqlens must be 1-D [B + 1]; got shape {tuple(cu_seqlens.shape)}")
    if cu_seqlens.numel() < 2:
        raise ValueError(f"cu_seqlens must have B + 1 >= 2 entries (0, ..., total tokens); got {cu_seqlens.numel()}")
    if cu_seqlens.device != device:
        raise ValueError(f"cu_seqlens must be on the device of {of} ({device}); got {cu_seqlens.device}")
    cu = cu_seqlens.to(torch.int64)
    ok = (cu[0] == 0) & (cu[-1] == total) & (cu[1:] >= cu[:-1]).all()
    msg = f"cu_seqlens must start at 0, be non-decreasing and end at the number of tokens (labels.shape[0] = {total})"
    if torch.compiler.is_compiling():
        torch._assert_async(ok, msg)
    elif not bool(ok):
        raise ValueError(f"{msg}; got {cu_seqlens.tolist() if cu_seqlens.numel() <= 16 else '...'}")
    return cu


def per_sequence_sums(
    token_values: torch.Tensor, mask: torch.Tensor, cu_seqlens: Optional[torch.Tensor]
) -> Tuple[torch.Tensor, torch.Tensor]:
    """(sum of token_values, number of real tokens) per sequence.

    Padded: ``[B, T]`` -> ``[B]``. Packed (``cu_seqlens`` [B + 1] int64): ``[total]`` ->
    ``[B]`` with one scatter-add, no Python loop over sequences.
    """
    if cu_seqlens is None:
        return token_values.sum(-1), mask.sum(-1)
    B = cu_seqlens.numel() - 1
    positions = torch.arange(token_values.shape[0], device=token_values.device)
    seq = torch.searchsorted(cu_seqlens[1:], positions, right=True)
    sums = token_values.new_zeros(B).index_add(0, seq, token_values)
    counts = torch.zeros(B, dtype=torch.int64, device=mask.device).index_add(0, seq, mask.to(torch.int64))
    return sums, counts


def sequence_logprobs_and_lengths(
    logits,
    labels,
    *,
    ignore_index=-100,
    temperature=1.0,
    average=False,
    cu_seqlens=None,
    inplace_backward=False,
    backend="auto",
    process_group=None,
    vocab_start=None,
    vocab_size=None,
):
    """:func:`sequence_logprobs` plus the int64 number of real labels per sequence."""
    _validate.check_bool(average, "average")
    if process_group is None and vocab_start is None and vocab_size is None:
        _validate.check_logits(logits)  # (a vocabulary shard may be empty: token_logprobs checks it)
    # against the logits' device: labels on another device are then reported as such
    dev, of = (logits.device, "logits") if isinstance(logits, torch.Tensor) else (None, "labels")
    cu_seqlens = check_sequence_labels(labels, cu_seqlens, dev, of)
    logp = token_logprobs(
        logits,
        labels,
        ignore_index=ignore_index,
        temperature=temperature,
        inplace_backward=inplace_backward,
        backend=backend,
        process_group=process_group,
        vocab_start=vocab_start,
        vocab_size=vocab_size,
    )
    return sequence_totals(logp, labels, ignore_index, cu_seqlens, average)


def check_sequence_labels(labels, cu_seqlens, device=None, of: str = "labels") -> Optional[torch.Tensor]:
    """``labels`` padded ``[..., T]``, or packed ``[total_tokens]`` with ``cu_seqlens`` (returned
    as int64 ``[B + 1]``, checked to be on ``device``, the device of ``of``; None: labels')."""
    _validate.check_tensor(labels, "labels")
    if cu_seqlens is None:
        if labels.dim() < 1:
            raise ValueError("labels must have shape [..., T] (padded) or [total_tokens] with cu_seqlens; got 0-d")
        return None
    if labels.dim() != 1:
        raise ValueError(f"with cu_seqlens, labels must be packed: shape [total_tokens]; got {tuple(labels.shape)}")
    return _check_cu_seqlens(cu_seqlens, labels.shape[0], labels.device if device is None else device, of)


def sequence_totals(logp, labels, ignore_index: int, cu_seqlens, average: bool):
    """(per-sequence sum or, with ``average``, mean of the token log-probs ``logp``; int64
    number of real labels per sequence)."""
    sums, counts = per_sequence_sums(logp, labels != ignore_index, cu_seqlens)
    if average:
        # sums are 0 where counts are 0: a sequence with no real label gives 0, not NaN
        sums = sums / counts.clamp(min=1).to(sums.dtype)
    return sums, counts


def sequence_logprobs(
    logits,
    labels,
    *,
    ignore_index: int = -100,
    temperature=1.0,
    average: bool = False,
    cu_seqlens: Optional[torch.Tensor] = None,
    inplace_backward: bool = False,
    backend: str = "auto",
    process_group=None,
    vocab_start: Optional[int] = None,
    vocab_size: Optional[int] = None,
) -> torch.Tensor:
    """Per-sequence log-probs: the sum (or, with ``average``, the mean) over real labels.

    Args:
        logits: padded ``[B, T, V]`` (any leading ``[..., T]``), or packed
            ``[total_tokens, V]`` with ``cu_seqlens``; fp32 / bf16 / fp16.
        labels: ``logits.shape[:-1]`` integers, already shifted so ``labels[..., t]`` is the
            token predicted by ``logits[..., t, :]``; ``ignore_index`` marks prompt/padding.
        cu_seqlens: int ``[B + 1]`` offsets of the packed sequences (0, ..., total_tokens).
        average: divide by the number of real labels (0 for a sequence without any).
        temperature, inplace_backward, backend: as in :func:`token_logprobs`.
        process_group, vocab_start, vocab_size: vocabulary-parallel logits (a shard of the
            vocabulary per rank), as in :func:`token_logprobs`.

    Returns:
        fp32 ``[B]`` (``labels.shape[:-1]`` when padded).
    """
    return sequence_logprobs_and_lengths(
        logits,
        labels,
        ignore_index=ignore_index,
        temperature=temperature,
        average=average,
        cu_seqlens=cu_seqlens,
        inplace_backward=inplace_backward,
        backend=backend,
        process_group=process_group,
        vocab_start=vocab_start,
        vocab_size=vocab_size,
    )[0]


class SequenceLogProbs(nn.Module):
    """Config-only module around :func:`sequence_logprobs` (the options are its keywords,
    validated here, once; ``process_group``, ``vocab_start``, ``vocab_size``: vocabulary-parallel
    logits, as there).

    ``forward(logits, labels, cu_seqlens=None) -> [B]``.
    """

    def __init__(
        self,
        *,
        ignore_index: int = -100,
        temperature: float = 1.0,
        average: bool = False,
        inplace_backward: bool = False,
        backend: str = "auto",
        process_group=None,
        vocab_start: Optional[int] = None,
        vocab_size: Optional[int] = None,
    ):
        super().__init__()
        self.ignore_index = _validate.check_int(ignore_index, "ignore_index")
        self.temperature = _validate.check_positive_float(temperature, "temperature")
        self.average = _validate.check_bool(average, "average")
        self.inplace_backward = _validate.check_bool(inplace_backward, "inplace_backward")
        if not isinstance(backend, str):
            raise TypeError(f"backend must be a str; got {type(backend).__name__}")
        self.backend = backend
        self.process_group, self.vocab_start, self.vocab_size = check_vocab_parallel_options(
            process_group, vocab_start, vocab_size
        )

    def forward(self, logits, labels, cu_seqlens=None):
        return sequence_logprobs(
            logits,
            labels,
            ignore_index=self.ignore_index,
            temperature=self.temperature,
            average=self.average,
            cu_seqlens=cu_seqlens,
            inplace_backward=self.inplace_backward,
            backend=self.backend,
            process_group=self.process_group,
            vocab_start=self.vocab_start,
            vocab_size=self.vocab_size,
        )

    def extra_repr(self):
        return f"ignore_index={self.ignore_index}, temperature={self.temperature}, average={self.average}"
