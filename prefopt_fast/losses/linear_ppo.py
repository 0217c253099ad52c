"""PPO loss straight from hidden states and the lm_head (fused-linear).

The twin of :func:`prefopt_fast.ppo_loss`, with the logits replaced by ``hidden`` ``[..., H]``
and ``weight`` ``[V, H]`` (plus ``bias``, ``lora``, ``logit_scale``, ``softcap``,
``chunk_size``): the per-token statistics come from
:func:`prefopt_fast.ops.linear_logprobs.linear_token_logprobs`, which never materializes the
``[tokens, V]`` logits; the loss head is the same code as :func:`prefopt_fast.ppo_loss`'s.
"""

from typing import Dict, Optional, Tuple, Union

from torch import Tensor

from .. import _validate
from ..ops.linear_logprobs import linear_token_logprobs
from . import ppo as _ppo_mod

__all__ = ["linear_ppo_loss", "LinearPPOLoss"]


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
    ref_hidden=None,
    ref_weight=None,
    ref_bias=None,
    vocab_parallel=None,
):
    def token_stats(kernel_labels: Tensor, with_kl: bool):
        ref = dict(ref_hidden=ref_hidden, ref_weight=ref_weight, ref_bias=ref_bias) if with_kl else {}
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
            stats=("entropy", "kl") if with_kl else ("entropy",),
            chunk_size=chunk_size,
            backend=backend,
            **ref,
            **(vocab_parallel or {}),
        )

    has_ref_head = ref_hidden is not None or ref_weight is not None or ref_bias is not None

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
        has_ref_head,
        is_weights,
        global_num_tokens,
        full_ref="ref_hidden",
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
    ref_hidden: Optional[Tensor] = None,
    ref_weight: Optional[Tensor] = None,
    ref_bias: Optional[Tensor] = None,
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
    convention: Optional[str] = None,
    loss_type_args: Optional[Dict[str, float]] = None,
    is_weights: Optional[Tensor] = None,
    global_num_tokens: Optional[Union[float, Tensor]] = None,
    chunk_size: Optional[int] = None,
    backend: str = "auto",
    process_group=None,
    vocab_start: Optional[int] = None,
    vocab_size: Optional[int] = None,
) -> Tuple[Tensor, Dict[str, Tensor]]:
    """:func:`prefopt_fast.ppo_loss` from hidden states ``[B, T, H]`` and the lm_head ``weight [V, H]``.

    Same options and outputs as :func:`prefopt_fast.ppo_loss` (see there); the exact KL
    (``kl_estimator="full"``) reads the reference head instead of reference logits:
    ``ref_hidden`` ``[B, T, H_ref]``, ``ref_weight`` ``[V, H_ref]`` and optional ``ref_bias``
    ``[V]`` (e.g. the PEFT base model: same weight, adapter disabled), tile by tile beside the
    policy's (see :func:`prefopt_fast.linear_token_logprobs`, ``stats=("kl",)``).
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
        convention,
        loss_type_args,
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
        ref_hidden=ref_hidden,
        ref_weight=ref_weight,
        ref_bias=ref_bias,
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
    ref_logps=None, ref_hidden=None, ref_weight=None, ref_bias=None, is_weights=None,
    global_num_tokens=None) -> (loss, metrics)``.
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
        ref_hidden: Optional[Tensor] = None,
        ref_weight: Optional[Tensor] = None,
        ref_bias: Optional[Tensor] = None,
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
            ref_hidden=ref_hidden,
            ref_weight=ref_weight,
            ref_bias=ref_bias,
            temperature=self.temperature,
            logit_scale=self.logit_scale,
            softcap=self.softcap,
            is_weights=is_weights,
            global_num_tokens=global_num_tokens,
            chunk_size=self.chunk_size,
            backend=self.backend,
            vocab_parallel=self._vocab_parallel(),
        )
