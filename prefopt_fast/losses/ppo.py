"""PPO / GRPO clipped policy-gradient loss from the logits, with KL penalties and an entropy bonus.

The vocabulary is touched only by :func:`prefopt_fast.token_logprobs` (one streaming pass
per logits row: log-prob of the label, entropy and, for ``kl_estimator="full"``, the exact
KL to the reference distribution). Everything here is plain PyTorch on ``[B, T]`` vectors;
:func:`policy_loss` / :class:`PolicyLoss` is that head alone, over per-token log-probs (and
entropies, KL) the caller already has, and ppo_loss, linear_ppo_loss and the TRL GRPO
integration all run it.

Per token, with m the mask (label != ignore_index, times ``loss_mask``), logp the policy
log-prob, old the behaviour log-prob, ref the reference log-prob, A the advantage:

    l_t   = logp - old
    r     = exp(l_t)                               (token level), or
    r_b   = exp(sum_t m l_t / max(sum_t m, 1))     (sequence level, GSPO; as TRL)
    pg    = -min(r A, clip(r, 1 - eps_low, 1 + eps_high) A)
    dual clip c > 1 (A < 0 only):  pg = min(pg, -c A)
    kl    = k1: logp - ref | k2: (logp - ref)^2 / 2 | k3: exp(ref - logp) - (ref - logp) - 1
            | abs: |logp - ref| | low_var_kl: clamp(k3 with (ref - logp) clamped to [-20, 20],
            -10, 10) (verl) | full: sum_v p_v (log p_v - log q_v) over the whole vocabulary
    kl_ratio_correction:  kl = kl * r            (TRL's use_bias_correction_kl)
    loss_t = pg * w + kl_coef * kl               (w = is_weights; the KL term is not weighted)
    loss   = agg(loss_t) - entropy_coef * agg_H(H)

``convention`` says whose formula a name means where TRL 1.16 and verl 0.9 give one name two:

    None (default)  the formulas above: no clamp on l_t, dual clip only when given, ``k3`` =
                    Schulman's unclamped k3 (TRL's); verl's ``+`` estimators refused
    "trl"           the same; loss_agg_mode must be a TRL loss_type
    "verl"          verl's: l_t clamped to [-20, 20] before exp; dual clip c = 3 unless given
                    (verl's clip_ratio_c; its vanilla loss has no off switch); ``k3`` = verl's k3
                    = low_var_kl; ``k1+`` / ``k3+`` / ``abs+`` / ``low_var_kl+`` = the value of the
                    estimator with the gradient of k2 (verl's straight-through kl_penalty);
                    verl's spellings ``kl``, ``mse``, ``kl+``, ``k2+``, ``mse+`` are taken too;
                    sequence level = verl's gspo (the token ratio sg[r_b] pi_t / sg[pi_t], its
                    log clamped above at 10, no dual clip by default); loss_agg_mode must be
                    verl's

``agg`` (``loss_agg_mode``), with S_b = sum_t m loss_t, L_b = sum_t m. verl's names are verl's
``agg_loss`` (dp_size 1): the means over b run over the n >= 1 sequences with L_b > 0.

    token-mean               sum_b S_b / N, N = global_num_tokens or max(sum_b L_b, 1)
    seq-mean-token-mean      sum_{b: L_b > 0} (S_b / L_b) / n
    seq-mean-token-sum       sum_b S_b / n
    seq-mean-token-sum-norm  sum_b S_b / n / D, D = max_length (verl's loss_scale_factor) or T

TRL 1.16 GRPOTrainer ``loss_type`` names are TRL's formulas, the means over all B sequences:

    grpo     mean_b S_b / max(L_b, 1)
    bnpo     token-mean over the local tokens (global_num_tokens not allowed)
    dr_grpo  sum_b S_b / (B * max_length), max_length = TRL's max_completion_length (required)
    dapo     token-mean; global_num_tokens = TRL's normalizer
             num_items_in_batch / num_processes (* grad_accum / steps_per_generation in training)
    luspo    mean_b S_b (clipped surrogate)
    cispo    token-mean as dapo, pg = -sg(min(r, clip_eps_high)) A logp (clip_eps_high is TRL's
             epsilon_high: the cap of the ratio itself)
    sapo     as grpo, pg = -sigmoid(tau (r - 1)) 4 / tau A, tau = sapo_temperature_pos if A > 0
             else sapo_temperature_neg
    vespo    token-mean as dapo, pg = -phi A logp, phi (detached) = exp(lam + k log w - lam w),
             log w = clamp(sum_t m clamp(l_t, -20, 20), log 1e-8, 20), (k, lam) = (vespo_k_pos,
             vespo_lambda_pos) if A >= 0 else the _neg pair

``loss_type_args`` sets sapo's / vespo's GRPOConfig fields (``TRL_LOSS_TYPE_ARGS``, TRL's
defaults). ``agg_H``: the verl mode names aggregate the entropy like the policy loss (verl's
agg_loss); TRL's names use TRL's mean per-token entropy over the local tokens.

Reproducing a TRL training step exactly (TRL's eval mode is the default above):
- gradient accumulation over G steps: TRL divides the loss of grpo / bnpo / dr_grpo / luspo /
  sapo and the entropy bonus of every loss type by G; the policy term of dapo / cispo / vespo
  is not divided (its normalizer already spans the window). So use ``loss / G`` for the
  former, and for the latter pass ``entropy_coef / G`` and ``global_num_tokens =
  num_items_in_batch / num_processes * G / steps_per_generation``;
- TRL 1.16 defaults ``use_bias_correction_kl=True``: pass ``kl_ratio_correction=True``;
- TRL's vLLM importance-sampling ratio (token or sequence modes, already truncated or masked),
  its off-policy sequence mask (``off_policy_mask_threshold``) and its high-entropy token mask
  (``top_entropy_quantile``) all multiply the policy term only: pass their product as
  ``is_weights``. (With ``top_entropy_quantile < 1`` TRL also restricts the entropy bonus to
  those tokens; that part is not reproduced. For vespo TRL folds the vLLM ratio into phi
  instead: not reproduced, pass only the masks.)
- not supported: adaptive entropy control.

Metrics: TRL's names (see :func:`ppo_loss`) plus verl's ``ppo_kl`` (the masked mean of -l_t,
clamped where the convention clamps) and ``pg_clipfrac_lower`` (the fraction of the tokens
where the dual clip binds; 0 without one).
"""

import math
from typing import Dict, NamedTuple, Optional, Tuple, Union

import torch
from torch import Tensor, nn

from .. import _validate
from .._validate import check_bool, check_choice, check_real
from ..distributed import check_vocab_parallel_options
from ..ops.token_logprobs import token_logprobs

__all__ = [
    "ppo_loss",
    "PPOLoss",
    "policy_loss",
    "PolicyLoss",
    "PolicyConfig",
    "check_policy_config",
    "ppo_from_token_stats",
    "KL_ESTIMATORS",
    "LOSS_AGG_MODES",
    "TRL_LOSS_TYPES",
    "TRL_LOSS_TYPE_ARGS",
    "VERL_KL_ESTIMATORS",
    "VERL_KL_ALIASES",
    "CONVENTIONS",
    "IMPORTANCE_SAMPLING_LEVELS",
]

KL_ESTIMATORS = ("k1", "k2", "k3", "abs", "low_var_kl", "full")
# verl's straight-through estimators (convention="verl" only): the value of the named estimator, the gradient of k2
VERL_KL_ESTIMATORS = ("k1+", "k3+", "abs+", "low_var_kl+")
# verl's other spellings (kl_penalty): "kl" is k1 and "mse" is k2; k2's own "+" form is k2
VERL_KL_ALIASES = {"kl": "k1", "mse": "k2", "kl+": "k1+", "k2+": "k2", "mse+": "k2"}
CONVENTIONS = ("trl", "verl")
LOSS_AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")
# TRL GRPOTrainer loss_type -> the aggregation it uses (with TRL's means over all B sequences)
TRL_LOSS_TYPES = {
    "grpo": "seq-mean-token-mean",
    "bnpo": "token-mean",
    "dr_grpo": "seq-mean-token-sum-norm",
    "dapo": "token-mean",
    "luspo": "seq-mean-token-sum",
    "cispo": "token-mean",
    "sapo": "seq-mean-token-mean",
    "vespo": "token-mean",
}
# TRL loss types whose per-token objective is not the clipped surrogate
_TRL_OBJECTIVES = ("cispo", "sapo", "vespo")
# TRL 1.16 GRPOConfig fields each objective reads, with TRL's defaults (``loss_type_args``)
TRL_LOSS_TYPE_ARGS = {
    "sapo": {"sapo_temperature_pos": 1.0, "sapo_temperature_neg": 1.05},
    "vespo": {"vespo_k_pos": 2.0, "vespo_lambda_pos": 3.0, "vespo_k_neg": 3.0, "vespo_lambda_neg": 2.0},
}
VERL_DUAL_CLIP = 3.0  # verl's clip_ratio_c default: its vanilla loss always applies the dual clip
IMPORTANCE_SAMPLING_LEVELS = ("token", "sequence")


class PolicyConfig(NamedTuple):
    """The validated hyper-parameters of the policy-gradient heads (:func:`check_policy_config`)."""

    ignore_index: int
    clip_eps_low: float
    clip_eps_high: float
    dual_clip: Optional[float]
    kl_coef: float
    kl_estimator: str
    kl_ratio_correction: bool
    entropy_coef: float
    agg: str  # one of LOSS_AGG_MODES
    trl: Optional[str]  # the TRL alias, if one was given
    max_length: Optional[int]
    importance_sampling_level: str
    convention: Optional[str] = None  # None, "trl" or "verl"
    objective: str = "clip"  # "clip" (the clipped surrogate) or a TRL objective: "cispo", "sapo", "vespo"
    objective_args: Tuple[Tuple[str, float], ...] = ()  # its TRL_LOSS_TYPE_ARGS, filled in


def check_policy_config(
    ignore_index,
    clip_eps_low,
    clip_eps_high,
    dual_clip,
    kl_coef,
    kl_estimator,
    kl_ratio_correction,
    entropy_coef,
    loss_agg_mode,
    max_length,
    importance_sampling_level,
    convention=None,
    loss_type_args=None,
) -> PolicyConfig:
    """The hyper-parameters of :func:`ppo_loss` / :func:`policy_loss` (Python values only, no
    tensors), validated: a :class:`PolicyConfig`. ``ignore_index`` only matters to the heads
    that take labels."""
    ignore_index = _validate.check_int(ignore_index, "ignore_index")
    if convention is not None:
        convention = check_choice(
            convention,
            CONVENTIONS,
            "convention",
            what=" or None (the trainer whose formulas the names mean where TRL and verl differ)",
        )
    eps_low = check_real(clip_eps_low, "clip_eps_low", lo=0.0)
    eps_high = eps_low if clip_eps_high is None else check_real(clip_eps_high, "clip_eps_high", lo=0.0)
    if dual_clip is not None:
        dual_clip = check_real(
            dual_clip,
            "dual_clip",
            lo=1.0,
            lo_open=True,
            why=" (the dual-clip bound c on the ratio for negative advantages; None disables it)",
        )
    kl_coef = check_real(kl_coef, "kl_coef", lo=0.0)
    if isinstance(kl_estimator, str) and kl_estimator in VERL_KL_ALIASES:
        if convention != "verl":
            raise ValueError(
                f"kl_estimator={kl_estimator!r} is verl's name for {VERL_KL_ALIASES[kl_estimator]!r}; pass "
                f"convention='verl' or the name {VERL_KL_ALIASES[kl_estimator]!r}"
            )
        kl_estimator = VERL_KL_ALIASES[kl_estimator]
    if isinstance(kl_estimator, str) and kl_estimator in VERL_KL_ESTIMATORS:
        if convention != "verl":
            raise ValueError(
                f"kl_estimator={kl_estimator!r} is verl's straight-through estimator (the value of "
                f"{kl_estimator[:-1]!r}, the gradient of k2); pass convention='verl' to use it"
            )
    else:
        kl_estimator = check_choice(
            kl_estimator,
            KL_ESTIMATORS + (VERL_KL_ESTIMATORS if convention == "verl" else ()),
            "kl_estimator",
        )
    kl_ratio_correction = check_bool(kl_ratio_correction, "kl_ratio_correction")
    entropy_coef = check_real(entropy_coef, "entropy_coef")

    if not isinstance(loss_agg_mode, str):
        raise TypeError(f"loss_agg_mode must be a str; got {type(loss_agg_mode).__name__}")
    if loss_agg_mode in LOSS_AGG_MODES:
        agg, trl = loss_agg_mode, None
    elif loss_agg_mode in TRL_LOSS_TYPES:
        agg, trl = TRL_LOSS_TYPES[loss_agg_mode], loss_agg_mode
    else:
        raise ValueError(
            f"loss_agg_mode must be one of verl's {list(LOSS_AGG_MODES)} or a TRL GRPO loss_type "
            f"{list(TRL_LOSS_TYPES)}; got {loss_agg_mode!r}"
        )
    # a convention names the trainer; its names only (no hybrid that neither trainer computes)
    if convention == "verl" and trl is not None:
        raise ValueError(
            f"with convention='verl', loss_agg_mode must be one of verl's names {list(LOSS_AGG_MODES)}; got "
            f"{loss_agg_mode!r}, a TRL GRPOTrainer loss_type (use convention='trl' / None for TRL's)"
        )
    if convention == "trl" and trl is None:
        raise ValueError(
            f"with convention='trl', loss_agg_mode must be one of TRL's GRPOTrainer loss_type names "
            f"{list(TRL_LOSS_TYPES)}; got verl's {loss_agg_mode!r} (use convention='verl' / None for verl's)"
        )
    objective = trl if trl in _TRL_OBJECTIVES else "clip"

    if agg == "seq-mean-token-sum-norm":
        if trl is not None and max_length is None:
            raise ValueError(
                f"max_length is required by loss_agg_mode={loss_agg_mode!r}: the fixed divisor of Dr. GRPO "
                "(the maximum completion length, TRL's max_completion_length)"
            )
        if max_length is not None:
            max_length = _validate.check_int(max_length, "max_length", lo=1)
    elif max_length is not None:
        raise ValueError(
            f"max_length is only used by loss_agg_mode 'seq-mean-token-sum-norm' (verl's loss_scale_factor) / "
            f"'dr_grpo' (TRL's max_completion_length); got loss_agg_mode={loss_agg_mode!r}"
        )

    if objective != "clip" and dual_clip is not None:
        raise ValueError(
            f"dual_clip is only used by the clipped surrogate; TRL's {loss_agg_mode!r} objective ignores "
            f"`delta`; got dual_clip={dual_clip:g}"
        )
    if dual_clip is not None and trl is not None and dual_clip <= 1.0 + eps_high:
        # TRL's `delta` clamps the ratio of the unclipped branch for every token; that equals the
        # dual clip only when delta > 1 + epsilon_high (which TRL recommends).
        raise ValueError(
            f"dual_clip must be > 1 + clip_eps_high = {1.0 + eps_high:g} with the TRL alias {trl!r} (TRL's "
            f"`delta` matches the dual clip only above 1 + epsilon_high); got {dual_clip:g}"
        )

    importance_sampling_level = check_choice(
        importance_sampling_level, IMPORTANCE_SAMPLING_LEVELS, "importance_sampling_level"
    )
    if convention == "verl" and dual_clip is None and importance_sampling_level == "token":
        # verl's vanilla loss has no off switch for the dual clip (its gspo loss has no dual clip)
        dual_clip = VERL_DUAL_CLIP

    defaults = TRL_LOSS_TYPE_ARGS.get(objective, {})
    if loss_type_args is not None:
        if not isinstance(loss_type_args, dict):
            raise TypeError(f"loss_type_args must be a dict or None; got {type(loss_type_args).__name__}")
        unknown = sorted(set(loss_type_args) - set(defaults))
        if unknown:
            raise ValueError(
                f"loss_type_args has keys {unknown} that loss_agg_mode={loss_agg_mode!r} does not read; valid: "
                f"{sorted(defaults)} (TRL GRPOConfig field names)"
            )
    args = dict(defaults)
    for k, v in (loss_type_args or {}).items():
        if k.startswith("sapo_temperature"):
            args[k] = check_real(v, f"loss_type_args[{k!r}]", lo=0.0, lo_open=True)
        else:
            args[k] = check_real(v, f"loss_type_args[{k!r}]")
    return PolicyConfig(
        ignore_index,
        eps_low,
        eps_high,
        dual_clip,
        kl_coef,
        kl_estimator,
        kl_ratio_correction,
        entropy_coef,
        agg,
        trl,
        max_length,
        importance_sampling_level,
        convention,
        objective,
        tuple(sorted(args.items())),
    )


def _check_bt(
    x, name: str, B: int, T: int, device, *, allow_seq: bool = False, kinds: str = "float", src: str = "logits"
) -> Tensor:
    """``x`` as a [B, T] tensor, or [B, 1] when ``allow_seq`` and it is [B] / [B, 1]."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor; got {type(x).__name__}")
    if kinds == "float" and not x.dtype.is_floating_point:
        raise TypeError(f"{name} must be a floating-point tensor; got {x.dtype}")
    if kinds == "mask" and x.dtype.is_complex:
        raise TypeError(f"{name} must be a bool, integer or floating-point tensor; got {x.dtype}")
    shape = tuple(x.shape)
    if allow_seq and shape == (B,):
        x = x.unsqueeze(1)
    elif not (shape == (B, T) or (allow_seq and shape == (B, 1))):
        want = f"[B, T] = {[B, T]}" + (f" or [B] = {[B]} (one value per sequence)" if allow_seq else "")
        raise ValueError(f"{name} must have shape {want} (B, T from labels); got {list(shape)}")
    if x.device != device:
        raise ValueError(f"{name} must be on the device of {src} ({device}); got {x.device}")
    return x


def _kl_estimate(d: Tensor, estimator: str, convention: Optional[str]) -> Tensor:
    """Sampled KL(pi || pi_ref) estimate from d = log pi_ref - log pi of the sampled token.

    ``k3`` is Schulman's (TRL's) unless ``convention="verl"``, where it is verl's clamped
    ``low_var_kl``; a ``+`` name (verl) has the value of its base and the gradient of k2."""
    straight_through = estimator.endswith("+")
    base = estimator[:-1] if straight_through else estimator
    if base == "k3" and convention == "verl":
        base = "low_var_kl"
    if base == "k1":
        v = -d
    elif base == "k2":
        v = 0.5 * d * d
    elif base == "k3":
        v = torch.exp(d) - d - 1.0
    elif base == "abs":
        v = d.abs()
    else:  # low_var_kl: verl's k3, clamped in log space for exp and in value for variance
        dc = d.clamp(-20.0, 20.0)
        v = (torch.exp(dc) - dc - 1.0).clamp(-10.0, 10.0)
    if not straight_through:
        return v
    # straight through (verl's kl_penalty): k1 / k3 are unbiased in value, k2 in gradient
    g = 0.5 * d * d
    return g - g.detach() + v.detach()


def _seq_sums(x: Tensor, m: Tensor) -> Tensor:
    return (x * m).sum(-1)


def _aggregate(
    x: Tensor, m: Tensor, agg: str, max_length: Optional[int], denom: Optional[Tensor], trl: bool = False
) -> Tensor:
    """Reduce a per-token [B, T] (or broadcastable [B, 1]) tensor with mask m [B, T]: TRL's
    formulas for a TRL alias (``trl``: means over all B sequences, Dr. GRPO's B * max_length),
    verl's ``agg_loss`` for verl's names (means over the non-empty sequences; the sum-norm
    divisor is ``max_length`` or T)."""
    s = _seq_sums(x, m)
    if agg == "token-mean":
        n = m.sum().clamp(min=1.0) if denom is None else denom
        return s.sum() / n
    L = m.sum(-1)
    if trl:
        if agg == "seq-mean-token-mean":
            return (s / L.clamp(min=1.0)).mean()
        if agg == "seq-mean-token-sum":
            return s.mean()
        return s.sum() / (s.shape[0] * max_length)
    nonempty = L > 0
    n_seq = nonempty.sum().clamp(min=1).to(s.dtype)  # an all-empty batch: 0, not verl's 0 / 0
    if agg == "seq-mean-token-mean":
        return (s / torch.where(nonempty, L, torch.ones_like(L))).sum() / n_seq
    if agg == "seq-mean-token-sum":
        return s.sum() / n_seq
    return s.sum() / n_seq / (m.shape[-1] if max_length is None else max_length)


def _masked_mean(x: Tensor, m: Tensor, per_sequence: bool = False) -> Tensor:
    """TRL's metric mean: over the B sequences for a per-sequence value, else over the masked tokens.

    ``per_sequence`` comes from where the value came from (a ``[B]`` advantage, the GSPO
    ratio), not from its shape: with T == 1 a per-token value is ``[B, 1]`` too.
    """
    x = x.detach()
    if per_sequence:
        return x.to(m.dtype).mean()
    return (x.expand(m.shape) * m).sum() / m.sum().clamp(min=1.0)


def _ppo(
    logits,
    labels,
    old_logps,
    advantages,
    cfg: PolicyConfig,
    loss_mask,
    ref_logps,
    ref_logits,
    temperature,
    is_weights,
    global_num_tokens,
    backend,
    vocab_parallel=None,
) -> Tuple[Tensor, Dict[str, Tensor]]:
    def token_stats(kernel_labels: Tensor, with_kl: bool):
        return token_logprobs(
            logits,
            kernel_labels,
            ignore_index=cfg.ignore_index,
            temperature=temperature,
            stats=("entropy", "kl") if with_kl else ("entropy",),
            ref_logits=ref_logits if with_kl else None,
            backend=backend,
            **(vocab_parallel or {}),
        )

    return ppo_from_token_stats(
        token_stats,
        logits,
        "logits",
        "V",
        labels,
        old_logps,
        advantages,
        cfg,
        loss_mask,
        ref_logps,
        ref_logits is not None,
        is_weights,
        global_num_tokens,
    )


def ppo_from_token_stats(
    token_stats,
    src,
    src_name: str,
    last: str,
    labels,
    old_logps,
    advantages,
    cfg: PolicyConfig,
    loss_mask,
    ref_logps,
    has_ref_logits: bool,
    is_weights,
    global_num_tokens,
    full_ref: str = "ref_logits",
) -> Tuple[Tensor, Dict[str, Tensor]]:
    """The PPO loss of an op that computes per-token statistics from ``src``, the ``[B, T, last]``
    tensor named ``src_name`` ("logits" [B, T, V] for ppo_loss, "hidden" [B, T, H] for
    linear_ppo_loss): checks ``src`` and the labels against it, folds ``loss_mask`` into the
    labels, calls ``token_stats(kernel_labels, with_kl)`` (a ``TokenLogProbsOutput`` with the
    log-probs, the entropy and, when ``with_kl``, the exact KL) and applies the head of
    :func:`policy_loss` to them. ``cfg``: :func:`check_policy_config`; ``full_ref`` names the
    input of the exact KL in errors ("ref_logits", or "ref_hidden" for the fused-linear loss)."""
    _validate.check_tensor(src, src_name)
    if src.dim() != 3:
        raise ValueError(f"{src_name} must have shape [B, T, {last}]; got {list(src.shape)}")
    B, T = src.shape[0], src.shape[1]
    # dtype and device before the loss mask is folded into the labels (torch.where would cast a
    # bool tensor, or fail inside torch for another device)
    _validate.check_index_tensor(labels, "labels", (B, T), src.device, f"{src_name}.shape[:-1]")
    if B == 0 or T == 0:
        raise ValueError(f"{src_name} must have a non-empty batch and sequence; got shape {list(src.shape)}")
    return _ppo_head(
        token_stats,
        labels,
        B,
        T,
        src.device,
        old_logps,
        advantages,
        cfg,
        loss_mask,
        ref_logps,
        has_ref_logits,
        is_weights,
        global_num_tokens,
        src=src_name,
        full_ref=full_ref,
    )


def _check_head_inputs(
    B: int,
    T: int,
    dev,
    old_logps,
    advantages,
    cfg: PolicyConfig,
    loss_mask,
    ref_logps,
    has_full_ref: bool,
    is_weights,
    global_num_tokens,
    src: str,
    full_ref: str,
):
    """The per-token inputs every head shares, checked against ``[B, T]`` on ``dev`` (``src``
    names the tensor they come with). ``full_ref`` names the input of ``kl_estimator="full"``
    ("ref_logits" for the losses from logits / hidden states, "kl" for :func:`policy_loss`);
    ``has_full_ref``: it was given. Returns the checked (advantages, adv_per_seq, old_logps,
    loss_mask, is_weights, ref_logps, global_num_tokens)."""
    # per sequence by origin: [B], or [B, 1] when that is not also [B, T]
    adv_per_seq = isinstance(advantages, Tensor) and (advantages.dim() == 1 or T > 1)
    advantages = _check_bt(advantages, "advantages", B, T, dev, allow_seq=True, src=src)
    adv_per_seq = adv_per_seq and advantages.shape[1] == 1
    if old_logps is not None:
        old_logps = _check_bt(old_logps, "old_logps", B, T, dev, src=src)
    if loss_mask is not None:
        loss_mask = _check_bt(loss_mask, "loss_mask", B, T, dev, kinds="mask", src=src)
    if is_weights is not None:
        is_weights = _check_bt(is_weights, "is_weights", B, T, dev, allow_seq=True, src=src)

    full = cfg.kl_estimator == "full"
    if full_ref == "ref_logits":
        reads, needs = (
            "it reads ref_logits",
            ("ref_logits: the reference model's logits [B, T, V] (same shape and dtype as logits)"),
        )
    elif full_ref == "ref_hidden":
        reads = "it reads ref_hidden / ref_weight"
        needs = (
            "ref_hidden and ref_weight: the reference model's hidden states [B, T, H_ref] and lm_head "
            "weight [V, H_ref] (and ref_bias if it has one)"
        )
    else:
        reads = "it reads kl"
        needs = 'kl: the exact per-token KL(pi || pi_ref) [B, T] (e.g. token_logprobs\' "kl" stat)'
    if full:
        if ref_logps is not None:
            raise ValueError(
                f'ref_logps is only used by the sampled KL estimators, not by kl_estimator="full" ({reads}); drop ref_logps '
                'or pick a sampled estimator ("k1", "k2", "k3", "abs", "low_var_kl", or verl "k1+", "k3+", "abs+", "low_var_kl+")'
            )
        if not has_full_ref and cfg.kl_coef != 0.0:
            raise ValueError(f'kl_estimator="full" needs {needs}')
    else:
        if has_full_ref:
            raise ValueError(
                f'{full_ref} is only used by kl_estimator="full"; got kl_estimator='
                f"{cfg.kl_estimator!r} (pass ref_logps [B, T] instead)"
            )
        if ref_logps is None and cfg.kl_coef != 0.0:
            raise ValueError(
                f"kl_estimator={cfg.kl_estimator!r} needs ref_logps: the reference model's per-token "
                f"log-probs [B, T] (kl_coef={cfg.kl_coef:g})"
            )
    if ref_logps is not None:
        ref_logps = _check_bt(ref_logps, "ref_logps", B, T, dev, src=src)
    # ref_logits is checked (shape, dtype, device, strides) by token_logprobs

    if global_num_tokens is not None:
        if cfg.agg != "token-mean" or cfg.trl == "bnpo":
            name = cfg.trl or cfg.agg
            raise ValueError(
                f"global_num_tokens is only used by loss_agg_mode 'token-mean' and 'dapo' (token normalizers); "
                f"got loss_agg_mode={name!r}"
                + (
                    " (TRL's bnpo normalizes by the local token count; use 'dapo' for a global one)"
                    if cfg.trl == "bnpo"
                    else ""
                )
            )
        if isinstance(global_num_tokens, Tensor):
            if (
                global_num_tokens.numel() != 1
                or global_num_tokens.dtype.is_complex
                or global_num_tokens.dtype == torch.bool
            ):
                raise ValueError(
                    "global_num_tokens must be a number or a one-element real tensor; got a "
                    f"{global_num_tokens.dtype} tensor of shape {list(global_num_tokens.shape)}"
                )
            if global_num_tokens.device != dev:
                raise ValueError(
                    f"global_num_tokens must be on the device of {src} ({dev}); got {global_num_tokens.device}"
                )
        else:
            global_num_tokens = check_real(global_num_tokens, "global_num_tokens", lo=0.0, lo_open=True)
    return advantages, adv_per_seq, old_logps, loss_mask, is_weights, ref_logps, global_num_tokens


def _ppo_head(
    token_stats,
    labels,
    B: int,
    T: int,
    dev,
    old_logps,
    advantages,
    cfg: PolicyConfig,
    loss_mask,
    ref_logps,
    has_ref_logits: bool,
    is_weights,
    global_num_tokens,
    src: str = "logits",
    full_ref: str = "ref_logits",
) -> Tuple[Tensor, Dict[str, Tensor]]:
    """Everything after the logits: ``token_stats(kernel_labels, with_kl)`` returns the per-token
    log-probs and entropy (and the exact KL when ``with_kl``) as a ``TokenLogProbsOutput``; the
    per-token head is :func:`policy_loss`'s. ``labels`` are checked already; ``src`` names the
    tensor whose device ``dev`` is ("logits" or "hidden")."""
    advantages, adv_per_seq, old_logps, loss_mask, is_weights, ref_logps, global_num_tokens = _check_head_inputs(
        B,
        T,
        dev,
        old_logps,
        advantages,
        cfg,
        loss_mask,
        ref_logps,
        has_ref_logits,
        is_weights,
        global_num_tokens,
        src,
        full_ref,
    )

    keep = labels != cfg.ignore_index
    if loss_mask is not None:
        keep = keep & (loss_mask != 0)
        # masked-out tokens become ignored rows: no work, no statistic, an exactly zero gradient
        # (an infinite exact KL in a row the loss drops must not turn into 0 * inf = NaN)
        kernel_labels = torch.where(keep, labels, cfg.ignore_index)
    else:
        kernel_labels = labels

    # -- the row kernels: the only pass over the vocabulary
    full = cfg.kl_estimator == "full"
    use_kl = ref_logps is not None or (full and has_ref_logits)
    out = token_stats(kernel_labels, full and use_kl)
    return _policy_terms(
        out.logprobs,
        out.entropy,
        out.kl if full and use_kl else None,
        keep,
        loss_mask,
        old_logps,
        advantages,
        adv_per_seq,
        ref_logps,
        use_kl,
        cfg,
        is_weights,
        global_num_tokens,
        B,
        T,
        dev,
    )


def _policy_terms(
    logp,
    entropy,
    exact_kl,
    keep,
    loss_mask,
    old_logps,
    advantages,
    adv_per_seq: bool,
    ref_logps,
    use_kl: bool,
    cfg: PolicyConfig,
    is_weights,
    global_num_tokens,
    B: int,
    T: int,
    dev,
) -> Tuple[Tensor, Dict[str, Tensor]]:
    """The clipped surrogate, KL and entropy terms over checked per-token ``[B, T]`` vectors.

    ``keep``: bool [B, T], the tokens the loss reads (``loss_mask`` further weights them);
    ``entropy`` may be None (no bonus, no "entropy" metric); ``exact_kl``: the per-token exact
    KL when ``kl_estimator="full"`` has a reference, else None."""
    full = cfg.kl_estimator == "full"
    dt = (
        torch.float64
        if logp.dtype == torch.float64
        or any(t is not None and t.dtype == torch.float64 for t in (old_logps, ref_logps, advantages, is_weights))
        else torch.float32
    )
    logp = logp.to(dt)
    if entropy is not None:
        entropy = entropy.to(dt)
    m = keep.to(dt) if loss_mask is None else loss_mask.to(dt) * keep.to(dt)
    zero = torch.zeros((), dtype=dt, device=dev)

    # Masked positions may hold anything (padding, -inf): keep them out of exp and the gradient.
    verl = cfg.convention == "verl"
    old = logp.detach() if old_logps is None else old_logps.to(dt)
    log_ratio = torch.where(keep, logp - old, zero)  # per token, [B, T]
    ratio_per_seq = cfg.importance_sampling_level == "sequence"
    if verl and not ratio_per_seq:
        log_ratio = log_ratio.clamp(-20.0, 20.0)  # verl clamps before exp (its vanilla and sapo losses)
    token_log_ratio = log_ratio
    if ratio_per_seq:
        log_ratio = (log_ratio * m).sum(-1, keepdim=True) / m.sum(-1, keepdim=True).clamp(min=1.0)  # [B, 1]
    if ratio_per_seq and verl:
        # verl's gspo: the token ratio sg[s_b] * pi_t / sg[pi_t], its log clamped above at 10
        lp = torch.where(keep, logp, zero)
        ratio = torch.exp(torch.clamp(lp - lp.detach() + log_ratio.detach(), max=10.0))  # [B, T]
        ratio_seen = torch.exp(log_ratio.clamp(max=10.0))  # [B, 1], its value
    else:
        ratio = ratio_seen = torch.exp(log_ratio)  # [B, T] or [B, 1]
    adv = advantages.to(dt)

    lower = None
    if cfg.objective == "clip":
        clipped = ratio.clamp(1.0 - cfg.clip_eps_low, 1.0 + cfg.clip_eps_high)
        pg = -torch.minimum(ratio * adv, clipped * adv)
        if cfg.dual_clip is not None:
            with torch.no_grad():  # verl's pg_clipfrac_lower: where the dual clip binds
                lower = (pg > -cfg.dual_clip * adv) & (adv < 0)
            pg = torch.where(adv < 0, torch.minimum(pg, -cfg.dual_clip * adv), pg)
    else:
        args = dict(cfg.objective_args)
        lp = torch.where(keep, logp, zero)
        if cfg.objective == "cispo":  # TRL: the ratio capped at epsilon_high, as a constant weight on log pi
            pg = -ratio.clamp(max=cfg.clip_eps_high).detach() * adv * lp
        elif cfg.objective == "sapo":  # TRL: a sigmoid gate on the ratio instead of the hard clip
            tau = torch.where(adv > 0, args["sapo_temperature_pos"], args["sapo_temperature_neg"]).to(dt)
            pg = -(torch.sigmoid(tau * (ratio - 1.0)) * 4.0 / tau) * adv
        else:  # vespo: TRL's gamma weight of the sequence ratio (a sum of log-ratios), a constant
            phi = _vespo_phi(token_log_ratio, m, adv, args)
            pg = -phi * adv * lp
    if is_weights is not None:
        pg = pg * is_weights.to(dt)
    per_token = pg

    kl = None
    if use_kl:
        if full:
            kl = torch.where(keep, exact_kl.to(dt), zero)
        else:
            kl = _kl_estimate(torch.where(keep, ref_logps.to(dt) - logp, zero), cfg.kl_estimator, cfg.convention)
        if cfg.kl_ratio_correction:
            kl = kl * ratio
        if cfg.kl_coef != 0.0:
            per_token = per_token + cfg.kl_coef * kl

    denom = None
    if global_num_tokens is not None:
        denom = (
            global_num_tokens.to(dt).reshape(())
            if isinstance(global_num_tokens, Tensor)
            else torch.tensor(global_num_tokens, dtype=dt, device=dev)
        )
    trl = cfg.trl is not None
    per_token = per_token.expand(B, T)
    loss = _aggregate(per_token, m, cfg.agg, cfg.max_length, denom, trl)
    policy_loss = loss.detach()
    if cfg.entropy_coef != 0.0:
        if trl:
            h = _aggregate(entropy, m, "token-mean", None, None)
        else:
            h = _aggregate(entropy, m, cfg.agg, cfg.max_length, denom)
        loss = loss - cfg.entropy_coef * h

    with torch.no_grad():
        clip_per_seq = ratio_per_seq and adv_per_seq
        metrics = {}
        if cfg.objective == "clip":
            low = (ratio_seen < 1.0 - cfg.clip_eps_low) & (adv < 0)
            high = (ratio_seen > 1.0 + cfg.clip_eps_high) & (adv > 0)
            metrics["clip_ratio/low_mean"] = _masked_mean(low, m, clip_per_seq)
            metrics["clip_ratio/high_mean"] = _masked_mean(high, m, clip_per_seq)
            metrics["clip_ratio/region_mean"] = _masked_mean(low | high, m, clip_per_seq)
        elif cfg.objective == "cispo":
            metrics["cispo_clip_ratio"] = _masked_mean((ratio_seen > cfg.clip_eps_high) & (adv > 0), m, clip_per_seq)
        elif cfg.objective == "vespo":
            metrics["vespo/phi_seq_mean"] = _masked_mean(phi, m, adv_per_seq)
        metrics["ratio"] = _masked_mean(ratio_seen, m, ratio_per_seq)
        if entropy is not None:
            metrics["entropy"] = _masked_mean(entropy, m)
        metrics["policy_loss"] = policy_loss
        if kl is not None:
            metrics["kl"] = _masked_mean(kl, m)
        # verl's: the mean of old - logp over the tokens (clamped where verl clamps), and the
        # fraction of the tokens where the dual clip binds (0 without one)
        metrics["ppo_kl"] = _masked_mean(-token_log_ratio, m)
        if cfg.objective == "clip":
            metrics["pg_clipfrac_lower"] = zero if lower is None else _masked_mean(lower, m)
    return loss, metrics


def _vespo_phi(log_ratio: Tensor, m: Tensor, adv: Tensor, args: Dict[str, float]) -> Tensor:
    """TRL 1.16's ``GRPOTrainer.get_gamma_weights`` (without the vLLM sampler ratio):
    phi(w) = exp(lambda + k log w - lambda w), w the sequence ratio exp(sum_t m clamp(log r_t, +-20))
    with log w clamped to [log 1e-8, 20], (k, lambda) by the sign of A; detached."""
    with torch.no_grad():
        lo = math.log(1e-8)
        log_w = (log_ratio.clamp(-20.0, 20.0) * m).sum(-1, keepdim=True).clamp(lo, 20.0)
        nonneg = adv >= 0
        k = torch.where(nonneg, args["vespo_k_pos"], args["vespo_k_neg"]).to(log_w.dtype)
        lam = torch.where(nonneg, args["vespo_lambda_pos"], args["vespo_lambda_neg"]).to(log_w.dtype).clamp(min=1e-4)
        log_phi = lam + k * log_w - lam * torch.exp(log_w)
        return torch.exp(log_phi).nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)


def ppo_loss(
    logits: Tensor,
    labels: Tensor,
    old_logps: Optional[Tensor],
    advantages: Tensor,
    *,
    ignore_index: int = -100,
    loss_mask: Optional[Tensor] = None,
    ref_logps: Optional[Tensor] = None,
    ref_logits: Optional[Tensor] = None,
    temperature: Union[float, Tensor] = 1.0,
    clip_eps_low: float = 0.2,
    clip_eps_high: Optional[float] = None,
    dual_clip: Optional[float] = None,
    kl_coef: float = 0.0,
    kl_estimator: str = "k3",
    kl_ratio_correction: bool = False,
    entropy_coef: float = 0.0,
    loss_agg_mode: str = "token-mean",
    max_length: Optional[int] = None,
    importance_sampling_level: str = "token",
    convention: Optional[str] = None,
    loss_type_args: Optional[Dict[str, float]] = None,
    is_weights: Optional[Tensor] = None,
    global_num_tokens: Optional[Union[float, Tensor]] = None,
    backend: str = "auto",
    process_group=None,
    vocab_start: Optional[int] = None,
    vocab_size: Optional[int] = None,
) -> Tuple[Tensor, Dict[str, Tensor]]:
    """Clipped policy-gradient loss (PPO / GRPO / DAPO / Dr. GRPO / GSPO) straight from the logits.

    See the module docstring for the exact formulas.

    Args:
        logits: ``[B, T, V]`` policy logits (float32 / bfloat16 / float16; last stride 1,
            other strides free, e.g. ``logits[:, :-1]``), already aligned with ``labels``.
        labels: int ``[B, T]``: the sampled tokens; ``ignore_index`` marks padding / prompt.
        old_logps: float ``[B, T]`` log-probs of the behaviour policy (the one that sampled),
            or ``None`` for on-policy: old = logp.detach(), the ratio is 1 with a live
            gradient (as TRL does).
        advantages: float ``[B]`` (per sequence) or ``[B, T]`` (per token).
        loss_mask: optional ``[B, T]`` (bool or 0/1 numbers) further masking tokens (e.g.
            tool outputs); non-binary values act as weights in the sums and the counts.
        ref_logps: float ``[B, T]`` reference log-probs, for the sampled KL estimators.
        ref_logits: ``[B, T, V]`` reference logits (shape and dtype of ``logits``), for
            ``kl_estimator="full"``; no gradient flows to them.
        temperature: float > 0 or a tensor broadcastable to ``[B, T]``, applied to the logits
            (and to ``ref_logits``).
        clip_eps_low, clip_eps_high: >= 0; the ratio is clipped to
            ``[1 - clip_eps_low, 1 + clip_eps_high]`` (``clip_eps_high=None``: symmetric).
        dual_clip: ``c > 1`` caps the loss of negative-advantage tokens at ``-c A``, or None
            (with ``convention="verl"``: verl's c = 3 at the token level). With a TRL name it
            must exceed ``1 + clip_eps_high``, where it equals TRL's ``delta``; cispo / sapo /
            vespo refuse it (TRL ignores delta there).
        kl_coef: >= 0, weight of the per-token KL penalty (TRL's ``beta``).
        kl_estimator: one of ``KL_ESTIMATORS``, or with ``convention="verl"`` one of
            ``VERL_KL_ESTIMATORS``. ``"full"`` is the exact KL(pi || pi_ref) over the
            vocabulary; the others are the sampled estimators on the label's log-probs.
            ``"k3"`` is Schulman's (TRL's) unless ``convention="verl"`` (verl's clamped k3).
        kl_ratio_correction: multiply the KL by the (differentiable) ratio, TRL's
            ``use_bias_correction_kl`` (True by default in TRL 1.16).
        entropy_coef: weight of the entropy bonus (``loss -= entropy_coef * H``).
        loss_agg_mode: one of verl's ``LOSS_AGG_MODES`` or a TRL loss type in ``TRL_LOSS_TYPES``
            (each with its trainer's formula, module docstring).
        max_length: int, the divisor of ``dr_grpo`` (TRL's max_completion_length, required) and
            of ``seq-mean-token-sum-norm`` (verl's loss_scale_factor; default T); refused elsewhere.
        importance_sampling_level: ``"token"`` or ``"sequence"`` (GSPO: one ratio per sequence,
            the exp of the mean masked log-ratio).
        convention: None, ``"trl"`` or ``"verl"``: whose formula the names TRL and verl share
            mean (``k3``, the log-ratio clamp, the dual-clip default, GSPO's ratio; module
            docstring). None: TRL's per-token formulas, with each loss_agg_mode name's own
            aggregation.
        loss_type_args: dict of sapo's / vespo's TRL GRPOConfig fields (``TRL_LOSS_TYPE_ARGS``),
            or None for TRL's defaults.
        is_weights: float ``[B, T]`` or ``[B]`` weights multiplying the clipped policy term
            (not the KL term), e.g. truncated importance weights between the rollout engine
            and the trainer, or TRL's off-policy / entropy masks. Used as given (pass them
            detached).
        global_num_tokens: the token normalizer of ``token-mean`` / ``dapo`` (a number > 0 or
            a one-element tensor), e.g. the masked-token count of the whole global batch
            across gradient-accumulation steps, divided by the number of data-parallel ranks
            when DDP / FSDP average the gradients. Default: the local count.
        backend: the row-kernel backend (see :func:`prefopt_fast.token_logprobs`).
        process_group, vocab_start, vocab_size: vocabulary-parallel ``logits`` and
            ``ref_logits`` (each rank holds a vocabulary shard; every other input replicated),
            as in :func:`prefopt_fast.token_logprobs`. The loss and metrics are replicated.

    Returns:
        ``(loss, metrics)``: a 0-d fp32 loss (fp64 if an input is fp64) and detached 0-d
        metrics of this call (not reduced across processes), named as TRL logs them:
        ``clip_ratio/low_mean`` (ratio < 1 - eps_low with A < 0), ``clip_ratio/high_mean``
        (ratio > 1 + eps_high with A > 0), ``clip_ratio/region_mean`` (either) for the clipped
        surrogate, ``cispo_clip_ratio`` / ``vespo/phi_seq_mean`` for those, ``ratio``,
        ``entropy``, ``kl`` (only with a reference; the KL as used in the loss, ratio
        correction included) and ``policy_loss`` (the loss without the entropy bonus); and
        verl's ``ppo_kl`` and ``pg_clipfrac_lower`` (clipped surrogate). Means run over the
        masked tokens, or over the sequences for per-sequence quantities.
    """
    cfg = check_policy_config(
        ignore_index,
        clip_eps_low,
        clip_eps_high,
        dual_clip,
        kl_coef,
        kl_estimator,
        kl_ratio_correction,
        entropy_coef,
        loss_agg_mode,
        max_length,
        importance_sampling_level,
        convention,
        loss_type_args,
    )
    return _ppo(
        logits,
        labels,
        old_logps,
        advantages,
        cfg,
        loss_mask,
        ref_logps,
        ref_logits,
        temperature,
        is_weights,
        global_num_tokens,
        backend,
        dict(process_group=process_group, vocab_start=vocab_start, vocab_size=vocab_size),
    )


class PPOLoss(nn.Module):
    """Config-only module around :func:`ppo_loss`; hyper-parameters (its keywords, down to
    ``process_group``, ``vocab_start``, ``vocab_size`` for vocabulary-parallel logits) are
    validated here, once.

    ``forward(logits, labels, old_logps, advantages, *, loss_mask=None, ref_logps=None,
    ref_logits=None, is_weights=None, global_num_tokens=None) -> (loss, metrics)``.
    """

    def __init__(
        self,
        *,
        ignore_index: int = -100,
        temperature: float = 1.0,
        clip_eps_low: float = 0.2,
        clip_eps_high: Optional[float] = None,
        dual_clip: Optional[float] = None,
        kl_coef: float = 0.0,
        kl_estimator: str = "k3",
        kl_ratio_correction: bool = False,
        entropy_coef: float = 0.0,
        loss_agg_mode: str = "token-mean",
        max_length: Optional[int] = None,
        importance_sampling_level: str = "token",
        convention: Optional[str] = None,
        loss_type_args: Optional[Dict[str, float]] = None,
        backend: str = "auto",
        process_group=None,
        vocab_start: Optional[int] = None,
        vocab_size: Optional[int] = None,
    ):
        super().__init__()
        self._cfg = check_policy_config(
            ignore_index,
            clip_eps_low,
            clip_eps_high,
            dual_clip,
            kl_coef,
            kl_estimator,
            kl_ratio_correction,
            entropy_coef,
            loss_agg_mode,
            max_length,
            importance_sampling_level,
            convention,
            loss_type_args,
        )
        if isinstance(temperature, Tensor):
            raise TypeError("PPOLoss takes a float temperature; pass a per-token tensor to ppo_loss instead")
        self.temperature = check_real(temperature, "temperature", lo=0.0, lo_open=True)
        if not isinstance(backend, str):
            raise TypeError(f"backend must be a str; got {type(backend).__name__}")
        self.backend = backend
        self.loss_agg_mode = loss_agg_mode
        self.process_group, self.vocab_start, self.vocab_size = check_vocab_parallel_options(
            process_group, vocab_start, vocab_size
        )

    def _vocab_parallel(self) -> Dict[str, object]:
        return dict(process_group=self.process_group, vocab_start=self.vocab_start, vocab_size=self.vocab_size)

    def extra_repr(self) -> str:
        s = _config_repr(self.loss_agg_mode, self._cfg)
        if self.temperature != 1.0:
            s += f", temperature={self.temperature}"
        return s

    def forward(
        self,
        logits: Tensor,
        labels: Tensor,
        old_logps: Optional[Tensor],
        advantages: Tensor,
        *,
        loss_mask: Optional[Tensor] = None,
        ref_logps: Optional[Tensor] = None,
        ref_logits: Optional[Tensor] = None,
        is_weights: Optional[Tensor] = None,
        global_num_tokens: Optional[Union[float, Tensor]] = None,
    ):
        return _ppo(
            logits,
            labels,
            old_logps,
            advantages,
            self._cfg,
            loss_mask,
            ref_logps,
            ref_logits,
            self.temperature,
            is_weights,
            global_num_tokens,
            self.backend,
            self._vocab_parallel(),
        )


def _config_repr(loss_agg_mode: str, c: PolicyConfig) -> str:
    s = f"loss_agg_mode={loss_agg_mode!r}, clip_eps=({c.clip_eps_low}, {c.clip_eps_high})"
    if c.dual_clip is not None:
        s += f", dual_clip={c.dual_clip}"
    if c.kl_coef:
        s += f", kl_coef={c.kl_coef}, kl_estimator={c.kl_estimator!r}"
        if c.kl_ratio_correction:
            s += ", kl_ratio_correction=True"
    if c.entropy_coef:
        s += f", entropy_coef={c.entropy_coef}"
    if c.max_length is not None:
        s += f", max_length={c.max_length}"
    if c.importance_sampling_level != "token":
        s += f", importance_sampling_level={c.importance_sampling_level!r}"
    if c.convention is not None:
        s += f", convention={c.convention!r}"
    if c.objective_args:
        s += f", loss_type_args={dict(c.objective_args)}"
    return s


# --------------------------------------------------------------------------- per-token head


def _policy(
    cfg: PolicyConfig, logps, old_logps, advantages, mask, entropy, ref_logps, kl, is_weights, global_num_tokens
) -> Tuple[Tensor, Dict[str, Tensor]]:
    _validate.check_tensor(logps, "logps")
    if not logps.dtype.is_floating_point:
        raise TypeError(f"logps must be a floating-point tensor; got {logps.dtype}")
    if logps.dim() != 2:
        raise ValueError(
            f"logps must have shape [B, T] (per-token log-probs of the sampled tokens); got {list(logps.shape)}"
        )
    B, T = logps.shape
    if B == 0 or T == 0:
        raise ValueError(f"logps must have a non-empty batch and sequence; got shape {list(logps.shape)}")
    dev = logps.device
    if mask is not None:
        mask = _check_bt(mask, "mask", B, T, dev, kinds="mask", src="logps")
    if entropy is not None:
        entropy = _check_bt(entropy, "entropy", B, T, dev, src="logps")
    elif cfg.entropy_coef != 0.0:
        raise ValueError(
            f"entropy_coef={cfg.entropy_coef:g} needs entropy: the per-token entropies [B, T] of the "
            'policy (e.g. token_logprobs(..., stats=("entropy",)).entropy)'
        )
    if kl is not None:
        kl = _check_bt(kl, "kl", B, T, dev, src="logps")
    advantages, adv_per_seq, old_logps, _, is_weights, ref_logps, global_num_tokens = _check_head_inputs(
        B,
        T,
        dev,
        old_logps,
        advantages,
        cfg,
        None,
        ref_logps,
        kl is not None,
        is_weights,
        global_num_tokens,
        "logps",
        "kl",
    )
    keep = torch.ones((B, T), dtype=torch.bool, device=dev) if mask is None else mask != 0
    full = cfg.kl_estimator == "full"
    use_kl = ref_logps is not None or (full and kl is not None)
    return _policy_terms(
        logps,
        entropy,
        kl if full and use_kl else None,
        keep,
        mask,
        old_logps,
        advantages,
        adv_per_seq,
        ref_logps,
        use_kl,
        cfg,
        is_weights,
        global_num_tokens,
        B,
        T,
        dev,
    )


def policy_loss(
    logps: Tensor,
    old_logps: Optional[Tensor],
    advantages: Tensor,
    mask: Optional[Tensor] = None,
    *,
    entropy: Optional[Tensor] = None,
    ref_logps: Optional[Tensor] = None,
    kl: Optional[Tensor] = None,
    clip_eps_low: float = 0.2,
    clip_eps_high: Optional[float] = None,
    dual_clip: Optional[float] = None,
    kl_coef: float = 0.0,
    kl_estimator: str = "k3",
    kl_ratio_correction: bool = False,
    entropy_coef: float = 0.0,
    loss_agg_mode: str = "token-mean",
    max_length: Optional[int] = None,
    importance_sampling_level: str = "token",
    convention: Optional[str] = None,
    loss_type_args: Optional[Dict[str, float]] = None,
    is_weights: Optional[Tensor] = None,
    global_num_tokens: Optional[Union[float, Tensor]] = None,
) -> Tuple[Tensor, Dict[str, Tensor]]:
    """The clipped policy-gradient loss of :func:`ppo_loss` over per-token ``[B, T]`` vectors.

    The head of :func:`ppo_loss` (and of :func:`prefopt_fast.linear_ppo_loss` and the TRL
    GRPO integration) without the pass over the vocabulary: for log-probs computed elsewhere
    (verl, OpenRLHF, a vLLM rollout, or :func:`prefopt_fast.token_logprobs`). Fed the
    log-probs, entropies and exact KL ``ppo_loss`` computes from its logits, it returns the
    same loss and metrics. See the module docstring for the formulas.

    Args:
        logps: float ``[B, T]`` log-probs of the sampled tokens under the policy (the
            gradient flows through them).
        old_logps: float ``[B, T]`` behaviour log-probs, or ``None`` (on-policy: old =
            logps.detach()).
        advantages: float ``[B]`` (per sequence) or ``[B, T]`` (per token).
        mask: optional ``[B, T]`` (bool or 0/1 numbers; other values weight the sums and
            counts): the tokens the loss reads (``ppo_loss``'s ``labels != ignore_index``
            times its ``loss_mask``). Masked positions may hold anything. Default: all tokens.
        entropy: float ``[B, T]`` per-token entropies of the policy: the entropy bonus
            (required when ``entropy_coef != 0``) and the ``entropy`` metric.
        ref_logps: float ``[B, T]`` reference log-probs, for the sampled KL estimators.
        kl: float ``[B, T]`` exact per-token KL(pi || pi_ref) (e.g. ``token_logprobs(...,
            stats=("kl",), ref_logits=...)``), for ``kl_estimator="full"``.
        clip_eps_low, clip_eps_high, dual_clip, kl_coef, kl_estimator, kl_ratio_correction,
        entropy_coef, loss_agg_mode, max_length, importance_sampling_level, convention,
        loss_type_args, is_weights,
        global_num_tokens: as in :func:`ppo_loss`.

    Returns:
        ``(loss, metrics)`` as :func:`ppo_loss`; ``entropy`` is among the metrics only when
        ``entropy`` is given.
    """
    cfg = check_policy_config(
        -100,
        clip_eps_low,
        clip_eps_high,
        dual_clip,
        kl_coef,
        kl_estimator,
        kl_ratio_correction,
        entropy_coef,
        loss_agg_mode,
        max_length,
        importance_sampling_level,
        convention,
        loss_type_args,
    )
    return _policy(cfg, logps, old_logps, advantages, mask, entropy, ref_logps, kl, is_weights, global_num_tokens)


class PolicyLoss(nn.Module):
    """Config-only module around :func:`policy_loss`; the hyper-parameters (its keywords) are
    validated here, once.

    ``forward(logps, old_logps, advantages, mask=None, *, entropy=None, ref_logps=None,
    kl=None, is_weights=None, global_num_tokens=None) -> (loss, metrics)``.
    """

    def __init__(
        self,
        *,
        clip_eps_low: float = 0.2,
        clip_eps_high: Optional[float] = None,
        dual_clip: Optional[float] = None,
        kl_coef: float = 0.0,
        kl_estimator: str = "k3",
        kl_ratio_correction: bool = False,
        entropy_coef: float = 0.0,
        loss_agg_mode: str = "token-mean",
        max_length: Optional[int] = None,
        importance_sampling_level: str = "token",
        convention: Optional[str] = None,
        loss_type_args: Optional[Dict[str, float]] = None,
    ):
        super().__init__()
        self.config = check_policy_config(
            -100,
            clip_eps_low,
            clip_eps_high,
            dual_clip,
            kl_coef,
            kl_estimator,
            kl_ratio_correction,
            entropy_coef,
            loss_agg_mode,
            max_length,
            importance_sampling_level,
            convention,
            loss_type_args,
        )
        self.loss_agg_mode = loss_agg_mode

    def extra_repr(self) -> str:
        return _config_repr(self.loss_agg_mode, self.config)

    def forward(
        self,
        logps: Tensor,
        old_logps: Optional[Tensor],
        advantages: Tensor,
        mask: Optional[Tensor] = None,
        *,
        entropy: Optional[Tensor] = None,
        ref_logps: Optional[Tensor] = None,
        kl: Optional[Tensor] = None,
        is_weights: Optional[Tensor] = None,
        global_num_tokens: Optional[Union[float, Tensor]] = None,
    ):
        return _policy(
            self.config, logps, old_logps, advantages, mask, entropy, ref_logps, kl, is_weights, global_num_tokens
        )
