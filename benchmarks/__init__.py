"""prefopt_fast benchmark suite: ``python -m benchmarks`` (see benchmarks/README.md).

Each op has a thin script ``bench_<op>.py`` defining ``OP`` (an ``harness.OpSpec``);
register it here to make it reachable through ``--op`` (the first one is the default).
"""
OPS = {
    "token_logprobs": "benchmarks.bench_token_logprobs",
    "ppo_loss": "benchmarks.bench_ppo",
    "ppo_loss_full_kl": "benchmarks.bench_ppo_full_kl",
    "linear_dpo": "benchmarks.bench_linear",
}
