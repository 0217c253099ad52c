"""Helpers shared by the pytest-benchmark files (benchmarks/test_bench_*.py)."""
import dataclasses
import functools

import pytest

from benchmarks import harness as H


def shapes(op: H.OpSpec) -> dict:
    """The pytest shapes: ``small`` is the --quick shape, ``default`` the default preset's."""
    return {"small": op.presets["quick"][0], "default": op.presets["default"][0]}


def case_params(op: H.OpSpec, dtypes=("fp32", "bf16")) -> list:
    """pytest params (provider, shape name, dtype) over every provider of ``op``."""
    out = []
    for p in op.providers:
        for name in shapes(op):
            for dt in dtypes:
                marks = [pytest.mark.slow] if name != "small" else []
                out.append(pytest.param(p.name, name, dt, marks=marks, id=f"{p.name}-{name}-{dt}"))
    return out


@functools.lru_cache(maxsize=None)
def _fn(op_module: str, provider: str):
    """The provider's callable, made once per process (torch.compile compiles once)."""
    return H.load_op(op_module).provider(provider).make()


def runner_for(op: H.OpSpec, provider: str, shape_name: str, dtype: str, grad: bool = True) -> H.CaseRunner:
    """A CaseRunner for the case, or pytest.skip with the harness's note."""
    prov = op.provider(provider)
    why = H.availability(prov)
    if why:
        pytest.skip(why)
    shape = shapes(op)[shape_name]
    case = H.Case.make(shape, dtype, H.default_device())
    why = prov.check(case) if prov.check else None
    why = why or H.memory_guard(op, prov, case, H.available_memory(case.device))
    if why:
        pytest.skip(why)
    if not grad:
        prov = dataclasses.replace(prov, backward=False)
    return H.CaseRunner(op, prov, case, fn=_fn(op.module, provider))
