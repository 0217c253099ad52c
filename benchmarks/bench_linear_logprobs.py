"""Benchmark of linear_token_logprobs / linear_sequence_logprobs: log-probs of the labels
through the lm_head from hidden states, never materializing the logits.

Inputs: hidden ``[B, T, H]`` (B = 4), the lm_head ``weight [V, H]`` (both requiring grad),
labels ``[B, T]`` whose first 64 positions (at most T / 4) are ignored. Ops:
``linear_token_logprobs`` (``OP``: per-token log-probs) and ``linear_sequence_logprobs``
(``variant_op("sequence")``: their per-sequence sums, fp32 [B]). The peers compute the
same numbers as ``-CE`` per token: torch's ``F.linear_cross_entropy(reduction="none")``
(chunked options), cut-cross-entropy's ``linear_cross_entropy(reduction="none")`` and TRL
1.16's fused head ``ChunkedLogProbFunction``, on the completion rows (the peers' output is
those [M] rows; ours the [B, T] tensor with zeros at ignored positions). ``matmul-floor``:
the three GEMMs alone. The bound is the GEMM term (see bench_linear_dpo.py).
"""

import os
import sys

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import bench_support as S
from benchmarks.spec import OpSpec, prefopt_fast_providers

VARIANTS = {"token": "linear_token_logprobs", "sequence": "linear_sequence_logprobs"}
LAYOUT = S.LinearLayout(batch=4, hidden=2048, prompt=64)


def _finish(kind):
    if kind == "token":
        return lambda rows, seq, inputs: rows
    return None  # per-sequence sums


def _naive(kind):
    def naive(inputs):
        """hidden @ W.T in the dtype, fp32 log_softmax, gather (and the masked sums)."""
        logits = inputs["hidden"] @ inputs["weight"].t()
        tok = S.naive_token_logps(logits.float(), inputs["labels"])
        return tok if kind == "token" else S.masked_seq_sums(tok, inputs["labels"])

    return naive


def _call(kind):
    def call(inputs, backend, inplace_backward):
        import prefopt_fast

        f = prefopt_fast.linear_token_logprobs if kind == "token" else prefopt_fast.linear_sequence_logprobs
        return f(inputs["hidden"], inputs["weight"], inputs["labels"], backend=backend)

    return call


def variant_op(kind: str) -> OpSpec:
    ours, notes = prefopt_fast_providers(_call(kind), inplace=False, mem_factor=0.2)
    fin = _finish(kind)
    what = "on the completion rows" + ("" if kind == "token" else ", sums")
    providers = (
        S.linear_baselines(
            _naive(kind), lambda: S.on_completion_rows(S.trl_chunked_logps(), fin), "" if kind == "token" else ", sums"
        )
        + [
            S.torch_lce_provider(lambda ce: S.from_ce(ce, fin), what),
            *S.cce_providers(lambda ce: S.from_ce(ce, fin), what),
        ]
        + ours
    )
    return S.linear_op(
        VARIANTS[kind],
        f"benchmarks.bench_linear_logprobs:{kind}",
        LAYOUT,
        providers,
        description=("per-token" if kind == "token" else "per-sequence") + " log-probs from hidden states"
        " [B, T, H] and the lm_head [V, H], fwd + bwd (grads to both)",
        notes=notes
        + [
            "Liger-Kernel's chunked losses have no plain log-prob / cross-entropy head that runs"
            " on CPU (its fused-linear cross-entropy is Triton): see linear_dpo / linear_ppo"
        ],
        # torch-linear-ce runs at ~100x the GEMM bound on this CPU and TRL's head at ~15x:
        # in --full only linear_dpo keeps TRL (each would take minutes per shape here)
        full_providers=("matmul-floor", "naive", "cce", "prefopt_fast.*")
        if kind == "token"
        else ("naive", "prefopt_fast.*"),
        # the sequence variant is the token one plus [B] sums: --quick skips its slowest peer
        quick_providers=None if kind == "token" else ("matmul-floor", "naive", "trl", "cce", "prefopt_fast.*"),
    )


OP = variant_op("token")

if __name__ == "__main__":
    sys.exit(S.script_main("benchmarks.bench_linear_logprobs", VARIANTS))
