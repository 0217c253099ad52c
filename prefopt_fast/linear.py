"""The fused-linear API in one place: log-probs and losses from hidden states and the lm_head.

Nothing of size ``[tokens, V]`` is ever allocated: see
:mod:`prefopt_fast.ops.linear_logprobs` for the chunking and the memory rule.
"""

from .losses.linear import LinearDPOLoss, LinearPPOLoss, linear_dpo_loss, linear_pair_logps, linear_ppo_loss
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
    "linear_pair_logps",
    "linear_dpo_loss",
    "LinearDPOLoss",
    "linear_ppo_loss",
    "LinearPPOLoss",
    "default_chunk_size",
]
