"""``import prefopt_fast`` is light: public names load on first use, and the Triton kernels
read the row contract (``prefopt_fast._rows``) without pulling in the ops, losses or
torch.compile machinery."""

import subprocess
import sys

from expected import require_module  # not tests.expected: verl's wheel installs a top-level `tests` package

import prefopt_fast
import prefopt_fast.linear
import prefopt_fast.losses


def _modules_after(code: str) -> set:
    out = subprocess.run(
        [sys.executable, "-c", code + "\nimport sys; print(' '.join(sorted(sys.modules)))"],
        capture_output=True,
        text=True,
        check=True,
    )
    return set(out.stdout.split())


def test_import_is_lazy():
    mods = _modules_after("import prefopt_fast, prefopt_fast._rows")
    ours = {m for m in mods if m.startswith("prefopt_fast")}
    assert ours == {"prefopt_fast", "prefopt_fast._rows", "prefopt_fast._version"}, ours
    assert "torch._dynamo" not in mods


def test_triton_kernels_read_the_contract_only():
    require_module("triton")
    mods = _modules_after("import prefopt_fast.kernels.row_forward, prefopt_fast.kernels.row_backward")
    ours = {m for m in mods if m.startswith("prefopt_fast") and not m.startswith("prefopt_fast.kernels")}
    assert ours == {"prefopt_fast", "prefopt_fast._rows", "prefopt_fast._version"}, ours


def test_every_public_name_resolves_and_matches_the_submodules():
    want = set(prefopt_fast.losses.__all__) | set(prefopt_fast.linear.__all__)
    want |= {"available_backends", "build_info", "token_logprobs", "TokenLogProbsOutput"}
    want |= {"sequence_logprobs", "SequenceLogProbs"}
    assert set(prefopt_fast.__all__) == want
    assert len(prefopt_fast.__all__) == len(want)  # no name listed twice
    for name in prefopt_fast.__all__:
        assert getattr(prefopt_fast, name) is not None
        assert name in dir(prefopt_fast)
    ns = {}
    exec("from prefopt_fast import *", ns)
    assert set(prefopt_fast.__all__) <= set(ns)
