"""The fused-linear API in one place: log-probs and losses from hidden states and the lm_head.

``linear_`` / ``Linear*`` means "from hidden states + lm_head weight" (Liger's "fused linear").
Nothing of size ``[tokens, V]`` is ever allocated: see
:mod:`prefopt_fast.ops.linear_logprobs` for the chunking and the memory rule.
"""

from .losses.linear_dpo import (
    LinearCPOLoss,
    LinearDPOLoss,
    LinearORPOLoss,
    LinearSimPOLoss,
    linear_cpo_loss,
    linear_dpo_loss,
    linear_orpo_loss,
    linear_pair_logprobs,
    linear_simpo_loss,
)
from .losses.linear_ppo import LinearPPOLoss, linear_ppo_loss
from .ops.linear_logprobs import (
    LinearSequenceLogProbs,
    default_chunk_size,
    linear_sequence_logprobs,
    linear_token_logprobs,
)

__all__ = [
    "linear_token_logprobs",
    "linear_sequence_logprobs",
    "LinearSequenceLogProbs",
    "linear_pair_logprobs",
    "linear_dpo_loss",
    "LinearDPOLoss",
    "linear_cpo_loss",
    "LinearCPOLoss",
    "linear_simpo_loss",
    "LinearSimPOLoss",
    "linear_orpo_loss",
    "LinearORPOLoss",
    "linear_ppo_loss",
    "LinearPPOLoss",
    "default_chunk_size",
]

# Old names, kept importable for one release with a DeprecationWarning (not in __all__).
_RENAMED = {
    "linear_pair_logps": "linear_pair_logprobs",
}


def __getattr__(name):
    if name in _RENAMED:
        import warnings

        new = _RENAMED[name]
        warnings.warn(
            f"prefopt_fast.linear.{name} is deprecated and will be removed; use prefopt_fast.linear.{new}",
            DeprecationWarning,
            stacklevel=2,
        )
        return globals()[new]
    raise AttributeError(f"module 'prefopt_fast.linear' has no attribute {name!r}")
