"""Benchmark of the fused-linear DPO loss (issue 6): DPO forward + backward from hidden states.

Inputs: the stacked [chosen; rejected] batch of 2B = 4 sequences, hidden ``[4, T, H]``,
the lm_head ``weight [V, H]`` (both in the dtype, both requiring grad), labels ``[4, T]``
whose first 64 positions (at most T / 4) are the prompt (ignored) and the rest uniform in
``[0, V)``, and precomputed fp32 reference sums ``[B]``. The loss is sigmoid DPO (beta 0.1);
the gradient flows to ``hidden`` and ``weight``.

Providers doing the same work (completion log-probs through the lm_head, summed per
sequence, the DPO head, the gradients of hidden and weight): ``prefopt_fast.<backend>``
(``linear_dpo_loss``); ``naive`` (materialized logits, fp32 log_softmax, gather); ``trl``
(TRL 1.16's fused head ``ChunkedLogProbFunction`` on the completion rows, as its trainer
calls it on GPUs); ``torch-linear-ce`` (torch's chunked ``F.linear_cross_entropy``);
``cce`` / ``cce-compile`` (cut-cross-entropy, Triton on CUDA / its torch.compile path);
``liger`` / ``liger-compile`` (Liger-Kernel's ``LigerFusedLinearDPOLoss``, plain PyTorch
chunked per pair, eager / under torch.compile; reference-free (``use_ref_model=False``,
reference sums 0): the same lm_head work, its reference path would add a second forward);
``matmul-floor`` (the three GEMMs alone: the floor the issue measures against; its memory
column is not a contender's). FLOPs given to the harness are the floor's (2 M H V
forward, 4 M H V backward, M = completion tokens): ``x bound`` reads as "times the GEMM rate".
The default preset is the issue's shape (T = 512, H = 2048, V = 128256): minutes per fp32
step on a 2-core CPU; run it with ``--repeats 1 --warmup 0``.
"""

import os
import sys

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import bench_support as S
from benchmarks.spec import prefopt_fast_providers

BETA = 0.1
LAYOUT = S.LinearLayout(
    batch=4, hidden=2048, prompt=64, extra=lambda shape, g: S.ref_seq_logps(shape, g, min(64, shape["T"] // 4))
)
make_shape, make_inputs, main_bytes, bytes_moved, flops = (
    LAYOUT.make_shape,
    LAYOUT.make_inputs,
    LAYOUT.main_bytes,
    LAYOUT.bytes_moved,
    LAYOUT.flops,
)


def _head(seq, inputs):
    return S.dpo_sigmoid(seq, inputs["ref_chosen"], inputs["ref_rejected"], BETA)


def naive(inputs):
    """Materialized logits in the dtype, fp32 log_softmax over the vocabulary, gather, sums."""
    logits = inputs["hidden"] @ inputs["weight"].t()
    return _head(S.masked_seq_sums(S.naive_token_logps(logits.float(), inputs["labels"]), inputs["labels"]), inputs)


def _finish(row_logps, seq, inputs):
    return _head(S.seq_sums(row_logps, seq, inputs["labels"].shape[0]), inputs)


def _from_ce(ce):
    return S.from_ce(ce, _finish)


def _make_liger(compiled):
    def make():
        from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss

        loss = LigerFusedLinearDPOLoss(beta=BETA, use_ref_model=False, compiled=compiled)
        return lambda inputs: loss(inputs["weight"], inputs["hidden"], inputs["labels"])[0]

    return make


def _linear_dpo_call(inputs, backend, inplace_backward):
    from prefopt_fast.linear import linear_dpo_loss

    loss, _ = linear_dpo_loss(
        inputs["hidden"],
        inputs["weight"],
        inputs["labels"],
        ref_chosen_logps=inputs["ref_chosen"],
        ref_rejected_logps=inputs["ref_rejected"],
        beta=BETA,
        backend=backend,
    )
    return loss


_ours, _our_notes = prefopt_fast_providers(_linear_dpo_call, inplace=False, mem_factor=0.2)

PROVIDERS = (
    S.linear_baselines(naive, lambda: S.on_completion_rows(S.trl_chunked_logps(), _finish), ", sums, DPO")
    + [
        S.torch_lce_provider(_from_ce, "on the completion rows, sums, DPO"),
        *S.cce_providers(_from_ce, "on the completion rows, sums, DPO"),
        *S.liger_providers(_make_liger, "LigerFusedLinearDPOLoss (reference-free)"),
    ]
    + _ours
)

OP = S.linear_op(
    "linear_dpo",
    "benchmarks.bench_linear_dpo",
    LAYOUT,
    PROVIDERS,
    description="sigmoid DPO fwd + bwd from hidden states [2B, T, H] and the lm_head [V, H] (grads to both)",
    notes=_our_notes
    + [
        "matmul-floor materializes the logits: its memory column is not a contender's",
        "liger runs reference-free (reference sums 0): the same lm_head work as the others",
    ],
    full_providers=("matmul-floor", "naive", "trl", "cce", "liger", "prefopt_fast.*"),
)

if __name__ == "__main__":
    sys.exit(S.script_main("benchmarks.bench_linear_dpo"))
