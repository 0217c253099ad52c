"""prefopt_fast: fused kernels for the losses of LLM preference training.

Per-token log-probs, the DPO / Bradley-Terry losses and the PPO loss straight from the
logits, without materializing the softmax, with exact gradients.

Names: public names spell log-probabilities "logprobs"; tensor arguments and metric keys keep
TRL's names (``chosen_logps``, ``logps/chosen``). ``linear_`` / ``Linear*`` take hidden states
and the lm_head weight (Liger's "fused linear"); ``logits_*`` take the logits.
"""

import importlib

from ._version import __version__  # noqa: F401

# The public names and the module each lives in. They are imported on first use (PEP 562), so
# ``import prefopt_fast`` (and ``prefopt_fast.kernels``, which reads the row contract from
# ``prefopt_fast._rows``) costs no more than the module asked for.
_EXPORTS = {
    "prefopt_fast._dispatch": ["available_backends"],
    "prefopt_fast._build_info": ["build_info"],
    "prefopt_fast.ops.token_logprobs": ["token_logprobs", "TokenLogProbsOutput"],
    "prefopt_fast.ops.sequence_logprobs": ["sequence_logprobs", "SequenceLogProbs"],
    "prefopt_fast.losses.dpo": ["dpo_loss", "DPOLoss", "DPO_LOSS_TYPES", "F_DIVERGENCES"],
    "prefopt_fast.losses.reference_free": ["cpo_loss", "simpo_loss", "orpo_loss", "CPO_LOSS_TYPES"],
    "prefopt_fast.losses.reward": ["bradley_terry_loss", "BradleyTerryLoss"],
    "prefopt_fast.losses.logits_dpo": ["logits_dpo_loss", "LogitsDPOLoss", "pair_logprobs"],
    "prefopt_fast.losses.ppo": [
        "ppo_loss",
        "PPOLoss",
        "policy_loss",
        "PolicyLoss",
        "KL_ESTIMATORS",
        "LOSS_AGG_MODES",
        "TRL_LOSS_TYPES",
    ],
    "prefopt_fast.ops.linear_logprobs": [
        "linear_token_logprobs",
        "linear_sequence_logprobs",
        "LinearSequenceLogProbs",
        "default_chunk_size",
    ],
    "prefopt_fast.losses.linear_dpo": [
        "linear_pair_logprobs",
        "linear_dpo_loss",
        "LinearDPOLoss",
        "linear_cpo_loss",
        "LinearCPOLoss",
        "linear_simpo_loss",
        "LinearSimPOLoss",
        "linear_orpo_loss",
        "LinearORPOLoss",
    ],
    "prefopt_fast.losses.linear_ppo": ["linear_ppo_loss", "LinearPPOLoss"],
}
_WHERE = {name: mod for mod, names in _EXPORTS.items() for name in names}

__all__ = [name for names in _EXPORTS.values() for name in names]

# Old public names, kept importable for one release with a DeprecationWarning (not in __all__).
_RENAMED = {
    "TokenLogProbs": "TokenLogProbsOutput",
    "pair_logps": "pair_logprobs",
    "linear_pair_logps": "linear_pair_logprobs",
    "fused_dpo_loss": "logits_dpo_loss",
    "FusedDPOLoss": "LogitsDPOLoss",
}


def __getattr__(name):
    if name in _WHERE:
        value = getattr(importlib.import_module(_WHERE[name]), name)
        globals()[name] = value  # once
        return value
    if name in _RENAMED:
        import warnings

        new = _RENAMED[name]
        warnings.warn(
            f"prefopt_fast.{name} is deprecated and will be removed; use prefopt_fast.{new}",
            DeprecationWarning,
            stacklevel=2,
        )
        return __getattr__(new)
    raise AttributeError(f"module 'prefopt_fast' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
