"""DPO-family and PPO losses straight from hidden states and the lm_head (fused-linear).

The twins of :func:`fused_dpo_loss` and :func:`ppo_loss`, with the logits replaced by
``hidden`` ``[..., H]`` and ``weight`` ``[V, H]`` (plus ``bias``, ``lora``, ``logit_scale``,
``softcap``, ``chunk_size``): the per-token statistics come from
:func:`prefopt_fast.ops.linear_logprobs.linear_token_logprobs`, which never materializes the
``[tokens, V]`` logits; the loss heads are the same code as the from-logits losses.
"""

from typing import Dict, Optional, Tuple, Union

import torch
from torch import Tensor

from .. import _validate
from ..distributed import check_vocab_parallel_options
from ..ops.linear_logprobs import linear_sequence_logprobs_and_lengths, linear_token_logprobs
from . import ppo as _ppo_mod
from .dpo import DPOLoss, dpo_loss

__all__ = ["linear_pair_logps", "linear_dpo_loss", "LinearDPOLoss", "linear_ppo_loss", "LinearPPOLoss"]


def _check_reference(labels: Tensor, weight: Tensor, ref_hidden, ref_weight, ref_bias) -> None:
    """The reference model's states and head, checked by their own names (the reference pass
    would report them as ``hidden`` / ``weight``). The policy's inputs are valid already."""
    _validate.check_tensor(ref_hidden, "ref_hidden")
    if ref_hidden.dtype not in _validate.LOGIT_DTYPES:
        raise TypeError(
            f"ref_hidden must be float32, bfloat16 or float16 (float64 on backend='torch'); got {ref_hidden.dtype}"
        )
    if (
        tuple(ref_hidden.shape[:-1]) != tuple(labels.shape)
        or ref_hidden.dim() != labels.dim() + 1
        or ref_hidden.shape[-1] < 1
    ):
        raise ValueError(
            f"ref_hidden must have shape labels.shape + [H_ref] = {list(labels.shape)} + [H_ref], "
            f"H_ref >= 1 (the reference's hidden size); got {list(ref_hidden.shape)}"
        )
    if ref_hidden.device != labels.device:
        raise ValueError(f"ref_hidden must be on the device of hidden ({labels.device}); got {ref_hidden.device}")
    V, Hr = weight.shape[0], ref_hidden.shape[-1]
    _validate.check_companion(
        ref_weight,
        "ref_weight",
        (V, Hr),
        ref_hidden.dtype,
        ref_hidden.device,
        "ref_hidden",
        " = [V, H_ref] (V = weight.shape[0], H_ref = ref_hidden.shape[-1])",
    )
    if ref_bias is not None:
        _validate.check_companion(
            ref_bias,
            "ref_bias",
            (V,),
            ref_hidden.dtype,
            ref_hidden.device,
            "ref_hidden",
            " = [V] (V = weight.shape[0])",
        )


def linear_pair_logps(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    *,
    bias: Optional[Tensor] = None,
    lora=None,
    ref_chosen_logps: Optional[Tensor] = None,
    ref_rejected_logps: Optional[Tensor] = None,
    ref_hidden: Optional[Tensor] = None,
    ref_weight: Optional[Tensor] = None,
    ref_bias: Optional[Tensor] = None,
    ignore_index: int = -100,
    temperature=1.0,
    logit_scale: float = 1.0,
    softcap: Optional[float] = None,
    cu_seqlens: Optional[Tensor] = None,
    chunk_size: Optional[int] = None,
    backend: str = "auto",
    process_group=None,
    vocab_start: Optional[int] = None,
    vocab_size: Optional[int] = None,
) -> Dict[str, Optional[Tensor]]:
    """Summed completion log-probs of the stacked [chosen; rejected] batch, split into the DPO inputs.

    As :func:`prefopt_fast.pair_logps`, from hidden states. The reference, when given as
    ``ref_hidden`` + ``ref_weight`` (+ ``ref_bias``), runs under ``no_grad`` with the same
    transform (temperature, logit_scale, softcap) and no LoRA.
    """
    kw = dict(
        ignore_index=ignore_index,
        temperature=temperature,
        logit_scale=logit_scale,
        softcap=softcap,
        cu_seqlens=cu_seqlens,
        chunk_size=chunk_size,
        backend=backend,
        process_group=process_group,
        vocab_start=vocab_start,
        vocab_size=vocab_size,
    )
    sums, counts = linear_sequence_logprobs_and_lengths(hidden, weight, labels, bias=bias, lora=lora, **kw)
    if sums.dim() != 1 or sums.shape[0] % 2:
        raise ValueError(
            "hidden must hold the stacked [chosen; rejected] batch: 2B sequences, padded [2B, T, H] or "
            f"packed with cu_seqlens of 2B + 1 entries; got {tuple(sums.shape)} sequences"
        )
    B = sums.shape[0] // 2
    if ref_hidden is not None or ref_weight is not None or ref_bias is not None:
        if ref_hidden is None or ref_weight is None:
            raise ValueError(
                "the reference model needs both ref_hidden ([2B, T, H], like hidden) and ref_weight "
                "([V, H]); pass ref_weight=weight when the policy and the reference share the head"
            )
        if ref_chosen_logps is not None or ref_rejected_logps is not None:
            raise ValueError("pass either ref_hidden / ref_weight or ref_chosen_logps / ref_rejected_logps, not both")
        _check_reference(labels, weight, ref_hidden, ref_weight, ref_bias)
        with torch.no_grad():
            ref_sums, _ = linear_sequence_logprobs_and_lengths(
                ref_hidden.detach(),
                ref_weight.detach(),
                labels,
                bias=None if ref_bias is None else ref_bias.detach(),
                **kw,
            )
        ref_chosen_logps, ref_rejected_logps = ref_sums[:B], ref_sums[B:]
    return dict(
        chosen_logps=sums[:B],
        rejected_logps=sums[B:],
        ref_chosen_logps=ref_chosen_logps,
        ref_rejected_logps=ref_rejected_logps,
        chosen_lengths=counts[:B],
        rejected_lengths=counts[B:],
    )


def linear_dpo_loss(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    *,
    bias: Optional[Tensor] = None,
    lora=None,
    ref_chosen_logps: Optional[Tensor] = None,
    ref_rejected_logps: Optional[Tensor] = None,
    ref_hidden: Optional[Tensor] = None,
    ref_weight: Optional[Tensor] = None,
    ref_bias: Optional[Tensor] = None,
    ignore_index: int = -100,
    temperature=1.0,
    logit_scale: float = 1.0,
    softcap: Optional[float] = None,
    cu_seqlens: Optional[Tensor] = None,
    chunk_size: Optional[int] = None,
    backend: str = "auto",
    process_group=None,
    vocab_start: Optional[int] = None,
    vocab_size: Optional[int] = None,
    **dpo_kwargs,
) -> Tuple[Tensor, Dict[str, Tensor]]:
    """DPO-family loss from the policy's last hidden states of the stacked batch and its lm_head.

    Args:
        hidden: ``[2B, T, H]`` (rows 0..B-1 chosen, B..2B-1 rejected) or packed
            ``[total_tokens, H]`` with ``cu_seqlens`` of ``2B + 1`` entries.
        weight, bias, lora, temperature, logit_scale, softcap, chunk_size, backend: as in
            :func:`prefopt_fast.linear_token_logprobs`.
        labels: shifted completion labels, ``ignore_index`` on prompt and padding.
        ref_chosen_logps, ref_rejected_logps: precomputed ``[B]`` reference log-probs, or
        ref_hidden, ref_weight, ref_bias: the reference model's hidden states and head,
            evaluated under no_grad here; or none of these, for reference-free training.
        process_group, vocab_start, vocab_size: vocabulary-parallel ``weight`` / ``ref_weight``
            (and biases), as in :func:`prefopt_fast.linear_token_logprobs`.
        dpo_kwargs: everything :func:`prefopt_fast.dpo_loss` takes (beta, loss_type, ...).

    Returns:
        ``(loss, metrics)`` as :func:`prefopt_fast.dpo_loss`.
    """
    logps = linear_pair_logps(
        hidden,
        weight,
        labels,
        bias=bias,
        lora=lora,
        ref_chosen_logps=ref_chosen_logps,
        ref_rejected_logps=ref_rejected_logps,
        ref_hidden=ref_hidden,
        ref_weight=ref_weight,
        ref_bias=ref_bias,
        ignore_index=ignore_index,
        temperature=temperature,
        logit_scale=logit_scale,
        softcap=softcap,
        cu_seqlens=cu_seqlens,
        chunk_size=chunk_size,
        backend=backend,
        process_group=process_group,
        vocab_start=vocab_start,
        vocab_size=vocab_size,
    )
    for k in ("chosen_lengths", "rejected_lengths"):
        if dpo_kwargs.get(k) is not None:
            logps.pop(k)
    return dpo_loss(**logps, **dpo_kwargs)


class LinearDPOLoss(DPOLoss):
    """Config-only module: :class:`DPOLoss`'s hyper-parameters plus the fused-linear options of
    :func:`linear_dpo_loss` (``process_group``, ``vocab_start``, ``vocab_size``: a
    vocabulary-parallel head, as there).

    ``forward(hidden, weight, labels, ref_chosen_logps=None, ref_rejected_logps=None, *, bias=None,
    lora=None, ref_hidden=None, ref_weight=None, ref_bias=None, cu_seqlens=None, pair_weights=None)
    -> (loss, metrics)``.
    """

    def __init__(
        self,
        beta: float = 0.1,
        loss_type="sigmoid",
        *,
        ignore_index: int = -100,
        temperature: float = 1.0,
        logit_scale: float = 1.0,
        softcap: Optional[float] = None,
        chunk_size: Optional[int] = None,
        backend: str = "auto",
        process_group=None,
        vocab_start: Optional[int] = None,
        vocab_size: Optional[int] = None,
        **dpo_config,
    ):
        super().__init__(beta, loss_type, **dpo_config)
        self.ignore_index = _validate.check_int(ignore_index, "ignore_index")
        self.temperature = _validate.check_positive_float(temperature, "temperature")
        self.logit_scale, self.softcap = _validate.check_linear_scalars(logit_scale, softcap, chunk_size)
        if not isinstance(backend, str):
            raise TypeError(f"backend must be a str; got {type(backend).__name__}")
        self.chunk_size = chunk_size
        self.backend = backend
        self.process_group, self.vocab_start, self.vocab_size = check_vocab_parallel_options(
            process_group, vocab_start, vocab_size
        )

    def forward(
        self,
        hidden: Tensor,
        weight: Tensor,
        labels: Tensor,
        ref_chosen_logps: Optional[Tensor] = None,
        ref_rejected_logps: Optional[Tensor] = None,
        *,
        bias: Optional[Tensor] = None,
        lora=None,
        ref_hidden: Optional[Tensor] = None,
        ref_weight: Optional[Tensor] = None,
        ref_bias: Optional[Tensor] = None,
        cu_seqlens: Optional[Tensor] = None,
        pair_weights: Optional[Tensor] = None,
    ):
        logps = linear_pair_logps(
            hidden,
            weight,
            labels,
            bias=bias,
            lora=lora,
            ref_chosen_logps=ref_chosen_logps,
            ref_rejected_logps=ref_rejected_logps,
            ref_hidden=ref_hidden,
            ref_weight=ref_weight,
            ref_bias=ref_bias,
            ignore_index=self.ignore_index,
            temperature=self.temperature,
            logit_scale=self.logit_scale,
            softcap=self.softcap,
            cu_seqlens=cu_seqlens,
            chunk_size=self.chunk_size,
            backend=self.backend,
            process_group=self.process_group,
            vocab_start=self.vocab_start,
            vocab_size=self.vocab_size,
        )
        return super().forward(**logps, pair_weights=pair_weights)


def _check_sampled_kl(cfg) -> None:
    if cfg.kl_estimator == "full":
        raise ValueError(
            'kl_estimator must be a sampled estimator ("k1", "k2", "k3", "abs", "low_var_kl", with '
            'ref_logps) in the fused-linear PPO loss: "full" needs the reference logits (use ppo_loss '
            "on materialized logits for it)"
        )


def _linear_ppo(
    hidden,
    weight,
    labels,
    old_logps,
    advantages,
    cfg,
    *,
    bias,
    lora,
    loss_mask,
    ref_logps,
    temperature,
    logit_scale,
    softcap,
    is_weights,
    global_num_tokens,
    chunk_size,
    backend,
    vocab_parallel=None,
):
    _check_sampled_kl(cfg)

    def token_stats(kernel_labels: Tensor, with_kl: bool):
        return linear_token_logprobs(
            hidden,
            weight,
            kernel_labels,
            bias=bias,
            lora=lora,
            ignore_index=cfg.ignore_index,
            temperature=temperature,
            logit_scale=logit_scale,
            softcap=softcap,
            stats=("entropy",),
            chunk_size=chunk_size,
            backend=backend,
            **(vocab_parallel or {}),
        )

    return _ppo_mod.ppo_from_token_stats(
        token_stats,
        hidden,
        "hidden",
        "H",
        labels,
        old_logps,
        advantages,
        cfg,
        loss_mask,
        ref_logps,
        False,
        is_weights,
        global_num_tokens,
    )


def linear_ppo_loss(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    old_logps: Optional[Tensor],
    advantages: Tensor,
    *,
    bias: Optional[Tensor] = None,
    lora=None,
    ignore_index: int = -100,
    loss_mask: Optional[Tensor] = None,
    ref_logps: Optional[Tensor] = None,
    temperature: Union[float, Tensor] = 1.0,
    logit_scale: float = 1.0,
    softcap: Optional[float] = None,
    clip_eps_low: float = 0.2,
    clip_eps_high: Optional[float] = None,
    dual_clip: Optional[float] = None,
    kl_coef: float = 0.0,
    kl_estimator: str = "k3",
    kl_ratio_correction: bool = False,
    entropy_coef: float = 0.0,
    loss_agg_mode: str = "token-mean",
    max_length: Optional[int] = None,
    importance_sampling_level: str = "token",
    is_weights: Optional[Tensor] = None,
    global_num_tokens: Optional[Union[float, Tensor]] = None,
    chunk_size: Optional[int] = None,
    backend: str = "auto",
    process_group=None,
    vocab_start: Optional[int] = None,
    vocab_size: Optional[int] = None,
) -> Tuple[Tensor, Dict[str, Tensor]]:
    """:func:`prefopt_fast.ppo_loss` from hidden states ``[B, T, H]`` and the lm_head ``weight [V, H]``.

    Same options and outputs as :func:`prefopt_fast.ppo_loss` (see there), except that
    ``kl_estimator="full"`` (the exact KL, which needs reference logits) is not available;
    ``bias``, ``lora``, ``logit_scale``, ``softcap`` and ``chunk_size`` are as in
    :func:`prefopt_fast.linear_token_logprobs`. Tokens masked by ``ignore_index`` or
    ``loss_mask`` are dropped before any matmul. ``process_group``, ``vocab_start``,
    ``vocab_size``: a vocabulary-parallel head, as in :func:`prefopt_fast.linear_token_logprobs`.
    """
    cfg = _ppo_mod.check_policy_config(
        ignore_index,
        clip_eps_low,
        clip_eps_high,
        dual_clip,
        kl_coef,
        kl_estimator,
        kl_ratio_correction,
        entropy_coef,
        loss_agg_mode,
        max_length,
        importance_sampling_level,
    )
    return _linear_ppo(
        hidden,
        weight,
        labels,
        old_logps,
        advantages,
        cfg,
        bias=bias,
        lora=lora,
        loss_mask=loss_mask,
        ref_logps=ref_logps,
        temperature=temperature,
        logit_scale=logit_scale,
        softcap=softcap,
        is_weights=is_weights,
        global_num_tokens=global_num_tokens,
        chunk_size=chunk_size,
        backend=backend,
        vocab_parallel=dict(process_group=process_group, vocab_start=vocab_start, vocab_size=vocab_size),
    )


class LinearPPOLoss(_ppo_mod.PPOLoss):
    """Config-only module around :func:`linear_ppo_loss`; hyper-parameters (its keywords, down to
    ``process_group``, ``vocab_start``, ``vocab_size`` for a vocabulary-parallel head) are
    validated here, once.

    ``forward(hidden, weight, labels, old_logps, advantages, *, bias=None, lora=None, loss_mask=None,
    ref_logps=None, is_weights=None, global_num_tokens=None) -> (loss, metrics)``.
    """

    def __init__(
        self,
        *,
        logit_scale: float = 1.0,
        softcap: Optional[float] = None,
        chunk_size: Optional[int] = None,
        **ppo_config,
    ):
        super().__init__(**ppo_config)
        _check_sampled_kl(self._cfg)
        self.logit_scale, self.softcap = _validate.check_linear_scalars(logit_scale, softcap, chunk_size)
        self.chunk_size = chunk_size

    def extra_repr(self) -> str:
        s = super().extra_repr()
        if self.logit_scale != 1.0:
            s += f", logit_scale={self.logit_scale}"
        if self.softcap is not None:
            s += f", softcap={self.softcap}"
        return s

    def forward(
        self,
        hidden: Tensor,
        weight: Tensor,
        labels: Tensor,
        old_logps: Optional[Tensor],
        advantages: Tensor,
        *,
        bias: Optional[Tensor] = None,
        lora=None,
        loss_mask: Optional[Tensor] = None,
        ref_logps: Optional[Tensor] = None,
        is_weights: Optional[Tensor] = None,
        global_num_tokens: Optional[Union[float, Tensor]] = None,
    ):
        return _linear_ppo(
            hidden,
            weight,
            labels,
            old_logps,
            advantages,
            self._cfg,
            bias=bias,
            lora=lora,
            loss_mask=loss_mask,
            ref_logps=ref_logps,
            temperature=self.temperature,
            logit_scale=self.logit_scale,
            softcap=self.softcap,
            is_weights=is_weights,
            global_num_tokens=global_num_tokens,
            chunk_size=self.chunk_size,
            backend=self.backend,
            vocab_parallel=self._vocab_parallel(),
        )
