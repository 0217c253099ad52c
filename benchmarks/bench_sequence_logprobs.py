"""Benchmark of sequence_logprobs: per-sequence sums of the completion tokens' log-probs.

Padded (``OP``, op ``sequence_logprobs``): logits [B, T, V], B = 8, labels [B, T] with the
first quarter of each sequence a prompt (ignored). Packed (``variant_op("packed")``, op
``sequence_logprobs_packed``): logits [B * T, V] with cu_seqlens [B + 1], lengths varying
around T. Output: fp32 [B]; the gradient flows into the logits.
Run: ``python -m benchmarks --op 'sequence_logprobs*'`` or this file directly.
"""

import os
import sys

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch.nn.functional as F

from benchmarks import bench_support as S
from benchmarks.spec import OpSpec, Provider, prefopt_fast_providers

VARIANTS = {"padded": "sequence_logprobs", "packed": "sequence_logprobs_packed"}


def naive(inputs):
    """log_softmax + gather in the input dtype, masked fp32 sums per sequence."""
    return S.masked_seq_sums(
        S.naive_token_logps(inputs["logits"], inputs["labels"]), inputs["labels"], inputs.get("cu_seqlens")
    )


def torch_cross_entropy(inputs):
    """-F.cross_entropy(ignore_index=-100, reduction='none'), then the sums."""
    logits, labels = inputs["logits"], inputs["labels"]
    v = logits.shape[-1]
    tok = -F.cross_entropy(logits.reshape(-1, v), labels.reshape(-1), reduction="none").view(labels.shape)
    return S.masked_seq_sums(tok, labels, inputs.get("cu_seqlens"))


def _make_trl():
    tl = S.trl_selective_log_softmax()
    return lambda inputs: S.masked_seq_sums(
        tl(inputs["logits"], inputs["labels"]), inputs["labels"], inputs.get("cu_seqlens")
    )


def _call(inputs, backend, inplace_backward):
    import prefopt_fast

    return prefopt_fast.sequence_logprobs(
        inputs["logits"],
        inputs["labels"],
        cu_seqlens=inputs.get("cu_seqlens"),
        backend=backend,
        inplace_backward=inplace_backward,
    )


def variant_op(layout: str) -> OpSpec:
    ours, notes = prefopt_fast_providers(_call)
    lay = S.LogitsLayout(batch=8, prompt=0.25, packed=layout == "packed", small_per_token=8)
    providers = [
        Provider(
            "naive",
            lambda: naive,
            mem_factor=4.0,
            description="log_softmax(logits, -1).gather(...) in the input dtype, masked sums per sequence",
        ),
        S.compiled_provider(naive),
        Provider(
            "torch-cross-entropy",
            lambda: torch_cross_entropy,
            mem_factor=4.0,
            description="-F.cross_entropy(reduction='none') then masked sums",
        ),
        S.trl_provider(_make_trl, "trl selective_log_softmax, then masked sums"),
    ] + ours
    what = "packed [B * T, V] + cu_seqlens" if layout == "packed" else "padded [B, T, V]"
    return S.logits_op(
        VARIANTS[layout],
        f"benchmarks.bench_sequence_logprobs:{layout}",
        lay,
        providers,
        description=f"per-sequence sums of completion log-probs from {what} logits (fwd, bwd into the logits)",
        notes=notes,
        full_providers=("naive", "trl", "prefopt_fast.*"),
    )


OP = variant_op("padded")

if __name__ == "__main__":
    sys.exit(S.script_main("benchmarks.bench_sequence_logprobs", VARIANTS))
