"""prefopt_fast: fused kernels for the losses of LLM preference training.

Per-token log-probs, the DPO / Bradley-Terry losses and the PPO loss straight from the
logits, without materializing the softmax, with exact gradients.
"""
from ._dispatch import available_backends
from .ops.token_logprobs import TokenLogProbs, token_logprobs

__version__ = "0.1.0"

__all__ = ["available_backends", "token_logprobs", "TokenLogProbs"]
