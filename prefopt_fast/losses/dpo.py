"""DPO-family loss heads on per-sequence log-probs, with the semantics of TRL 1.16's DPOTrainer.

Inputs are per-sequence vectors ``[B]``: ``chosen_logps[b]`` is the SUM of the policy's
log-probs over the completion tokens of the chosen answer of pair ``b`` (the prompt is
masked out), likewise for rejected and for the reference model. Only ``ipo``,
``sigmoid_norm`` (and ``sft``) need the completion lengths, ``[B]`` int or float tensors
counting the completion tokens; they are clamped at 1 so an empty completion divides by 1.

Notation used in the docstrings below, per pair:
    r_w = chosen_logps - ref_chosen_logps,  r_l = rejected_logps - ref_rejected_logps
    s_w = f'(r_w), s_l = f'(r_l)  (the f-divergence score; s = r for reverse_kl, the default)
    h   = beta * (s_w - s_l),  eps = label_smoothing
The loss is ``sum_k loss_weights[k] * mean_b(loss_k[b] * pair_weights[b])`` (``reduction="mean"``;
``"sum"`` sums over b instead, ``"none"`` returns the per-pair ``sum_k loss_weights[k] * loss_k[b]
* pair_weights[b]``, ``[B]``).

Everything is computed in fp32 (fp64 if an input is fp64) whatever the input dtype; the
heads work on [B] vectors so the upcast costs nothing. Gradients flow to every tensor that
requires them, the reference log-probs included (pass them detached, as a reference model
under ``no_grad`` produces them).
"""

import math
import warnings
from typing import Callable, Dict, NamedTuple, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._validate import check_bool, check_choice
from ._common import (
    LN2,
    check_real,
    check_reduction,
    check_vector,
    clamped_lengths,
    loss_dtype,
    reduce,
    reward_metrics,
)

__all__ = ["dpo_loss", "DPOLoss", "DPO_LOSS_TYPES", "F_DIVERGENCES", "F_DIVERGENCE_LOSS_TYPES"]

F_DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")

# The f-DPO reparameterization leaves a beta * log Z(x) term that cancels only in the
# chosen - rejected score difference, so only the losses built on that difference
# generalize to the other f-divergences (TRL rejects the rest, and so do we).
F_DIVERGENCE_LOSS_TYPES = frozenset(
    {"sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust", "discopop", "sft"}
)

# Valid label_smoothing per loss type that uses it: (lo, hi, lo_open, hi_open, why).
_LABEL_SMOOTHING_RANGES = {
    # divides by 1 - 2 eps; eps is a flip probability, below 1/2 for the labels to mean anything
    "robust": (0.0, 0.5, False, True, " for loss_type 'robust' (the probability that a label is flipped)"),
    # log(eps) and log(1 - eps) are both taken
    "exo_pair": (0.0, 1.0, True, True, " for loss_type 'exo_pair' (EXO's epsilon; the paper suggests 1e-3)"),
    # a convex mix of the two label directions
    "aot": (0.0, 1.0, False, False, " for loss_type 'aot'"),
    "aot_unpaired": (0.0, 1.0, False, False, " for loss_type 'aot_unpaired'"),
}

_NEEDS_LENGTHS = {"ipo": "both", "sigmoid_norm": "both", "sft": "chosen"}


class _Pair(NamedTuple):
    """Per-pair quantities shared by the loss-type functions (all ``[B]``, compute dtype)."""

    chosen_logps: Tensor
    rejected_logps: Tensor
    ref_chosen_logps: Tensor
    ref_rejected_logps: Tensor
    chosen_logratios: Tensor  # r_w
    rejected_logratios: Tensor  # r_l
    chosen_scores: Tensor  # s_w
    rejected_scores: Tensor  # s_l
    chosen_lengths: Optional[Tensor]  # raw [B] lengths (int or float), or None
    rejected_lengths: Optional[Tensor]
    beta: float
    label_smoothing: float
    discopop_tau: float
    bco_delta: Union[float, Tensor]


def _smoothed_logistic(x: Tensor, eps: float) -> Tensor:
    """(1 - eps) * -log sigmoid(x) + eps * -log sigmoid(-x)."""
    return -(1.0 - eps) * F.logsigmoid(x) - eps * F.logsigmoid(-x)


def _h(p: _Pair) -> Tensor:
    return p.beta * (p.chosen_scores - p.rejected_scores)


def _normalized_delta(p: _Pair) -> Tensor:
    """s_w / max(L_w, 1) - s_l / max(L_l, 1): the per-token score difference."""
    dt = p.chosen_scores.dtype
    return p.chosen_scores / clamped_lengths(p.chosen_lengths, dt) - p.rejected_scores / clamped_lengths(
        p.rejected_lengths, dt
    )


def _sigmoid(p: _Pair) -> Tensor:
    """-log sigmoid(h). label_smoothing is ignored (as in TRL 1.16; 'robust' is cDPO)."""
    return -F.logsigmoid(_h(p))


def _hinge(p: _Pair) -> Tensor:
    """relu(1 - h) (SLiC)."""
    return torch.relu(1.0 - _h(p))


def _ipo(p: _Pair) -> Tensor:
    """(s_w / L_w - s_l / L_l - 1 / (2 beta))^2: IPO on per-token (length-normalized) scores."""
    return (_normalized_delta(p) - 0.5 / p.beta) ** 2


def _exo_pair(p: _Pair) -> Tensor:
    """KL(q || [1 - eps, eps]) with q = [sigmoid(h), sigmoid(-h)] (EXO-pref, K = 2)."""
    h, eps = _h(p), p.label_smoothing
    log_qw, log_ql = F.logsigmoid(h), F.logsigmoid(-h)
    return torch.exp(log_qw) * (log_qw - math.log1p(-eps)) + torch.exp(log_ql) * (log_ql - math.log(eps))


def _nca_pair(p: _Pair) -> Tensor:
    """-log sigmoid(beta r_w) - 1/2 log sigmoid(-beta r_w) - 1/2 log sigmoid(-beta r_l) (NCA)."""
    cw, cl = p.beta * p.chosen_logratios, p.beta * p.rejected_logratios
    return -F.logsigmoid(cw) - 0.5 * F.logsigmoid(-cw) - 0.5 * F.logsigmoid(-cl)


def _robust(p: _Pair) -> Tensor:
    """((1 - eps)(-log sigmoid(h)) + eps log sigmoid(-h)) / (1 - 2 eps): unbiased under label flips."""
    h, eps = _h(p), p.label_smoothing
    return (-(1.0 - eps) * F.logsigmoid(h) + eps * F.logsigmoid(-h)) / (1.0 - 2.0 * eps)


def _bco_pair(p: _Pair) -> Tensor:
    """-log sigmoid(beta r_w - delta) - log sigmoid(-(beta r_l - delta)); delta = bco_delta (0 in TRL 1.16)."""
    cw = p.beta * p.chosen_logratios - p.bco_delta
    cl = p.beta * p.rejected_logratios - p.bco_delta
    return -F.logsigmoid(cw) - F.logsigmoid(-cl)


def _sppo_hard(p: _Pair) -> Tensor:
    """(r_w - 1/(2 beta))^2 + (r_l + 1/(2 beta))^2 (SPPO with hard win probabilities 1 / 0)."""
    half = 0.5 / p.beta
    return (p.chosen_logratios - half) ** 2 + (p.rejected_logratios + half) ** 2


def _aot(p: _Pair) -> Tensor:
    """Smoothed logistic of beta (sort(policy margins) - sort(reference margins)), paired AOT.

    Sorting couples the pairs of the batch: the per-pair loss is not that pair's alone.
    """
    policy = torch.sort(p.chosen_logps - p.rejected_logps, dim=0).values
    ref = torch.sort(p.ref_chosen_logps - p.ref_rejected_logps, dim=0).values
    return _smoothed_logistic(p.beta * (policy - ref), p.label_smoothing)


def _aot_unpaired(p: _Pair) -> Tensor:
    """Smoothed logistic of beta (sort(r_w) - sort(r_l)), unpaired AOT."""
    w = torch.sort(p.chosen_logratios, dim=0).values
    l = torch.sort(p.rejected_logratios, dim=0).values
    return _smoothed_logistic(p.beta * (w - l), p.label_smoothing)


def _apo_zero(p: _Pair) -> Tensor:
    """1 - sigmoid(beta r_w) + sigmoid(beta r_l) (APO-zero: raise chosen, lower rejected)."""
    return 1.0 - torch.sigmoid(p.beta * p.chosen_logratios) + torch.sigmoid(p.beta * p.rejected_logratios)


def _apo_down(p: _Pair) -> Tensor:
    """sigmoid(beta r_w) + 1 - sigmoid(beta (r_w - r_l)) (APO-down: lower both, rejected more)."""
    return (
        torch.sigmoid(p.beta * p.chosen_logratios)
        + 1.0
        - torch.sigmoid(p.beta * (p.chosen_logratios - p.rejected_logratios))
    )


def _discopop(p: _Pair) -> Tensor:
    """(1 - m)(-log sigmoid(h)) + m exp(-h), m = sigmoid(h / tau) (DiscoPOP's log-ratio modulated loss).

    m exp(-h) is evaluated as exp(log sigmoid(h / tau) - h): equal, but finite where the
    plain product is inf * 0 (h below about -88 in fp32).
    """
    h, tau = _h(p), p.discopop_tau
    log_m = F.logsigmoid(h / tau)
    return -F.logsigmoid(h) * (1.0 - torch.exp(log_m)) + torch.exp(log_m - h)


def _sft(p: _Pair) -> Tensor:
    """-(sum of chosen completion log-probs) / (number of chosen completion tokens), over the batch.

    The token-level mean NLL of the chosen completions (one scalar, broadcast to [B]);
    a batch without any chosen completion token gives 0 (TRL: NaN).
    """
    total = p.chosen_lengths.to(p.chosen_logps.dtype).sum().clamp(min=1.0)
    return (-p.chosen_logps.sum() / total).expand(p.chosen_logps.shape[0])


def _sigmoid_norm(p: _Pair) -> Tensor:
    """-log sigmoid(beta (s_w / L_w - s_l / L_l)): sigmoid on per-token (length-normalized) scores."""
    return -F.logsigmoid(p.beta * _normalized_delta(p))


_LOSSES: Dict[str, Callable[[_Pair], Tensor]] = {
    "sigmoid": _sigmoid,
    "hinge": _hinge,
    "ipo": _ipo,
    "exo_pair": _exo_pair,
    "nca_pair": _nca_pair,
    "robust": _robust,
    "bco_pair": _bco_pair,
    "sppo_hard": _sppo_hard,
    "aot": _aot,
    "aot_unpaired": _aot_unpaired,
    "apo_zero": _apo_zero,
    "apo_down": _apo_down,
    "discopop": _discopop,
    "sft": _sft,
    "sigmoid_norm": _sigmoid_norm,
}

DPO_LOSS_TYPES = tuple(_LOSSES)


def _f_scores(logratios: Tensor, f_divergence: str, f_alpha: float) -> Tensor:
    """f'(t) at t = pi / pi_ref = exp(logratio): the policy's implicit reward under the f-divergence."""
    if f_divergence == "reverse_kl":  # f'(t) = log t (+ 1, which cancels)
        return logratios
    if f_divergence == "forward_kl":  # f'(t) = 1 - 1/t
        return -torch.expm1(-logratios)
    if f_divergence == "js_divergence":  # f'(t) = log(2t / (1 + t))
        return LN2 + F.logsigmoid(logratios)
    # alpha_divergence: f'(t) = (t^(alpha - 1) - 1) / (alpha - 1), log t in the limit alpha -> 1
    if abs(f_alpha - 1.0) < 1e-6:
        return logratios
    a = f_alpha - 1.0
    # TRL clamps the exponent at 80 (exp stays finite in fp32); the clamp also zeroes the
    # gradient beyond it, so we keep it for parity.
    return torch.expm1(torch.clamp(a * logratios, max=80.0)) / a


class _Config(NamedTuple):
    loss_types: Tuple[str, ...]
    loss_weights: Tuple[float, ...]
    beta: float
    label_smoothing: float
    f_divergence: str
    f_alpha: float
    discopop_tau: float
    reduction: str


def check_dpo_config(
    beta, loss_type, loss_weights, label_smoothing, f_divergence, f_alpha, discopop_tau, reduction
) -> _Config:
    """Validate the hyper-parameters of the DPO family (no tensors involved)."""
    if isinstance(loss_type, str):
        types = (loss_type,)
    elif isinstance(loss_type, (list, tuple)) and all(isinstance(t, str) for t in loss_type):
        types = tuple(loss_type)
    else:
        raise TypeError(f"loss_type must be a str or a list of str; got {loss_type!r}")
    if not types:
        raise ValueError(f"loss_type must name at least one loss; valid: {list(DPO_LOSS_TYPES)}")
    for t in types:
        if t not in _LOSSES:
            raise ValueError(f"loss_type: unknown loss type {t!r}; valid: {list(DPO_LOSS_TYPES)}")

    if loss_weights is None:
        weights = (1.0,) * len(types)
    else:
        if not isinstance(loss_weights, (list, tuple)):
            raise TypeError(f"loss_weights must be a list of floats (one per loss_type); got {loss_weights!r}")
        if len(loss_weights) != len(types):
            raise ValueError(
                f"loss_weights must have one weight per loss_type: got {len(loss_weights)} weights "
                f"for {len(types)} loss types {list(types)}"
            )
        weights = tuple(check_real(w, f"loss_weights[{i}]") for i, w in enumerate(loss_weights))

    beta = check_real(beta, "beta", lo=0.0, lo_open=True)

    label_smoothing = check_real(label_smoothing, "label_smoothing", lo=0.0, hi=1.0)
    users = [t for t in types if t in _LABEL_SMOOTHING_RANGES]
    for t in users:
        lo, hi, lo_open, hi_open, why = _LABEL_SMOOTHING_RANGES[t]
        check_real(label_smoothing, "label_smoothing", lo=lo, hi=hi, lo_open=lo_open, hi_open=hi_open, why=why)
    if label_smoothing != 0.0 and not users:
        warnings.warn(
            f"label_smoothing={label_smoothing} has no effect on loss_type {list(types)}: only "
            f"{sorted(_LABEL_SMOOTHING_RANGES)} use it (in TRL 1.16 'sigmoid' ignores it; 'robust' is "
            "the label-noise-robust sigmoid).",
            UserWarning,
            stacklevel=3,
        )

    check_choice(f_divergence, F_DIVERGENCES, "f_divergence")
    if f_divergence != "reverse_kl":
        bad = [t for t in types if t not in F_DIVERGENCE_LOSS_TYPES]
        if bad:
            raise ValueError(
                f"f_divergence={f_divergence!r} is only defined for loss types {sorted(F_DIVERGENCE_LOSS_TYPES)}; "
                f"got loss_type {bad} (use f_divergence='reverse_kl' with them)"
            )
    f_alpha = check_real(f_alpha, "f_alpha")
    discopop_tau = check_real(discopop_tau, "discopop_tau", lo=0.0, lo_open=True)
    reduction = check_reduction(reduction)
    return _Config(types, weights, beta, label_smoothing, f_divergence, f_alpha, discopop_tau, reduction)


def check_average(average, loss_type) -> bool:
    """``average`` (per-length mean sequence log-probs) for the DPO losses that compute the
    log-probs themselves: refused with the loss types that divide by the lengths on their own.
    ``loss_type`` as the caller gave it (a bad one is left to :func:`dpo_loss` to report)."""
    check_bool(average, "average")
    types = (loss_type,) if isinstance(loss_type, str) else loss_type if isinstance(loss_type, (list, tuple)) else ()
    own = [t for t in types if t in _NEEDS_LENGTHS]
    if average and own:
        raise ValueError(
            f"average=True is only valid with loss types that take the summed log-probs: {own} divide by "
            "the completion lengths themselves (use average=False with them)"
        )
    return average


def dpo_loss(
    chosen_logps: Tensor,
    rejected_logps: Tensor,
    ref_chosen_logps: Optional[Tensor] = None,
    ref_rejected_logps: Optional[Tensor] = None,
    *,
    beta: float = 0.1,
    loss_type: Union[str, Sequence[str]] = "sigmoid",
    loss_weights: Optional[Sequence[float]] = None,
    label_smoothing: float = 0.0,
    chosen_lengths: Optional[Tensor] = None,
    rejected_lengths: Optional[Tensor] = None,
    f_divergence: str = "reverse_kl",
    f_alpha: float = 0.5,
    discopop_tau: float = 0.05,
    bco_delta: Optional[Union[float, Tensor]] = None,
    pair_weights: Optional[Tensor] = None,
    reduction: str = "mean",
) -> Tuple[Tensor, Dict[str, Tensor]]:
    """DPO-family loss of TRL 1.16's ``DPOTrainer`` from per-sequence log-probs.

    Args:
        chosen_logps, rejected_logps: float ``[B]``, policy log-probs summed over each
            completion (e.g. ``sequence_logprobs(...)`` of the [chosen; rejected] batch, split).
        ref_chosen_logps, ref_rejected_logps: float ``[B]`` of the reference model, or both
            ``None`` for reference-free training (the reference log-probs are then 0).
        beta: > 0. For ``ipo`` it is IPO's tau.
        loss_type: one of ``DPO_LOSS_TYPES`` or a list of them, combined as
            ``sum_k loss_weights[k] * loss_k`` (``loss_weights`` defaults to all 1).
        label_smoothing: used by ``robust`` ([0, 0.5)), ``exo_pair`` ((0, 1)), ``aot`` and
            ``aot_unpaired`` ([0, 1]); ignored, with a warning if non-zero, by the others
            (``sigmoid`` included, as in TRL 1.16).
        chosen_lengths, rejected_lengths: int or float ``[B]`` completion token counts; required
            by ``ipo`` and ``sigmoid_norm`` (both) and ``sft`` (chosen only).
        f_divergence: ``reverse_kl`` (standard DPO), ``forward_kl``, ``js_divergence`` or
            ``alpha_divergence`` (with ``f_alpha``; TRL's default 0.5); non-default values only
            for the loss types in ``F_DIVERGENCE_LOSS_TYPES``.
        discopop_tau: > 0, DiscoPOP's temperature.
        bco_delta: float or 0-d tensor, the reward shift of ``bco_pair`` (default 0, which is
            TRL 1.16's ``bco_pair``). The BCO paper uses a running mean of the rewards
            ``beta * r``; ``DPOLoss(bco_running_mean=True)`` keeps one.
        pair_weights: optional float ``[B]`` multiplying each pair's loss before the mean
            (TRL's ``use_weighting``: WPO weights, computed by the caller and usually detached).
            Not allowed with ``aot`` / ``aot_unpaired``, whose sorting breaks the pairing.
        reduction: ``"mean"`` (TRL's), ``"sum"``, or ``"none"`` for the per-pair losses ``[B]``
            (``sft`` adds its batch NLL to every pair; ``aot*`` pair sorted margins, not inputs).

    Returns:
        ``(loss, metrics)``: a loss tensor, 0-d (``[B]`` with ``reduction="none"``; fp32, fp64
        for fp64 inputs) and a dict of
        detached 0-d tensors named as TRL logs them: ``rewards/chosen`` = mean(beta r_w),
        ``rewards/rejected`` = mean(beta r_l), ``rewards/accuracies`` = mean(beta r_w > beta r_l)
        (strict), ``rewards/margins`` = mean(beta (r_w - r_l)), ``logps/chosen``,
        ``logps/rejected`` (batch means of the policy log-probs). The rewards use the plain
        log-ratios r, whatever the f-divergence.
    """
    cfg = check_dpo_config(
        beta, loss_type, loss_weights, label_smoothing, f_divergence, f_alpha, discopop_tau, reduction
    )
    return dpo_loss_from_config(
        cfg,
        chosen_logps,
        rejected_logps,
        ref_chosen_logps,
        ref_rejected_logps,
        chosen_lengths,
        rejected_lengths,
        bco_delta,
        pair_weights,
    )


def dpo_loss_from_config(
    cfg: _Config,
    chosen_logps,
    rejected_logps,
    ref_chosen_logps,
    ref_rejected_logps,
    chosen_lengths,
    rejected_lengths,
    bco_delta,
    pair_weights,
) -> Tuple[Tensor, Dict[str, Tensor]]:
    """dpo_loss with validated hyper-parameters ``cfg``: checks the tensors, then computes."""
    chosen_logps = check_vector(chosen_logps, "chosen_logps")
    rejected_logps = check_vector(rejected_logps, "rejected_logps", like=chosen_logps, like_name="chosen_logps")
    if (ref_chosen_logps is None) != (ref_rejected_logps is None):
        raise ValueError(
            "ref_chosen_logps and ref_rejected_logps must be given together, or both None for reference-free "
            f"training; got ref_chosen_logps {'None' if ref_chosen_logps is None else 'a tensor'} and "
            f"ref_rejected_logps {'None' if ref_rejected_logps is None else 'a tensor'}"
        )
    if ref_chosen_logps is not None:
        ref_chosen_logps = check_vector(
            ref_chosen_logps, "ref_chosen_logps", like=chosen_logps, like_name="chosen_logps"
        )
        ref_rejected_logps = check_vector(
            ref_rejected_logps, "ref_rejected_logps", like=chosen_logps, like_name="chosen_logps"
        )

    for t in cfg.loss_types:
        need = _NEEDS_LENGTHS.get(t)
        if need is None:
            continue
        if chosen_lengths is None:
            raise ValueError(f"chosen_lengths is required by loss_type {t!r} (completion token counts, [B])")
        if need == "both" and rejected_lengths is None:
            raise ValueError(f"rejected_lengths is required by loss_type {t!r} (completion token counts, [B])")
    if chosen_lengths is not None:
        chosen_lengths = check_vector(
            chosen_lengths, "chosen_lengths", like=chosen_logps, like_name="chosen_logps", allow_int=True
        )
    if rejected_lengths is not None:
        rejected_lengths = check_vector(
            rejected_lengths, "rejected_lengths", like=chosen_logps, like_name="chosen_logps", allow_int=True
        )

    if bco_delta is None:
        bco_delta = 0.0
    elif "bco_pair" not in cfg.loss_types:
        raise ValueError(f"bco_delta is only used by loss_type 'bco_pair'; got loss_type {list(cfg.loss_types)}")
    elif isinstance(bco_delta, Tensor):
        if not bco_delta.dtype.is_floating_point:
            raise TypeError(f"bco_delta must be a float or a one-element float tensor; got {bco_delta.dtype}")
        if bco_delta.numel() != 1:
            raise ValueError(
                f"bco_delta must be a float or a one-element float tensor; got shape {tuple(bco_delta.shape)}"
            )
        if bco_delta.device != chosen_logps.device:
            raise ValueError(
                f"bco_delta must be on the device of chosen_logps ({chosen_logps.device}); got {bco_delta.device}"
            )
        bco_delta = bco_delta.reshape(())
    else:
        bco_delta = check_real(bco_delta, "bco_delta")

    if pair_weights is not None:
        pair_weights = check_vector(pair_weights, "pair_weights", like=chosen_logps, like_name="chosen_logps")
        sorted_types = [t for t in cfg.loss_types if t in ("aot", "aot_unpaired")]
        if sorted_types:
            raise ValueError(
                f"pair_weights cannot be used with loss_type {sorted_types}: these losses sort the batch, "
                "so a per-pair weight has no pair to apply to"
            )

    dt = loss_dtype(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps)
    cw, cl = chosen_logps.to(dt), rejected_logps.to(dt)
    if ref_chosen_logps is None:
        rw, rl = torch.zeros_like(cw), torch.zeros_like(cl)
    else:
        rw, rl = ref_chosen_logps.to(dt), ref_rejected_logps.to(dt)
    r_w, r_l = cw - rw, cl - rl
    pair = _Pair(
        chosen_logps=cw,
        rejected_logps=cl,
        ref_chosen_logps=rw,
        ref_rejected_logps=rl,
        chosen_logratios=r_w,
        rejected_logratios=r_l,
        chosen_scores=_f_scores(r_w, cfg.f_divergence, cfg.f_alpha),
        rejected_scores=_f_scores(r_l, cfg.f_divergence, cfg.f_alpha),
        chosen_lengths=chosen_lengths,
        rejected_lengths=rejected_lengths,
        beta=cfg.beta,
        label_smoothing=cfg.label_smoothing,
        discopop_tau=cfg.discopop_tau,
        bco_delta=bco_delta if not isinstance(bco_delta, Tensor) else bco_delta.to(dt),
    )

    loss = None
    for t, w in zip(cfg.loss_types, cfg.loss_weights):
        per_pair = _LOSSES[t](pair)
        if pair_weights is not None:
            per_pair = per_pair * pair_weights.to(dt)
        # each term reduced before the weighted sum: the "mean" path is the one TRL takes
        term = reduce(per_pair, cfg.reduction) * w
        loss = term if loss is None else loss + term

    metrics = reward_metrics(cfg.beta, r_w, r_l, cw, cl)
    return loss, metrics


class DPOLoss(nn.Module):
    """Config-only module around :func:`dpo_loss`; hyper-parameters are validated here, once.

    ``forward(chosen_logps, rejected_logps, ref_chosen_logps=None, ref_rejected_logps=None, *,
    chosen_lengths=None, rejected_lengths=None, pair_weights=None) -> (loss, metrics)``.

    With ``bco_running_mean=True`` (``bco_pair`` only) the module keeps the BCO paper's reward
    shift: in training mode each call first folds the batch mean of the rewards
    ``beta * [r_w; r_l]`` into a running mean (each batch counted once, as TRL < 1.0 did) and
    uses the updated mean as ``bco_delta``; in eval mode the stored mean is used unchanged.
    The state lives in buffers (``bco_mean``, ``bco_count``), so it is checkpointed with the
    module; it is per process (average it across ranks yourself if needed). ``bco_delta``
    instead fixes the shift to a float (as :func:`dpo_loss`'s ``bco_delta``; a tensor shift
    that changes per call goes to :func:`dpo_loss` itself).
    """

    def __init__(
        self,
        beta: float = 0.1,
        loss_type: Union[str, Sequence[str]] = "sigmoid",
        loss_weights: Optional[Sequence[float]] = None,
        label_smoothing: float = 0.0,
        f_divergence: str = "reverse_kl",
        f_alpha: float = 0.5,
        discopop_tau: float = 0.05,
        bco_running_mean: bool = False,
        bco_delta: Optional[float] = None,
        reduction: str = "mean",
    ):
        super().__init__()
        cfg = check_dpo_config(
            beta, loss_type, loss_weights, label_smoothing, f_divergence, f_alpha, discopop_tau, reduction
        )
        self._cfg = cfg
        self._loss_type = loss_type if isinstance(loss_type, str) else loss_type[:]  # the tuple is cfg.loss_types
        check_bool(bco_running_mean, "bco_running_mean")
        if bco_running_mean and "bco_pair" not in cfg.loss_types:
            raise ValueError(f"bco_running_mean=True needs loss_type 'bco_pair'; got {list(cfg.loss_types)}")
        if bco_delta is not None:
            if isinstance(bco_delta, Tensor):
                raise TypeError(
                    "bco_delta must be a float in DPOLoss (a fixed shift); pass a tensor shift to dpo_loss instead"
                )
            bco_delta = check_real(bco_delta, "bco_delta")
            if "bco_pair" not in cfg.loss_types:
                raise ValueError(
                    f"bco_delta is only used by loss_type 'bco_pair'; got loss_type {list(cfg.loss_types)}"
                )
            if bco_running_mean:
                raise ValueError("pass either bco_delta (a fixed shift) or bco_running_mean=True, not both")
        self.bco_delta = bco_delta
        self.bco_running_mean = bco_running_mean
        if bco_running_mean:
            self.register_buffer("bco_mean", torch.zeros((), dtype=torch.float32))
            self.register_buffer("bco_count", torch.zeros((), dtype=torch.int64))

    # read-only views of the validated config: build a new module to change it
    beta = property(lambda self: self._cfg.beta)
    # as given (a str stays a str, a list a list), copied so the config cannot change through it
    loss_type = property(lambda self: self._loss_type if isinstance(self._loss_type, str) else self._loss_type[:])
    loss_weights = property(lambda self: list(self._cfg.loss_weights))
    label_smoothing = property(lambda self: self._cfg.label_smoothing)
    f_divergence = property(lambda self: self._cfg.f_divergence)
    f_alpha = property(lambda self: self._cfg.f_alpha)
    discopop_tau = property(lambda self: self._cfg.discopop_tau)
    reduction = property(lambda self: self._cfg.reduction)

    def extra_repr(self) -> str:
        s = f"beta={self.beta}, loss_type={self.loss_type!r}"
        if any(w != 1.0 for w in self._cfg.loss_weights):
            s += f", loss_weights={self.loss_weights}"
        if self.label_smoothing:
            s += f", label_smoothing={self.label_smoothing}"
        if self.f_divergence != "reverse_kl":
            s += f", f_divergence={self.f_divergence!r}, f_alpha={self.f_alpha}"
        if "discopop" in self._cfg.loss_types:
            s += f", discopop_tau={self.discopop_tau}"
        if self.bco_running_mean:
            s += ", bco_running_mean=True"
        if self.bco_delta is not None:
            s += f", bco_delta={self.bco_delta}"
        if self.reduction != "mean":
            s += f", reduction={self.reduction!r}"
        return s

    @torch.no_grad()
    def _update_bco_mean(self, chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps) -> None:
        r = torch.cat([chosen_logps.detach().float(), rejected_logps.detach().float()])
        if ref_chosen_logps is not None:
            r = r - torch.cat([ref_chosen_logps.detach().float(), ref_rejected_logps.detach().float()])
        self.bco_count += 1
        self.bco_mean += (self.beta * r.mean() - self.bco_mean) / self.bco_count

    def forward(
        self,
        chosen_logps: Tensor,
        rejected_logps: Tensor,
        ref_chosen_logps: Optional[Tensor] = None,
        ref_rejected_logps: Optional[Tensor] = None,
        *,
        chosen_lengths: Optional[Tensor] = None,
        rejected_lengths: Optional[Tensor] = None,
        pair_weights: Optional[Tensor] = None,
    ):
        bco_delta = self.bco_delta
        if self.bco_running_mean:
            if self.training:
                # validate shapes before touching the state, so a bad call leaves it unchanged
                check_vector(chosen_logps, "chosen_logps")
                check_vector(rejected_logps, "rejected_logps", like=chosen_logps, like_name="chosen_logps")
                if ref_chosen_logps is not None and ref_rejected_logps is not None:
                    check_vector(ref_chosen_logps, "ref_chosen_logps", like=chosen_logps, like_name="chosen_logps")
                    check_vector(ref_rejected_logps, "ref_rejected_logps", like=chosen_logps, like_name="chosen_logps")
                    self._update_bco_mean(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps)
                elif ref_chosen_logps is None and ref_rejected_logps is None:
                    self._update_bco_mean(chosen_logps, rejected_logps, None, None)
            bco_delta = self.bco_mean.clone()
        # hyper-parameters were validated in __init__ (and any label_smoothing warning given there)
        return dpo_loss_from_config(
            self._cfg,
            chosen_logps,
            rejected_logps,
            ref_chosen_logps,
            ref_rejected_logps,
            chosen_lengths,
            rejected_lengths,
            bco_delta,
            pair_weights,
        )
