"""prefopt_fast benchmark suite: ``python -m benchmarks`` (see benchmarks/README.md).

Each op has a thin script ``bench_<op>.py`` defining ``OP`` (a ``spec.OpSpec``), or
``variant_op(name)`` for a parametrized script (registered as ``"module:variant"``);
register it here to make it reachable through ``--op`` (the first one is the default of
the default preset; --quick / --full / --dry-run run them all).
"""

OPS = {
    "token_logprobs": "benchmarks.bench_token_logprobs",
    "sequence_logprobs": "benchmarks.bench_sequence_logprobs:padded",
    "sequence_logprobs_packed": "benchmarks.bench_sequence_logprobs:packed",
    "dpo": "benchmarks.bench_dpo",
    "bradley_terry": "benchmarks.bench_bradley_terry",
    **{
        ("ppo_loss_full_kl" if kl == "full" else f"ppo_loss_{kl}"): f"benchmarks.bench_ppo:{kl}"
        for kl in ("k1", "k2", "k3", "abs", "low_var_kl", "full")
    },
    "linear_token_logprobs": "benchmarks.bench_linear_logprobs:token",
    "linear_sequence_logprobs": "benchmarks.bench_linear_logprobs:sequence",
    "linear_dpo": "benchmarks.bench_linear_dpo",
    "linear_ppo": "benchmarks.bench_linear_ppo",
}
