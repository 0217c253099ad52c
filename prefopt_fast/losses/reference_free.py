"""Reference-free preference heads on per-sequence log-probs: CPO, SimPO and ORPO.

Inputs follow :mod:`prefopt_fast.losses.dpo`: ``chosen_logps`` / ``rejected_logps`` are float
``[B]`` SUMS of the policy's completion-token log-probs, ``chosen_lengths`` /
``rejected_lengths`` int or float ``[B]`` completion token counts (clamped at 1 wherever
they divide, so an empty completion divides by 1). Where a head works on per-token means
(SimPO, ORPO, CPO's ``ipo``/``simpo`` types) it divides by the lengths itself.

Semantics follow TRL 1.16's ``trl.experimental.cpo.CPOTrainer`` and
``trl.experimental.orpo.ORPOTrainer``; the NLL term those trainers add is the mean
negative log-likelihood of the chosen tokens, which these heads compute from the sums
(``-sum_b S_w / sum_b L_w``) unless a precomputed ``nll_loss`` is passed.
Computed in fp32 (fp64 for fp64 inputs).

One name and one default per hyper-parameter, TRL's ``CPOConfig`` being canonical: ``beta=0.1``,
``label_smoothing=0.0``, ``cpo_alpha=1.0`` (the weight of the NLL term), ``simpo_gamma=0.5``
(SimPO's target margin), ``alpha=0.0`` (AlphaPO reward shaping; 0 is none).

``reduction``: ``"mean"`` (TRL's), ``"sum"``, or ``"none"`` for the per-pair losses ``[B]``;
a batch-level term (the NLL) is added to every pair, so the mean of ``"none"`` is ``"mean"``
and its sum is ``"sum"``.
"""

import warnings
from typing import Dict, NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .._validate import check_choice
from ._common import (
    check_real,
    check_reduction,
    check_vector,
    clamped_lengths,
    log1mexp,
    loss_dtype,
    reduce,
    renamed_keywords,
    reward_metrics,
)

__all__ = ["cpo_loss", "simpo_loss", "orpo_loss", "CPO_LOSS_TYPES"]

CPO_LOSS_TYPES = ("sigmoid", "hinge", "ipo", "simpo")
_AVERAGED = ("ipo", "simpo")  # CPO types that use per-token mean log-probs


def _check_pair(chosen_logps, rejected_logps, chosen_lengths, rejected_lengths, need_lengths: str):
    """Validate the [B] inputs; ``need_lengths`` in {"", "chosen", "both"} names what must be given."""
    chosen_logps = check_vector(chosen_logps, "chosen_logps")
    rejected_logps = check_vector(rejected_logps, "rejected_logps", like=chosen_logps, like_name="chosen_logps")
    if need_lengths and chosen_lengths is None:
        raise ValueError("chosen_lengths is required here (completion token counts, [B])")
    if need_lengths == "both" and rejected_lengths is None:
        raise ValueError("rejected_lengths is required here (completion token counts, [B])")
    if chosen_lengths is not None:
        chosen_lengths = check_vector(
            chosen_lengths, "chosen_lengths", like=chosen_logps, like_name="chosen_logps", allow_int=True
        )
    if rejected_lengths is not None:
        rejected_lengths = check_vector(
            rejected_lengths, "rejected_lengths", like=chosen_logps, like_name="chosen_logps", allow_int=True
        )
    return chosen_logps, rejected_logps, chosen_lengths, rejected_lengths


def _check_nll(nll_loss, like: Tensor) -> Optional[Tensor]:
    if nll_loss is None:
        return None
    if not isinstance(nll_loss, Tensor):
        raise TypeError(f"nll_loss must be a 0-d float tensor or None; got {type(nll_loss).__name__}")
    if not nll_loss.dtype.is_floating_point:
        raise TypeError(f"nll_loss must be a 0-d float tensor (a mean NLL); got {nll_loss.dtype}")
    if nll_loss.numel() != 1:
        raise ValueError(f"nll_loss must be a 0-d float tensor (a mean NLL); got shape {tuple(nll_loss.shape)}")
    if nll_loss.device != like.device:
        raise ValueError(f"nll_loss must be on the device of chosen_logps ({like.device}); got {nll_loss.device}")
    return nll_loss.reshape(())


def _chosen_nll(chosen_logps: Tensor, chosen_lengths: Tensor) -> Tensor:
    """Token-mean NLL of the chosen completions over the batch (0 if there is no token)."""
    return -chosen_logps.sum() / chosen_lengths.to(chosen_logps.dtype).sum().clamp(min=1.0)


class CPOSettings(NamedTuple):
    """Validated hyper-parameters of :func:`cpo_loss` (and of SimPO, its ``simpo`` type)."""

    beta: float
    loss_type: str
    label_smoothing: float
    cpo_alpha: float
    simpo_gamma: float
    alpha: float
    reduction: str


def check_cpo_settings(
    beta, loss_type, label_smoothing, cpo_alpha, simpo_gamma, alpha, reduction, stacklevel: int = 3
) -> CPOSettings:
    """Check the hyper-parameters of :func:`cpo_loss` (no tensors involved)."""
    check_choice(loss_type, CPO_LOSS_TYPES, "loss_type", " (the CPO loss types)")
    beta = check_real(beta, "beta", lo=0.0, lo_open=True)
    if loss_type in ("sigmoid", "simpo"):
        label_smoothing = check_real(
            label_smoothing, "label_smoothing", lo=0.0, hi=1.0, hi_open=True, why=f" for loss_type {loss_type!r}"
        )
    else:
        label_smoothing = check_real(label_smoothing, "label_smoothing", lo=0.0, hi=1.0, hi_open=True)
        if label_smoothing != 0.0:
            warnings.warn(
                f"label_smoothing={label_smoothing} has no effect on CPO loss_type {loss_type!r}",
                UserWarning,
                stacklevel=stacklevel,
            )
    cpo_alpha = check_real(cpo_alpha, "cpo_alpha", lo=0.0)
    simpo_gamma = check_real(simpo_gamma, "simpo_gamma")
    alpha = check_real(alpha, "alpha")
    reduction = check_reduction(reduction)
    return CPOSettings(beta, loss_type, label_smoothing, cpo_alpha, simpo_gamma, alpha, reduction)


def cpo_head(
    cfg: CPOSettings,
    chosen_logps: Tensor,
    rejected_logps: Tensor,
    chosen_lengths: Optional[Tensor],
    rejected_lengths: Optional[Tensor],
    nll_loss: Optional[Tensor] = None,
) -> Tuple[Tensor, Dict[str, Tensor]]:
    """:func:`cpo_loss` with validated hyper-parameters ``cfg``: checks the tensors, then computes."""
    beta, loss_type, label_smoothing, cpo_alpha, simpo_gamma, alpha = cfg[:6]
    averaged = loss_type in _AVERAGED
    need_nll = cpo_alpha != 0.0 and nll_loss is None
    need = "both" if averaged else ("chosen" if need_nll else "")
    chosen_logps, rejected_logps, chosen_lengths, rejected_lengths = _check_pair(
        chosen_logps, rejected_logps, chosen_lengths, rejected_lengths, need
    )
    nll_loss = _check_nll(nll_loss, chosen_logps)

    dt = loss_dtype(chosen_logps, rejected_logps)
    xw, xl = chosen_logps.to(dt), rejected_logps.to(dt)
    if averaged:
        xw = xw / clamped_lengths(chosen_lengths, dt)
        xl = xl / clamped_lengths(rejected_lengths, dt)
    if alpha != 0.0:
        # AlphaPO reward shaping r = (1 - p^-alpha) / alpha with p = exp(x)
        rw, rl = -torch.expm1(-alpha * xw) / alpha, -torch.expm1(-alpha * xl) / alpha
    else:
        rw, rl = xw, xl
    d = rw - rl

    if loss_type == "simpo":
        d = d - simpo_gamma / beta
    if loss_type in ("sigmoid", "simpo"):
        losses = -(1.0 - label_smoothing) * F.logsigmoid(beta * d) - label_smoothing * F.logsigmoid(-beta * d)
    elif loss_type == "hinge":
        losses = torch.relu(1.0 - beta * d)
    else:  # ipo
        losses = (d - 0.5 / beta) ** 2

    if cpo_alpha == 0.0:
        nll = torch.zeros((), dtype=dt, device=xw.device)
        loss = reduce(losses, cfg.reduction)
    else:
        nll = nll_loss.to(dt) if nll_loss is not None else _chosen_nll(chosen_logps.to(dt), chosen_lengths)
        loss = _plus_batch_term(losses, cpo_alpha * nll, cfg.reduction)

    metrics = reward_metrics(beta, rw, rl, xw, xl)
    metrics["nll_loss"] = nll.detach()
    return loss, metrics


def _plus_batch_term(per_pair: Tensor, term: Tensor, reduction: str) -> Tensor:
    """reduce(per_pair + term): a batch-level 0-d ``term`` counted once per pair."""
    if reduction == "mean":
        return per_pair.mean() + term
    if reduction == "sum":
        return per_pair.sum() + per_pair.shape[0] * term
    return per_pair + term


def cpo_loss(
    chosen_logps: Tensor,
    rejected_logps: Tensor,
    chosen_lengths: Optional[Tensor] = None,
    rejected_lengths: Optional[Tensor] = None,
    *,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    cpo_alpha: float = 1.0,
    simpo_gamma: float = 0.5,
    alpha: float = 0.0,
    nll_loss: Optional[Tensor] = None,
    reduction: str = "mean",
) -> Tuple[Tensor, Dict[str, Tensor]]:
    """Contrastive Preference Optimization (TRL's ``CPOTrainer``), reference-free.

    With ``x_w, x_l`` the policy log-probs (sums for ``sigmoid``/``hinge``, per-token means
    ``S / max(L, 1)`` for ``ipo``/``simpo``), optionally AlphaPO-shaped
    (``alpha != 0``: ``x -> (1 - exp(-alpha x)) / alpha``), and ``d = x_w - x_l``:

    - ``sigmoid``: ``(1 - eps)(-log sigmoid(beta d)) + eps(-log sigmoid(-beta d))`` (CPO, Eq. 3)
    - ``simpo``: the same with ``d - simpo_gamma / beta`` (CPO-SimPO; see :func:`simpo_loss`)
    - ``hinge``: ``relu(1 - beta d)``;  ``ipo``: ``(d - 1 / (2 beta))^2``
      (both ignore ``label_smoothing``)

    loss = mean_b(per-pair loss) + ``cpo_alpha`` * NLL, NLL = ``nll_loss`` if given, else the
    token-mean NLL of the chosen completions (needs ``chosen_lengths``; TRL's CPO NLL is the
    same quantity: cross-entropy over the chosen completion tokens). ``reduction``: see the
    module docstring.

    Returns ``(loss, metrics)``; metrics (detached 0-d, TRL's names): ``rewards/chosen`` =
    mean(beta x_w), ``rewards/rejected``, ``rewards/accuracies`` (strict >), ``rewards/margins``,
    ``logps/chosen`` / ``logps/rejected`` (batch means of the un-shaped x), ``nll_loss``.
    """
    cfg = check_cpo_settings(beta, loss_type, label_smoothing, cpo_alpha, simpo_gamma, alpha, reduction)
    return cpo_head(cfg, chosen_logps, rejected_logps, chosen_lengths, rejected_lengths, nll_loss)


def check_simpo_lengths(chosen_lengths, rejected_lengths, where: str = "simpo_loss") -> None:
    for name, x in (("chosen_lengths", chosen_lengths), ("rejected_lengths", rejected_lengths)):
        if x is None:
            raise ValueError(
                f"{name} is required by {where} (completion token counts, [B]; pass ones if "
                "your log-probs are already per-token means)"
            )


@renamed_keywords(gamma="simpo_gamma", nll_weight="cpo_alpha")
def simpo_loss(
    chosen_logps: Tensor,
    rejected_logps: Tensor,
    chosen_lengths: Tensor,
    rejected_lengths: Tensor,
    *,
    beta: float = 0.1,
    simpo_gamma: float = 0.5,
    label_smoothing: float = 0.0,
    cpo_alpha: float = 1.0,
    alpha: float = 0.0,
    nll_loss: Optional[Tensor] = None,
    reduction: str = "mean",
) -> Tuple[Tensor, Dict[str, Tensor]]:
    """SimPO: ``-log sigmoid(beta (S_w / L_w - S_l / L_l) - simpo_gamma)``, length-normalized.

    Exactly ``cpo_loss(..., loss_type="simpo")``, with the same names and defaults (TRL's
    ``CPOConfig``: beta 0.1, simpo_gamma 0.5, cpo_alpha 1.0, which is CPO-SimPO). Pure SimPO
    is ``cpo_alpha=0.0``; the SimPO paper's setting is e.g. ``beta=2.0, simpo_gamma=1.0,
    cpo_alpha=0.0``. ``label_smoothing`` mixes in the flipped term as TRL does.
    ``gamma=`` / ``nll_weight=`` are the deprecated names of ``simpo_gamma`` / ``cpo_alpha``.

    Returns ``(loss, metrics)`` with the metrics of :func:`cpo_loss` (rewards are
    ``beta * S / L``, ``logps/*`` the per-token means).
    """
    cfg = check_cpo_settings(beta, "simpo", label_smoothing, cpo_alpha, simpo_gamma, alpha, reduction)
    check_simpo_lengths(chosen_lengths, rejected_lengths)
    return cpo_head(cfg, chosen_logps, rejected_logps, chosen_lengths, rejected_lengths, nll_loss)


class ORPOSettings(NamedTuple):
    """Validated hyper-parameters of :func:`orpo_loss`."""

    beta: float
    reduction: str


def check_orpo_settings(beta, reduction) -> ORPOSettings:
    return ORPOSettings(check_real(beta, "beta", lo=0.0, lo_open=True), check_reduction(reduction))


def orpo_loss(
    chosen_logps: Tensor,
    rejected_logps: Tensor,
    chosen_lengths: Tensor,
    rejected_lengths: Tensor,
    *,
    beta: float = 0.1,
    nll_loss: Optional[Tensor] = None,
    reduction: str = "mean",
) -> Tuple[Tensor, Dict[str, Tensor]]:
    """ORPO (TRL's ``ORPOTrainer``): NLL - beta * mean(log sigmoid(log odds ratio)).

    With per-token means ``x = S / max(L, 1)`` (all < 0), the log odds ratio is
    ``(x_w - x_l) - (log(1 - exp(x_w)) - log(1 - exp(x_l)))``; ``beta`` is the paper's lambda.
    NLL = ``nll_loss`` if given, else the token-mean NLL of the chosen completions. Note:
    TRL's ORPO NLL averages over the chosen PROMPT AND completion tokens; to match it exactly
    pass that value as ``nll_loss``. An empty completion (x = 0) has an infinite log odds.
    ``reduction``: see the module docstring.

    Returns ``(loss, metrics)``; metrics (detached 0-d, TRL's names): ``rewards/*`` from
    ``beta * x``, ``logps/chosen`` / ``logps/rejected`` (means of x), ``nll_loss``,
    ``log_odds_ratio`` = mean(log sigmoid(log odds)), ``log_odds_chosen`` = mean(log odds).
    """
    cfg = check_orpo_settings(beta, reduction)
    return orpo_head(cfg, chosen_logps, rejected_logps, chosen_lengths, rejected_lengths, nll_loss)


def orpo_head(
    cfg: ORPOSettings,
    chosen_logps: Tensor,
    rejected_logps: Tensor,
    chosen_lengths: Tensor,
    rejected_lengths: Tensor,
    nll_loss: Optional[Tensor] = None,
) -> Tuple[Tensor, Dict[str, Tensor]]:
    """:func:`orpo_loss` with validated hyper-parameters ``cfg``: checks the tensors, then computes."""
    beta = cfg.beta
    chosen_logps, rejected_logps, chosen_lengths, rejected_lengths = _check_pair(
        chosen_logps, rejected_logps, chosen_lengths, rejected_lengths, "both"
    )
    nll_loss = _check_nll(nll_loss, chosen_logps)

    dt = loss_dtype(chosen_logps, rejected_logps)
    xw = chosen_logps.to(dt) / clamped_lengths(chosen_lengths, dt)
    xl = rejected_logps.to(dt) / clamped_lengths(rejected_lengths, dt)
    log_odds = (xw - xl) - (log1mexp(xw) - log1mexp(xl))
    ratio = F.logsigmoid(log_odds)
    nll = nll_loss.to(dt) if nll_loss is not None else _chosen_nll(chosen_logps.to(dt), chosen_lengths)
    if cfg.reduction == "mean":
        loss = nll - beta * ratio.mean()
    else:
        loss = _plus_batch_term(-beta * ratio, nll, cfg.reduction)

    metrics = reward_metrics(beta, xw, xl, xw, xl)
    metrics["nll_loss"] = nll.detach()
    metrics["log_odds_ratio"] = ratio.detach().mean()
    metrics["log_odds_chosen"] = log_odds.detach().mean()
    return loss, metrics
