"""Every op of the suite through pytest-benchmark: ``pytest benchmarks/ --benchmark-only``.

The same ops, providers and inputs as ``python -m benchmarks`` (the OPS registry), measured
in this process by pytest-benchmark (time only; the CLI adds memory, GB/s and the bound).
Shapes: ``small`` (each op's --quick shape, in its --quick dtypes) and ``default`` (the
default preset's, marked slow); select with ``-k small`` or ``-k 'dpo and small'``.
Compiling providers (``*-compile``) are marked slow too. Not collected by ``pytest tests``.
"""

import pytest

from benchmarks import OPS
from benchmarks.bench_support import runner_for, shapes
from benchmarks.bound import bytes_by_phase
from benchmarks.spec import load_op

pytest.importorskip("pytest_benchmark")


def _params():
    out = []
    for op_name, module in OPS.items():
        op = load_op(module)
        for p in op.providers:
            for shape_name in shapes(op):
                for dt in op.preset_dtypes["quick" if shape_name == "small" else "default"]:
                    slow = shape_name != "small" or p.slow_setup
                    out.append(
                        pytest.param(
                            op_name,
                            p.name,
                            shape_name,
                            dt,
                            marks=[pytest.mark.slow] if slow else [],
                            id=f"{op_name}-{p.name}-{shape_name}-{dt}",
                        )
                    )
    return out


PARAMS = _params()


@pytest.mark.parametrize("op_name,provider,shape_name,dtype", PARAMS)
def test_step(benchmark, op_name, provider, shape_name, dtype):
    """Forward + backward (the gradients of the op's inputs), one step per round."""
    op = load_op(OPS[op_name])
    runner = runner_for(op, provider, shape_name, dtype)
    try:
        benchmark.extra_info.update(bytes_by_phase(op, runner.case.shape_dict, runner.case.torch_dtype))
        benchmark.pedantic(runner.step, setup=runner.prepare, rounds=5, warmup_rounds=1, iterations=1)
    finally:
        runner.close()


@pytest.mark.parametrize("op_name,provider,shape_name,dtype", PARAMS)
def test_fwd_nograd(benchmark, op_name, provider, shape_name, dtype):
    """Forward under torch.no_grad (e.g. the reference model's pass)."""
    op = load_op(OPS[op_name])
    runner = runner_for(op, provider, shape_name, dtype, grad=False)
    try:
        benchmark.extra_info.update(bytes_by_phase(op, runner.case.shape_dict, runner.case.torch_dtype))
        benchmark.pedantic(runner.forward_nograd, setup=runner.prepare, rounds=5, warmup_rounds=1, iterations=1)
    finally:
        runner.close()
