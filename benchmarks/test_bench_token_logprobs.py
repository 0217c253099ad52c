"""token_logprobs through pytest-benchmark: ``pytest benchmarks/ --benchmark-only``.

The same providers and inputs as ``python -m benchmarks --op token_logprobs``, measured
in this process by pytest-benchmark (time only; the CLI adds memory, GB/s and the bound).
Shapes: ``small`` (the --quick shape) and ``default`` (issue 2's target shape); select
with ``-k small``. Not collected by ``python -m pytest tests``.
"""
import pytest

from benchmarks import harness as H
from benchmarks.bench_token_logprobs import OP

from benchmarks.bench_support import case_params, runner_for

pytest.importorskip("pytest_benchmark")

PARAMS = case_params(OP, ("fp32", "bf16"))


@pytest.mark.parametrize("provider,shape_name,dtype", PARAMS)
def test_step(benchmark, provider, shape_name, dtype):
    """Forward + backward (the gradient of the logits), one step per round."""
    prov = OP.provider(provider)
    if not prov.backward:
        pytest.skip("forward-only provider")
    runner = runner_for(OP, provider, shape_name, dtype)
    try:
        benchmark.extra_info.update(H.bytes_by_phase(OP, runner.case.shape_dict, runner.case.torch_dtype))
        benchmark.pedantic(runner.step, setup=runner.prepare, rounds=3, warmup_rounds=1, iterations=1)
    finally:
        runner.close()


@pytest.mark.parametrize("provider,shape_name,dtype", PARAMS)
def test_fwd_nograd(benchmark, provider, shape_name, dtype):
    """Forward under torch.no_grad (e.g. the reference model's log-probs)."""
    runner = runner_for(OP, provider, shape_name, dtype, grad=False)
    try:
        benchmark.extra_info.update(H.bytes_by_phase(OP, runner.case.shape_dict, runner.case.torch_dtype))
        benchmark.pedantic(runner.forward_nograd, setup=runner.prepare, rounds=3, warmup_rounds=1,
                           iterations=1)
    finally:
        runner.close()
