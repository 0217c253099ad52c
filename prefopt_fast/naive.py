"""Naive float64 autograd reference for :func:`prefopt_fast.token_logprobs`.

Deliberately simple and memory-hungry (full ``log_softmax`` over ``[..., V]`` in fp64):
it exists to check the fused backends, never to be fast. Written from the math of
DESIGN.md, independently of the row kernels.
"""

import torch

STAT_NAMES = ("entropy", "log_sum_sq_probs", "mean_logit", "is_argmax")
FIELDS = ("logprobs",) + STAT_NAMES


def naive_token_logprobs(logits, labels, *, ignore_index=-100, temperature=1.0, stats=()):
    """fp64 reference of ``token_logprobs``.

    logits [..., V] any float dtype (upcast to fp64, differentiable through the upcast);
    labels int [...]; temperature a float or a tensor broadcastable to ``labels.shape``.

    Returns the fp64 log-probs ``[...]`` when ``stats`` is empty, else a plain tuple in
    the field order of ``TokenLogProbsOutput``: ``(logprobs, entropy, log_sum_sq_probs,
    mean_logit, is_argmax)`` with ``None`` for unrequested stats. Float outputs are fp64,
    ``is_argmax`` is bool. Rows whose label is ``ignore_index`` give 0 (False) everywhere
    and no gradient. Non-finite input follows fp64 ``torch.log_softmax`` (NaN or +inf in
    a row -> NaN; a row of only -inf -> NaN).
    """
    stats = tuple(stats)
    for s in stats:
        if s not in STAT_NAMES:
            raise ValueError(f"stats: unknown stat {s!r}; expected a subset of {STAT_NAMES}")
    x = logits.to(torch.float64)
    if isinstance(temperature, torch.Tensor):
        t = temperature.to(device=x.device, dtype=torch.float64).expand(labels.shape)
        x = x / t.unsqueeze(-1)
    else:
        x = x / float(temperature)

    keep = labels != ignore_index
    y = torch.where(keep, labels, torch.zeros_like(labels)).long()
    logp_all = torch.log_softmax(x, dim=-1)
    zero = torch.zeros((), dtype=torch.float64, device=x.device)

    logp = torch.where(keep, logp_all.gather(-1, y.unsqueeze(-1)).squeeze(-1), zero)
    if not stats:
        return logp

    out = dict.fromkeys(STAT_NAMES)
    if "entropy" in stats:
        p = logp_all.exp()
        # Double where: terms with p == 0 count 0, and no 0 * inf = NaN reaches the
        # gradient; a NaN p is not == 0, so NaN rows stay NaN.
        safe_logp = torch.where(p == 0, zero, logp_all)
        h = -(p * safe_logp).sum(-1)
        out["entropy"] = torch.where(keep, h, zero)
    if "log_sum_sq_probs" in stats:
        out["log_sum_sq_probs"] = torch.where(keep, torch.logsumexp(2.0 * logp_all, dim=-1), zero)
    if "mean_logit" in stats:
        out["mean_logit"] = torch.where(keep, x.mean(-1), zero)
    if "is_argmax" in stats:
        # torch.argmax returns the first index of the maximum.
        out["is_argmax"] = keep & (x.argmax(-1) == y)
    return (logp,) + tuple(out[s] for s in STAT_NAMES)
