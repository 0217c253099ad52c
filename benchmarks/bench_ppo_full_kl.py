"""Benchmark of ppo_loss with the exact KL (``kl_estimator="full"``, issue 4): policy and
reference logits [B, T, V], one streaming pass over both per row.

The issue's target: forward + backward within 1.6x of the bandwidth bound, which here counts
both logits tensors: fwd reads both, bwd reads both and writes the policy gradient.
Run: ``python benchmarks/bench_ppo_full_kl.py [--quick|--full]`` (register
``"ppo_loss_full_kl": "benchmarks.bench_ppo_full_kl"`` in ``benchmarks/__init__.py`` for ``--op``).
"""
import os
import sys

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch

from benchmarks import bench_ppo as P
from benchmarks import harness as H

LOSS_KW = dict(P.LOSS_KW, kl_estimator="full")


def make_inputs(shape, dtype, device, seed=0):
    return P.make_inputs(shape, dtype, device, seed, with_ref_logits=True)


def bytes_moved(shape, dtype):
    n, s = P._n(shape), P.main_bytes(shape, dtype)
    small = n * (8 + 4 * 4)
    return {"fwd": 2 * s + small, "bwd": 3 * s + small}


def naive(inputs):
    """Full fp32 log_softmax of both tensors, the exact KL summed over the vocabulary, then the loss."""
    logits, labels = inputs["logits"], inputs["labels"]
    keep = labels != -100
    m = keep.float()
    logp_all = torch.log_softmax(logits.float(), dim=-1)
    logq_all = torch.log_softmax(inputs["ref_logits"].float(), dim=-1)
    p = logp_all.exp()
    logp = logp_all.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    ent = -(p * logp_all).sum(-1)
    kl = (p * (logp_all - logq_all)).sum(-1)
    ratio = torch.exp(torch.where(keep, logp - inputs["old_logps"], 0.0))
    a = inputs["advantages"].unsqueeze(1)
    pg = -torch.minimum(ratio * a, ratio.clamp(0.8, 1.28) * a)
    pg = torch.where(a < 0, torch.minimum(pg, -3.0 * a), pg)
    per_tok = pg + 0.04 * kl - 0.01 * ent
    return (per_tok * m).sum() / m.sum().clamp(min=1.0)


def _call(inputs, backend, inplace_backward):
    from prefopt_fast.losses import ppo_loss

    loss, _ = ppo_loss(inputs["logits"], inputs["labels"], inputs["old_logps"], inputs["advantages"],
                       ref_logits=inputs["ref_logits"], backend=backend, **LOSS_KW)
    return loss


def _kl_check(backend, inner):
    def check(case):
        try:
            from prefopt_fast import _dispatch
            if not getattr(_dispatch._load(backend), "SUPPORTS_KL", False):
                return f"backend {backend!r} has no exact-KL kernel yet"
        except Exception as exc:
            return f"{type(exc).__name__}: {exc}"
        return inner(case) if inner is not None else None
    return check


_ours, _notes = H.prefopt_fast_providers(_call, inplace=False)
_ours = [H.dataclasses.replace(p, check=_kl_check(p.name.split(".", 1)[1], p.check)) for p in _ours]

OP = H.OpSpec(
    name="ppo_loss_full_kl",
    module="benchmarks.bench_ppo_full_kl",
    description="clipped PG loss with the exact full-vocabulary KL from policy + reference logits [B, T, V]",
    make_inputs=make_inputs,
    grad_inputs=("logits",),
    main_bytes=P.main_bytes,
    bytes_moved=bytes_moved,
    alloc_bytes=P.main_bytes,
    make_shape=P.make_shape,
    tokens=P._n,
    vocab=lambda s: s["V"],
    presets=P.OP.presets,
    preset_dtypes=P.OP.preset_dtypes,
    providers=[H.Provider("naive", lambda: naive, mem_factor=12.0,
                          description="fp32 log_softmax of both tensors, exact KL over V, then the loss")] + _ours,
    reference=("naive",),
    notes=_notes + ["target: prefopt_fast.<backend> step within 1.6x of the bound (both logits read)"],
)

if __name__ == "__main__":
    from benchmarks import bench_ppo_full_kl as _self  # the importable module, for the workers
    sys.exit(H.main(op=_self.OP))
