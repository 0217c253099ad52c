"""prefopt_fast: fused kernels for the losses of LLM preference training.

Per-token log-probs, the DPO / Bradley-Terry losses and the PPO loss straight from the
logits, without materializing the softmax, with exact gradients.

Names: public names spell log-probabilities "logprobs"; tensor arguments and metric keys keep
TRL's names (``chosen_logps``, ``logps/chosen``). ``linear_`` / ``Linear*`` take hidden states
and the lm_head weight (Liger's "fused linear"); ``logits_*`` take the logits.
"""

from ._build_info import build_info
from ._dispatch import available_backends
from ._version import __version__  # noqa: F401
from .linear import *  # noqa: F401,F403  (the fused-linear variants: hidden states + lm_head weight)
from .linear import __all__ as _linear_all
from .losses import *  # noqa: F401,F403  (the loss heads; their __all__ lists them)
from .losses import __all__ as _losses_all
from .ops.sequence_logprobs import SequenceLogProbs, sequence_logprobs
from .ops.token_logprobs import TokenLogProbsOutput, token_logprobs

__all__ = [
    "available_backends",
    "build_info",
    "token_logprobs",
    "TokenLogProbsOutput",
    "sequence_logprobs",
    "SequenceLogProbs",
    *_losses_all,
    *_linear_all,
]

# Old public names, kept importable for one release with a DeprecationWarning (not in __all__).
_RENAMED = {
    "TokenLogProbs": "TokenLogProbsOutput",
    "pair_logps": "pair_logprobs",
    "linear_pair_logps": "linear_pair_logprobs",
    "fused_dpo_loss": "logits_dpo_loss",
    "FusedDPOLoss": "LogitsDPOLoss",
}


def __getattr__(name):
    if name in _RENAMED:
        import warnings

        new = _RENAMED[name]
        warnings.warn(
            f"prefopt_fast.{name} is deprecated and will be removed; use prefopt_fast.{new}",
            DeprecationWarning,
            stacklevel=2,
        )
        return globals()[new]
    raise AttributeError(f"module 'prefopt_fast' has no attribute {name!r}")
