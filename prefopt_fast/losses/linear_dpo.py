"""Pairwise preference losses straight from hidden states and the lm_head (fused-linear).

The twins of :func:`prefopt_fast.logits_dpo_loss` and of the reference-free heads
(:func:`prefopt_fast.cpo_loss`, :func:`~prefopt_fast.simpo_loss`, :func:`~prefopt_fast.orpo_loss`),
with the logits replaced by ``hidden`` ``[2B, T, H]`` (or packed ``[tokens, H]``) and ``weight``
``[V, H]`` (plus ``bias``, ``lora``, ``logit_scale``, ``softcap``, ``chunk_size``): the summed
log-probs come from :func:`linear_pair_logprobs`, which never materializes the ``[tokens, V]``
logits; the loss heads are the same code as over per-sequence vectors.

Gradient plans (``plan=``). ``"recompute"``: the summed log-probs are an autograd output of
the fused op, whose backward recomputes the logits (4 GEMMs over the completion rows).
``"forward"``: every per-pair loss of the DPO family (and of CPO, SimPO, ORPO) depends on its
own pair only (a batch term such as the chosen NLL is linear in the log-probs), so the
pairs' rows are processed a chunk of whole pairs at a time: logits (GEMM 1), the pairs'
log-probs, dL/dlogp of their rows (the gradient of the batch head over the ``[B]`` vectors
known so far), the logits turned into dL/dz in place, then the gradients of hidden and
weight (GEMMs 2, 3); the backward only scales them (3 GEMMs, no stored logits; the buffer
holds at least one pair's logits, see
:func:`prefopt_fast.ops.linear_logprobs.linear_sequence_forward_grad`).
``"auto"`` takes ``"forward"`` whenever it applies: a gradient is asked for, one device (no
vocabulary-parallel / DTensor head), no ``softcap``, ``reduction`` ``"mean"`` or ``"sum"``,
no loss type coupling the pairs (``aot``, ``aot_unpaired``: batch sorts), no ``[B]`` input
(reference log-probs, ``pair_weights``, ``bco_delta``, ``nll_loss``) requiring grad, not
under torch.compile (its data-dependent chunks do not trace: compiled code keeps the
recompute plan), no ``bco_running_mean``, and (``"auto"`` only) no pair whose logits exceed
the larger of the chunk budget and 256 MiB (the buffer holds whole pairs: a long pair would
cost more memory than the plan saves time). ``"forward"`` where it does not apply is an
error naming the reason. The forward plan's backward runs once (no ``retain_graph`` second
pass) and is not differentiable again.
"""

import inspect
from typing import Dict, Optional, Tuple

import torch
from torch import Tensor, nn

from .. import _validate
from ..distributed import check_vocab_parallel_options, is_dtensor
from ..ops.linear_logprobs import (
    MAX_CHUNK_BYTES,
    check_linear_inputs,
    default_chunk_size,
    linear_sequence_forward_grad,
    linear_sequence_logprobs_and_lengths,
)
from ..ops.sequence_logprobs import check_sequence_labels, per_sequence_sums
from .dpo import DPOLoss, check_average, check_dpo_config, dpo_loss, dpo_loss_from_config
from .reference_free import (
    check_cpo_settings,
    check_orpo_settings,
    cpo_head,
    orpo_head,
)

__all__ = [
    "linear_pair_logprobs",
    "linear_dpo_loss",
    "LinearDPOLoss",
    "linear_cpo_loss",
    "LinearCPOLoss",
    "linear_simpo_loss",
    "LinearSimPOLoss",
    "linear_orpo_loss",
    "LinearORPOLoss",
]


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


# ------------------------------------------------------------------------- gradient plans

PLANS = ("auto", "recompute", "forward")
# loss types whose per-pair loss reads other pairs (sorts, batch totals)
_COUPLED_TYPES = ("aot", "aot_unpaired")


def check_plan(plan) -> str:
    if not isinstance(plan, str) or plan not in PLANS:
        raise ValueError(f"plan must be one of {list(PLANS)}; got {plan!r}")
    return plan


def _forward_plan_refusal(hidden, weight, bias, lora, labels, softcap, sharded, loss_types, reduction, vectors):
    """Why the forward-gradient plan cannot run this call, or None when it can (see the module docstring)."""
    if torch.compiler.is_compiling():
        return "under torch.compile (its data-dependent chunks do not trace)"
    lora_t = tuple(lora[:2]) if isinstance(lora, (tuple, list)) and len(lora) == 3 else ()
    params = tuple(x for x in (hidden, weight, bias, *lora_t) if isinstance(x, Tensor))
    if not torch.is_grad_enabled() or not any(x.requires_grad for x in params):
        return "without a gradient to compute"
    if sharded or any(is_dtensor(x) for x in params):
        return "a vocabulary-parallel or DTensor head (one device only)"
    if softcap is not None:
        return "softcap"
    if reduction not in ("mean", "sum"):
        return f"reduction={reduction!r} (the backward needs one scalar loss)"
    coupled = [t for t in loss_types if t in _COUPLED_TYPES]
    if coupled:
        return f"loss_type {coupled} (the loss of a pair reads the other pairs)"
    if any(isinstance(x, Tensor) and x.requires_grad for x in vectors):
        return "a [B] input (reference log-probs, pair_weights, bco_delta, nll_loss) requiring grad"
    if not isinstance(labels, Tensor) or labels.dim() > 2:
        return "labels that are not [2B, T] or packed [tokens]"
    return None


def _pair_size_refusal(hidden, weight, labels, bias, lora, cu_seqlens, ignore_index, chunk_size):
    """``"auto"`` only: why a pair is too large for the forward plan's buffer (one chunk holds
    whole pairs): its logits over the larger of the chunk budget and MAX_CHUNK_BYTES (256 MiB).
    Checks the policy's inputs first (the recompute plan's messages)."""
    _check_policy(hidden, weight, labels, bias, lora, ignore_index)
    counts = _sequence_counts(labels, ignore_index, check_sequence_labels(labels, cu_seqlens))
    if counts.shape[0] % 2 or not counts.shape[0]:
        return None  # reported by the plan itself
    B = counts.shape[0] // 2
    largest, M = int((counts[:B] + counts[B:]).max()), int(counts.sum())
    V, item = weight.shape[0], hidden.element_size()
    rows = chunk_size if chunk_size is not None else default_chunk_size(M, V, hidden.dtype)
    cap = max(rows * V * item, MAX_CHUNK_BYTES)
    if largest * V * item > cap:
        return (
            f"(auto) to a pair of {largest} completion tokens: its logits ({largest * V * item / 2**20:.0f} MiB) "
            f"exceed the buffer's cap ({cap / 2**20:.0f} MiB); plan='forward' takes it anyway"
        )
    return None


def _use_forward_plan(plan: str, refusal, size_refusal=None) -> bool:
    """Whether to run the forward plan; ``size_refusal``: a callable giving the pair-size refusal
    of ``"auto"`` (evaluated only when nothing else refuses)."""
    if plan == "recompute":
        return False
    if refusal is None:
        return plan == "forward" or size_refusal is None or size_refusal() is None
    if plan == "forward":
        raise ValueError(f"plan='forward' does not apply {refusal}; use plan='recompute' or plan='auto'")
    return False


class _PairHead:
    """The forward-gradient plan's head (see ``LinearForwardGradFunction``) over ``values`` [2B]
    = [chosen; rejected] (sums or means), groups = pairs. ``fn(chosen [B], rejected [B]) ->
    (loss 0-d, metrics)`` is the whole batch's head; the coefficients of a chunk's pairs are
    its gradient at the values known so far (the other pairs' entries are placeholders), exact
    when a pair's gradient does not read the other pairs' values: per-pair losses reduced by a
    mean or a sum, plus batch terms linear in the values with fixed weights (the chosen NLL
    over the batch's token count, which is known up front)."""

    def __init__(self, fn, B: int):
        self.fn, self.B = fn, B
        self.metrics = None

    def coefficients(self, groups, values):
        B = self.B
        with torch.enable_grad():
            v = values.detach().clone().requires_grad_(True)
            loss, _ = self.fn(v[:B], v[B:])
            (g,) = torch.autograd.grad(loss, v, allow_unused=True)
        coef = torch.zeros_like(values)
        if g is not None:
            idx = torch.cat([groups, groups + B])
            coef[idx] = g[idx].to(coef.dtype)
        return coef

    def loss(self, values):
        loss, self.metrics = self.fn(values[: self.B], values[self.B :])
        return loss


def _sequence_counts(labels, ignore_index, cu_seqlens):
    """int64 [S]: real labels per sequence of labels [S, T] (or packed with cu_seqlens)."""
    mask = labels != ignore_index
    return per_sequence_sums(mask.to(torch.float32), mask, cu_seqlens)[1]


def _check_policy(hidden, weight, labels, bias, lora, ignore_index) -> None:
    """The policy's inputs, checked before the reference pass reads them."""
    check_linear_inputs(hidden, weight, labels, bias, lora, _validate.check_int(ignore_index, "ignore_index"))


def _sequence_count(labels: Tensor, cu_seqlens) -> int:
    cu = check_sequence_labels(labels, cu_seqlens)
    return labels.shape[0] if cu is None else cu.numel() - 1


def _pair_groups(S: int, device) -> Tensor:
    """int64 [2B]: the pair of each sequence of the stacked [chosen; rejected] batch."""
    if S % 2:
        raise ValueError(
            "hidden must hold the stacked [chosen; rejected] batch: 2B sequences, padded [2B, T, H] or "
            f"packed with cu_seqlens of 2B + 1 entries; got {S} sequences"
        )
    return torch.arange(S, device=device) % (S // 2)


def _forward_plan_loss(hidden, weight, labels, *, bias, lora, cu_seqlens, opts, average, make_fn):
    """``(loss, metrics)`` of a pairwise head by the forward-gradient plan. ``make_fn(chosen_lengths,
    rejected_lengths)`` returns the batch head ``fn(chosen, rejected) -> (loss, metrics)``;
    ``opts``: ignore_index, temperature, logit_scale, chunk_size, backend."""
    _check_policy(hidden, weight, labels, bias, lora, opts["ignore_index"])
    cu = check_sequence_labels(labels, cu_seqlens)
    counts = _sequence_counts(labels, opts["ignore_index"], cu)
    groups = _pair_groups(counts.shape[0], labels.device)
    B = counts.shape[0] // 2
    head = _PairHead(make_fn(counts[:B], counts[B:]), B)
    with torch.no_grad():  # the head's inputs, checked before any GEMM
        head.loss(torch.zeros(2 * B, dtype=torch.float32, device=labels.device))
    loss, _, _ = linear_sequence_forward_grad(
        hidden, weight, labels, head, groups, bias=bias, lora=lora, cu_seqlens=cu, average=average, **opts
    )
    return loss, head.metrics


_DPO_SIGNATURE = inspect.signature(dpo_loss)


def _checked_reference(hidden, weight, labels, bias, lora, refs, kw):
    """The forward-gradient plan's preamble: the policy inputs checked, then the pairs' reference
    log-probs ``(chosen, rejected)`` from ``refs`` = (ref_hidden, ref_weight, ref_bias,
    ref_chosen_logps, ref_rejected_logps); ``kw``: the reference call's options."""
    _check_policy(hidden, weight, labels, bias, lora, kw["ignore_index"])
    B = _sequence_count(labels, kw["cu_seqlens"]) // 2
    return _reference_logps(labels, weight, B, *refs, kw)


def _dpo_forward_plan(
    hidden, weight, labels, *, bias, lora, ref, cu_seqlens, opts, average, dpo_kwargs, bco_delta=None, pair_weights=None
):
    """``(loss, metrics)`` of :func:`linear_dpo_loss` by the forward-gradient plan. ``ref``:
    (ref_chosen_logps, ref_rejected_logps) or (None, None); ``dpo_kwargs`` as dpo_loss takes
    them (a module passes its config as ``cfg`` there instead)."""
    chosen_lengths = rejected_lengths = None
    if "cfg" in dpo_kwargs:
        cfg = dpo_kwargs["cfg"]
    else:
        z = torch.zeros(0)
        args = _DPO_SIGNATURE.bind(z, z, **dpo_kwargs)
        args.apply_defaults()
        a = args.arguments
        cfg = check_dpo_config(
            a["beta"],
            a["loss_type"],
            a["loss_weights"],
            a["label_smoothing"],
            a["f_divergence"],
            a["f_alpha"],
            a["discopop_tau"],
            a["reduction"],
        )
        chosen_lengths, rejected_lengths = a["chosen_lengths"], a["rejected_lengths"]
        bco_delta, pair_weights = a["bco_delta"], a["pair_weights"]
    if isinstance(bco_delta, Tensor):
        bco_delta = bco_delta.detach()

    def make_fn(lc, lr):
        lc = lc if chosen_lengths is None else chosen_lengths
        lr = lr if rejected_lengths is None else rejected_lengths
        return lambda c, r: dpo_loss_from_config(cfg, c, r, ref[0], ref[1], lc, lr, bco_delta, pair_weights)

    return _forward_plan_loss(
        hidden,
        weight,
        labels,
        bias=bias,
        lora=lora,
        cu_seqlens=cu_seqlens,
        opts=opts,
        average=average,
        make_fn=make_fn,
    )


def _reference_logps(labels, weight, B, ref_hidden, ref_weight, ref_bias, ref_chosen_logps, ref_rejected_logps, kw):
    """(ref_chosen_logps, ref_rejected_logps): as given, or from the reference head under no_grad."""
    if ref_hidden is None and ref_weight is None and ref_bias is None:
        return ref_chosen_logps, ref_rejected_logps
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
    return ref_sums[:B], ref_sums[B:]


def linear_pair_logprobs(
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
    average: bool = False,
) -> Dict[str, Optional[Tensor]]:
    """Summed completion log-probs of the stacked [chosen; rejected] batch, split into the DPO inputs.

    As :func:`prefopt_fast.pair_logprobs` (a dict of ``[B]`` tensors: ``chosen_logps``,
    ``rejected_logps``, ``ref_chosen_logps``, ``ref_rejected_logps``, int64 ``chosen_lengths``,
    ``rejected_lengths``), from hidden states. The reference, when given as ``ref_hidden`` +
    ``ref_weight`` (+ ``ref_bias``), runs under ``no_grad`` with the same transform
    (temperature, logit_scale, softcap) and no LoRA. ``average=True``: per-length means, as
    ``linear_sequence_logprobs(average=True)``.
    """
    kw = dict(
        average=average,
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
    ref_chosen_logps, ref_rejected_logps = _reference_logps(
        labels, weight, B, ref_hidden, ref_weight, ref_bias, ref_chosen_logps, ref_rejected_logps, kw
    )
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
    average: bool = False,
    plan: str = "auto",
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
        average: per-length mean log-probs instead of sums (not with ``ipo``, ``sigmoid_norm``,
            ``sft``, which divide by the lengths themselves).
        plan: ``"auto"``, ``"recompute"`` or ``"forward"``: how the gradients are made (module docstring).
        dpo_kwargs: everything :func:`prefopt_fast.dpo_loss` takes (beta, loss_type, reduction, ...).

    Returns:
        ``(loss, metrics)`` as :func:`prefopt_fast.dpo_loss`.
    """
    plan = check_plan(plan)
    loss_type = dpo_kwargs.get("loss_type", "sigmoid")
    check_average(average, loss_type)
    sharded = process_group is not None or vocab_start is not None or vocab_size is not None
    vectors = (ref_chosen_logps, ref_rejected_logps, dpo_kwargs.get("pair_weights"), dpo_kwargs.get("bco_delta"))
    types = (loss_type,) if isinstance(loss_type, str) else tuple(loss_type) if isinstance(loss_type, list) else ()
    refusal = _forward_plan_refusal(
        hidden, weight, bias, lora, labels, softcap, sharded, types, dpo_kwargs.get("reduction", "mean"), vectors
    )
    if _use_forward_plan(
        plan,
        refusal,
        lambda: _pair_size_refusal(hidden, weight, labels, bias, lora, cu_seqlens, ignore_index, chunk_size),
    ):
        opts = dict(
            ignore_index=ignore_index,
            temperature=temperature,
            logit_scale=logit_scale,
            chunk_size=chunk_size,
            backend=backend,
        )
        ref = _checked_reference(
            hidden,
            weight,
            labels,
            bias,
            lora,
            (ref_hidden, ref_weight, ref_bias, ref_chosen_logps, ref_rejected_logps),
            dict(opts, softcap=softcap, cu_seqlens=cu_seqlens, average=average),
        )
        return _dpo_forward_plan(
            hidden,
            weight,
            labels,
            bias=bias,
            lora=lora,
            ref=ref,
            cu_seqlens=cu_seqlens,
            opts=opts,
            average=average,
            dpo_kwargs=dpo_kwargs,
        )
    logps = linear_pair_logprobs(
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
        average=average,
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
    -> (loss, metrics)``. ``plan``: the gradient plan, as in :func:`linear_dpo_loss`.
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
        average: bool = False,
        plan: str = "auto",
        **dpo_config,
    ):
        super().__init__(beta, loss_type, **dpo_config)
        self.plan = check_plan(plan)
        _set_linear_options(
            self,
            ignore_index,
            temperature,
            logit_scale,
            softcap,
            chunk_size,
            backend,
            process_group,
            vocab_start,
            vocab_size,
        )
        self.average = check_average(average, self._cfg.loss_types)

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
        cfg = self._cfg
        sharded = self.process_group is not None or self.vocab_start is not None or self.vocab_size is not None
        refusal = _forward_plan_refusal(
            hidden,
            weight,
            bias,
            lora,
            labels,
            self.softcap,
            sharded,
            cfg.loss_types,
            cfg.reduction,
            (ref_chosen_logps, ref_rejected_logps, pair_weights, self.bco_delta),
        )
        if refusal is None and self.bco_running_mean:
            refusal = "with bco_running_mean (the shift is the batch's mean reward)"
        size = (hidden, weight, labels, bias, lora, cu_seqlens, self.ignore_index, self.chunk_size)
        if _use_forward_plan(self.plan, refusal, lambda: _pair_size_refusal(*size)):
            opts = _linear_options(self)
            ref = _checked_reference(
                hidden,
                weight,
                labels,
                bias,
                lora,
                (ref_hidden, ref_weight, ref_bias, ref_chosen_logps, ref_rejected_logps),
                dict(opts, cu_seqlens=cu_seqlens, average=self.average),
            )
            for k in ("softcap", "process_group", "vocab_start", "vocab_size"):
                opts.pop(k)
            return _dpo_forward_plan(
                hidden,
                weight,
                labels,
                bias=bias,
                lora=lora,
                ref=ref,
                cu_seqlens=cu_seqlens,
                opts=opts,
                average=self.average,
                dpo_kwargs={"cfg": cfg},
                bco_delta=self.bco_delta,
                pair_weights=pair_weights,
            )
        logps = linear_pair_logprobs(
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
            cu_seqlens=cu_seqlens,
            average=self.average,
            **_linear_options(self),
        )
        return super().forward(**logps, pair_weights=pair_weights)


# ------------------------------------------------------------------ linear options of the modules


def _set_linear_options(
    m: nn.Module,
    ignore_index,
    temperature,
    logit_scale,
    softcap,
    chunk_size,
    backend,
    process_group,
    vocab_start,
    vocab_size,
) -> None:
    """Validate the fused-linear options once and keep them on the module ``m``."""
    m.ignore_index = _validate.check_int(ignore_index, "ignore_index")
    m.temperature = _validate.check_positive_float(temperature, "temperature")
    m.logit_scale, m.softcap = _validate.check_linear_scalars(logit_scale, softcap, chunk_size)
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a str; got {type(backend).__name__}")
    m.chunk_size = chunk_size
    m.backend = backend
    m.process_group, m.vocab_start, m.vocab_size = check_vocab_parallel_options(process_group, vocab_start, vocab_size)


def _linear_options(m: nn.Module) -> dict:
    """The keywords of :func:`linear_pair_logprobs` a module holds."""
    return dict(
        ignore_index=m.ignore_index,
        temperature=m.temperature,
        logit_scale=m.logit_scale,
        softcap=m.softcap,
        chunk_size=m.chunk_size,
        backend=m.backend,
        process_group=m.process_group,
        vocab_start=m.vocab_start,
        vocab_size=m.vocab_size,
    )


def _linear_repr(m: nn.Module) -> str:
    s = ""
    if m.temperature != 1.0:
        s += f", temperature={m.temperature}"
    if m.logit_scale != 1.0:
        s += f", logit_scale={m.logit_scale}"
    if m.softcap is not None:
        s += f", softcap={m.softcap}"
    return s


def _policy_logprobs(hidden, weight, labels, bias, lora, cu_seqlens, opts: dict) -> Dict[str, Optional[Tensor]]:
    """The reference-free heads' inputs: summed log-probs and lengths of the policy alone."""
    return linear_pair_logprobs(hidden, weight, labels, bias=bias, lora=lora, cu_seqlens=cu_seqlens, **opts)


def _reference_free(head, cfg, plan, hidden, weight, labels, bias, lora, cu_seqlens, opts, nll_loss):
    """``head(cfg, chosen, rejected, chosen_lengths, rejected_lengths, nll_loss)`` (CPO / ORPO) of
    the policy's summed log-probs, by the plan ``plan`` picks (module docstring)."""
    plan = check_plan(plan)
    sharded = any(opts.get(k) is not None for k in ("process_group", "vocab_start", "vocab_size"))
    types = (cfg.loss_type,) if hasattr(cfg, "loss_type") else ()
    refusal = _forward_plan_refusal(
        hidden, weight, bias, lora, labels, opts["softcap"], sharded, types, cfg.reduction, (nll_loss,)
    )
    size = (hidden, weight, labels, bias, lora, cu_seqlens, opts["ignore_index"], opts["chunk_size"])
    if _use_forward_plan(plan, refusal, lambda: _pair_size_refusal(*size)):
        fwd = {k: opts[k] for k in ("ignore_index", "temperature", "logit_scale", "chunk_size", "backend")}
        return _forward_plan_loss(
            hidden,
            weight,
            labels,
            bias=bias,
            lora=lora,
            cu_seqlens=cu_seqlens,
            opts=fwd,
            average=False,
            make_fn=lambda lc, lr: lambda c, r: head(cfg, c, r, lc, lr, nll_loss),
        )
    logps = _policy_logprobs(hidden, weight, labels, bias, lora, cu_seqlens, opts)
    return head(
        cfg,
        logps["chosen_logps"],
        logps["rejected_logps"],
        logps["chosen_lengths"],
        logps["rejected_lengths"],
        nll_loss,
    )


# ------------------------------------------------------------------------------------- CPO


def linear_cpo_loss(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    *,
    bias: Optional[Tensor] = None,
    lora=None,
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
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    cpo_alpha: float = 1.0,
    simpo_gamma: float = 0.5,
    alpha: float = 0.0,
    nll_loss: Optional[Tensor] = None,
    reduction: str = "mean",
    plan: str = "auto",
) -> Tuple[Tensor, Dict[str, Tensor]]:
    """:func:`prefopt_fast.cpo_loss` from the policy's hidden states of the stacked batch and its lm_head.

    ``hidden`` ``[2B, T, H]`` (rows 0..B-1 chosen, B..2B-1 rejected) or packed ``[tokens, H]``
    with ``cu_seqlens`` of ``2B + 1`` entries; the other tensor and linear options as in
    :func:`linear_dpo_loss`; the hyper-parameters (``beta`` ... ``reduction``) and the result
    as :func:`prefopt_fast.cpo_loss`, over the summed completion log-probs and their lengths.
    """
    cfg = check_cpo_settings(beta, loss_type, label_smoothing, cpo_alpha, simpo_gamma, alpha, reduction)
    opts = dict(
        ignore_index=ignore_index,
        temperature=temperature,
        logit_scale=logit_scale,
        softcap=softcap,
        chunk_size=chunk_size,
        backend=backend,
        process_group=process_group,
        vocab_start=vocab_start,
        vocab_size=vocab_size,
    )
    return _reference_free(cpo_head, cfg, plan, hidden, weight, labels, bias, lora, cu_seqlens, opts, nll_loss)


class LinearCPOLoss(nn.Module):
    """Config-only module around :func:`linear_cpo_loss` (every configuration keyword, same defaults).

    ``forward(hidden, weight, labels, *, bias=None, lora=None, cu_seqlens=None, nll_loss=None)
    -> (loss, metrics)``.
    """

    def __init__(
        self,
        beta: float = 0.1,
        loss_type: str = "sigmoid",
        *,
        label_smoothing: float = 0.0,
        cpo_alpha: float = 1.0,
        simpo_gamma: float = 0.5,
        alpha: float = 0.0,
        reduction: str = "mean",
        ignore_index: int = -100,
        temperature: float = 1.0,
        logit_scale: float = 1.0,
        softcap: Optional[float] = None,
        chunk_size: Optional[int] = None,
        backend: str = "auto",
        process_group=None,
        vocab_start: Optional[int] = None,
        vocab_size: Optional[int] = None,
        plan: str = "auto",
    ):
        super().__init__()
        self.plan = check_plan(plan)
        self._cfg = check_cpo_settings(beta, loss_type, label_smoothing, cpo_alpha, simpo_gamma, alpha, reduction)
        _set_linear_options(
            self,
            ignore_index,
            temperature,
            logit_scale,
            softcap,
            chunk_size,
            backend,
            process_group,
            vocab_start,
            vocab_size,
        )

    # read-only views of the validated config: build a new module to change it
    beta = property(lambda self: self._cfg.beta)
    loss_type = property(lambda self: self._cfg.loss_type)
    label_smoothing = property(lambda self: self._cfg.label_smoothing)
    cpo_alpha = property(lambda self: self._cfg.cpo_alpha)
    simpo_gamma = property(lambda self: self._cfg.simpo_gamma)
    alpha = property(lambda self: self._cfg.alpha)
    reduction = property(lambda self: self._cfg.reduction)

    def extra_repr(self) -> str:
        c = self._cfg
        s = f"beta={c.beta}, loss_type={c.loss_type!r}, cpo_alpha={c.cpo_alpha}"
        if c.loss_type == "simpo":
            s += f", simpo_gamma={c.simpo_gamma}"
        if c.label_smoothing:
            s += f", label_smoothing={c.label_smoothing}"
        if c.alpha:
            s += f", alpha={c.alpha}"
        if c.reduction != "mean":
            s += f", reduction={c.reduction!r}"
        return s + _linear_repr(self)

    def forward(
        self,
        hidden: Tensor,
        weight: Tensor,
        labels: Tensor,
        *,
        bias: Optional[Tensor] = None,
        lora=None,
        cu_seqlens: Optional[Tensor] = None,
        nll_loss: Optional[Tensor] = None,
    ):
        return _reference_free(
            cpo_head,
            self._cfg,
            self.plan,
            hidden,
            weight,
            labels,
            bias,
            lora,
            cu_seqlens,
            _linear_options(self),
            nll_loss,
        )


# ----------------------------------------------------------------------------------- SimPO


def linear_simpo_loss(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    *,
    bias: Optional[Tensor] = None,
    lora=None,
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
    beta: float = 0.1,
    simpo_gamma: float = 0.5,
    label_smoothing: float = 0.0,
    cpo_alpha: float = 1.0,
    alpha: float = 0.0,
    nll_loss: Optional[Tensor] = None,
    reduction: str = "mean",
    plan: str = "auto",
) -> Tuple[Tensor, Dict[str, Tensor]]:
    """:func:`prefopt_fast.simpo_loss` from hidden states and the lm_head (``linear_cpo_loss(...,
    loss_type="simpo")``); the inputs as :func:`linear_cpo_loss`. Pure SimPO is ``cpo_alpha=0.0``.
    """
    cfg = check_cpo_settings(beta, "simpo", label_smoothing, cpo_alpha, simpo_gamma, alpha, reduction)
    opts = dict(
        ignore_index=ignore_index,
        temperature=temperature,
        logit_scale=logit_scale,
        softcap=softcap,
        chunk_size=chunk_size,
        backend=backend,
        process_group=process_group,
        vocab_start=vocab_start,
        vocab_size=vocab_size,
    )
    return _reference_free(cpo_head, cfg, plan, hidden, weight, labels, bias, lora, cu_seqlens, opts, nll_loss)


class LinearSimPOLoss(LinearCPOLoss):
    """Config-only module around :func:`linear_simpo_loss` (every configuration keyword, same defaults).

    ``forward(hidden, weight, labels, *, bias=None, lora=None, cu_seqlens=None, nll_loss=None)
    -> (loss, metrics)``.
    """

    def __init__(
        self,
        beta: float = 0.1,
        simpo_gamma: float = 0.5,
        *,
        label_smoothing: float = 0.0,
        cpo_alpha: float = 1.0,
        alpha: float = 0.0,
        reduction: str = "mean",
        ignore_index: int = -100,
        temperature: float = 1.0,
        logit_scale: float = 1.0,
        softcap: Optional[float] = None,
        chunk_size: Optional[int] = None,
        backend: str = "auto",
        process_group=None,
        vocab_start: Optional[int] = None,
        vocab_size: Optional[int] = None,
        plan: str = "auto",
    ):
        nn.Module.__init__(self)
        self.plan = check_plan(plan)
        self._cfg = check_cpo_settings(beta, "simpo", label_smoothing, cpo_alpha, simpo_gamma, alpha, reduction)
        _set_linear_options(
            self,
            ignore_index,
            temperature,
            logit_scale,
            softcap,
            chunk_size,
            backend,
            process_group,
            vocab_start,
            vocab_size,
        )


# ------------------------------------------------------------------------------------ ORPO


def linear_orpo_loss(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    *,
    bias: Optional[Tensor] = None,
    lora=None,
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
    beta: float = 0.1,
    nll_loss: Optional[Tensor] = None,
    reduction: str = "mean",
    plan: str = "auto",
) -> Tuple[Tensor, Dict[str, Tensor]]:
    """:func:`prefopt_fast.orpo_loss` from hidden states and the lm_head; the inputs as
    :func:`linear_cpo_loss`, ``beta``, ``nll_loss``, ``reduction`` and the result as
    :func:`prefopt_fast.orpo_loss`.
    """
    cfg = check_orpo_settings(beta, reduction)
    opts = dict(
        ignore_index=ignore_index,
        temperature=temperature,
        logit_scale=logit_scale,
        softcap=softcap,
        chunk_size=chunk_size,
        backend=backend,
        process_group=process_group,
        vocab_start=vocab_start,
        vocab_size=vocab_size,
    )
    return _reference_free(orpo_head, cfg, plan, hidden, weight, labels, bias, lora, cu_seqlens, opts, nll_loss)


class LinearORPOLoss(nn.Module):
    """Config-only module around :func:`linear_orpo_loss` (every configuration keyword, same defaults).

    ``forward(hidden, weight, labels, *, bias=None, lora=None, cu_seqlens=None, nll_loss=None)
    -> (loss, metrics)``.
    """

    def __init__(
        self,
        beta: float = 0.1,
        *,
        reduction: str = "mean",
        ignore_index: int = -100,
        temperature: float = 1.0,
        logit_scale: float = 1.0,
        softcap: Optional[float] = None,
        chunk_size: Optional[int] = None,
        backend: str = "auto",
        process_group=None,
        vocab_start: Optional[int] = None,
        vocab_size: Optional[int] = None,
        plan: str = "auto",
    ):
        super().__init__()
        self.plan = check_plan(plan)
        self._cfg = check_orpo_settings(beta, reduction)
        _set_linear_options(
            self,
            ignore_index,
            temperature,
            logit_scale,
            softcap,
            chunk_size,
            backend,
            process_group,
            vocab_start,
            vocab_size,
        )

    beta = property(lambda self: self._cfg.beta)
    reduction = property(lambda self: self._cfg.reduction)

    def extra_repr(self) -> str:
        s = f"beta={self.beta}"
        if self.reduction != "mean":
            s += f", reduction={self.reduction!r}"
        return s + _linear_repr(self)

    def forward(
        self,
        hidden: Tensor,
        weight: Tensor,
        labels: Tensor,
        *,
        bias: Optional[Tensor] = None,
        lora=None,
        cu_seqlens: Optional[Tensor] = None,
        nll_loss: Optional[Tensor] = None,
    ):
        return _reference_free(
            orpo_head,
            self._cfg,
            self.plan,
            hidden,
            weight,
            labels,
            bias,
            lora,
            cu_seqlens,
            _linear_options(self),
            nll_loss,
        )
