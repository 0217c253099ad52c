"""Bradley-Terry reward-model loss, as TRL 1.16's ``RewardTrainer.compute_loss`` computes it."""

from typing import Dict, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._common import check_real, check_reduction, check_vector, loss_dtype, reduce

__all__ = ["bradley_terry_loss", "BradleyTerryLoss"]


def _check_coefficient(value) -> Optional[float]:
    if value is None:
        return None
    # a negative coefficient would reward pushing r_w + r_l away from 0 without bound
    return check_real(value, "center_rewards_coefficient", lo=0.0)


def bradley_terry_loss(
    chosen_rewards: Tensor,
    rejected_rewards: Tensor,
    *,
    margin: Optional[Union[float, Tensor]] = None,
    center_rewards_coefficient: Optional[float] = None,
    reduction: str = "mean",
) -> Tuple[Tensor, Dict[str, Tensor]]:
    """Pairwise Bradley-Terry loss of a reward model.

    ``loss = mean_b(-log sigmoid(r_w - r_l - margin)) + c * mean_b((r_w + r_l)^2)``

    Args:
        chosen_rewards, rejected_rewards: float ``[B]`` or ``[B, 1]`` (a reward head's output).
        margin: ``None``, a float, or a float ``[B]`` tensor: the required reward gap per pair
            (TRL reads it from the dataset's ``margin`` column).
        center_rewards_coefficient: ``None`` or ``c >= 0``; the centering term keeps rewards
            near 0 (Eisenstein et al. 2023).
        reduction: ``"mean"`` (TRL's), ``"sum"``, or ``"none"`` for the per-pair losses ``[B]``
            (``-log sigmoid(r_w - r_l - margin) + c (r_w + r_l)^2``).

    Returns:
        ``(loss, metrics)``: 0-d loss (``[B]`` with ``reduction="none"``; fp32, fp64 for fp64 inputs) and detached 0-d metrics named
        as TRL logs them: ``accuracy`` = mean(r_w > r_l) (strict), ``margin`` = mean(r_w - r_l)
        (the input ``margin`` is not subtracted), ``mean_reward`` / ``min_reward`` /
        ``max_reward`` over all 2B rewards.
    """
    c = _check_coefficient(center_rewards_coefficient)
    reduction = check_reduction(reduction)
    chosen_rewards = check_vector(chosen_rewards, "chosen_rewards", allow_column=True)
    rejected_rewards = check_vector(
        rejected_rewards, "rejected_rewards", like=chosen_rewards, like_name="chosen_rewards", allow_column=True
    )
    dt = loss_dtype(chosen_rewards, rejected_rewards)
    rw, rl = chosen_rewards.to(dt), rejected_rewards.to(dt)
    diff = rw - rl
    if margin is not None:
        if isinstance(margin, Tensor):
            m = check_vector(margin, "margin", like=chosen_rewards, like_name="chosen_rewards", allow_column=True)
            diff = diff - m.to(dt)
        else:
            diff = diff - check_real(margin, "margin")
    # each term reduced on its own: the "mean" path is the one TRL takes
    loss = reduce(-F.logsigmoid(diff), reduction)
    if c is not None:
        loss = loss + c * reduce((rw + rl) ** 2, reduction)

    with torch.no_grad():
        all_rewards = torch.cat([rw, rl])
        metrics = {
            "accuracy": (rw > rl).to(dt).mean(),
            "margin": (rw - rl).mean(),
            "mean_reward": all_rewards.mean(),
            "min_reward": all_rewards.min(),
            "max_reward": all_rewards.max(),
        }
    return loss, metrics


class BradleyTerryLoss(nn.Module):
    """Config-only module around :func:`bradley_terry_loss`.

    ``forward(chosen_rewards, rejected_rewards, margin=None) -> (loss, metrics)``.
    """

    def __init__(self, center_rewards_coefficient: Optional[float] = None, reduction: str = "mean"):
        super().__init__()
        self.center_rewards_coefficient = _check_coefficient(center_rewards_coefficient)
        self.reduction = check_reduction(reduction)

    def extra_repr(self) -> str:
        s = f"center_rewards_coefficient={self.center_rewards_coefficient}"
        return s if self.reduction == "mean" else s + f", reduction={self.reduction!r}"

    def forward(self, chosen_rewards: Tensor, rejected_rewards: Tensor, margin: Optional[Union[float, Tensor]] = None):
        return bradley_terry_loss(
            chosen_rewards,
            rejected_rewards,
            margin=margin,
            center_rewards_coefficient=self.center_rewards_coefficient,
            reduction=self.reduction,
        )
