"""Loss heads: plain PyTorch over per-token / per-sequence vectors."""

from .dpo import DPO_LOSS_TYPES, F_DIVERGENCES, DPOLoss, dpo_loss
from .fused_dpo import FusedDPOLoss, fused_dpo_loss, pair_logps
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
    "fused_dpo_loss",
    "FusedDPOLoss",
    "pair_logps",
    "ppo_loss",
    "PPOLoss",
    "policy_loss",
    "PolicyLoss",
    "KL_ESTIMATORS",
    "LOSS_AGG_MODES",
    "TRL_LOSS_TYPES",
]
