"""Benchmark of linear_ppo_loss: the clipped PG loss (k3 KL to precomputed reference
log-probs) from hidden states and the lm_head, never materializing the logits.

Inputs: hidden ``[B, T, H]`` (B = 8), weight ``[V, H]`` (both requiring grad), labels with
the first 64 positions (at most T / 4) ignored, old / reference log-probs ``[B, T]`` fp32,
advantages ``[B]``. The loss is the configuration Liger-Kernel's GRPO loss also computes,
so every provider does the same work: ratio clipped to [0.8, 1.28], k3 KL with coefficient
0.04, token-mean over the completion tokens (Liger: ``loss_type="dapo"``), no entropy term.
Providers: ``naive`` (materialized logits, fp32 log_softmax, gather, the loss), ``trl``
(TRL 1.16's ``ChunkedLogProbFunction`` on the completion rows, then the loss), ``liger`` /
``liger-compile`` (``LigerFusedLinearGRPOLoss``, eager / compiled chunk step), ``verl-torch``
/ ``verl-liger`` (verl 0.9's ``FusedLinearForPPO`` with ``impl_backend`` "torch" / "liger" on the
completion rows, then the loss: verl's fused path always computes the entropy too),
``matmul-floor`` and ``prefopt_fast.<backend>``. The bound is the GEMM term.
"""

import math
import os
import sys

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch

from benchmarks import bench_support as S
from benchmarks.spec import Provider, prefopt_fast_providers

EPS_LOW, EPS_HIGH, KL_COEF = 0.2, 0.28, 0.04


def _extra(shape, g):
    b, t = shape["B"], shape["T"]
    base = -math.log(shape["V"]) - 2.0
    return {
        "old_logps": base + 0.3 * torch.randn(b, t, generator=g),
        "ref_logps": base + 0.3 * torch.randn(b, t, generator=g),
        "advantages": torch.randn(b, generator=g),
    }


LAYOUT = S.LinearLayout(batch=8, hidden=2048, prompt=64, extra=_extra)


def loss_on_rows(logp, inputs):
    """The loss from the completion rows' log-probs [M] (rows in the order of ``labels != -100``)."""
    keep = inputs["labels"] != S.IGN
    old, ref = inputs["old_logps"][keep], inputs["ref_logps"][keep]
    a = inputs["advantages"].unsqueeze(1).expand_as(keep)[keep]
    ratio = torch.exp(logp.float() - old)
    pg = -torch.minimum(ratio * a, ratio.clamp(1 - EPS_LOW, 1 + EPS_HIGH) * a)
    d = ref - logp.float()
    return (pg + KL_COEF * (torch.exp(d) - d - 1.0)).mean()


def naive(inputs):
    logits = inputs["hidden"] @ inputs["weight"].t()
    tok = S.naive_token_logps(logits.float(), inputs["labels"])
    return loss_on_rows(tok[inputs["labels"] != S.IGN], inputs)


def _make_trl():
    rows = S.trl_chunked_logps()
    return S.on_completion_rows(rows, lambda v, seq, inputs: loss_on_rows(v, inputs))


def _make_liger(compiled):
    def make():
        from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

        loss = LigerFusedLinearGRPOLoss(
            beta=KL_COEF,
            compiled=compiled,
            use_ref_model=True,
            epsilon_low=EPS_LOW,
            epsilon_high=EPS_HIGH,
            loss_type="dapo",
        )

        def fn(inputs):
            labels = inputs["labels"]
            out = loss(
                inputs["hidden"],
                inputs["weight"],
                labels.clamp(min=0),
                (labels != S.IGN).long(),
                inputs["advantages"],
                ref_per_token_logps=inputs["ref_logps"],
                old_per_token_logps=inputs["old_logps"],
            )
            return out[0] if isinstance(out, tuple) else out

        return fn

    return make


def _make_verl(impl_backend):
    def make():
        from verl.utils.experimental.torch_functional import FusedLinearForPPO

        fused = FusedLinearForPPO(impl_backend=impl_backend)
        rows = S.on_completion_rows(lambda h, w, y: fused(h, w, y)[0], lambda v, seq, inputs: loss_on_rows(v, inputs))
        return rows

    return make


VERL_PROVIDERS = [
    Provider(
        f"verl-{impl}",
        _make_verl(impl),
        kind="peer",
        requires=("verl",) + (("liger_kernel",) if impl == "liger" else ()),
        install="bash scripts/setup.sh (verl 0.9 --no-deps)",
        mem_factor=1.0,
        description=f"verl.utils.experimental.torch_functional.FusedLinearForPPO(impl_backend={impl!r}), then the loss",
    )
    for impl in ("torch", "liger")
]


def _call(inputs, backend, inplace_backward):
    from prefopt_fast.linear import linear_ppo_loss

    loss, _ = linear_ppo_loss(
        inputs["hidden"],
        inputs["weight"],
        inputs["labels"],
        inputs["old_logps"],
        inputs["advantages"],
        ref_logps=inputs["ref_logps"],
        clip_eps_low=EPS_LOW,
        clip_eps_high=EPS_HIGH,
        kl_coef=KL_COEF,
        kl_estimator="k3",
        loss_agg_mode="token-mean",
        backend=backend,
    )
    return loss


_ours, _notes = prefopt_fast_providers(_call, inplace=False, mem_factor=0.2)

PROVIDERS = (
    S.linear_baselines(naive, _make_trl, ", then the loss")
    + S.liger_providers(_make_liger, "LigerFusedLinearGRPOLoss(loss_type='dapo')")
    + VERL_PROVIDERS
    + _ours
)

OP = S.linear_op(
    "linear_ppo",
    "benchmarks.bench_linear_ppo",
    LAYOUT,
    PROVIDERS,
    description="clipped PG loss (k3 KL) fwd + bwd from hidden states [B, T, H] and the lm_head [V, H]",
    notes=_notes,
    full_providers=("matmul-floor", "naive", "liger", "verl-torch", "prefopt_fast.*"),
)

if __name__ == "__main__":
    sys.exit(S.script_main("benchmarks.bench_linear_ppo"))
