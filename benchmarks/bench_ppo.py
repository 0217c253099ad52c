"""Benchmark of ppo_loss (issue 4), one op per KL estimator: the clipped policy-gradient
loss from logits [B, T, V].

The loss is a GRPO-style step: off-policy ratio, asymmetric clip + dual clip, a KL penalty
to the reference (kl_coef 0.04), entropy bonus (0.01), token-mean. ``variant_op(kl)`` for
``kl`` in k1, k2, k3, abs, low_var_kl (sampled estimators from reference log-probs [B, T];
ops ``ppo_loss_<kl>``) and full (the exact KL over the vocabulary from reference logits
[B, T, V], read but not differentiated; op ``ppo_loss_full_kl``, whose bound counts both
logits tensors). The issue's targets: the sampled estimators' step within 5% of
``token_logprobs`` with the entropy statistic (provider ``token_logprobs+entropy.<backend>``,
the loss head is [B, T] work); the exact KL's step within 1.6x of the bound.

Run: ``python -m benchmarks --op 'ppo_loss_*'`` or ``python benchmarks/bench_ppo.py --op ppo_loss_k2``.
"""

import dataclasses
import math
import os
import sys

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch

from benchmarks import bench_support as S
from benchmarks.spec import OpSpec, Provider, prefopt_fast_providers

B = 8  # sequences per batch; tokens N = B * T
ESTIMATORS = ("k1", "k2", "k3", "abs", "low_var_kl", "full")
LOSS_KW = dict(
    clip_eps_low=0.2, clip_eps_high=0.28, dual_clip=3.0, kl_coef=0.04, entropy_coef=0.01, loss_agg_mode="token-mean"
)


def op_name(kl: str) -> str:
    return "ppo_loss_full_kl" if kl == "full" else f"ppo_loss_{kl}"


def _extra(shape, g):
    """old / reference log-probs [B, T] fp32 near log(1 / V) - 2; advantages [B]."""
    b, t = shape["B"], shape["T"]
    base = -math.log(shape["V"]) - 2.0
    return {
        "old_logps": base + 0.3 * torch.randn(b, t, generator=g),
        "ref_logps": base + 0.3 * torch.randn(b, t, generator=g),
        "advantages": torch.randn(b, generator=g),
    }


def kl_estimate(d, kl):
    """The sampled KL estimate from d = log pi_ref - log pi (the definitions in the PPO docs)."""
    if kl == "k1":
        return -d
    if kl == "k2":
        return 0.5 * d * d
    if kl == "abs":
        return d.abs()
    if kl == "low_var_kl":
        d = d.clamp(-20.0, 20.0)
        return (torch.exp(d) - d - 1.0).clamp(-10.0, 10.0)
    return torch.exp(d) - d - 1.0


def naive(inputs, kl="k3"):
    """What users write: full fp32 log_softmax (of both tensors for the exact KL), gather,
    entropy from the probabilities, then the loss."""
    logits, labels = inputs["logits"], inputs["labels"]
    keep = labels != S.IGN
    m = keep.float()
    logp_all = torch.log_softmax(logits.float(), dim=-1)
    p = logp_all.exp()
    logp = logp_all.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    ent = -(p * logp_all).sum(-1)
    ratio = torch.exp(torch.where(keep, logp - inputs["old_logps"], 0.0))
    a = inputs["advantages"].unsqueeze(1)
    pg = -torch.minimum(ratio * a, ratio.clamp(0.8, 1.28) * a)
    pg = torch.where(a < 0, torch.minimum(pg, -3.0 * a), pg)
    if kl == "full":
        klv = (p * (logp_all - torch.log_softmax(inputs["ref_logits"].float(), dim=-1))).sum(-1)
    else:
        klv = kl_estimate(torch.where(keep, inputs["ref_logps"] - logp, 0.0), kl)
    per_tok = pg + 0.04 * klv - 0.01 * ent
    return (per_tok * m).sum() / m.sum().clamp(min=1.0)


def _ppo_call(kl):
    def call(inputs, backend, inplace_backward):
        from prefopt_fast.losses import ppo_loss

        ref = {"ref_logits": inputs["ref_logits"]} if kl == "full" else {"ref_logps": inputs["ref_logps"]}
        loss, _ = ppo_loss(
            inputs["logits"],
            inputs["labels"],
            inputs["old_logps"],
            inputs["advantages"],
            kl_estimator=kl,
            backend=backend,
            **ref,
            **LOSS_KW,
        )
        return loss

    return call


def _token_logprobs_call(inputs, backend, inplace_backward):
    import prefopt_fast

    out = prefopt_fast.token_logprobs(
        inputs["logits"], inputs["labels"], stats=("entropy",), backend=backend, inplace_backward=inplace_backward
    )
    return out.logprobs, out.entropy


def _kl_check(backend, inner):
    def check(case):
        try:
            from prefopt_fast import _dispatch

            if not getattr(_dispatch.load_backend(backend), "SUPPORTS_KL", False):
                return f"backend {backend!r} has no exact-KL kernel yet"
        except Exception as exc:
            return f"{type(exc).__name__}: {exc}"
        return inner(case) if inner is not None else None

    return check


def variant_op(kl: str) -> OpSpec:
    if kl not in ESTIMATORS:
        raise KeyError(f"unknown KL estimator {kl!r}; known: {', '.join(ESTIMATORS)}")
    full = kl == "full"
    ours, notes = prefopt_fast_providers(_ppo_call(kl), inplace=False)
    if full:
        ours = [dataclasses.replace(p, check=_kl_check(p.name.split(".", 1)[1], p.check)) for p in ours]
        floor = []
        notes.append("target: prefopt_fast.<backend> step within 1.6x of the bound (both logits read)")
    else:
        floor = S.renamed(
            prefopt_fast_providers(_token_logprobs_call, inplace=False)[0],
            "token_logprobs+entropy",
            "baseline",
            "the floor: prefopt_fast.token_logprobs(stats=('entropy',))",
        )
        notes.append("target: prefopt_fast.<backend> within 5% of token_logprobs+entropy.<backend> (step)")

    def naive_kl(inputs):
        return naive(inputs, kl)

    providers = (
        [
            Provider(
                "naive",
                lambda: naive_kl,
                mem_factor=12.0 if full else 8.0,
                description="fp32 log_softmax over the vocabulary + gather + entropy"
                + (" + exact KL vs the reference logits" if full else f" + {kl} KL")
                + ", then the loss",
            ),
            S.compiled_provider(naive_kl),
        ]
        + floor
        + ours
    )
    # the estimators differ only in [B, T] work: the k3 op sweeps every provider, the others
    # (in --quick: naive and ours; in --full: naive and the compiled backends, the pure-PyTorch
    # fallback taking seconds per step at V = 256000 here) skip the floor, the same for all
    sweep = None if kl in ("k3", "full") else ("naive", "prefopt_fast.*")
    full_sweep = None if sweep is None else ("naive",) + S.COMPILED
    return S.logits_op(
        op_name(kl),
        f"benchmarks.bench_ppo:{kl}",
        S.LogitsLayout(batch=B, prompt=0.125, ref_logits=full, extra=_extra, small_per_token=24),
        providers,
        description=(
            f"clipped PG loss ({kl} KL, entropy bonus) from logits [B, T, V]"
            if not full
            else "clipped PG loss with the exact full-vocabulary KL from policy + reference logits [B, T, V]"
        )
        + ", fwd + bwd into the logits",
        notes=notes,
        default=(4096, 128256),  # the B = 8, T = 512, V = 128256
        dtypes=("bf16", "fp32"),
        full_providers=full_sweep
        or ("naive", "prefopt_fast.*") + tuple(p.replace("prefopt_fast", "token_logprobs+entropy") for p in S.COMPILED),
        quick_providers=sweep,
        full_tokens=(2048,) if sweep else (128, 2048),
    )


OP = variant_op("k3")

if __name__ == "__main__":
    sys.exit(S.script_main("benchmarks.bench_ppo", ESTIMATORS))
