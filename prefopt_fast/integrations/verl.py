"""verl 0.9 integration: prefopt_fast as a fused-kernel backend of verl, and behind its from-logits helpers.

Importing :mod:`prefopt_fast` never imports verl; importing this module does.

:func:`patch_verl` / :func:`unpatch_verl` / :func:`patched_verl` swap three things, process-wide:

1. the fused-linear backend. verl computes PPO log-probs and entropy from hidden states and the
   lm_head weight with ``verl.utils.experimental.torch_functional.FusedLinearForPPO(impl_backend=...)``,
   which the model forward installed by ``verl.models.transformers.monkey_patch.patch_forward_with_backends``
   builds from ``model._verl_fused_kernels_backend`` (the config's
   ``actor_rollout_ref.model.fused_kernel_options.impl_backend``). While patched,
   ``FusedLinearForPPO`` is :class:`PrefoptFusedLinearForPPO` (a subclass accepting
   ``impl_backend="prefopt"``; the other backends are verl's own) and ``patch_forward_with_backends``
   accepts ``"prefopt"``: it installs verl's torch-backend forward (the one for the model type:
   dense, Qwen2/3-VL, GLM-4V, Qwen3.5) and marks the model ``"prefopt"``. The prefopt backend calls
   :func:`prefopt_fast.linear_token_logprobs` with ``stats=("entropy",)``; it returns what verl's
   "torch" backend returns: fp32 log-probs and entropy in the logits' dtype, shaped like
   ``input_ids`` (``[T]`` for ``[T, H]`` hidden states, ``[B, S]`` for ``[B, S, H]``: verl passes
   ``[1, total_nnz, H]`` with ``use_remove_padding`` and ``[B, S, H]`` without), with
   ``logits = hidden @ weight.T / temperature``.
2. ``verl.utils.torch_functional.logprobs_from_logits`` / ``entropy_from_logits`` /
   ``entropy_from_logits_with_chunking`` (the non-fused path: verl's engines divide the logits by
   the temperature first, then call these on ``[total_nnz, V]`` rmpad logits or ``[B, S, V]``),
   in that module and in every ``verl.*`` module that imported them by name, computed with
   :func:`prefopt_fast.token_logprobs`. Same signatures, shapes and dtypes as verl's: log-probs
   fp32 where verl would use flash-attn's cross-entropy (flash-attn importable and
   ``VERL_DISABLE_FLASH_ATTN_CE`` unset), else in the logits' dtype (verl's PyTorch path);
   ``entropy_from_logits`` in the logits' dtype, ``entropy_from_logits_with_chunking`` fp32.
   ``inplace_backward`` keeps its meaning (the backward overwrites the logits buffer), which
   verl's CPU path ignores.
3. policy losses: the names of :data:`POLICY_LOSSES` (``prefopt_vanilla`` / ``prefopt_gspo``: verl's
   ``vanilla`` / ``gspo`` computed by :func:`prefopt_fast.policy_loss`) are registered with
   ``verl.trainer.ppo.core_algos.register_policy_loss`` (``actor.policy_loss.loss_mode``).

Ray: verl's actors run in other processes. Patch them by importing this module there with the
environment variable ``PREFOPT_VERL_PATCH=1`` set (importing it then calls :func:`patch_verl`), e.g.
``VERL_USE_EXTERNAL_MODULES=prefopt_fast.integrations.verl PREFOPT_VERL_PATCH=1`` in the shell that
launches ``verl.trainer.main_ppo`` (``import verl`` imports the modules it lists; the local Ray
workers inherit the environment). See docs/integrations.md.

Falls back to verl's own code (one warning per reason) for devices other than CPU / CUDA and
dtypes other than fp32 / bf16 / fp16.
"""

import contextlib
import io
import os
import sys
import threading
import warnings
from typing import Optional

import torch
import verl

from . import version_guard
from ._patch_state import PatchState

# The verl versions this integration was tested with, [low, high), and the internals it relies
# on. Outside the range it warns once at patch time; a missing internal is an error naming it.
TESTED_VERL = ("0.9", "0.10")
VERL_INTERNALS = (
    "verl.utils.experimental.torch_functional.FusedLinearForPPO",  # the class patch_verl swaps
    "verl.models.transformers.monkey_patch.patch_forward_with_backends",  # swapped: accepts "prefopt"
    "verl.models.transformers.monkey_patch.apply_monkey_patch",  # calls it by its module global
    "verl.models.transformers.dense_common.forward_with_torch_backend",
    "verl.utils.torch_functional.logprobs_from_logits",
    "verl.utils.torch_functional.entropy_from_logits",
    "verl.utils.torch_functional.entropy_from_logits_with_chunking",
    "verl.utils.torch_functional.FLAH_ATTN_CROSS_ENTROPY_LOSS_AVAILABLE",  # sic: verl's spelling
    "verl.trainer.ppo.core_algos.register_policy_loss",
    "verl.trainer.ppo.core_algos.POLICY_LOSS_REGISTRY",
    "verl.trainer.ppo.core_algos.agg_loss",
    "verl.trainer.ppo.core_algos.compute_policy_loss_vanilla",  # what prefopt_vanilla restates
    "verl.trainer.ppo.core_algos.compute_policy_loss_gspo",  # what prefopt_gspo restates
)
_INTEGRATION = "prefopt_fast.integrations.verl"
_VERL_VERSION = getattr(verl, "__version__", "0")

version_guard.require_internals(_INTEGRATION, "verl", _VERL_VERSION, TESTED_VERL, VERL_INTERNALS, error=ImportError)

import verl.models.transformers.monkey_patch as _verl_monkey_patch  # noqa: E402
import verl.trainer.ppo.core_algos as _verl_core_algos  # noqa: E402
import verl.utils.experimental.torch_functional as _verl_exp_F  # noqa: E402
import verl.utils.torch_functional as _verl_F  # noqa: E402

from ..losses.ppo import policy_loss  # noqa: E402
from ..ops.linear_logprobs import linear_token_logprobs  # noqa: E402
from ..ops.token_logprobs import token_logprobs  # noqa: E402

__all__ = [
    "TESTED_VERL",
    "BACKEND",
    "POLICY_LOSSES",
    "check_verl",
    "patch_verl",
    "unpatch_verl",
    "patched_verl",
    "is_verl_patched",
    "PrefoptFusedLinearForPPO",
    "logprobs_from_logits",
    "entropy_from_logits",
    "entropy_from_logits_with_chunking",
    "compute_policy_loss_prefopt_vanilla",
    "compute_policy_loss_prefopt_gspo",
]

BACKEND = "prefopt"  # the value of fused_kernel_options.impl_backend that selects prefopt_fast

# verl's originals, taken at import (before any patch of ours)
_VERL_FUSED = _verl_exp_F.FusedLinearForPPO
_VERL_PATCH_FORWARD = _verl_monkey_patch.patch_forward_with_backends
_VERL_LOGPROBS = _verl_F.logprobs_from_logits
_VERL_ENTROPY = _verl_F.entropy_from_logits
_VERL_ENTROPY_CHUNKED = _verl_F.entropy_from_logits_with_chunking

_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_KERNEL_DEVICES = ("cpu", "cuda")

_warned = set()
_warn_lock = threading.Lock()


def _warn_once(reason: str) -> None:
    with _warn_lock:
        if reason in _warned:
            return
        _warned.add(reason)
    warnings.warn(f"{_INTEGRATION}: {reason}; using verl's own implementation for these calls", RuntimeWarning, 3)


def _fallback_reason(t: torch.Tensor) -> Optional[str]:
    if t.device.type not in _KERNEL_DEVICES:
        return f"device type {t.device.type!r} has no prefopt_fast kernel"
    if t.dtype not in _KERNEL_DTYPES:
        return f"dtype {t.dtype} is not float32 / bfloat16 / float16"
    return None


def check_verl() -> None:
    """Check the installed verl: warn once (``UntestedVersionWarning``) when its version is outside
    :data:`TESTED_VERL`; raise ``RuntimeError`` naming any internal of :data:`VERL_INTERNALS` it lacks.
    Called by :func:`patch_verl` and :func:`patched_verl`."""
    version_guard.warn_if_untested(_INTEGRATION, "verl", _VERL_VERSION, TESTED_VERL, stacklevel=4)
    version_guard.require_internals(_INTEGRATION, "verl", _VERL_VERSION, TESTED_VERL, VERL_INTERNALS)


# --------------------------------------------------------------------------- fused-linear backend


def _fused_linear(hidden: torch.Tensor, weight: torch.Tensor, input_ids: torch.Tensor, temperature):
    """verl's FusedLinearForPPO contract on prefopt_fast: ``hidden`` ``[T, H]`` or ``[B, S, H]``,
    ``weight`` ``[V, H]``, ``input_ids`` shaped ``hidden.shape[:-1]`` -> (fp32 log-probs, entropy in
    the logits' dtype), both shaped like ``input_ids``."""
    if hidden.ndim not in (2, 3):
        raise ValueError(f"hidden_states must be 2D or 3D, got shape {tuple(hidden.shape)}")
    if input_ids.shape != hidden.shape[:-1]:
        raise ValueError(
            f"input_ids shape {tuple(input_ids.shape)} must match hidden_states shape {tuple(hidden.shape[:-1])}"
        )
    dev = hidden.device
    # the dtype verl's torch backend computes the logits in: the matmul's (autocast's when on)
    autocast_on = dev.type in _KERNEL_DEVICES and torch.is_autocast_enabled(dev.type)
    cdt = torch.get_autocast_dtype(dev.type) if autocast_on else torch.promote_types(hidden.dtype, weight.dtype)
    ctx = torch.autocast(dev.type, enabled=False) if autocast_on else contextlib.nullcontext()
    with ctx:
        out = linear_token_logprobs(
            hidden.to(cdt), weight.to(cdt), input_ids, temperature=temperature, stats=("entropy",)
        )
    return out.logprobs.float(), out.entropy.to(cdt)


class PrefoptFusedLinearForPPO(_VERL_FUSED):
    """verl's ``FusedLinearForPPO`` accepting ``impl_backend="prefopt"`` (prefopt_fast's fused-linear
    log-probs and entropy); ``"torch"`` and ``"liger"`` run verl's own code. ``chunk_size`` is
    ignored by the prefopt backend (prefopt_fast sizes its tiles by its own memory rule)."""

    def __init__(self, chunk_size: int = 512, impl_backend: str = "torch"):
        if impl_backend != BACKEND:
            super().__init__(chunk_size=chunk_size, impl_backend=impl_backend)
            return
        torch.nn.Module.__init__(self)
        self.chunk_size = chunk_size
        self.impl_backend = impl_backend

    def forward(self, hidden_states, vocab_weights, input_ids, temperature: float = 1.0):
        if self.impl_backend != BACKEND:
            return super().forward(hidden_states, vocab_weights, input_ids, temperature)
        input_ids = input_ids.to(torch.int64)  # as verl
        why = _fallback_reason(hidden_states) or _fallback_reason(vocab_weights)
        if why is not None:
            _warn_once(why)
            return _VERL_FUSED(chunk_size=self.chunk_size, impl_backend="torch")(
                hidden_states, vocab_weights, input_ids, temperature
            )
        return _fused_linear(hidden_states, vocab_weights, input_ids, temperature)


def _patch_forward_with_backends(model, use_fused_kernels: bool = False, fused_kernels_backend: str = None):
    """verl's ``patch_forward_with_backends``, which also accepts ``fused_kernels_backend="prefopt"``:
    verl's torch-backend forward for the model type, with the model marked ``"prefopt"`` (that forward
    builds ``FusedLinearForPPO(impl_backend=model._verl_fused_kernels_backend)``)."""
    original = _saved.get(("verl.models.transformers.monkey_patch", "patch_forward_with_backends"), _VERL_PATCH_FORWARD)
    if not (use_fused_kernels and fused_kernels_backend == BACKEND):
        return original(model, use_fused_kernels=use_fused_kernels, fused_kernels_backend=fused_kernels_backend)
    with contextlib.redirect_stdout(io.StringIO()):  # it would print "Using Torch backend"
        original(model, use_fused_kernels=True, fused_kernels_backend="torch")
    model._verl_fused_kernels_backend = BACKEND
    print(f"Using prefopt_fast backend for fused kernels in {model.__class__.__name__}")


# --------------------------------------------------------------------------- from-logits helpers


def _verl_logprob_dtype(logits: torch.Tensor) -> torch.dtype:
    # verl's logprobs_from_logits: flash-attn's cross-entropy (fp32 out) when importable and not
    # disabled, else log_softmax + gather in the logits' dtype
    flash = _verl_F.FLAH_ATTN_CROSS_ENTROPY_LOSS_AVAILABLE and os.environ.get("VERL_DISABLE_FLASH_ATTN_CE", "0") != "1"
    return torch.float32 if flash else logits.dtype


def logprobs_from_logits(logits, labels, inplace_backward=True):
    """verl's ``logprobs_from_logits`` on prefopt_fast: ``logits`` ``[..., V]``, ``labels`` ``[...]``
    -> log-probs ``[...]`` (dtype: see the module docstring). ``inplace_backward=True`` lets the
    backward overwrite ``logits`` with their gradient (verl passes False when the entropy also needs them)."""
    why = _fallback_reason(logits)
    if why is not None:
        _warn_once(why)
        return _VERL_LOGPROBS(logits, labels, inplace_backward=inplace_backward)
    out = token_logprobs(logits, labels.to(torch.int64), inplace_backward=bool(inplace_backward))
    return out.to(_verl_logprob_dtype(logits))


def _entropy(logits: torch.Tensor) -> torch.Tensor:
    # token_logprobs scores a label in the same pass; any in-range label serves
    dummy = torch.zeros(logits.shape[:-1], dtype=torch.int64, device=logits.device)
    return token_logprobs(logits, dummy, stats=("entropy",)).entropy


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """verl's ``entropy_from_logits``: ``[..., V]`` -> entropy ``[...]`` in the logits' dtype
    (differentiable), computed by prefopt_fast in fp32."""
    why = _fallback_reason(logits)
    if why is not None:
        _warn_once(why)
        return _VERL_ENTROPY(logits)
    return _entropy(logits).to(logits.dtype)


def entropy_from_logits_with_chunking(logits: torch.Tensor, chunk_size: int = 2048) -> torch.Tensor:
    """verl's ``entropy_from_logits_with_chunking``: ``[N, V]`` -> fp32 entropy ``[N]``.
    ``chunk_size`` is ignored: prefopt_fast never materializes the softmax."""
    why = _fallback_reason(logits)
    if why is not None:
        _warn_once(why)
        return _VERL_ENTROPY_CHUNKED(logits, chunk_size=chunk_size)
    return _entropy(logits).float()


# --------------------------------------------------------------------------- patch state

# (defining module, attribute) -> the replacement; every verl.* module that imported the original
# by name gets the replacement too
_REPLACEMENTS = {
    ("verl.utils.experimental.torch_functional", "FusedLinearForPPO"): PrefoptFusedLinearForPPO,
    ("verl.models.transformers.monkey_patch", "patch_forward_with_backends"): _patch_forward_with_backends,
    ("verl.utils.torch_functional", "logprobs_from_logits"): logprobs_from_logits,
    ("verl.utils.torch_functional", "entropy_from_logits"): entropy_from_logits,
    ("verl.utils.torch_functional", "entropy_from_logits_with_chunking"): entropy_from_logits_with_chunking,
}
_state = {"installed": False}  # what _install saved; the patch bookkeeping is _patches
_saved: dict = {}  # (defining module, attribute) -> what was there before the patch
_POLICY_LOSSES_REGISTERED: dict = {}  # name -> what the registry held before (None: nothing)


def _verl_modules():
    return [m for n, m in list(sys.modules.items()) if m is not None and (n == "verl" or n.startswith("verl."))]


def _install() -> None:
    if _state["installed"]:
        return
    modules = _verl_modules()
    for (home, attr), new in _REPLACEMENTS.items():
        old = getattr(sys.modules[home], attr)
        _saved[(home, attr)] = old
        for mod in modules:
            if getattr(mod, "__dict__", {}).get(attr) is old:  # no module __getattr__ (lazy import) runs
                setattr(mod, attr, new)
    _register_policy_losses()
    _state["installed"] = True


def _uninstall() -> None:
    if not _state["installed"]:
        return
    modules = _verl_modules()
    for (home, attr), new in _REPLACEMENTS.items():
        old = _saved.pop((home, attr))
        if getattr(sys.modules[home], attr) is not new:
            warnings.warn(
                f"{_INTEGRATION}: {home}.{attr} was replaced by something else while patched; leaving that in place",
                RuntimeWarning,
                stacklevel=3,
            )
        for mod in modules:
            if getattr(mod, "__dict__", {}).get(attr) is new:
                setattr(mod, attr, old)
    _unregister_policy_losses()
    _state["installed"] = False


_patches = PatchState(_install, _uninstall)


def patch_verl() -> None:
    """Make ``fused_kernel_options.impl_backend: prefopt`` a verl fused-kernel backend, route verl's
    from-logits log-prob / entropy helpers to prefopt_fast and register the prefopt policy losses,
    until :func:`unpatch_verl`. Idempotent. Call it before verl builds its models and engines
    (they capture the helpers then)."""
    check_verl()
    _patches.patch()


def unpatch_verl() -> None:
    """Undo :func:`patch_verl`: restore what was there before. Idempotent. A model whose forward
    verl already patched with ``impl_backend="prefopt"`` then fails at its next forward (verl's
    ``FusedLinearForPPO`` rejects the backend). While a :func:`patched_verl` context is open, the
    patch stays until the last one exits."""
    _patches.unpatch()


@contextlib.contextmanager
def patched_verl():
    """Context manager: :func:`patch_verl` inside. Re-entrant and thread-safe; the originals come back
    when the last context exits, unless :func:`patch_verl` was called (then at :func:`unpatch_verl`)."""
    check_verl()
    with _patches.scoped():
        yield


def is_verl_patched() -> bool:
    """Whether :func:`patch_verl` / :func:`patched_verl` is in effect."""
    return _state["installed"]


# --------------------------------------------------------------------------- policy losses


def _verl_clip(config):
    """verl's vanilla clip parameters from its ActorConfig: eps_low, eps_high, dual-clip c."""
    clip = config.clip_ratio
    low = config.clip_ratio_low if config.clip_ratio_low is not None else clip
    high = config.clip_ratio_high if config.clip_ratio_high is not None else clip
    c = config.get("clip_ratio_c", 3.0)
    if not c > 1.0:
        raise ValueError(f"clip_ratio_c must be > 1 (the dual-clip lower bound of the ratio); got {c}")
    return low, high, c


def _verl_policy_loss(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config, is_weights, **head):
    """prefopt_fast's PPO head (``convention="verl"``) aggregated as verl's ``agg_loss`` with the
    actor's ``global_batch_info``; ``head``: the objective's own options. Returns verl's
    ``(loss, metrics)``."""
    assert config is not None  # as verl: the loss reads the actor config
    mask = response_mask.to(log_prob.dtype)
    info = dict(getattr(config, "global_batch_info", None) or {})
    dp_size = info.get("dp_size", 1)
    num_tokens, batch_size = info.get("batch_num_tokens"), info.get("global_batch_size")
    # verl's agg_loss over the global batch: token modes divide by the global token count / dp,
    # sequence modes by the global number of sequences / dp (each rank's loss then averages right)
    mode, global_num_tokens, rescale = loss_agg_mode, None, None
    if loss_agg_mode in ("token-mean", "token-sum"):
        if loss_agg_mode == "token-sum":
            mode, global_num_tokens = "token-mean", 1.0 / dp_size  # masked_sum * dp_size
        elif num_tokens is not None:
            global_num_tokens = num_tokens / dp_size
        elif dp_size > 1:
            raise ValueError("(global) batch_num_tokens is required when dp_size > 1")  # as verl's agg_loss
    elif loss_agg_mode in ("seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"):
        if batch_size is not None:  # the head divides by the local non-empty sequences: rescale
            rescale = (response_mask.sum(-1) > 0).sum().clamp(min=1) * dp_size / batch_size
        elif dp_size > 1:
            raise ValueError("global_batch_size is required when dp_size > 1")  # as verl's agg_loss
    loss, m = policy_loss(
        log_prob,
        old_log_prob,
        advantages,
        mask,
        convention="verl",
        loss_agg_mode=mode,
        max_length=info.get("loss_scale_factor") if loss_agg_mode == "seq-mean-token-sum-norm" else None,
        is_weights=is_weights,
        global_num_tokens=global_num_tokens,
        **head,
    )
    if rescale is not None:
        loss = loss * rescale
    metrics = {
        # verl's pg_clipfrac (-A clip(r) > -A r) is prefopt_fast's clip_ratio/region_mean
        "actor/pg_clipfrac": m["clip_ratio/region_mean"].item(),
        "actor/ppo_kl": m["ppo_kl"].item(),
        "actor/pg_clipfrac_lower": m["pg_clipfrac_lower"].item(),
    }
    return loss, metrics


def compute_policy_loss_prefopt_vanilla(
    old_log_prob: torch.Tensor,
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    loss_agg_mode: str = "token-mean",
    config=None,
    rollout_is_weights: Optional[torch.Tensor] = None,
):
    """verl's ``vanilla`` policy loss (``compute_policy_loss_vanilla``: clipped ratio with
    ``clip_ratio_low`` / ``clip_ratio_high``, dual clip ``clip_ratio_c``, the log-ratio clamped to
    [-20, 20], ``rollout_is_weights`` on the policy term, ``agg_loss`` with the actor's
    ``global_batch_info``) computed by :func:`prefopt_fast.policy_loss` with ``convention="verl"``
    on the ``[B, T]`` log-probs, for every ``loss_agg_mode`` verl 0.9 has. Same signature and
    return as verl's: ``(loss, {"actor/pg_clipfrac", "actor/ppo_kl", "actor/pg_clipfrac_lower"})``."""
    low, high, c = _verl_clip(config)
    return _verl_policy_loss(
        old_log_prob,
        log_prob,
        advantages,
        response_mask,
        loss_agg_mode,
        config,
        rollout_is_weights,
        clip_eps_low=low,
        clip_eps_high=high,
        dual_clip=c,
    )


def compute_policy_loss_prefopt_gspo(
    old_log_prob: torch.Tensor,
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    loss_agg_mode: str = "seq-mean-token-mean",
    config=None,
    rollout_is_weights: Optional[torch.Tensor] = None,
):
    """verl's ``gspo`` policy loss (``compute_policy_loss_gspo``: the sequence-level ratio
    exp(mean_t log r) carried per token, its log clamped above at 10, clipped with
    ``clip_ratio_low`` / ``clip_ratio_high``, no dual clip) by prefopt_fast's head with
    ``importance_sampling_level="sequence"`` and ``convention="verl"``. Signature and return as
    verl's."""
    low, high, _ = _verl_clip(config)
    return _verl_policy_loss(
        old_log_prob,
        log_prob,
        advantages,
        response_mask,
        loss_agg_mode,
        config,
        rollout_is_weights,
        clip_eps_low=low,
        clip_eps_high=high,
        importance_sampling_level="sequence",
    )


# verl loss_mode name -> function
POLICY_LOSSES = {
    "prefopt_vanilla": compute_policy_loss_prefopt_vanilla,
    "prefopt_gspo": compute_policy_loss_prefopt_gspo,
}


def _register_policy_losses() -> None:
    registry = _verl_core_algos.POLICY_LOSS_REGISTRY
    for name, fn in POLICY_LOSSES.items():
        _POLICY_LOSSES_REGISTERED[name] = registry.get(name)
        _verl_core_algos.register_policy_loss(name)(fn)


def _unregister_policy_losses() -> None:
    registry = _verl_core_algos.POLICY_LOSS_REGISTRY
    for name, fn in POLICY_LOSSES.items():
        before = _POLICY_LOSSES_REGISTERED.pop(name, None)
        if registry.get(name) is not fn:
            continue  # replaced by someone else meanwhile: theirs stays
        if before is None:
            del registry[name]
        else:
            registry[name] = before


if os.environ.get("PREFOPT_VERL_PATCH", "0") not in ("", "0"):
    patch_verl()
