"""Loss heads: plain PyTorch over per-token / per-sequence vectors.

The from-hidden-states twins (``linear_dpo``, ``linear_ppo``) are re-exported by
:mod:`prefopt_fast.linear`.
"""

from .dpo import DPO_LOSS_TYPES, F_DIVERGENCES, DPOLoss, dpo_loss
from .logits_dpo import LogitsDPOLoss, logits_dpo_loss, pair_logprobs
from .ppo import KL_ESTIMATORS, LOSS_AGG_MODES, TRL_LOSS_TYPES, PolicyLoss, PPOLoss, policy_loss, ppo_loss
from .reference_free import CPO_LOSS_TYPES, cpo_loss, orpo_loss, simpo_loss
from .reward import BradleyTerryLoss, bradley_terry_loss

__all__ = [
    "dpo_loss",
    "DPOLoss",
    "DPO_LOSS_TYPES",
    "F_DIVERGENCES",
    "cpo_loss",
    "simpo_loss",
    "orpo_loss",
    "CPO_LOSS_TYPES",
    "bradley_terry_loss",
    "BradleyTerryLoss",
    "logits_dpo_loss",
    "LogitsDPOLoss",
    "pair_logprobs",
    "ppo_loss",
    "PPOLoss",
    "policy_loss",
    "PolicyLoss",
    "KL_ESTIMATORS",
    "LOSS_AGG_MODES",
    "TRL_LOSS_TYPES",
]
