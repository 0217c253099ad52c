"""Benchmark of logits_dpo_loss: sigmoid DPO (beta 0.1) straight from the policy logits of
the stacked [chosen; rejected] batch, precomputed reference log-probs.

Inputs: logits [2B, T, V] with 2B = 4, labels [2B, T] whose first quarter is the prompt
(ignored), fp32 reference sums [B] x 2. Providers doing the same work (completion
log-probs summed per sequence, then the DPO head; gradient into the logits):
``naive`` (log_softmax + gather + DPO), ``naive-compile``, ``trl`` (TRL's
``selective_log_softmax``, then the sigmoid DPO formula TRL's DPOTrainer applies inline:
TRL 1.16 has no standalone DPO-loss function) and ``prefopt_fast.<backend>[+inplace]``.
"""

import os
import sys

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import bench_support as S
from benchmarks.spec import Provider, prefopt_fast_providers

BETA = 0.1
PROMPT = 0.25
LAYOUT = S.LogitsLayout(
    batch=4,
    prompt=PROMPT,
    small_per_token=8,
    extra=lambda shape, g: S.ref_seq_logps(shape, g, int(shape["T"] * PROMPT)),
)


def _head(seq, inputs):
    return S.dpo_sigmoid(seq, inputs["ref_chosen"], inputs["ref_rejected"], BETA)


def naive(inputs):
    """log_softmax + gather in the input dtype, masked fp32 sums, sigmoid DPO."""
    return _head(S.masked_seq_sums(S.naive_token_logps(inputs["logits"], inputs["labels"]), inputs["labels"]), inputs)


def _make_trl():
    tl = S.trl_selective_log_softmax()
    return lambda inputs: _head(S.masked_seq_sums(tl(inputs["logits"], inputs["labels"]), inputs["labels"]), inputs)


def _call(inputs, backend, inplace_backward):
    import prefopt_fast

    loss, _ = prefopt_fast.logits_dpo_loss(
        inputs["logits"],
        inputs["labels"],
        ref_chosen_logps=inputs["ref_chosen"],
        ref_rejected_logps=inputs["ref_rejected"],
        beta=BETA,
        backend=backend,
        inplace_backward=inplace_backward,
    )
    return loss


_ours, _notes = prefopt_fast_providers(_call)

OP = S.logits_op(
    "dpo",
    "benchmarks.bench_dpo",
    LAYOUT,
    [
        Provider(
            "naive",
            lambda: naive,
            mem_factor=4.0,
            description="log_softmax(logits, -1).gather(...) in the input dtype, masked sums, sigmoid DPO",
        ),
        S.compiled_provider(naive),
        S.trl_provider(_make_trl, "trl selective_log_softmax, masked sums, TRL's sigmoid DPO formula"),
    ]
    + _ours,
    description="sigmoid DPO fwd + bwd from the logits [2B, T, V] of the stacked batch (precomputed reference)",
    notes=_notes + ["Liger's DPO and cut-cross-entropy work from hidden states: see linear_dpo"],
    full_providers=("naive", "trl", "prefopt_fast.*"),
)

if __name__ == "__main__":
    sys.exit(S.script_main("benchmarks.bench_dpo"))
