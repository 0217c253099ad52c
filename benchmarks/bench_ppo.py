"""Benchmark of ppo_loss (issue 4): the clipped policy-gradient loss from logits [B, T, V].

The loss is a GRPO-style step: off-policy ratio, asymmetric clip + dual clip, k3 KL to
reference log-probs (kl_coef 0.04), entropy bonus (0.01), token-mean. The issue's target:
forward + backward within 5% of ``token_logprobs`` with the entropy statistic on the same
logits (the provider ``token_logprobs+entropy.<backend>``), since the loss head is [B, T]
work. The exact-KL variant (``kl_estimator="full"``, two logits tensors) is benchmarked by
``bench_ppo_full_kl.py``.

Run: ``python benchmarks/bench_ppo.py [--quick|--full]`` (register ``"ppo_loss":
"benchmarks.bench_ppo"`` in ``benchmarks/__init__.py`` to reach it with ``--op``).
"""
import dataclasses
import os
import sys

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch

from benchmarks import harness as H

B = 8  # sequences per batch; tokens N = B * T
LOSS_KW = dict(clip_eps_low=0.2, clip_eps_high=0.28, dual_clip=3.0, kl_coef=0.04, kl_estimator="k3",
               entropy_coef=0.01, loss_agg_mode="token-mean")


def make_shape(tokens: int, vocab: int) -> dict:
    if tokens % B:
        raise ValueError(f"token count must be a multiple of {B}, got {tokens}")
    return {"B": B, "T": tokens // B, "V": vocab}


def make_inputs(shape, dtype, device, seed=0, with_ref_logits=False):
    """logits [B, T, V] ~ N(0, 2^2) in ``dtype``; labels [B, T] uniform (the last eighth of each
    sequence is padding); old / reference log-probs [B, T] fp32 near log(1 / V); advantages [B]."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    b, t, v = shape["B"], shape["T"], shape["V"]
    logits = torch.empty(b, t, v, dtype=dtype, device=device)
    logits.normal_(0.0, 2.0, **({"generator": g} if device == "cpu" else {}))
    labels = torch.randint(0, v, (b, t), generator=g)
    labels[:, t - t // 8:] = -100
    base = -torch.log(torch.tensor(float(v))) - 2.0
    old = base + 0.3 * torch.randn(b, t, generator=g)
    ref = base + 0.3 * torch.randn(b, t, generator=g)
    adv = torch.randn(b, generator=g)
    out = {"logits": logits, "labels": labels.to(device), "old_logps": old.to(device), "ref_logps": ref.to(device),
           "advantages": adv.to(device)}
    if with_ref_logits:
        ref_logits = torch.empty_like(logits)
        ref_logits.normal_(0.0, 2.0, **({"generator": g} if device == "cpu" else {}))
        out["ref_logits"] = ref_logits
    return out


def _n(shape):
    return shape["B"] * shape["T"]


def main_bytes(shape, dtype):
    return _n(shape) * shape["V"] * torch.empty((), dtype=dtype).element_size()


def bytes_moved(shape, dtype):
    """fwd reads the logits once; bwd reads them once and writes the gradient once
    (+ the [B, T] vectors, negligible)."""
    n, s = _n(shape), main_bytes(shape, dtype)
    small = n * (8 + 4 * 4)
    return {"fwd": s + small, "bwd": 2 * s + small}


# ----------------------------------------------------------------------------- providers


def naive(inputs):
    """What users write: a full fp32 log_softmax, gather, entropy from the probabilities, then the loss."""
    logits, labels = inputs["logits"], inputs["labels"]
    keep = labels != -100
    m = keep.float()
    logp_all = torch.log_softmax(logits.float(), dim=-1)
    logp = logp_all.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    ent = -(logp_all.exp() * logp_all).sum(-1)
    ratio = torch.exp(torch.where(keep, logp - inputs["old_logps"], 0.0))
    a = inputs["advantages"].unsqueeze(1)
    pg = -torch.minimum(ratio * a, ratio.clamp(0.8, 1.28) * a)
    pg = torch.where(a < 0, torch.minimum(pg, -3.0 * a), pg)
    d = torch.where(keep, inputs["ref_logps"] - logp, 0.0)
    per_tok = pg + 0.04 * (torch.exp(d) - d - 1.0) - 0.01 * ent
    return (per_tok * m).sum() / m.sum().clamp(min=1.0)


def _ppo_call(inputs, backend, inplace_backward):
    from prefopt_fast.losses import ppo_loss

    loss, _ = ppo_loss(inputs["logits"], inputs["labels"], inputs["old_logps"], inputs["advantages"],
                       ref_logps=inputs["ref_logps"], backend=backend, **LOSS_KW)
    return loss


def _token_logprobs_call(inputs, backend, inplace_backward):
    import prefopt_fast

    out = prefopt_fast.token_logprobs(inputs["logits"], inputs["labels"], stats=("entropy",), backend=backend,
                                      inplace_backward=inplace_backward)
    return out.logprobs, out.entropy


def _renamed(providers, prefix, kind, what):
    return [dataclasses.replace(p, name=p.name.replace("prefopt_fast", prefix, 1), kind=kind,
                                description=p.description.replace("prefopt_fast", what, 1)) for p in providers]


_ours, _our_notes = H.prefopt_fast_providers(_ppo_call, inplace=False)
_tl, _ = H.prefopt_fast_providers(_token_logprobs_call, inplace=False)

PROVIDERS = [
    H.Provider("naive", lambda: naive, mem_factor=8.0,
               description="fp32 log_softmax over the whole vocabulary + gather + entropy, then the loss"),
] + _renamed(_tl, "token_logprobs+entropy", "baseline",
             "the floor: prefopt_fast.token_logprobs(stats=('entropy',))") + _ours

_FULL = [make_shape(n, v) for v in (32000, 128256) for n in (1024, 4096)]

OP = H.OpSpec(
    name="ppo_loss",
    module="benchmarks.bench_ppo",
    description="GRPO-style clipped PG loss (k3 KL, entropy bonus) from logits [B, T, V], fwd + bwd into the logits",
    make_inputs=make_inputs,
    grad_inputs=("logits",),
    main_bytes=main_bytes,
    bytes_moved=bytes_moved,
    alloc_bytes=main_bytes,
    make_shape=make_shape,
    tokens=_n,
    vocab=lambda s: s["V"],
    presets={
        "dry-run": [make_shape(64, 1000)],
        "quick": [make_shape(1024, 32000)],
        "default": [make_shape(4096, 128256)],  # the B = 8, T = 512, V = 128256
        "full": _FULL,
    },
    preset_dtypes={"dry-run": ["fp32", "bf16"], "quick": ["bf16"], "default": ["bf16", "fp32"],
                   "full": ["bf16", "fp32"]},
    providers=PROVIDERS,
    reference=("naive",),
    notes=_our_notes + ["target: prefopt_fast.<backend> within 5% of token_logprobs+entropy.<backend> (step)"],
)

if __name__ == "__main__":
    from benchmarks import bench_ppo as _self  # the importable module, for the workers
    sys.exit(H.main(op=_self.OP))
