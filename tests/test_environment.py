"""The test environment holds what scripts/test.sh installs, and a missing piece fails loudly.

One test per expected component (tests/expected.py): in strict mode (scripts/test.sh, CI) a
missing component is a failure naming it and the reason. Then the mechanism itself: with TRL
made unimportable, or the native extension broken, a strict run fails with a clear reason,
and ``PREFOPT_ALLOW_MISSING`` turns exactly that into a skip.
"""

import os
import subprocess
import sys
from pathlib import Path

import expected
import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("component", sorted(expected.COMPONENTS))
def test_component_present(component):
    expected.require(component)


def _run_strict(block: str, *args: str, allow: str = "") -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PREFOPT_ALLOW_MISSING", "PYTHONPATH")}
    env.update(
        PREFOPT_STRICT="1",
        PREFOPT_TEST_BLOCK=block,
        PREFOPT_ALLOW_MISSING=allow,
        PYTHONPATH=str(ROOT / "tests" / "simulate_missing"),
    )
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_missing_trl_fails_a_strict_run():
    res = _run_strict("trl", "tests/test_environment.py::test_component_present[trl]")
    assert res.returncode == 1, res.stdout + res.stderr
    assert "trl is expected in this environment" in res.stdout and "blocked by tests/simulate_missing" in res.stdout

    relaxed = _run_strict("trl", "tests/test_environment.py::test_component_present[trl]", allow="trl")
    assert relaxed.returncode == 0 and "1 skipped" in relaxed.stdout, relaxed.stdout + relaxed.stderr


def test_broken_native_extension_fails_a_strict_run():
    # a backend-parametrized test: the cpu case must fail, not skip, when _C does not import
    res = _run_strict(
        "prefopt_fast._C",
        "tests/test_environment.py::test_component_present[cpu-extension]",
        "tests/test_token_logprobs.py::test_stats_only_argmax_does_not_need_grad",
        "-k",
        "cpu",
    )
    assert res.returncode == 1, res.stdout + res.stderr
    assert "cpu-extension is expected in this environment" in res.stdout
    assert "prefopt_fast._C could not be imported" in res.stdout
    # the component test fails; the backend fixture of the cpu case errors (a fixture's failure)
    assert "1 failed" in res.stdout and "1 error" in res.stdout and "passed" not in res.stdout, res.stdout


def test_unknown_component_is_a_programming_error():
    with pytest.raises(KeyError, match="unknown component"):
        expected.problem("tlr")
