"""TRL 1.16 integration: prefopt_fast behind TRL's fused LM head, and trainers whose losses are its heads.

Importing :mod:`prefopt_fast` never imports TRL; importing this module does.

Two independent pieces:

1. :func:`patch_trl` / :func:`unpatch_trl` / :func:`patched_trl` swap the module global
   ``trl.trainer.utils._ChunkedLogProbFunction`` -- the kernel behind ``add_fused_lm_head``,
   i.e. behind every log-prob of TRL's DPO, GRPO, RLOO, KTO and SFT trainers -- for
   :class:`PrefoptChunkedLogProbFunction`, which computes the same five outputs with
   :func:`prefopt_fast.linear_token_logprobs`. Nothing else in TRL changes.

2. :class:`DPOTrainer`, :class:`RewardTrainer` and :class:`GRPOTrainer`: subclasses of TRL's
   trainers with the same constructor (plus ``prefopt_lm_head``), whose loss comes from
   :func:`prefopt_fast.dpo_loss`, :func:`prefopt_fast.bradley_terry_loss` and the PPO head of
   :func:`prefopt_fast.ppo_loss`, logging the metrics TRL logs under the same names. A TRL
   option the heads cannot reproduce raises ``ValueError`` at construction, naming it.
   DPO and GRPO trainers also run under :func:`patched_trl` while they work (construction,
   ``train``, ``evaluate``, ``predict`` and every loss / input-preparation call).

What the patched head does with TRL's call
``apply(hidden, weight, bias, targets, temperature, chunk_size, softcap, logit_scale, outputs)``:

* compute dtype as TRL: the autocast dtype when autocast is on for the device, else
  ``hidden.dtype``; ``hidden``, ``weight`` and ``bias`` are cast to it (a differentiable
  ``.to``, a no-op when they already have it) and the kernels run with autocast off.
  Under autocast with fp32 master weights this casts the whole ``[V, H]`` weight once
  (TRL casts it tile by tile), and the weight gradient is accumulated in fp32 but rounded
  once to the compute dtype before it is cast back to fp32 (TRL keeps it fp32); in a pure
  fp32 or pure bf16 run the gradients match TRL's up to summation order.
* ``targets`` are used as given: TRL passes only the rows with a real label on Triton
  devices (CUDA / XPU) and every position elsewhere (CPU), the ignored ones clamped to
  token 0 and masked after the call. Both are reproduced (a clamped row is scored like any
  other row, as TRL does; the caller zeroes it and its gradient).
* ``chunk_size`` (TRL's vocabulary tile width) is ignored: prefopt_fast sizes its tiles by
  its own memory rule (see :mod:`prefopt_fast.ops.linear_logprobs`).
* ``final_logit_softcapping`` / ``logit_scale`` / ``temperature`` give the same transform
  ``softcap * tanh(z * logit_scale / softcap) / temperature`` (a softcap of 0 is TRL's 1.0).
* outputs ``entropy`` (differentiable), ``log_sum_sq_probs``, ``mean_logits``, ``is_top1``
  (non-differentiable) map to prefopt_fast's ``entropy``, ``log_sum_sq_probs``,
  ``mean_logit``, ``is_argmax``; unrequested ones are None, as in TRL.
* under ``accelerate launch`` with FSDP2 (accelerate 1.16) the weight arrives as the gathered
  plain parameter: accelerate puts ``[final norm, lm_head]`` in one unit that the final norm's
  forward gathers and that stays gathered until the backward, and FSDP2 reduce-scatters the
  head's gradient as any other (tested against a one-process run: tests/test_trainers_distributed.py).
* a DeepSpeed ZeRO-3 partitioned head (``weight`` / ``bias`` with DeepSpeed's ``ds_id``) runs
  on prefopt_fast too: read inside the engine's forward (as TRL's fused head reads it),
  DeepSpeed gathers it there and again for the backward, and reduce-scatters its whole-shape
  gradient; one still partitioned is gathered for a call without gradients and refused
  (``RuntimeError``) otherwise (:mod:`prefopt_fast.integrations._zero3`).
* falls back to TRL's own kernel (with one warning per reason) for a compute dtype other
  than fp32 / bf16 / fp16, and ``logit_scale == 0``.

The patch is process-wide: while it is on, every TRL model in the process uses it.
"""

import contextlib
import functools
import inspect
import math
import threading
import warnings
from contextlib import nullcontext
from typing import Optional

import torch
import trl

from . import _zero3, version_guard
from ._patch_state import PatchState

# The TRL versions this integration was tested with, [low, high), and the TRL internals it
# relies on (private names and trainer methods it overrides or calls). Outside the range it
# warns once at patch / trainer construction; a missing internal is an error naming it.
TESTED_TRL = ("1.16", "1.17")
TRL_INTERNALS = (
    "trl.trainer.utils._ChunkedLogProbFunction",  # the module global patch_trl swaps
    "trl.trainer.utils.use_adapter",
    "trl.trainer.utils.nanmin",
    "trl.trainer.utils.nanmax",
    "trl.kernels.ChunkedLogProbFunction",
    "trl.models.utils.disable_gradient_checkpointing",
    "trl.DPOTrainer._compute_loss",
    "trl.DPOTrainer.compute_ref_log_probs",
    "trl.RewardTrainer.compute_loss",
    "trl.GRPOTrainer._compute_loss",
    "trl.GRPOTrainer._prepare_inputs",
    "trl.GRPOTrainer._get_per_token_logps_and_entropies",
)
# attributes of a constructed trainer that the subclasses read or update
_TRAINER_ATTRIBUTES = {
    "DPOTrainer": ("_metrics", "_total_train_tokens", "_tp_size"),
    "RewardTrainer": ("_metrics", "_total_train_tokens", "_tp_size"),
    "GRPOTrainer": ("_metrics", "_entropy_bonus_enabled"),
}
_INTEGRATION = "prefopt_fast.integrations.trl"

version_guard.require_internals(_INTEGRATION, "trl", trl.__version__, TESTED_TRL, TRL_INTERNALS, error=ImportError)

import trl.trainer.utils as _trl_utils  # noqa: E402
from accelerate.utils import is_peft_model  # noqa: E402
from trl.kernels import ChunkedLogProbFunction as _TRL_CHUNKED  # noqa: E402
from trl.models.utils import disable_gradient_checkpointing  # noqa: E402

from ..losses._common import reward_metrics
from ..losses.dpo import DPOLoss
from ..losses.ppo import TRL_LOSS_TYPE_ARGS, TRL_LOSS_TYPES, PolicyLoss
from ..losses.reward import BradleyTerryLoss
from ..ops.linear_logprobs import linear_token_logprobs

__all__ = [
    "TESTED_TRL",
    "check_trl",
    "patch_trl",
    "unpatch_trl",
    "patched_trl",
    "is_trl_patched",
    "PrefoptChunkedLogProbFunction",
    "DPOTrainer",
    "RewardTrainer",
    "GRPOTrainer",
    "SUPPORTED_GRPO_LOSS_TYPES",
]

# TRL's optional outputs, in the order of its return tuple, and prefopt_fast's stat names
_TRL_OUTPUTS = ("entropy", "log_sum_sq_probs", "mean_logits", "is_top1")
_PF_STAT = {
    "entropy": "entropy",
    "log_sum_sq_probs": "log_sum_sq_probs",
    "mean_logits": "mean_logit",
    "is_top1": "is_argmax",
}
_HALF_OR_FLOAT = (torch.float32, torch.bfloat16, torch.float16)

# --------------------------------------------------------------------------- the patched kernel

_warned = set()
_warn_lock = threading.Lock()


def _warn_once(reason: str) -> None:
    with _warn_lock:
        if reason in _warned:
            return
        _warned.add(reason)
    warnings.warn(
        f"prefopt_fast.integrations.trl: {reason}; using TRL's own ChunkedLogProbFunction for these calls",
        RuntimeWarning,
        stacklevel=3,
    )


def _fallback_reason(weight, compute_dtype, logit_scale) -> Optional[str]:
    if compute_dtype not in _HALF_OR_FLOAT:
        return f"compute dtype {compute_dtype} (prefopt_fast's fused-linear kernels take fp32 / bf16 / fp16)"
    if isinstance(logit_scale, (int, float)) and not isinstance(logit_scale, bool) and logit_scale == 0:
        return "logit_scale == 0 (every logit is 0)"
    return None


class PrefoptChunkedLogProbFunction:
    """Drop-in for ``trl.kernels.ChunkedLogProbFunction`` backed by :func:`prefopt_fast.linear_token_logprobs`.

    ``apply(hidden [N, H], weight [V, H], bias [V] | None, targets int [N], temperature: float,
    chunk_size: int, final_logit_softcapping: float | None = None, logit_scale: float = 1.0,
    outputs=("entropy", "log_sum_sq_probs", "mean_logits", "is_top1"))`` returns
    ``(log_probs, entropy, log_sum_sq_probs, mean_logits, is_top1)``, fp32 ``[N]`` (is_top1
    bool), the fields not named in ``outputs`` None. Gradients reach hidden, weight and bias
    through log_probs and entropy. See the module docstring for the exact correspondence.
    """

    @staticmethod
    def apply(
        hidden,
        weight,
        bias,
        targets,
        temperature,
        chunk_size,
        final_logit_softcapping=None,
        logit_scale=1.0,
        outputs=_TRL_OUTPUTS,
    ):
        dev = hidden.device
        autocast_on = torch.is_autocast_enabled(dev.type)
        cdt = torch.get_autocast_dtype(dev.type) if autocast_on else hidden.dtype
        reason = _fallback_reason(weight, cdt, logit_scale)
        if reason is not None:
            _warn_once(reason)
            return _original().apply(
                hidden, weight, bias, targets, temperature, chunk_size, final_logit_softcapping, logit_scale, outputs
            )
        names = tuple(n for n in _TRL_OUTPUTS if n in outputs)
        # TRL: `softcap = final_logit_softcapping or 1.0` once a softcap is given
        softcap = None if final_logit_softcapping is None else (final_logit_softcapping or 1.0)
        ctx = torch.autocast(dev.type, enabled=False) if autocast_on else nullcontext()
        # a ZeRO-3 head: checked to be gathered (by DeepSpeed's engine in the forward it is read in),
        # or gathered for a call without gradients
        with _zero3.gathered(weight, bias), ctx:
            h = hidden.to(cdt)
            w = weight.to(cdt)
            b = None if bias is None else bias.to(cdt)
            out = linear_token_logprobs(
                h,
                w,
                targets,
                bias=b,
                temperature=temperature,
                logit_scale=float(logit_scale),
                softcap=softcap,
                stats=tuple(_PF_STAT[n] for n in names),
            )
        if not names:
            return out, None, None, None, None
        return (out.logprobs, out.entropy, out.log_sum_sq_probs, out.mean_logit, out.is_argmax)


# --------------------------------------------------------------------------- version guard


def check_trl() -> None:
    """Check the installed TRL: warn once (``UntestedVersionWarning``) when its version is
    outside :data:`TESTED_TRL`; raise ``RuntimeError`` naming any internal of
    :data:`TRL_INTERNALS` it lacks. Called by :func:`patch_trl`, :func:`patched_trl` and the
    trainers' constructors."""
    version_guard.warn_if_untested(_INTEGRATION, "trl", trl.__version__, TESTED_TRL, stacklevel=4)
    version_guard.require_internals(_INTEGRATION, "trl", trl.__version__, TESTED_TRL, TRL_INTERNALS)


def _check_trainer(trainer, kind: str) -> None:
    """RuntimeError naming the TRL ``kind`` trainer's attributes the subclass needs and ``trainer`` lacks."""
    version_guard.require_attributes(
        f"{_INTEGRATION}.{kind}", f"trl.{kind}", trainer, _TRAINER_ATTRIBUTES[kind], "trl", trl.__version__, TESTED_TRL
    )


# --------------------------------------------------------------------------- patch state

_state = {"saved": None}  # what _install saved; the patch bookkeeping is _patches


def _original():
    saved = _state["saved"]
    return _TRL_CHUNKED if saved is None or saved is PrefoptChunkedLogProbFunction else saved


def _install() -> None:
    cur = _trl_utils._ChunkedLogProbFunction
    if cur is PrefoptChunkedLogProbFunction:
        return
    _state["saved"] = cur
    _trl_utils._ChunkedLogProbFunction = PrefoptChunkedLogProbFunction


def _uninstall() -> None:
    cur = _trl_utils._ChunkedLogProbFunction
    if cur is PrefoptChunkedLogProbFunction:
        _trl_utils._ChunkedLogProbFunction = _state["saved"] if _state["saved"] is not None else _TRL_CHUNKED
    elif _state["saved"] is not None:
        warnings.warn(
            "prefopt_fast.integrations.trl: trl.trainer.utils._ChunkedLogProbFunction was replaced by "
            f"something else ({cur!r}) while patched; leaving that in place",
            RuntimeWarning,
            stacklevel=3,
        )
    _state["saved"] = None


_patches = PatchState(_install, _uninstall)


def patch_trl() -> None:
    """Route TRL's fused LM head through prefopt_fast until :func:`unpatch_trl`. Idempotent."""
    check_trl()
    _patches.patch()


def unpatch_trl() -> None:
    """Undo :func:`patch_trl`: restore the object that was there before. Idempotent.

    While a :func:`patched_trl` context (e.g. a running prefopt_fast trainer) is open, the
    patch stays until the last one exits.
    """
    _patches.unpatch()


@contextlib.contextmanager
def patched_trl():
    """Context manager: TRL's fused LM head runs on prefopt_fast inside. Re-entrant and thread-safe.

    The contexts are counted: the original object comes back when the last one exits, unless
    :func:`patch_trl` was called (then it stays until :func:`unpatch_trl`).
    """
    check_trl()
    with _patches.scoped():
        yield


def is_trl_patched() -> bool:
    """Whether ``trl.trainer.utils._ChunkedLogProbFunction`` is prefopt_fast's right now."""
    return _trl_utils._ChunkedLogProbFunction is PrefoptChunkedLogProbFunction


# --------------------------------------------------------------------------- shared trainer plumbing


def _bound_args(parent_init, args, kwargs):
    """The ``args`` (config) argument of a TRL trainer constructor call, or None."""
    try:
        bound = inspect.signature(parent_init).bind(None, *args, **kwargs)
    except TypeError:
        return None  # let TRL's constructor report the bad call
    return bound.arguments.get("args")


def _unsupported(trainer: str, option: str, value, why: str) -> ValueError:
    return ValueError(f"prefopt_fast.integrations.trl.{trainer}: {option}={value!r} is not supported: {why}")


def _with_lm_head_patch(method):
    """Run a trainer method under :func:`patched_trl` when the trainer asks for it."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        ctx = patched_trl() if getattr(self, "_prefopt_lm_head", False) else nullcontext()
        with ctx:
            return method(self, *args, **kwargs)

    return wrapper


class _LMHeadPatchMixin:
    """train / evaluate / predict / compute_loss under :func:`patched_trl` (``prefopt_lm_head=True``)."""

    @_with_lm_head_patch
    def train(self, *args, **kwargs):
        return super().train(*args, **kwargs)

    @_with_lm_head_patch
    def evaluate(self, *args, **kwargs):
        return super().evaluate(*args, **kwargs)

    @_with_lm_head_patch
    def predict(self, *args, **kwargs):
        return super().predict(*args, **kwargs)

    @_with_lm_head_patch
    def compute_loss(self, *args, **kwargs):
        return super().compute_loss(*args, **kwargs)


def _gather_mean(accelerator, x: torch.Tensor) -> float:
    return accelerator.gather(x.detach().reshape(1)).mean().item()


# --------------------------------------------------------------------------- DPO

_DPO_NON_MODEL_KEYS = frozenset({"completion_mask", "ref_chosen_logps", "ref_rejected_logps"})


class DPOTrainer(_LMHeadPatchMixin, trl.DPOTrainer):
    """TRL's ``DPOTrainer`` with the loss of :func:`prefopt_fast.dpo_loss` and TRL's fused head on prefopt_fast.

    Same constructor as ``trl.DPOTrainer`` plus ``prefopt_lm_head`` (default True: run TRL's
    fused LM head on :class:`PrefoptChunkedLogProbFunction` while the trainer works; False
    keeps TRL's kernel and changes only the loss head).

    Supported: every ``DPOConfig.loss_type`` of TRL 1.16 (several at once with
    ``loss_weights``), ``beta``, ``label_smoothing``, ``f_divergence_type`` /
    ``f_alpha_divergence_coef``, ``discopop_tau``, ``use_weighting`` (WPO), ``ld_alpha``
    (LD-DPO), ``precompute_ref_log_probs``, a reference model or a PEFT adapter disabled as
    the reference (or the ``"ref"`` adapter), ``sync_ref_model``, MoE ``router_aux_loss_coef``.
    Logged as TRL: ``entropy``, ``num_tokens``, ``logits/chosen``, ``logits/rejected``,
    ``mean_token_accuracy``, ``rewards/{chosen,rejected,accuracies,margins}``,
    ``logps/{chosen,rejected}`` (and ``aux_loss``).

    Refused at construction (``ValueError``): ``label_smoothing`` outside the range a loss
    type defines (``robust``: [0, 0.5), TRL only warns; ``exo_pair``: (0, 1)), ``beta <= 0``,
    and anything else :class:`prefopt_fast.DPOLoss` rejects.

    Differences: the reward / logps metrics are the means of each process's batch means
    (TRL: the mean of the gathered per-pair values), equal when every process has the same
    batch size, which accelerate's even batches ensure; ``sft`` on a batch without any chosen
    completion token gives 0 (TRL: NaN).
    """

    def __init__(self, *args, prefopt_lm_head: bool = True, **kwargs):
        if not isinstance(prefopt_lm_head, bool):
            raise TypeError(f"prefopt_lm_head must be a bool; got {type(prefopt_lm_head).__name__}")
        self._prefopt_lm_head = prefopt_lm_head
        check_trl()
        cfg = _bound_args(trl.DPOTrainer.__init__, args, kwargs)
        if cfg is not None:
            self._prefopt_build_heads(cfg)
        with patched_trl() if prefopt_lm_head else nullcontext():
            super().__init__(*args, **kwargs)
        _check_trainer(self, "DPOTrainer")
        self._prefopt_build_heads(self.args)

    def _prefopt_build_heads(self, args) -> None:
        types = list(args.loss_type) if isinstance(args.loss_type, (list, tuple)) else [args.loss_type]
        weights = list(args.loss_weights) if args.loss_weights is not None else [1.0] * len(types)
        if len(weights) != len(types):
            raise _unsupported(
                "DPOTrainer", "loss_weights", args.loss_weights, f"needs one weight per loss_type {types}"
            )
        main = [(t, w) for t, w in zip(types, weights) if t != "sft"]
        sft = [w for t, w in zip(types, weights) if t == "sft"]
        try:
            with warnings.catch_warnings():
                # prefopt_fast warns when label_smoothing has no effect; TRL does not
                warnings.simplefilter("ignore", UserWarning)
                self._prefopt_dpo = (
                    DPOLoss(
                        beta=args.beta,
                        loss_type=[t for t, _ in main],
                        loss_weights=[w for _, w in main],
                        label_smoothing=args.label_smoothing,
                        f_divergence=args.f_divergence_type,
                        f_alpha=args.f_alpha_divergence_coef,
                        discopop_tau=args.discopop_tau,
                    )
                    if main
                    else None
                )
            # TRL's sft term reads the per-token log-probs and the shifted completion mask, whatever
            # ld_alpha and the length convention of ipo / sigmoid_norm: its own head call
            self._prefopt_sft = DPOLoss(beta=args.beta, loss_type=["sft"] * len(sft), loss_weights=sft) if sft else None
        except (TypeError, ValueError) as e:
            raise ValueError(
                f"prefopt_fast.integrations.trl.DPOTrainer: DPOConfig(loss_type={types}, loss_weights="
                f"{args.loss_weights}, beta={args.beta}, label_smoothing={args.label_smoothing}, f_divergence_type="
                f"{args.f_divergence_type!r}, f_alpha_divergence_coef={args.f_alpha_divergence_coef}, discopop_tau="
                f"{args.discopop_tau}) is not supported by prefopt_fast.dpo_loss: {e}"
            ) from e
        if args.ld_alpha is not None and not (isinstance(args.ld_alpha, (int, float)) and math.isfinite(args.ld_alpha)):
            raise _unsupported("DPOTrainer", "ld_alpha", args.ld_alpha, "must be a finite float or None")

    @_with_lm_head_patch
    def compute_ref_log_probs(self, model, inputs):
        return super().compute_ref_log_probs(model, inputs)

    def _prefopt_reduce(self, per_token: torch.Tensor, label_mask: torch.Tensor) -> torch.Tensor:
        """Per-sequence log-probs from per-token ones: sums, or LD-DPO's shared + alpha * tail."""
        if self.ld_alpha is None:
            return per_token.sum(dim=1)
        # rank of each completion token within its sequence (0 elsewhere); the shared part is the
        # first min(len_chosen, len_rejected) tokens of each completion of the pair
        rank = label_mask.cumsum(dim=1) * label_mask
        lengths = label_mask.sum(dim=1)
        lc, lr = lengths.chunk(2, dim=0)
        shared = torch.minimum(lc, lr).repeat(2).unsqueeze(1)
        in_shared = (rank > 0) & (rank <= shared)
        in_tail = rank > shared
        return (per_token * in_shared).sum(dim=1) + self.ld_alpha * (per_token * in_tail).sum(dim=1)

    def _prefopt_ref_logps(self, ref_kwargs, labels, seq_len, label_mask):
        with torch.no_grad(), disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs):
            if is_peft_model(self.model) and self.ref_model is None:
                unwrapped = self.accelerator.unwrap_model(self.model)
                name = "ref" if "ref" in unwrapped.peft_config else None
                with _trl_utils.use_adapter(unwrapped, adapter_name=name):
                    out = self.model(**ref_kwargs, labels=labels, fused_lm_head=True)
            else:
                out = self.ref_model(**ref_kwargs, labels=labels, fused_lm_head=True)
        return self._prefopt_reduce(out.log_probs[:, -seq_len:], label_mask)

    def _compute_loss(self, model, inputs, return_outputs):
        mode = "train" if self.model.training else "eval"
        model_kwargs = {k: v for k, v in inputs.items() if k not in _DPO_NON_MODEL_KEYS}
        model_kwargs["use_cache"] = False
        if self.aux_loss_enabled:
            model_kwargs["output_router_logits"] = True
        completion_mask = inputs["completion_mask"]
        label_mask = completion_mask[..., 1:]  # position t predicts token t + 1
        labels = inputs["input_ids"].masked_fill(completion_mask == 0, -100)
        outputs = model(**model_kwargs, labels=labels, fused_lm_head=True)
        seq_len = label_mask.size(1)
        # prompt-learning PEFT prepends virtual tokens: keep the positions of the real ones
        per_token = outputs.log_probs[:, -seq_len:]
        logps = self._prefopt_reduce(per_token, label_mask)
        chosen, rejected = logps.chunk(2, dim=0)

        if self.precompute_ref_logps:
            ref_chosen, ref_rejected = inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]
        else:
            ref_kwargs = {k: v for k, v in model_kwargs.items() if k != "output_router_logits"}
            ref_chosen, ref_rejected = self._prefopt_ref_logps(ref_kwargs, labels, seq_len, label_mask).chunk(2)

        pair_weights = None
        if self.use_weighting:  # WPO: exp(mean_t (logp_t - log sum_v p_v^2)) per sequence, product over the pair
            with torch.no_grad():
                aligned = (per_token - outputs.log_sum_sq_probs[:, -seq_len:]) * label_mask
                w = torch.exp(aligned.sum(dim=1) / label_mask.sum(dim=1).clamp_min(1))
                wc, wr = w.chunk(2, dim=0)
                pair_weights = wc * wr

        loss = None
        metrics = None
        if self._prefopt_dpo is not None:
            # TRL normalizes ipo / sigmoid_norm by the unshifted completion mask
            lc, lr = completion_mask.sum(dim=1).chunk(2, dim=0)
            loss, metrics = self._prefopt_dpo(
                chosen,
                rejected,
                ref_chosen,
                ref_rejected,
                chosen_lengths=lc,
                rejected_lengths=lr,
                pair_weights=pair_weights,
            )
        if self._prefopt_sft is not None:
            plain_chosen, _ = per_token.sum(dim=1).chunk(2, dim=0)
            sft_lengths, _ = label_mask.sum(dim=1).chunk(2, dim=0)
            sft_loss, _ = self._prefopt_sft(
                plain_chosen, plain_chosen, chosen_lengths=sft_lengths, pair_weights=pair_weights
            )
            loss = sft_loss if loss is None else loss + sft_loss
        if metrics is None:
            dt = torch.float64 if chosen.dtype == torch.float64 else torch.float32
            metrics = reward_metrics(
                self.beta, chosen.to(dt) - ref_chosen.to(dt), rejected.to(dt) - ref_rejected.to(dt), chosen, rejected
            )

        if self.aux_loss_enabled:
            loss = loss + self.router_aux_loss_coef * outputs.aux_loss
            self._metrics[mode]["aux_loss"].append(self.accelerator.gather_for_metrics(outputs.aux_loss).mean().item())
        self._prefopt_log_dpo(mode, inputs, outputs, seq_len, label_mask, metrics)

        if return_outputs:
            warnings.warn(
                "`return_outputs=True` recomputes the logits with an extra forward pass (TRL's fused LM "
                "head does not build them)",
                FutureWarning,
                stacklevel=2,
            )
            with torch.no_grad():
                outputs = model(**model_kwargs)
            return loss, outputs
        return loss

    def _prefopt_log_dpo(self, mode, inputs, outputs, seq_len, label_mask, metrics) -> None:
        acc = self.accelerator
        log = self._metrics[mode]
        m = label_mask

        def weighted_mean(total, count) -> float:
            total = acc.gather_for_metrics(total).sum().item()
            count = acc.gather_for_metrics(count).sum().item()
            return total / count if count > 0 else 0.0

        entropy = outputs.entropy[:, -seq_len:].detach()
        log["entropy"].append(weighted_mean((entropy * m).sum(), m.sum()))
        if mode == "train":
            n = acc.gather_for_metrics(inputs["attention_mask"].sum()).sum().item()
            self._total_train_tokens += n // self._tp_size
        log["num_tokens"] = [self._total_train_tokens]

        mc, mr = m.chunk(2, dim=0)
        lc, lr = outputs.mean_logits[:, -seq_len:].chunk(2, dim=0)
        log["logits/chosen"].append(weighted_mean(lc[mc.bool()].sum(), mc.sum()))
        log["logits/rejected"].append(weighted_mean(lr[mr.bool()].sum(), mr.sum()))
        top1, _ = outputs.is_top1[:, -seq_len:].chunk(2, dim=0)
        log["mean_token_accuracy"].append(weighted_mean((top1 & mc.bool()).sum(), mc.sum()))

        for name in (
            "rewards/chosen",
            "rewards/rejected",
            "rewards/accuracies",
            "rewards/margins",
            "logps/chosen",
            "logps/rejected",
        ):
            log[name].append(_gather_mean(acc, metrics[name]))


# --------------------------------------------------------------------------- reward model


class RewardTrainer(trl.RewardTrainer):
    """TRL's ``RewardTrainer`` with the loss of :func:`prefopt_fast.bradley_terry_loss`.

    Same constructor as ``trl.RewardTrainer``. Supported: the dataset's ``margin`` column,
    ``center_rewards_coefficient`` (None or >= 0; a negative one is refused at construction).
    Logged as TRL: ``num_tokens``, ``min_reward``, ``mean_reward``, ``max_reward``,
    ``accuracy``, ``margin``. The loss is computed in fp32 whatever the reward dtype (TRL: in
    the reward dtype, e.g. bf16). A reward model has no LM head, so there is nothing to patch.
    """

    def __init__(self, *args, **kwargs):
        check_trl()
        cfg = _bound_args(trl.RewardTrainer.__init__, args, kwargs)
        if cfg is not None:
            self._prefopt_build_head(cfg)
        super().__init__(*args, **kwargs)
        _check_trainer(self, "RewardTrainer")
        self._prefopt_build_head(self.args)

    def _prefopt_build_head(self, args) -> None:
        c = args.center_rewards_coefficient
        try:
            self._prefopt_bt = BradleyTerryLoss(center_rewards_coefficient=c)
        except (TypeError, ValueError) as e:
            raise _unsupported("RewardTrainer", "center_rewards_coefficient", c, str(e)) from e

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mode = "train" if self.model.training else "eval"
        inputs["use_cache"] = False
        outputs = model(**inputs)
        chosen, rejected = torch.chunk(outputs.logits.squeeze(-1), chunks=2)
        loss, metrics = self._prefopt_bt(chosen, rejected, margin=inputs.get("margin"))

        acc = self.accelerator
        if mode == "train":
            n = acc.gather_for_metrics(inputs["attention_mask"].sum()).sum().item()
            self._total_train_tokens += n // self._tp_size
        log = self._metrics[mode]
        log["num_tokens"] = [self._total_train_tokens]
        log["min_reward"].append(acc.gather(metrics["min_reward"].reshape(1)).min().item())
        log["mean_reward"].append(_gather_mean(acc, metrics["mean_reward"]))
        log["max_reward"].append(acc.gather(metrics["max_reward"].reshape(1)).max().item())
        log["accuracy"].append(acc.gather_for_metrics(metrics["accuracy"].reshape(1)).mean().item())
        log["margin"].append(acc.gather_for_metrics(metrics["margin"].reshape(1)).mean().item())
        return (loss, outputs) if return_outputs else loss


# --------------------------------------------------------------------------- GRPO

SUPPORTED_GRPO_LOSS_TYPES = tuple(TRL_LOSS_TYPES)  # grpo, bnpo, dr_grpo, dapo, luspo, cispo, sapo, vespo
# the loss types TRL divides by its num_items_in_batch normalizer (not by the accumulation steps)
_GRPO_GLOBAL_NORMALIZER = ("dapo", "cispo", "vespo")


def _grpo_loss_type_args(args, loss_type) -> Optional[dict]:
    """The GRPOConfig fields the sapo / vespo objectives read (TRL_LOSS_TYPE_ARGS names), else None."""
    names = TRL_LOSS_TYPE_ARGS.get(loss_type)
    return None if names is None else {k: getattr(args, k) for k in names}


class GRPOTrainer(_LMHeadPatchMixin, trl.GRPOTrainer):
    """TRL's ``GRPOTrainer`` with the clipped-surrogate loss of prefopt_fast's PPO head.

    Same constructor as ``trl.GRPOTrainer`` plus ``prefopt_lm_head`` (as in
    :class:`DPOTrainer`; also covers the generation-time old / reference log-probs, computed
    inside ``train``).

    The head (the code of :func:`prefopt_fast.ppo_loss` after the per-token statistics, with
    ``convention="trl"``) takes TRL's per-token log-probs and entropies, with: ``loss_type``
    grpo / bnpo / dr_grpo / dapo / luspo (the clipped surrogate), cispo, sapo
    (``sapo_temperature_pos`` / ``_neg``) and vespo (``vespo_k_pos`` / ``_lambda_pos`` /
    ``_k_neg`` / ``_lambda_neg``), ``epsilon`` / ``epsilon_high``, ``delta`` (the dual clip;
    TRL ignores it for cispo / sapo / vespo, and so does the head), ``beta`` with the k3 KL and
    ``use_bias_correction_kl``, ``importance_sampling_level`` token / sequence (GSPO),
    ``entropy_coef`` (static), the tool mask, the off-policy sequence mask
    (``off_policy_mask_threshold``), the vLLM importance-sampling ratio and, without an entropy
    bonus, ``top_entropy_quantile`` (these three as weights on the clipped term), gradient
    accumulation and the dapo global token normalizer, MoE ``router_aux_loss_coef``.
    Logged as TRL: ``kl``, ``entropy``, ``clip_ratio/{low_mean,high_mean,region_mean,low_min,
    high_max}`` (clipped-surrogate types), ``cispo_clip_ratio``, ``vespo/phi_seq_mean``,
    ``policy_loss`` and ``entropy_coef`` (with an entropy bonus), ``aux_loss``; the rest of
    TRL's logging (rewards, completions, timing) is TRL's own code.

    Refused at construction (``ValueError``): ``use_adaptive_entropy=True``,
    ``top_entropy_quantile < 1`` together with a non-zero ``entropy_coef`` (TRL then also
    restricts the bonus to those tokens), a ``delta`` not above ``1 + epsilon_high`` (where
    TRL's clamp is not the dual clip), and vespo with vLLM's importance-sampling correction
    (TRL folds the sampler ratio into vespo's sequence weight, which the head's ``is_weights``
    -- a multiplier of the per-token loss -- cannot carry).
    """

    def __init__(self, *args, prefopt_lm_head: bool = True, **kwargs):
        if not isinstance(prefopt_lm_head, bool):
            raise TypeError(f"prefopt_lm_head must be a bool; got {type(prefopt_lm_head).__name__}")
        self._prefopt_lm_head = prefopt_lm_head
        check_trl()
        cfg = _bound_args(trl.GRPOTrainer.__init__, args, kwargs)
        if cfg is not None:
            self._prefopt_check(cfg)
        with patched_trl() if prefopt_lm_head else nullcontext():
            super().__init__(*args, **kwargs)
        _check_trainer(self, "GRPOTrainer")
        self._prefopt_check(self.args)

    @staticmethod
    def _prefopt_check(args) -> None:
        eps_high = args.epsilon_high if args.epsilon_high is not None else args.epsilon
        GRPOTrainer._prefopt_head_config(
            args.loss_type,
            args.epsilon,
            eps_high,
            args.delta,
            args.beta,
            args.use_bias_correction_kl,
            args.entropy_coef,
            args.max_completion_length,
            args.importance_sampling_level,
            args.use_adaptive_entropy,
            args.top_entropy_quantile,
            loss_type_args=_grpo_loss_type_args(args, args.loss_type),
            vllm_is=bool(args.use_vllm and args.vllm_importance_sampling_correction),
        )

    @staticmethod
    def _prefopt_head_config(
        loss_type,
        eps_low,
        eps_high,
        delta,
        beta,
        bias_correction_kl,
        entropy_coef,
        max_completion_length,
        importance_sampling_level,
        adaptive_entropy=False,
        top_entropy_quantile=1.0,
        loss_type_args=None,
        vllm_is=False,
    ):
        """The PPO head (a :class:`prefopt_fast.PolicyLoss`) for these GRPO settings, or ValueError naming the
        TRL option."""
        if loss_type not in SUPPORTED_GRPO_LOSS_TYPES:
            raise _unsupported(
                "GRPOTrainer",
                "loss_type",
                loss_type,
                f"prefopt_fast's PPO head implements the clipped surrogate of "
                f"{list(SUPPORTED_GRPO_LOSS_TYPES)}, not the {loss_type!r} objective",
            )
        if loss_type == "vespo" and vllm_is:
            raise _unsupported(
                "GRPOTrainer",
                "vllm_importance_sampling_correction",
                True,
                "with loss_type='vespo' TRL folds the vLLM sampler ratio into the sequence weight phi(w), which "
                "the head's is_weights (a multiplier of the per-token loss) cannot carry",
            )
        if adaptive_entropy:
            raise _unsupported(
                "GRPOTrainer",
                "use_adaptive_entropy",
                True,
                "the adaptive entropy controller is not reproduced; use a static entropy_coef",
            )
        if top_entropy_quantile < 1.0 and entropy_coef != 0.0:
            raise _unsupported(
                "GRPOTrainer",
                "top_entropy_quantile",
                top_entropy_quantile,
                f"with entropy_coef={entropy_coef} TRL restricts the entropy bonus to the "
                "high-entropy tokens, which the head does not; use top_entropy_quantile=1.0 or "
                "entropy_coef=0.0",
            )
        try:
            return PolicyLoss(
                clip_eps_low=eps_low,
                clip_eps_high=eps_high,
                # TRL reads delta only in the clipped surrogate
                dual_clip=None if loss_type in ("cispo", "sapo", "vespo") else delta,
                kl_coef=beta,
                kl_estimator="k3",
                convention="trl",
                loss_type_args=loss_type_args,
                kl_ratio_correction=bool(bias_correction_kl),
                entropy_coef=entropy_coef,
                loss_agg_mode=loss_type,
                max_length=max_completion_length if loss_type == "dr_grpo" else None,
                importance_sampling_level=importance_sampling_level,
            )
        except (TypeError, ValueError) as e:
            raise ValueError(
                f"prefopt_fast.integrations.trl.GRPOTrainer: GRPO settings (loss_type={loss_type!r}, epsilon="
                f"{eps_low}, epsilon_high={eps_high}, delta={delta}, beta={beta}, entropy_coef={entropy_coef}, "
                f"importance_sampling_level={importance_sampling_level!r}, max_completion_length="
                f"{max_completion_length}) are not supported by the PPO head: {e}"
            ) from e

    @_with_lm_head_patch
    def _prepare_inputs(self, *args, **kwargs):
        return super()._prepare_inputs(*args, **kwargs)

    def _compute_loss(self, model, inputs):
        mode = "train" if self.model.training else "eval"
        prompt_ids, prompt_mask = inputs["prompt_ids"], inputs["prompt_mask"]
        completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
        input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
        attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
        logits_to_keep = completion_ids.size(1)
        mask = completion_mask if "tool_mask" not in inputs else completion_mask * inputs["tool_mask"]
        per_token_logps, entropies, aux_loss = self._get_per_token_logps_and_entropies(
            model,
            input_ids,
            attention_mask,
            logits_to_keep,
            compute_entropy=True,
            compute_aux_loss=self.aux_loss_enabled,
            **{
                k: inputs.get(k)
                for k in (
                    "pixel_values",
                    "image_grid_thw",
                    "num_images",
                    "pixel_attention_mask",
                    "spatial_shapes",
                    "num_tiles",
                    "image_sizes",
                    "token_type_ids",
                    "mm_token_type_ids",
                    "image_position_ids",
                )
            },
        )

        advantages = inputs["advantages"]
        if advantages.dim() == 1:
            advantages = advantages.unsqueeze(1)
        old = inputs.get("old_per_token_logps")  # None: on-policy, the head uses logp.detach()
        ref = inputs["ref_per_token_logps"] if self.beta != 0.0 else None

        # multipliers of the clipped policy term only (not of the KL term), as TRL applies them
        weights = []
        if self.off_policy_mask_threshold is not None:
            sampling = inputs.get("sampling_per_token_logps", per_token_logps.detach() if old is None else old)
            weights.append(
                self.get_off_policy_mask(
                    advantages=advantages,
                    per_token_logps=per_token_logps,
                    sampling_per_token_logps=sampling,
                    mask=mask,
                    off_policy_threshold=self.off_policy_mask_threshold,
                )
            )
        if self.top_entropy_quantile < 1.0:
            weights.append(self.get_high_entropy_mask(entropies, mask, 1 - self.top_entropy_quantile))
        if self.use_vllm and self.vllm_importance_sampling_correction:
            weights.append(inputs["importance_sampling_ratio"])
        is_weights = None
        for w in weights:
            w = w.to(per_token_logps.dtype)
            is_weights = w if is_weights is None else is_weights * w

        G = self.current_gradient_accumulation_steps if mode == "train" else 1
        coef = self.entropy_coef if self._entropy_bonus_enabled else 0.0
        global_tokens = None
        if self.loss_type in _GRPO_GLOBAL_NORMALIZER:
            # num_items_in_batch spans the generation batch: rescale it to one accumulation window; the
            # policy term is then not divided by G, the entropy bonus is
            global_tokens = inputs["num_items_in_batch"].clamp(min=1.0) / self.accelerator.num_processes
            if mode == "train":
                global_tokens = global_tokens * G / self.args.steps_per_generation
            coef = coef / G
        head = self._prefopt_head_config(
            self.loss_type,
            self.epsilon_low,
            self.epsilon_high,
            self.args.delta,
            self.beta,
            self.args.use_bias_correction_kl,
            coef,
            self.max_completion_length,
            self.importance_sampling_level,
            self.use_adaptive_entropy,
            self.top_entropy_quantile,
            loss_type_args=_grpo_loss_type_args(self.args, self.loss_type),
            vllm_is=bool(self.use_vllm and self.vllm_importance_sampling_correction),
        )
        # TRL's per-token log-probs and entropies: the per-token head, masked where TRL masks
        loss, metrics = head(
            per_token_logps,
            old,
            advantages,
            mask != 0,
            entropy=entropies,
            ref_logps=ref,
            is_weights=is_weights,
            global_num_tokens=global_tokens,
        )
        if self.loss_type not in _GRPO_GLOBAL_NORMALIZER:
            loss = loss / G

        log = self._metrics[mode]
        acc = self.accelerator
        if self._entropy_bonus_enabled:
            log["policy_loss"].append(acc.gather(metrics["policy_loss"].reshape(1)).nanmean().item())
            if mode == "train" and acc.sync_gradients:
                log["entropy_coef"].append(self.entropy_coef)
        if self.aux_loss_enabled:
            loss = loss + self.router_aux_loss_coef * aux_loss / G
            log["aux_loss"].append(acc.gather_for_metrics(aux_loss).mean().item())
        self._prefopt_log_grpo(log, metrics, per_token_logps, old, advantages, mask)
        return loss

    def _prefopt_log_grpo(self, log, metrics, logps, old, advantages, mask) -> None:
        acc = self.accelerator
        n_tok = mask.sum().to(torch.float32)
        seq_level = self.importance_sampling_level == "sequence"
        n_seq = torch.tensor(float(mask.shape[0]), device=mask.device)

        def global_mean(local_mean, count) -> float:
            # the head's local means, weighted back into TRL's global (sum, count) mean
            totals = acc.reduce(torch.stack([local_mean.detach().float() * count, count]), reduction="sum")
            return (totals[0] / totals[1].clamp(min=1.0)).item()

        if self.beta != 0.0:
            log["kl"].append(global_mean(metrics["kl"], n_tok))
        log["entropy"].append(global_mean(metrics["entropy"], n_tok))
        n_clip = n_seq if seq_level else n_tok
        if self.loss_type == "cispo":
            log["cispo_clip_ratio"].append(global_mean(metrics["cispo_clip_ratio"], n_clip))
            return
        if self.loss_type == "vespo":  # one weight per sequence (per token with per-token advantages)
            n_phi = n_seq if advantages.shape[1] == 1 else n_tok
            log["vespo/phi_seq_mean"].append(global_mean(metrics["vespo/phi_seq_mean"], n_phi))
            return
        if self.loss_type == "sapo":
            return
        for name in ("clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean"):
            log[name].append(global_mean(metrics[name], n_clip))

        # per-sequence clip fractions (min / max over the global batch): from the ratios, detached
        with torch.no_grad():
            lr = logps.detach() - (logps.detach() if old is None else old)
            m = mask.to(lr.dtype)
            if seq_level:
                lr = (lr * m).sum(-1, keepdim=True) / m.sum(-1, keepdim=True).clamp(min=1.0)
            ratio = torch.exp(lr)
            low = ((ratio < 1 - self.epsilon_low) & (advantages < 0)).float()
            high = ((ratio > 1 + self.epsilon_high) & (advantages > 0)).float()

            def per_seq(x):  # NaN for a sequence without tokens, skipped by nanmin / nanmax as in TRL
                return x.squeeze(1) if x.shape[1] == 1 else (x * m).sum(-1) / m.sum(-1)

            log["clip_ratio/low_min"].append(_trl_utils.nanmin(acc.gather(per_seq(low))).item())
            log["clip_ratio/high_max"].append(_trl_utils.nanmax(acc.gather(per_seq(high))).item())
