"""prefopt_fast benchmark suite: ``python -m benchmarks`` (see benchmarks/README.md).

Each op has a thin script ``bench_<op>.py`` defining ``OP`` (an ``harness.OpSpec``);
register it here to make it reachable through ``--op``.
"""
OPS = {
    "token_logprobs": "benchmarks.bench_token_logprobs",
}
