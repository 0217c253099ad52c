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
"""

import warnings
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .._validate import check_choice
from ._common import check_real, check_vector, clamped_lengths, compute_dtype, log1mexp, reward_metrics

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
    same quantity: cross-entropy over the chosen completion tokens).

    Returns ``(loss, metrics)``; metrics (detached 0-d, TRL's names): ``rewards/chosen`` =
    mean(beta x_w), ``rewards/rejected``, ``rewards/accuracies`` (strict >), ``rewards/margins``,
    ``logps/chosen`` / ``logps/rejected`` (batch means of the un-shaped x), ``nll_loss``.
    """
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
                stacklevel=2,
            )
    cpo_alpha = check_real(cpo_alpha, "cpo_alpha", lo=0.0)
    simpo_gamma = check_real(simpo_gamma, "simpo_gamma")
    alpha = check_real(alpha, "alpha")

    averaged = loss_type in _AVERAGED
    need_nll = cpo_alpha != 0.0 and nll_loss is None
    need = "both" if averaged else ("chosen" if need_nll else "")
    chosen_logps, rejected_logps, chosen_lengths, rejected_lengths = _check_pair(
        chosen_logps, rejected_logps, chosen_lengths, rejected_lengths, need
    )
    nll_loss = _check_nll(nll_loss, chosen_logps)

    dt = compute_dtype(chosen_logps, rejected_logps)
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
        loss = losses.mean()
    else:
        nll = nll_loss.to(dt) if nll_loss is not None else _chosen_nll(chosen_logps.to(dt), chosen_lengths)
        loss = losses.mean() + cpo_alpha * nll

    metrics = reward_metrics(beta, rw, rl, xw, xl)
    metrics["nll_loss"] = nll.detach()
    return loss, metrics


def simpo_loss(
    chosen_logps: Tensor,
    rejected_logps: Tensor,
    chosen_lengths: Tensor,
    rejected_lengths: Tensor,
    *,
    beta: float = 2.0,
    gamma: float = 1.0,
    label_smoothing: float = 0.0,
    nll_weight: float = 0.0,
    nll_loss: Optional[Tensor] = None,
) -> Tuple[Tensor, Dict[str, Tensor]]:
    """SimPO: ``-log sigmoid(beta (S_w / L_w - S_l / L_l) - gamma)``, reference-free and length-normalized.

    ``label_smoothing`` mixes in the flipped term as in TRL's CPO ``simpo`` type (the SimPO
    repository does the same). ``nll_weight > 0`` adds the chosen token-mean NLL (CPO-SimPO;
    TRL's ``CPOTrainer(loss_type="simpo")`` has ``cpo_alpha = 1`` by default, so
    ``simpo_loss(..., nll_weight=1.0, beta=b, gamma=g)`` equals it with ``simpo_gamma=g``).
    Defaults are the SimPO repository's (beta 2.0, gamma = 0.5 beta); TRL's CPOConfig
    defaults are beta 0.1, simpo_gamma 0.5.

    Returns ``(loss, metrics)`` with the metrics of :func:`cpo_loss` (rewards are
    ``beta * S / L``, ``logps/*`` the per-token means).
    """
    beta = check_real(beta, "beta", lo=0.0, lo_open=True)
    gamma = check_real(gamma, "gamma")
    nll_weight = check_real(nll_weight, "nll_weight", lo=0.0)
    for name, x in (("chosen_lengths", chosen_lengths), ("rejected_lengths", rejected_lengths)):
        if x is None:
            raise ValueError(
                f"{name} is required by simpo_loss (completion token counts, [B]; pass ones if "
                "your log-probs are already per-token means)"
            )
    return cpo_loss(
        chosen_logps,
        rejected_logps,
        chosen_lengths,
        rejected_lengths,
        beta=beta,
        loss_type="simpo",
        label_smoothing=label_smoothing,
        cpo_alpha=nll_weight,
        simpo_gamma=gamma,
        nll_loss=nll_loss,
    )


def orpo_loss(
    chosen_logps: Tensor,
    rejected_logps: Tensor,
    chosen_lengths: Tensor,
    rejected_lengths: Tensor,
    *,
    beta: float = 0.1,
    nll_loss: Optional[Tensor] = None,
) -> Tuple[Tensor, Dict[str, Tensor]]:
    """ORPO (TRL's ``ORPOTrainer``): NLL - beta * mean(log sigmoid(log odds ratio)).

    With per-token means ``x = S / max(L, 1)`` (all < 0), the log odds ratio is
    ``(x_w - x_l) - (log(1 - exp(x_w)) - log(1 - exp(x_l)))``; ``beta`` is the paper's lambda.
    NLL = ``nll_loss`` if given, else the token-mean NLL of the chosen completions. Note:
    TRL's ORPO NLL averages over the chosen PROMPT AND completion tokens; to match it exactly
    pass that value as ``nll_loss``. An empty completion (x = 0) has an infinite log odds.

    Returns ``(loss, metrics)``; metrics (detached 0-d, TRL's names): ``rewards/*`` from
    ``beta * x``, ``logps/chosen`` / ``logps/rejected`` (means of x), ``nll_loss``,
    ``log_odds_ratio`` = mean(log sigmoid(log odds)), ``log_odds_chosen`` = mean(log odds).
    """
    beta = check_real(beta, "beta", lo=0.0, lo_open=True)
    chosen_logps, rejected_logps, chosen_lengths, rejected_lengths = _check_pair(
        chosen_logps, rejected_logps, chosen_lengths, rejected_lengths, "both"
    )
    nll_loss = _check_nll(nll_loss, chosen_logps)

    dt = compute_dtype(chosen_logps, rejected_logps)
    xw = chosen_logps.to(dt) / clamped_lengths(chosen_lengths, dt)
    xl = rejected_logps.to(dt) / clamped_lengths(rejected_lengths, dt)
    log_odds = (xw - xl) - (log1mexp(xw) - log1mexp(xl))
    ratio = F.logsigmoid(log_odds)
    nll = nll_loss.to(dt) if nll_loss is not None else _chosen_nll(chosen_logps.to(dt), chosen_lengths)
    loss = nll - beta * ratio.mean()

    metrics = reward_metrics(beta, xw, xl, xw, xl)
    metrics["nll_loss"] = nll.detach()
    metrics["log_odds_ratio"] = ratio.detach().mean()
    metrics["log_odds_chosen"] = log_odds.detach().mean()
    return loss, metrics
