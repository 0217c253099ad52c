"""The reference: every op of prefopt_fast written out plainly in float64 PyTorch.

This module is the specification of the package's math and the oracle its tests,
``tools/accuracy_table.py`` and the benchmarks compare against. It is deliberately naive
and memory-hungry: the logits are materialized, ``log_softmax`` runs over the whole
vocabulary, every loss is the textbook formula. It imports only ``torch`` and shares no
code with the fused ops or the loss heads, so it can catch their bugs.

Every function takes ``dtype`` (default ``torch.float64``): the dtype the inputs are cast
to before any arithmetic (through a differentiable ``.to``, so gradients w.r.t. inputs of
any dtype come from autograd through the reference). ``dtype=None`` computes in the
inputs' own dtype (the "plain PyTorch in the storage dtype" baseline of the accuracy table).

Contents
--------
token statistics     :func:`token_stats` (log-prob of the label, lse, entropy,
                     log sum p^2, mean logit, is-argmax, exact KL(p || q)),
                     :func:`token_logprobs` (the public op's fields) and
                     :func:`row_backward` (their gradient at given row statistics)
fused-linear logits  :func:`linear_logits`, :func:`linear_token_stats`; the fused-linear
                     losses are the losses of these logits (e.g. ``logits_dpo_loss(
                     linear_logits(h, W, b), labels, ...)``, ``ppo_loss(linear_logits(...), ...)``)
sequence sums        :func:`sequence_logprobs` (padded ``[B, T]`` or packed ``cu_seqlens``)
DPO family           :func:`dpo_loss` (every loss type, loss_weights, f-divergences,
                     pair weights, bco delta, TRL's metrics), :func:`logits_dpo_loss`
reference-free       :func:`cpo_loss` (sigmoid / hinge / ipo / simpo, AlphaPO),
                     :func:`simpo_loss`, :func:`orpo_loss`
reward model         :func:`bradley_terry_loss`
policy gradient      :func:`kl_estimate`, :func:`aggregate`, :func:`policy_loss` (PPO /
                     GRPO / DAPO / Dr. GRPO / GSPO over per-token vectors) and
                     :func:`ppo_loss` (from the logits)

Sources: TRL 1.16 (``DPOTrainer``, ``experimental.cpo.CPOTrainer``,
``experimental.orpo.ORPOTrainer``, ``GRPOTrainer``, ``RewardTrainer``), verl's
``core_algos`` (KL estimators, aggregation modes, dual clip), and the papers cited per
function.
"""

import math
from typing import Dict, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "STAT_NAMES",
    "DPO_LOSS_TYPES",
    "F_DIVERGENCES",
    "CPO_LOSS_TYPES",
    "KL_ESTIMATORS",
    "LOSS_AGG_MODES",
    "TRL_LOSS_TYPES",
    "token_stats",
    "token_logprobs",
    "naive_token_logprobs",
    "row_backward",
    "linear_logits",
    "linear_token_stats",
    "sequence_sums",
    "sequence_logprobs",
    "dpo_scores",
    "dpo_per_pair",
    "dpo_metrics",
    "dpo_loss",
    "logits_dpo_loss",
    "cpo_loss",
    "simpo_loss",
    "orpo_loss",
    "bradley_terry_loss",
    "kl_estimate",
    "aggregate",
    "policy_loss",
    "ppo_loss",
]

STAT_NAMES = ("entropy", "log_sum_sq_probs", "mean_logit", "is_argmax")
DPO_LOSS_TYPES = (
    "sigmoid",
    "hinge",
    "ipo",
    "exo_pair",
    "nca_pair",
    "robust",
    "bco_pair",
    "sppo_hard",
    "aot",
    "aot_unpaired",
    "apo_zero",
    "apo_down",
    "discopop",
    "sft",
    "sigmoid_norm",
)
F_DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")
CPO_LOSS_TYPES = ("sigmoid", "hinge", "ipo", "simpo")
KL_ESTIMATORS = ("k1", "k2", "k3", "abs", "low_var_kl", "full")
LOSS_AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")
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
TRL_LOSS_TYPE_ARGS = {
    "sapo": {"sapo_temperature_pos": 1.0, "sapo_temperature_neg": 1.05},
    "vespo": {"vespo_k_pos": 2.0, "vespo_lambda_pos": 3.0, "vespo_k_neg": 3.0, "vespo_lambda_neg": 2.0},
}


def _cast(x, dtype):
    if x is None or not isinstance(x, Tensor):
        return x
    return x if dtype is None else x.to(dtype)


# ============================================================================ token statistics


def _scaled(logits: Tensor, temperature, lead_shape, dtype) -> Tensor:
    """x = logits / temperature in the compute dtype; temperature a float or a tensor
    broadcastable to ``lead_shape`` (one value per row)."""
    x = _cast(logits, dtype)
    if isinstance(temperature, Tensor):
        t = temperature.to(device=x.device, dtype=x.dtype).expand(lead_shape)
        return x / t.unsqueeze(-1)
    return x / float(temperature)


def _row_lse(x: Tensor) -> Tensor:
    """log sum_v exp x_v, NaN where the row holds a NaN or a +inf (as float64
    ``log_softmax`` gives NaN there; ``torch.logsumexp`` alone would say +inf);
    -inf for a row of only -inf."""
    lse = torch.logsumexp(x, dim=-1)
    bad = torch.isnan(x).any(-1) | torch.isposinf(x).any(-1)
    return torch.where(bad, torch.full_like(lse, math.nan), lse)


def _keep_rows(x: Tensor, keep: Tensor) -> Tensor:
    return torch.where(keep.unsqueeze(-1), x, torch.zeros((), dtype=x.dtype, device=x.device))


def _plogq_sum(p: Tensor, a: Tensor) -> Tensor:
    """sum_v p_v a_v where terms with p_v == 0 count 0 (also when a_v is infinite), and
    no 0 * inf reaches the gradient. A NaN p is not == 0, so NaN rows stay NaN."""
    zero = torch.zeros((), dtype=p.dtype, device=p.device)
    return (p * torch.where(p == 0, zero, a)).sum(-1)


def token_stats(
    logits: Tensor,
    labels: Tensor,
    *,
    ignore_index: int = -100,
    temperature: Union[float, Tensor] = 1.0,
    ref_logits: Optional[Tensor] = None,
    dtype: Optional[torch.dtype] = torch.float64,
) -> Dict[str, Tensor]:
    """Every per-row statistic of the row contract (``prefopt_fast._rows``), from a full
    ``log_softmax``.

    Args:
        logits: float ``[..., V]`` (any dtype and strides; cast to ``dtype``, differentiably).
        labels: int ``[...]`` (``logits.shape[:-1]``).
        temperature: a float, or a tensor broadcastable to ``labels.shape``; the statistics
            are those of ``x = logits / temperature`` (and ``xr = ref_logits / temperature``).
        ref_logits: optional ``[..., V]`` reference logits: adds ``kl`` and ``ref_lse``.
            Autograd follows them if they require grad; the package's ops give them no
            gradient, so compare with them detached.

    Returns a dict of ``[...]`` tensors in the compute dtype (``is_argmax`` bool):

    - ``logprobs``  = x_y - logsumexp(x)                      (log p_y)
    - ``lse``       = logsumexp(x)
    - ``entropy``   = -sum_v p_v log p_v                      (terms with p_v == 0 count 0)
    - ``log_sum_sq_probs`` = log sum_v p_v^2
    - ``mean_logit`` = (1 / V) sum_v x_v
    - ``is_argmax`` = y is the FIRST index of max_v x_v
    - ``kl``        = sum_v p_v (log p_v - log q_v) = KL(p || q), q = softmax(xr); +inf
                      where some p_v > 0 has q_v == 0               (with ``ref_logits``)
    - ``ref_lse``   = logsumexp(xr)                                  (with ``ref_logits``)

    Rows whose label is ``ignore_index`` give 0 (False) everywhere and no gradient, whatever
    their logits hold. A label outside ``[0, V)`` that is not ``ignore_index`` gives
    ``logprobs`` NaN and ``is_argmax`` False, the rest as usual (the row contract; the
    public ops reject such labels).
    Non-finite input follows float64 ``torch.log_softmax``: a NaN or +inf anywhere in a row
    gives NaN statistics (``lse`` NaN); -inf entries are masked vocabulary (p = 0); a row of
    only -inf has ``lse`` = -inf and NaN log-probs.
    """
    V = logits.shape[-1]
    keep = labels != ignore_index
    # an ignored row is replaced by zeros before any arithmetic: whatever it holds (NaN, an
    # infinite KL), nothing of it reaches the outputs or the gradient
    x = _keep_rows(_scaled(logits, temperature, labels.shape, dtype), keep)
    in_range = (labels >= 0) & (labels < V)
    y = torch.where(in_range, labels, torch.zeros_like(labels)).long()
    logp_all = torch.log_softmax(x, dim=-1)
    p = logp_all.exp()
    zero = torch.zeros((), dtype=x.dtype, device=x.device)
    nan = torch.full((), math.nan, dtype=x.dtype, device=x.device)

    out = {
        "logprobs": torch.where(in_range, logp_all.gather(-1, y.unsqueeze(-1)).squeeze(-1), nan),
        "lse": _row_lse(x),
        "entropy": -_plogq_sum(p, logp_all),
        "log_sum_sq_probs": torch.logsumexp(2.0 * logp_all, dim=-1),
        "mean_logit": x.mean(-1),
    }
    out = {k: torch.where(keep, v, zero) for k, v in out.items()}
    # torch.argmax returns the first index of the maximum
    out["is_argmax"] = keep & in_range & (x.argmax(-1) == y)
    if ref_logits is not None:
        xr = _keep_rows(_scaled(ref_logits, temperature, labels.shape, dtype), keep)
        logq_all = torch.log_softmax(xr, dim=-1)
        out["kl"] = torch.where(keep, _plogq_sum(p, logp_all - logq_all), zero)
        out["ref_lse"] = torch.where(keep, _row_lse(xr), zero)
    return out


def token_logprobs(
    logits: Tensor,
    labels: Tensor,
    *,
    ignore_index: int = -100,
    temperature: Union[float, Tensor] = 1.0,
    stats: Sequence[str] = (),
    ref_logits: Optional[Tensor] = None,
    dtype: Optional[torch.dtype] = torch.float64,
):
    """Reference of ``prefopt_fast.token_logprobs``: the log-probs ``[...]`` when ``stats``
    is empty, else a dict ``{"logprobs": ..., <each requested stat>: ...}`` (``"kl"`` needs
    ``ref_logits``). Statistics as in :func:`token_stats`."""
    stats = tuple(stats)
    for s in stats:
        if s not in STAT_NAMES + ("kl",):
            raise ValueError(f"stats: unknown stat {s!r}; expected a subset of {STAT_NAMES + ('kl',)}")
    if "kl" in stats and ref_logits is None:
        raise ValueError("stats 'kl' needs ref_logits")
    out = token_stats(
        logits,
        labels,
        ignore_index=ignore_index,
        temperature=temperature,
        ref_logits=ref_logits if "kl" in stats else None,
        dtype=dtype,
    )
    if not stats:
        return out["logprobs"]
    return {k: out[k] for k in ("logprobs",) + stats}


def naive_token_logprobs(logits, labels, *, ignore_index=-100, temperature=1.0, stats=()):
    """fp64 reference in the field order of ``TokenLogProbsOutput``: the log-probs alone
    when ``stats`` is empty, else ``(logprobs, entropy, log_sum_sq_probs, mean_logit,
    is_argmax)`` with ``None`` for the stats not requested. (The former
    ``prefopt_fast.naive`` API, kept as a thin view of :func:`token_logprobs`.)"""
    out = token_logprobs(logits, labels, ignore_index=ignore_index, temperature=temperature, stats=stats)
    if not stats:
        return out
    return (out["logprobs"],) + tuple(out.get(s) for s in STAT_NAMES)


def row_backward(
    x: Tensor,
    labels: Tensor,
    lse: Tensor,
    grad_logp: Tensor,
    *,
    entropy: Optional[Tensor] = None,
    grad_entropy: Optional[Tensor] = None,
    ref_x: Optional[Tensor] = None,
    ref_lse: Optional[Tensor] = None,
    kl: Optional[Tensor] = None,
    grad_kl: Optional[Tensor] = None,
    ignore_index: int = -100,
) -> Tensor:
    """d/dx of sum_n c_n logp_n + e_n H_n + k_n KL_n for rows ``x [N, V]`` whose log-sum-exp,
    entropy, reference log-sum-exp and KL are GIVEN (the backward of the row contract,
    ``prefopt_fast._rows``, which gets them from its forward), all fp64:

        log p_v = x_v - lse,  log q_v = ref_x_v - ref_lse
        grad_v  = c (1[v == y] - p_v) - e p_v (log p_v + H) + k p_v (log p_v - log q_v - KL)

    (the e- and k-terms count 0 where p_v == 0; a label outside [0, V) drops the one-hot
    term; ignored rows get 0). With the exact lse / H / KL this is the autograd gradient of
    :func:`token_stats` w.r.t. x (tests/test_reference.py checks it); taking them as inputs
    lets a test evaluate it at a kernel's own forward statistics, or on a slice of a row.
    Multiply by 1 / temperature for the gradient w.r.t. the logits."""
    N, V = x.shape
    lp = x - lse[:, None]
    p = torch.exp(lp)
    zero = torch.zeros((), dtype=x.dtype, device=x.device)
    in_range = (labels >= 0) & (labels < V)
    onehot = torch.zeros_like(x)
    rows = in_range.nonzero().squeeze(1)
    onehot[rows, labels[rows]] = 1.0
    g = grad_logp[:, None] * (onehot - p)
    if grad_entropy is not None:
        g = g - torch.where(p == 0, zero, grad_entropy[:, None] * p * (lp + entropy[:, None]))
    if grad_kl is not None:
        lq = ref_x - ref_lse[:, None]
        g = g + torch.where(p == 0, zero, grad_kl[:, None] * p * (lp - lq - kl[:, None]))
    return torch.where((labels != ignore_index)[:, None], g, zero)


# ============================================================================ fused linear


def linear_logits(
    hidden: Tensor,
    weight: Tensor,
    bias: Optional[Tensor] = None,
    *,
    lora: Optional[Tuple[Tensor, Tensor, float]] = None,
    logit_scale: float = 1.0,
    softcap: Optional[float] = None,
    dtype: Optional[torch.dtype] = torch.float64,
) -> Tensor:
    """The lm_head transform of the fused-linear ops (TRL 1.16's fused LM head):

        z = (hidden @ weight.T + bias + scaling * (hidden @ A.T) @ B.T) * logit_scale
        z = softcap * tanh(z / softcap)          (when softcap is given)

    hidden ``[..., H]``, weight ``[V, H]``, bias ``[V]``, ``lora = (A [r, H], B [V, r],
    scaling)``. Returns ``[..., V]`` in the compute dtype."""
    h, w = _cast(hidden, dtype), _cast(weight, dtype)
    z = h @ w.T
    if bias is not None:
        z = z + _cast(bias, dtype)
    if lora is not None:
        a, b, scaling = lora
        z = z + float(scaling) * ((h @ _cast(a, dtype).T) @ _cast(b, dtype).T)
    z = z * float(logit_scale)
    if softcap is not None:
        z = float(softcap) * torch.tanh(z / float(softcap))
    return z


def linear_token_stats(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    *,
    bias: Optional[Tensor] = None,
    lora: Optional[Tuple[Tensor, Tensor, float]] = None,
    logit_scale: float = 1.0,
    softcap: Optional[float] = None,
    ignore_index: int = -100,
    temperature: Union[float, Tensor] = 1.0,
    ref_logits: Optional[Tensor] = None,
    dtype: Optional[torch.dtype] = torch.float64,
) -> Dict[str, Tensor]:
    """:func:`token_stats` of :func:`linear_logits` (the fused-linear ops' math, logits
    materialized)."""
    z = linear_logits(hidden, weight, bias, lora=lora, logit_scale=logit_scale, softcap=softcap, dtype=dtype)
    return token_stats(
        z, labels, ignore_index=ignore_index, temperature=temperature, ref_logits=ref_logits, dtype=dtype
    )


# ============================================================================ sequence sums


def sequence_sums(
    values: Tensor, keep: Tensor, cu_seqlens: Optional[Tensor] = None, *, average: bool = False
) -> Tuple[Tensor, Tensor]:
    """(per-sequence sums of ``values``, int64 counts of ``keep``).

    Padded: ``values`` / ``keep`` ``[B, T]`` (any leading dims), summed over the last.
    Packed: ``[total]`` with ``cu_seqlens`` int ``[B + 1]`` (sequence b is
    ``cu_seqlens[b]:cu_seqlens[b + 1]``). ``values`` are expected 0 where ``keep`` is False
    (as :func:`token_stats` gives). ``average``: the sums divided by max(count, 1), so a
    sequence without a kept token gives 0."""
    if cu_seqlens is None:
        s, n = values.sum(-1), keep.long().sum(-1)
    else:
        bounds = cu_seqlens.tolist()
        s = torch.stack([values[a:b].sum() for a, b in zip(bounds[:-1], bounds[1:])]) if len(bounds) > 1 else None
        if s is None:
            s = values.new_zeros(0)
        n = torch.tensor(
            [int(keep[a:b].sum()) for a, b in zip(bounds[:-1], bounds[1:])], dtype=torch.int64, device=keep.device
        )
    if average:
        s = s / n.clamp(min=1).to(s.dtype)
    return s, n


def sequence_logprobs(
    logits: Tensor,
    labels: Tensor,
    *,
    ignore_index: int = -100,
    temperature: Union[float, Tensor] = 1.0,
    average: bool = False,
    cu_seqlens: Optional[Tensor] = None,
    dtype: Optional[torch.dtype] = torch.float64,
) -> Tensor:
    """Reference of ``prefopt_fast.sequence_logprobs``: per-sequence sums (``average``:
    means over the real labels, 0 for none) of the token log-probs. ``logits`` ``[B, T, V]``
    with ``labels [B, T]``, or packed ``[total, V]`` / ``[total]`` with ``cu_seqlens``."""
    lp = token_stats(logits, labels, ignore_index=ignore_index, temperature=temperature, dtype=dtype)["logprobs"]
    return sequence_sums(lp, labels != ignore_index, cu_seqlens, average=average)[0]


# ============================================================================ DPO family


def dpo_scores(logratios: Tensor, f_divergence: str = "reverse_kl", f_alpha: float = 0.5) -> Tensor:
    """f'(t) at t = pi / pi_ref = exp(logratio): the implicit reward under an f-divergence
    (Wang et al. 2023, "Beyond Reverse KL"; TRL 1.16 DPOTrainer):

    reverse_kl  log t;   forward_kl  1 - 1/t;   js_divergence  log(2t / (1 + t));
    alpha_divergence  (t^(alpha - 1) - 1) / (alpha - 1), log t for alpha = 1. TRL clamps
    the exponent (alpha - 1) log t at 80; so does the reference."""
    r = logratios
    if f_divergence == "reverse_kl":
        return r
    if f_divergence == "forward_kl":
        return 1.0 - torch.exp(-r)
    if f_divergence == "js_divergence":
        # log(2t / (1 + t)) = log 2 + log sigmoid(log t)
        return math.log(2.0) + F.logsigmoid(r)
    if f_divergence == "alpha_divergence":
        if abs(f_alpha - 1.0) < 1e-6:
            return r
        a = f_alpha - 1.0
        return (torch.exp(torch.clamp(a * r, max=80.0)) - 1.0) / a
    raise ValueError(f"unknown f_divergence {f_divergence!r}")


def _per_token(x: Tensor, lengths: Tensor) -> Tensor:
    return x / lengths.to(x.dtype).clamp(min=1.0)


def _nll_logistic(x: Tensor, eps: float = 0.0) -> Tensor:
    """Label-smoothed logistic loss (1 - eps)(-log sigmoid x) + eps(-log sigmoid(-x))."""
    return -(1.0 - eps) * F.logsigmoid(x) - eps * F.logsigmoid(-x)


def dpo_per_pair(
    loss_type: str,
    chosen_logps: Tensor,
    rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    *,
    beta: float,
    label_smoothing: float = 0.0,
    chosen_lengths: Optional[Tensor] = None,
    rejected_lengths: Optional[Tensor] = None,
    f_divergence: str = "reverse_kl",
    f_alpha: float = 0.5,
    discopop_tau: float = 0.05,
    bco_delta: Union[float, Tensor] = 0.0,
) -> Tensor:
    """Per-pair loss ``[B]`` of one DPO ``loss_type`` (TRL 1.16 ``DPOTrainer`` semantics).

    With r_w = chosen - ref_chosen, r_l = rejected - ref_rejected (log-ratios), s = f'(r)
    (:func:`dpo_scores`), h = beta (s_w - s_l), eps = label_smoothing, L = max(length, 1):

    sigmoid       -log sigmoid(h)                                       (DPO, Rafailov 2023)
    hinge         max(0, 1 - h)                                         (SLiC, Zhao 2023)
    ipo           (s_w / L_w - s_l / L_l - 1 / (2 beta))^2             (IPO, Azar 2023; TRL normalizes)
    exo_pair      KL([sigmoid h, sigmoid -h] || [1 - eps, eps])         (EXO, Ji 2024)
    nca_pair      -log sigmoid(beta r_w) - 1/2 log sigmoid(-beta r_w) - 1/2 log sigmoid(-beta r_l)  (NCA)
    robust        ((1 - eps)(-log sigmoid h) + eps log sigmoid(-h)) / (1 - 2 eps)  (rDPO, Chowdhury 2024)
    bco_pair      -log sigmoid(beta r_w - delta) - log sigmoid(-(beta r_l - delta))  (BCO)
    sppo_hard     (r_w - 1 / (2 beta))^2 + (r_l + 1 / (2 beta))^2        (SPPO)
    aot           smoothed logistic of beta (sort(cw - cl) - sort(ref_cw - ref_cl))  (AOT, Melnyk 2024)
    aot_unpaired  smoothed logistic of beta (sort(r_w) - sort(r_l))
    apo_zero      1 - sigmoid(beta r_w) + sigmoid(beta r_l)             (APO, D'Oosterlinck 2024)
    apo_down      sigmoid(beta r_w) + 1 - sigmoid(beta (r_w - r_l))
    discopop      (1 - m)(-log sigmoid h) + m exp(-h), m = sigmoid(h / tau)  (DiscoPOP, Chris Lu 2024)
    sft           -sum_b chosen / max(sum_b L_w, 1), the same for every pair (MPO's SFT term)
    sigmoid_norm  -log sigmoid(beta (s_w / L_w - s_l / L_l))

    (smoothed logistic: (1 - eps)(-log sigmoid x) + eps(-log sigmoid(-x)).)
    """
    cw, cl, rcw, rcl = chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps
    rw, rl = cw - rcw, cl - rcl
    sw, sl = dpo_scores(rw, f_divergence, f_alpha), dpo_scores(rl, f_divergence, f_alpha)
    h = beta * (sw - sl)
    eps = label_smoothing
    if loss_type == "sigmoid":
        return -F.logsigmoid(h)
    if loss_type == "hinge":
        return torch.relu(1.0 - h)
    if loss_type == "ipo":
        return (_per_token(sw, chosen_lengths) - _per_token(sl, rejected_lengths) - 1.0 / (2.0 * beta)) ** 2
    if loss_type == "exo_pair":
        qw, ql = torch.sigmoid(h), torch.sigmoid(-h)
        log_qw, log_ql = F.logsigmoid(h), F.logsigmoid(-h)
        return qw * (log_qw - math.log(1.0 - eps)) + ql * (log_ql - math.log(eps))
    if loss_type == "nca_pair":
        return -F.logsigmoid(beta * rw) - 0.5 * F.logsigmoid(-beta * rw) - 0.5 * F.logsigmoid(-beta * rl)
    if loss_type == "robust":
        return ((1.0 - eps) * -F.logsigmoid(h) + eps * F.logsigmoid(-h)) / (1.0 - 2.0 * eps)
    if loss_type == "bco_pair":
        return -F.logsigmoid(beta * rw - bco_delta) - F.logsigmoid(-(beta * rl - bco_delta))
    if loss_type == "sppo_hard":
        return (rw - 1.0 / (2.0 * beta)) ** 2 + (rl + 1.0 / (2.0 * beta)) ** 2
    if loss_type == "aot":
        d = torch.sort(cw - cl).values - torch.sort(rcw - rcl).values
        return _nll_logistic(beta * d, eps)
    if loss_type == "aot_unpaired":
        d = torch.sort(rw).values - torch.sort(rl).values
        return _nll_logistic(beta * d, eps)
    if loss_type == "apo_zero":
        return 1.0 - torch.sigmoid(beta * rw) + torch.sigmoid(beta * rl)
    if loss_type == "apo_down":
        return torch.sigmoid(beta * rw) + 1.0 - torch.sigmoid(beta * (rw - rl))
    if loss_type == "discopop":
        log_m = F.logsigmoid(h / discopop_tau)
        m = torch.exp(log_m)
        # m exp(-h) as exp(log m - h): the same number, finite where the product is inf * 0
        return (1.0 - m) * -F.logsigmoid(h) + torch.exp(log_m - h)
    if loss_type == "sft":
        n = chosen_lengths.to(cw.dtype).sum().clamp(min=1.0)
        return (-cw.sum() / n).expand(cw.shape[0])
    if loss_type == "sigmoid_norm":
        return -F.logsigmoid(beta * (_per_token(sw, chosen_lengths) - _per_token(sl, rejected_lengths)))
    raise ValueError(f"unknown DPO loss_type {loss_type!r}; valid: {DPO_LOSS_TYPES}")


def dpo_metrics(
    beta: float, chosen_logratios: Tensor, rejected_logratios: Tensor, chosen_logps: Tensor, rejected_logps: Tensor
) -> Dict[str, Tensor]:
    """TRL's logged preference metrics (detached batch means): rewards/chosen = mean(beta r_w),
    rewards/rejected, rewards/accuracies = mean(beta r_w > beta r_l) (strict),
    rewards/margins = mean(beta (r_w - r_l)), logps/chosen, logps/rejected."""
    rw, rl = chosen_logratios.detach(), rejected_logratios.detach()
    return {
        "rewards/chosen": (beta * rw).mean(),
        "rewards/rejected": (beta * rl).mean(),
        "rewards/accuracies": (beta * rw > beta * rl).to(rw.dtype).mean(),
        "rewards/margins": (beta * (rw - rl)).mean(),
        "logps/chosen": chosen_logps.detach().mean(),
        "logps/rejected": rejected_logps.detach().mean(),
    }


def dpo_loss(
    chosen_logps: Tensor,
    rejected_logps: Tensor,
    ref_chosen_logps: Optional[Tensor] = None,
    ref_rejected_logps: Optional[Tensor] = None,
    *,
    beta: float = 0.1,
    loss_type: Union[str, Sequence[str]] = "sigmoid",
    loss_weights: Optional[Sequence[float]] = None,
    label_smoothing: float = 0.0,
    chosen_lengths: Optional[Tensor] = None,
    rejected_lengths: Optional[Tensor] = None,
    f_divergence: str = "reverse_kl",
    f_alpha: float = 0.5,
    discopop_tau: float = 0.05,
    bco_delta: Union[None, float, Tensor] = None,
    pair_weights: Optional[Tensor] = None,
    dtype: Optional[torch.dtype] = torch.float64,
) -> Tuple[Tensor, Dict[str, Tensor]]:
    """Reference of ``prefopt_fast.dpo_loss``: ``loss = sum_k loss_weights[k] *
    mean_b(per_pair_k[b] * pair_weights[b])`` (:func:`dpo_per_pair`), reference log-probs 0
    when not given; metrics of :func:`dpo_metrics` (plain log-ratios, whatever the
    f-divergence). Inputs ``[B]`` per-sequence sums, lengths int or float ``[B]``."""
    types = [loss_type] if isinstance(loss_type, str) else list(loss_type)
    weights = [1.0] * len(types) if loss_weights is None else list(loss_weights)
    cw, cl = _cast(chosen_logps, dtype), _cast(rejected_logps, dtype)
    if ref_chosen_logps is None:
        rcw, rcl = torch.zeros_like(cw), torch.zeros_like(cl)
    else:
        rcw, rcl = _cast(ref_chosen_logps, dtype), _cast(ref_rejected_logps, dtype)
    delta = 0.0 if bco_delta is None else _cast(bco_delta, cw.dtype)
    loss = None
    for t, w in zip(types, weights):
        per = dpo_per_pair(
            t,
            cw,
            cl,
            rcw,
            rcl,
            beta=beta,
            label_smoothing=label_smoothing,
            chosen_lengths=chosen_lengths,
            rejected_lengths=rejected_lengths,
            f_divergence=f_divergence,
            f_alpha=f_alpha,
            discopop_tau=discopop_tau,
            bco_delta=delta,
        )
        if pair_weights is not None:
            per = per * _cast(pair_weights, cw.dtype)
        term = w * per.mean()
        loss = term if loss is None else loss + term
    return loss, dpo_metrics(beta, cw - rcw, cl - rcl, cw, cl)


def logits_dpo_loss(
    logits: Tensor,
    labels: Tensor,
    ref_logits: Optional[Tensor] = None,
    *,
    ref_chosen_logps: Optional[Tensor] = None,
    ref_rejected_logps: Optional[Tensor] = None,
    ignore_index: int = -100,
    temperature: Union[float, Tensor] = 1.0,
    cu_seqlens: Optional[Tensor] = None,
    dtype: Optional[torch.dtype] = torch.float64,
    **dpo_kwargs,
) -> Tuple[Tensor, Dict[str, Tensor]]:
    """DPO from the logits of the stacked batch ``[chosen; rejected]`` (``logits [2B, T, V]``,
    ``labels [2B, T]``, or packed ``[total, V]`` / ``[total]`` with ``cu_seqlens [2B + 1]``):
    per-sequence sums of the token log-probs, completion lengths = real labels per sequence,
    then :func:`dpo_loss` (``dpo_kwargs``: its keywords). The reference sums come from
    ``ref_logits`` (under ``no_grad``), or precomputed ``ref_chosen_logps`` /
    ``ref_rejected_logps`` ``[B]``, or neither (reference-free)."""
    keep = labels != ignore_index
    lp = token_stats(logits, labels, ignore_index=ignore_index, temperature=temperature, dtype=dtype)["logprobs"]
    s, n = sequence_sums(lp, keep, cu_seqlens)
    B = s.shape[0] // 2
    rw, rl = ref_chosen_logps, ref_rejected_logps
    if ref_logits is not None:
        with torch.no_grad():
            lq = token_stats(ref_logits, labels, ignore_index=ignore_index, temperature=temperature, dtype=dtype)
            rs, _ = sequence_sums(lq["logprobs"], keep, cu_seqlens)
        rw, rl = rs[:B], rs[B:]
    elif rw is not None:
        rw, rl = _cast(rw, s.dtype), _cast(rl, s.dtype)
    dpo_kwargs.setdefault("chosen_lengths", n[:B])
    dpo_kwargs.setdefault("rejected_lengths", n[B:])
    return dpo_loss(s[:B], s[B:], rw, rl, dtype=None, **dpo_kwargs)


# ============================================================================ reference-free


def _chosen_nll(chosen_logps: Tensor, chosen_lengths: Tensor) -> Tensor:
    """Token-mean NLL of the chosen completions over the batch: -sum_b S_w / max(sum_b L_w, 1)."""
    return -chosen_logps.sum() / chosen_lengths.to(chosen_logps.dtype).sum().clamp(min=1.0)


def cpo_loss(
    chosen_logps: Tensor,
    rejected_logps: Tensor,
    chosen_lengths: Optional[Tensor] = None,
    rejected_lengths: Optional[Tensor] = None,
    *,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    cpo_alpha: float = 1.0,
    simpo_gamma: float = 0.5,
    alpha: float = 0.0,
    nll_loss: Optional[Tensor] = None,
    dtype: Optional[torch.dtype] = torch.float64,
) -> Tuple[Tensor, Dict[str, Tensor]]:
    """CPO (Xu et al. 2024; TRL 1.16 ``experimental.cpo.CPOTrainer``), reference-free.

    x = the sums (sigmoid, hinge) or per-token means S / max(L, 1) (ipo, simpo);
    AlphaPO shaping (Gupta et al. 2025) for alpha != 0: u = (1 - exp(-alpha x)) / alpha, else
    u = x; d = u_w - u_l (minus simpo_gamma / beta for simpo):

    sigmoid, simpo  (1 - eps)(-log sigmoid(beta d)) + eps(-log sigmoid(-beta d))
    hinge           max(0, 1 - beta d)
    ipo             (d - 1 / (2 beta))^2

    loss = mean_b(per pair) + cpo_alpha * NLL, NLL = ``nll_loss`` or the chosen token-mean
    NLL. Metrics: rewards from beta u, logps/* the means of x, nll_loss."""
    cw, cl = _cast(chosen_logps, dtype), _cast(rejected_logps, dtype)
    if loss_type in ("ipo", "simpo"):
        xw, xl = _per_token(cw, chosen_lengths), _per_token(cl, rejected_lengths)
    else:
        xw, xl = cw, cl
    if alpha != 0.0:
        uw, ul = (1.0 - torch.exp(-alpha * xw)) / alpha, (1.0 - torch.exp(-alpha * xl)) / alpha
    else:
        uw, ul = xw, xl
    d = uw - ul
    if loss_type == "simpo":
        d = d - simpo_gamma / beta
    if loss_type in ("sigmoid", "simpo"):
        per = _nll_logistic(beta * d, label_smoothing)
    elif loss_type == "hinge":
        per = torch.relu(1.0 - beta * d)
    elif loss_type == "ipo":
        per = (d - 1.0 / (2.0 * beta)) ** 2
    else:
        raise ValueError(f"unknown CPO loss_type {loss_type!r}; valid: {CPO_LOSS_TYPES}")
    if cpo_alpha == 0.0:
        nll = torch.zeros((), dtype=cw.dtype, device=cw.device)
    else:
        nll = _cast(nll_loss, cw.dtype) if nll_loss is not None else _chosen_nll(cw, chosen_lengths)
    loss = per.mean() + cpo_alpha * nll
    metrics = dpo_metrics(beta, uw, ul, xw, xl)
    metrics["nll_loss"] = nll.detach()
    return loss, metrics


def simpo_loss(
    chosen_logps: Tensor,
    rejected_logps: Tensor,
    chosen_lengths: Tensor,
    rejected_lengths: Tensor,
    *,
    beta: float = 0.1,
    simpo_gamma: float = 0.5,
    label_smoothing: float = 0.0,
    cpo_alpha: float = 1.0,
    alpha: float = 0.0,
    nll_loss: Optional[Tensor] = None,
    dtype: Optional[torch.dtype] = torch.float64,
) -> Tuple[Tensor, Dict[str, Tensor]]:
    """SimPO (Meng et al. 2024): -log sigmoid(beta (S_w / L_w - S_l / L_l) - gamma), label
    smoothed as TRL's CPO ``simpo`` type, plus ``cpo_alpha`` * chosen NLL (CPO-SimPO).
    The same as :func:`cpo_loss` with ``loss_type="simpo"``: beta (d - gamma / beta) =
    beta d - gamma. Defaults: TRL's CPOConfig (pure SimPO: cpo_alpha=0)."""
    return cpo_loss(
        chosen_logps,
        rejected_logps,
        chosen_lengths,
        rejected_lengths,
        beta=beta,
        loss_type="simpo",
        label_smoothing=label_smoothing,
        cpo_alpha=cpo_alpha,
        simpo_gamma=simpo_gamma,
        alpha=alpha,
        nll_loss=nll_loss,
        dtype=dtype,
    )


def orpo_loss(
    chosen_logps: Tensor,
    rejected_logps: Tensor,
    chosen_lengths: Tensor,
    rejected_lengths: Tensor,
    *,
    beta: float = 0.1,
    nll_loss: Optional[Tensor] = None,
    dtype: Optional[torch.dtype] = torch.float64,
) -> Tuple[Tensor, Dict[str, Tensor]]:
    """ORPO (Hong et al. 2024; TRL 1.16 ``experimental.orpo.ORPOTrainer``):

    x = S / max(L, 1) (per-token means, < 0), odds(x) = exp(x) / (1 - exp(x)),
    log_odds = log odds(x_w) - log odds(x_l) = (x_w - x_l) - (log(1 - e^x_w) - log(1 - e^x_l)),
    loss = NLL - beta * mean_b log sigmoid(log_odds).

    Metrics: rewards from beta x, logps/* the means of x, nll_loss, log_odds_ratio =
    mean(log sigmoid(log_odds)), log_odds_chosen = mean(log_odds)."""
    cw, cl = _cast(chosen_logps, dtype), _cast(rejected_logps, dtype)
    xw, xl = _per_token(cw, chosen_lengths), _per_token(cl, rejected_lengths)
    log_odds = (xw - xl) - (torch.log1p(-torch.exp(xw)) - torch.log1p(-torch.exp(xl)))
    ratio = F.logsigmoid(log_odds)
    nll = _cast(nll_loss, cw.dtype) if nll_loss is not None else _chosen_nll(cw, chosen_lengths)
    loss = nll - beta * ratio.mean()
    metrics = dpo_metrics(beta, xw, xl, xw, xl)
    metrics["nll_loss"] = nll.detach()
    metrics["log_odds_ratio"] = ratio.detach().mean()
    metrics["log_odds_chosen"] = log_odds.detach().mean()
    return loss, metrics


# ============================================================================ reward model


def bradley_terry_loss(
    chosen_rewards: Tensor,
    rejected_rewards: Tensor,
    *,
    margin: Union[None, float, Tensor] = None,
    center_rewards_coefficient: Optional[float] = None,
    dtype: Optional[torch.dtype] = torch.float64,
) -> Tuple[Tensor, Dict[str, Tensor]]:
    """Bradley-Terry reward-model loss (TRL 1.16 ``RewardTrainer.compute_loss``):

    loss = mean_b(-log sigmoid(r_w - r_l - margin)) + c * mean_b((r_w + r_l)^2)

    (the centering term of Eisenstein et al. 2023). Rewards ``[B]`` or ``[B, 1]``; margin a
    float or a tensor like the rewards. Metrics: accuracy = mean(r_w > r_l), margin =
    mean(r_w - r_l) (without the input margin), mean / min / max over all 2B rewards."""
    rw, rl = _cast(chosen_rewards, dtype), _cast(rejected_rewards, dtype)
    d = rw - rl
    if margin is not None:
        d = d - (_cast(margin, rw.dtype) if isinstance(margin, Tensor) else float(margin))
    loss = -F.logsigmoid(d).mean()
    if center_rewards_coefficient is not None:
        loss = loss + center_rewards_coefficient * ((rw + rl) ** 2).mean()
    with torch.no_grad():
        both = torch.cat([rw, rl])
        metrics = {
            "accuracy": (rw > rl).to(rw.dtype).mean(),
            "margin": (rw - rl).mean(),
            "mean_reward": both.mean(),
            "min_reward": both.min(),
            "max_reward": both.max(),
        }
    return loss, metrics


# ============================================================================ policy gradient


def kl_estimate(logp: Tensor, ref_logp: Tensor, estimator: str, convention: Optional[str] = None) -> Tensor:
    """Sampled estimate of KL(pi || pi_ref) at the sampled token, from its log-probs
    (Schulman 2020, "Approximating KL divergence"; verl ``kl_penalty``). With
    d = log pi_ref - log pi:

    k1  -d;   k2  d^2 / 2;   k3  exp(d) - d - 1 (>= 0; TRL GRPO's);   abs  |d|;
    low_var_kl  clamp(exp(dc) - dc - 1, -10, 10) with dc = clamp(d, -20, 20) (verl).
    ``convention="verl"``: k3 is low_var_kl (verl's k3), and ``name+`` (verl's straight
    through) has the value of ``name`` and the gradient of k2."""
    if estimator.endswith("+"):
        value = kl_estimate(logp, ref_logp, estimator[:-1], convention).detach()
        k2 = (logp - ref_logp) ** 2 / 2
        return value + (k2 - k2.detach())
    if estimator == "k3" and convention == "verl":
        estimator = "low_var_kl"
    d = ref_logp - logp
    if estimator == "k1":
        return -d
    if estimator == "k2":
        return 0.5 * d**2
    if estimator == "k3":
        return torch.exp(d) - d - 1.0
    if estimator == "abs":
        return torch.abs(d)
    if estimator == "low_var_kl":
        dc = torch.clamp(d, min=-20.0, max=20.0)
        return torch.clamp(torch.exp(dc) - dc - 1.0, min=-10.0, max=10.0)
    raise ValueError(f"unknown sampled KL estimator {estimator!r}")


def aggregate(
    values: Tensor,
    mask: Tensor,
    mode: str,
    *,
    max_length: Optional[int] = None,
    num_tokens: Union[None, float, Tensor] = None,
    trl: bool = False,
) -> Tensor:
    """Reduce per-token ``values`` ``[B, T]`` (or ``[B, 1]``, broadcast) with the float mask
    ``[B, T]``; S_b = sum_t mask v, L_b = sum_t mask, n = the number of sequences with L_b > 0
    (at least 1):

    verl ``agg_loss`` (``trl=False``):
    token-mean               sum_b S_b / N, N = num_tokens or max(sum_b L_b, 1)
    seq-mean-token-mean      sum_{b: L_b > 0} (S_b / L_b) / n
    seq-mean-token-sum       sum_b S_b / n
    seq-mean-token-sum-norm  sum_b S_b / n / (max_length or T)   (verl's loss_scale_factor)

    TRL 1.16 GRPOTrainer (``trl=True``): token-mean as above; the means run over all B:
    seq-mean-token-mean      mean_b S_b / max(L_b, 1)       (grpo, sapo)
    seq-mean-token-sum       mean_b S_b                     (luspo)
    seq-mean-token-sum-norm  sum_b S_b / (B * max_length)   (dr_grpo)"""
    v = values.expand(mask.shape)
    S = (v * mask).sum(-1)
    L = mask.sum(-1)
    B, T = mask.shape
    if mode == "token-mean":
        n = L.sum().clamp(min=1.0) if num_tokens is None else num_tokens
        return S.sum() / n
    if mode not in LOSS_AGG_MODES:
        raise ValueError(f"unknown aggregation {mode!r}; valid: {LOSS_AGG_MODES}")
    if trl:
        if mode == "seq-mean-token-mean":
            return (S / L.clamp(min=1.0)).mean()
        if mode == "seq-mean-token-sum":
            return S.mean()
        return S.sum() / (B * max_length)
    live = L > 0
    n = max(int(live.sum()), 1)
    if mode == "seq-mean-token-mean":
        return sum(S[b] / L[b] for b in range(B) if live[b]) / n if bool(live.any()) else S.sum() * 0.0
    if mode == "seq-mean-token-sum":
        return S.sum() / n
    return S.sum() / n / (T if max_length is None else max_length)


def _metric_mean(x: Tensor, mask: Tensor, per_sequence: bool) -> Tensor:
    x = x.detach()
    if per_sequence:  # one value per sequence: the mean over the B sequences
        return x.to(mask.dtype).mean()
    return (x.to(mask.dtype).expand(mask.shape) * mask).sum() / mask.sum().clamp(min=1.0)


def policy_loss(
    logprobs: Tensor,
    old_logprobs: Optional[Tensor],
    advantages: Tensor,
    mask: Tensor,
    *,
    entropy: Optional[Tensor] = None,
    ref_logprobs: Optional[Tensor] = None,
    exact_kl: Optional[Tensor] = None,
    loss_mask: Optional[Tensor] = None,
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
    global_num_tokens: Union[None, float, Tensor] = None,
    dtype: Optional[torch.dtype] = torch.float64,
) -> Tuple[Tensor, Dict[str, Tensor]]:
    """Clipped policy-gradient loss over per-token vectors (PPO, Schulman 2017; GRPO,
    Shao 2024; DAPO's clip-higher; Dr. GRPO; GSPO's sequence ratio; verl's dual clip;
    TRL 1.16 ``GRPOTrainer._compute_loss``; verl 0.9 ``compute_policy_loss_vanilla`` /
    ``compute_policy_loss_gspo`` with ``convention="verl"``).

    Inputs ``[B, T]``: ``logprobs`` (policy), ``old_logprobs`` (behaviour; None = on-policy,
    ``logprobs.detach()``), ``mask`` bool (real tokens), optional ``loss_mask`` (weights
    multiplying the mask), ``entropy`` per token, ``ref_logprobs`` (sampled KL) or
    ``exact_kl`` (``kl_estimator="full"``), ``is_weights`` ``[B, T]`` / ``[B]``;
    ``advantages`` ``[B]`` or ``[B, T]``. Per token, m = mask * loss_mask; a token with m = 0
    is dropped (nothing it holds, an infinite KL included, reaches the loss or gradient):

        l_t   = logp - old (0 at masked tokens); convention "verl": clamped to [-20, 20]
        log r = l_t, or for importance_sampling_level "sequence": s_b = sum_t m l_t / max(sum_t m, 1)
                (convention "verl": log r_t = min(s_b + logp_t - sg(logp_t), 10) with s_b detached)
        pg    = -min(r A, clip(r, 1 - eps_low, 1 + eps_high) A)   (eps_high None: eps_low)
        dual clip c (A < 0 only):  pg = min(pg, -c A)   (convention "verl", token level: c = 3 by default)
        TRL cispo: pg = -sg(min(r, eps_high)) A logp;  sapo: pg = -sigmoid(tau (r - 1)) 4 / tau A,
        tau = sapo_temperature_pos if A > 0 else _neg;  vespo: pg = -phi A logp, phi (detached) =
        exp(lam + k log w - lam w), log w = clamp(sum_t m clamp(l_t, +-20), log 1e-8, 20), (k, lam) by A >= 0
        pg    = pg * is_weights
        kl    = kl_estimate(logp, ref, convention) or exact_kl (0 at masked tokens), * r with kl_ratio_correction
        loss  = agg(pg + kl_coef * kl) - entropy_coef * agg_H(H)

    ``loss_agg_mode`` is one of ``LOSS_AGG_MODES`` (verl's :func:`aggregate`; ``global_num_tokens``
    the token-mean normalizer) or a TRL loss type in ``TRL_LOSS_TYPES`` (TRL's aggregate); agg_H
    is the loss's own aggregation for the verl names and TRL's per-token mean entropy for TRL's.

    Metrics (TRL's names): clip_ratio/low_mean (r < 1 - eps_low with A < 0),
    clip_ratio/high_mean (r > 1 + eps_high with A > 0), clip_ratio/region_mean (these three for
    the clipped surrogate), cispo_clip_ratio (r > eps_high with A > 0), vespo/phi_seq_mean,
    ratio, entropy (with ``entropy``), kl (with a KL term), policy_loss (the loss before the
    entropy bonus); verl's ppo_kl (mean of -l_t) and pg_clipfrac_lower (the dual clip binds;
    clipped surrogate only). Means over the masked tokens, or over the sequences for values
    that are per sequence (the sequence ratio; the clip fractions when both the ratio and A are).
    """
    trl = loss_agg_mode in TRL_LOSS_TYPES
    agg = TRL_LOSS_TYPES.get(loss_agg_mode, loss_agg_mode)
    objective = loss_agg_mode if loss_agg_mode in ("cispo", "sapo", "vespo") else "clip"
    targs = dict(TRL_LOSS_TYPE_ARGS.get(objective, {}), **(loss_type_args or {}))
    verl = convention == "verl"
    eps_low = clip_eps_low
    eps_high = clip_eps_low if clip_eps_high is None else clip_eps_high
    logp = _cast(logprobs, dtype)
    dt = logp.dtype
    keep = mask.bool() if loss_mask is None else mask.bool() & (loss_mask != 0)
    m = keep.to(dt) if loss_mask is None else keep.to(dt) * loss_mask.to(dt)
    zero = torch.zeros((), dtype=dt, device=logp.device)
    old = logp.detach() if old_logprobs is None else _cast(old_logprobs, dt)
    adv = _cast(advantages, dt)
    adv_per_seq = adv.dim() == 1
    if adv_per_seq:
        adv = adv.unsqueeze(1)
    seq_ratio = importance_sampling_level == "sequence"
    if verl and dual_clip is None and not seq_ratio and objective == "clip":
        dual_clip = 3.0

    tok_lr = torch.where(keep, logp - old, zero)
    if verl and not seq_ratio:
        tok_lr = torch.clamp(tok_lr, min=-20.0, max=20.0)
    lp = torch.where(keep, logp, zero)
    if seq_ratio:
        s_b = (tok_lr * m).sum(-1, keepdim=True) / m.sum(-1, keepdim=True).clamp(min=1.0)
        if verl:
            ratio = torch.exp(torch.clamp(s_b.detach() + lp - lp.detach(), max=10.0))
            shown = torch.exp(torch.clamp(s_b, max=10.0))
        else:
            ratio = shown = torch.exp(s_b)
    else:
        ratio = shown = torch.exp(tok_lr)

    binds = None
    if objective == "clip":
        unclipped = ratio * adv
        clipped = torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high) * adv
        pg = -torch.minimum(unclipped, clipped)
        if dual_clip is not None:
            binds = (pg > -dual_clip * adv) & (adv < 0)
            pg = torch.where(adv < 0, torch.minimum(pg, -dual_clip * adv), pg)
    elif objective == "cispo":
        pg = -torch.clamp(ratio, max=eps_high).detach() * adv * lp
    elif objective == "sapo":
        tau = torch.where(adv > 0, torch.full_like(adv, targs["sapo_temperature_pos"]), targs["sapo_temperature_neg"])
        pg = -torch.sigmoid(tau * (ratio - 1.0)) * 4.0 / tau * adv
    else:
        with torch.no_grad():
            log_w = (torch.clamp(tok_lr, -20.0, 20.0) * m).sum(-1, keepdim=True).clamp(math.log(1e-8), 20.0)
            pos = adv >= 0
            k = torch.where(pos, torch.full_like(adv, targs["vespo_k_pos"]), targs["vespo_k_neg"])
            lam = torch.where(pos, torch.full_like(adv, targs["vespo_lambda_pos"]), targs["vespo_lambda_neg"])
            lam = lam.clamp(min=1e-4)
            phi = torch.exp(lam + k * log_w - lam * torch.exp(log_w)).nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)
        pg = -phi * adv * lp
    if is_weights is not None:
        w = _cast(is_weights, dt)
        pg = pg * (w.unsqueeze(1) if w.dim() == 1 else w)
    per_token = pg

    kl = None
    if kl_estimator == "full" and exact_kl is not None:
        kl = torch.where(keep, _cast(exact_kl, dt), zero)
    elif kl_estimator != "full" and ref_logprobs is not None:
        kl = kl_estimate(lp, torch.where(keep, _cast(ref_logprobs, dt), zero), kl_estimator, convention)
    if kl is not None:
        if kl_ratio_correction:
            kl = kl * ratio
        if kl_coef != 0.0:
            per_token = per_token + kl_coef * kl

    num_tokens = None
    if global_num_tokens is not None:
        num_tokens = _cast(global_num_tokens, dt) if isinstance(global_num_tokens, Tensor) else global_num_tokens
        if isinstance(num_tokens, Tensor):
            num_tokens = num_tokens.reshape(())
    loss = aggregate(per_token, m, agg, max_length=max_length, num_tokens=num_tokens, trl=trl)
    pl = loss.detach()
    if entropy_coef != 0.0:
        H = _cast(entropy, dt)
        if trl:
            h = aggregate(H, m, "token-mean")
        else:
            h = aggregate(H, m, agg, max_length=max_length, num_tokens=num_tokens)
        loss = loss - entropy_coef * h

    with torch.no_grad():
        clip_per_seq = seq_ratio and adv_per_seq
        metrics = {}
        if objective == "clip":
            low = (shown < 1.0 - eps_low) & (adv < 0)
            high = (shown > 1.0 + eps_high) & (adv > 0)
            metrics["clip_ratio/low_mean"] = _metric_mean(low, m, clip_per_seq)
            metrics["clip_ratio/high_mean"] = _metric_mean(high, m, clip_per_seq)
            metrics["clip_ratio/region_mean"] = _metric_mean(low | high, m, clip_per_seq)
        elif objective == "cispo":
            metrics["cispo_clip_ratio"] = _metric_mean((shown > eps_high) & (adv > 0), m, clip_per_seq)
        elif objective == "vespo":
            metrics["vespo/phi_seq_mean"] = _metric_mean(phi, m, adv_per_seq)
        metrics["ratio"] = _metric_mean(shown, m, seq_ratio)
        if entropy is not None:
            metrics["entropy"] = _metric_mean(_cast(entropy, dt), m, False)
        metrics["policy_loss"] = pl
        if kl is not None:
            metrics["kl"] = _metric_mean(kl, m, False)
        metrics["ppo_kl"] = _metric_mean(-tok_lr, m, False)
        if objective == "clip":
            metrics["pg_clipfrac_lower"] = zero if binds is None else _metric_mean(binds, m, False)
    return loss, metrics


def ppo_loss(
    logits: Tensor,
    labels: Tensor,
    old_logprobs: Optional[Tensor],
    advantages: Tensor,
    *,
    ignore_index: int = -100,
    temperature: Union[float, Tensor] = 1.0,
    ref_logprobs: Optional[Tensor] = None,
    ref_logits: Optional[Tensor] = None,
    dtype: Optional[torch.dtype] = torch.float64,
    **policy_kwargs,
) -> Tuple[Tensor, Dict[str, Tensor]]:
    """Reference of ``prefopt_fast.ppo_loss``: :func:`token_stats` of ``logits [B, T, V]``
    (log-probs, entropy, and with ``kl_estimator="full"`` the exact KL to ``ref_logits``,
    which get no gradient), then :func:`policy_loss` (``policy_kwargs``: its keywords;
    tokens whose ``loss_mask`` is 0 are ignored like ``ignore_index`` labels)."""
    full = policy_kwargs.get("kl_estimator", "k3") == "full"
    ref = None
    if full and ref_logits is not None:
        ref = ref_logits.detach()
    loss_mask = policy_kwargs.get("loss_mask")
    if loss_mask is not None:  # tokens with loss_mask 0 are dropped like ignored ones
        labels = torch.where(loss_mask != 0, labels, torch.full_like(labels, ignore_index))
    st = token_stats(logits, labels, ignore_index=ignore_index, temperature=temperature, ref_logits=ref, dtype=dtype)
    return policy_loss(
        st["logprobs"],
        old_logprobs,
        advantages,
        labels != ignore_index,
        entropy=st["entropy"],
        ref_logprobs=None if full else ref_logprobs,
        exact_kl=st.get("kl"),
        dtype=None,
        **policy_kwargs,
    )
