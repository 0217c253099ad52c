"""scripts/gpu_check.sh (scripts/gpu_check.py) as far as a machine without a GPU can check it:
argument handling, the time budget, the summary it writes when the GPU steps cannot run, the
compute-sanitizer driver (on the cpu backend), and the offline in-place build with nvcc (slow:
~1-2 min on two busy cores, in a copy of the source tree)."""

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import expected
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_check.sh"
NO_GPU = not torch.cuda.is_available()


def _load():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "scripts" / "gpu_check.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


gpu_check = _load()


def _run(*args, cwd=ROOT, env=None, timeout=300):
    e = dict(os.environ, PYTHON=sys.executable, **(env or {}))
    return subprocess.run(
        ["bash", str(cwd / "scripts" / "gpu_check.sh"), *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=e,
        timeout=timeout,
    )


@pytest.mark.parametrize(
    "args, message",
    [
        ((), "the following arguments are required: outdir"),
        (("{out}", "--skip", "build,bogus"), "--skip: unknown step(s) bogus; the steps are build, gpu_tests"),
        (("{out}", "--budget", "0"), "--budget must be > 0 seconds, got 0.0"),
        (("{full}",), "exists and is not an empty folder"),
    ],
)
def test_bad_arguments_exit_2_naming_the_argument(tmp_path, args, message):
    full = tmp_path / "full"
    full.mkdir()
    (full / "old.txt").write_text("x")
    args = [a.format(out=tmp_path / "new", full=full) for a in args]
    res = _run(*args, timeout=60)
    assert res.returncode == 2, res.stderr
    assert message in res.stderr
    assert "usage: scripts/gpu_check.sh" in res.stderr
    assert not (tmp_path / "new").exists()


def test_budget_leaves_room_for_the_steps_still_to_run(tmp_path):
    args = gpu_check._parse([str(tmp_path / "o"), "--budget", "100", "--skip", "racecheck"])
    c = gpu_check.Check(args)
    # build: capped at its own limit, or what the budget leaves after 20 s for each later step
    later = len(["gpu_tests", "triton_tests", "memcheck", "benchmark"])
    assert c.timeout_for("build") == pytest.approx(100 - 20 * later, abs=1.0)
    assert c.timeout_for("benchmark") == pytest.approx(100, abs=1.0)  # the last step: what is left
    c.deadline -= 100  # out of time: a step is not started
    rc, secs, _ = c.run("gpu_tests", [sys.executable, "-c", "pass"])
    assert rc == "budget" and secs == 0
    assert c.finish_run("gpu_tests", rc, secs, None, "")["detail"] == "no time left in --budget"


@pytest.mark.skipif(not NO_GPU, reason="checks the summary of a machine without a GPU")
def test_without_a_gpu_the_summary_says_what_could_not_run(tmp_path):
    out = tmp_path / "out"
    res = _run(out, "--skip", "build", timeout=300)
    assert res.returncode == 3, res.stdout + res.stderr  # nothing failed, but it is incomplete
    doc = json.loads((out / "summary.json").read_text())
    assert [s["step"] for s in doc["steps"]] == gpu_check.STEPS
    status = {s["step"]: (s["status"], s["detail"]) for s in doc["steps"]}
    assert status["environment"][0] == "passed"
    assert status["build"] == ("skipped", "--skip")
    for step in ("gpu_tests", "triton_tests", "memcheck", "racecheck", "benchmark"):
        assert status[step][0] == "skipped"
        assert status[step][1].startswith("no CUDA device: torch.cuda.is_available() is False"), status[step]
    assert doc["ok"] is True and doc["complete"] is False
    env = json.loads((out / "environment.json").read_text())
    assert env["torch"] == torch.__version__ and env["cuda_available"] is False and env["gpus"] == []
    text = (out / "summary.txt").read_text()
    assert text in res.stdout
    lines = text.splitlines()
    assert lines[0].startswith("prefopt_fast GPU check, ")
    assert lines[1].startswith(f"torch {torch.__version__} ")
    assert any(line.startswith("environment   PASSED") for line in lines)
    assert "RESULT: INCOMPLETE: nothing failed, but gpu_tests, triton_tests, memcheck, racecheck, benchmark" in text
    i = lines.index("could not do:")
    assert lines[i + 1] == "  build: --skip"
    assert lines[i + 2].startswith("  gpu_tests: no CUDA device")


def test_sanitizer_driver_runs_every_variant_on_the_cpu_backend(capsys):
    # the driver compute-sanitizer runs on a GPU; here the same calls on the native cpu kernels
    expected.require("cpu-extension")
    gpu_check.sanitizer_driver("cpu", "cpu")
    assert "every cpu kernel variant ran and matched backend='torch'" in capsys.readouterr().out


HOME = None
try:
    sys.path.insert(0, str(ROOT / "tools"))
    import cuda_build

    HOME = cuda_build.find_cuda_home()
except Exception:  # noqa: BLE001 - no toolkit: the test below skips
    pass


@pytest.mark.slow
@pytest.mark.skipif(HOME is None, reason="no CUDA toolkit (CUDA_HOME / nvcc)")
def test_offline_in_place_build_for_a_given_arch(tmp_path):
    # a copy of the tree (an in-place build must not replace the _C this test run has loaded)
    tree = tmp_path / "tree"
    tree.mkdir()
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, tree / name)
    for name in ("csrc", "prefopt_fast", "tools", "scripts"):
        shutil.copytree(ROOT / name, tree / name, ignore=shutil.ignore_patterns("*.so", "__pycache__", "_C.skipped"))
    out = tmp_path / "out"
    # no network: any download would go to a closed port and fail; pip is not asked at all
    offline = {"http_proxy": "http://127.0.0.1:9", "https_proxy": "http://127.0.0.1:9", "PIP_NO_INDEX": "1"}
    skip = "gpu_tests,triton_tests,memcheck,racecheck,benchmark"
    res = _run(out, "--arch", "80", "--skip", skip, cwd=tree, env=dict(offline, CUDA_HOME=str(HOME)), timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr + (out / "build.log").read_text()
    doc = json.loads((out / "summary.json").read_text())
    build = next(s for s in doc["steps"] if s["step"] == "build")
    assert build["status"] == "passed"
    assert build["build_info"]["cuda_archs"] == ["sm_80"]
    assert build["build_info"]["extension"] is True
    assert sorted(p.name for p in (tree / "prefopt_fast").glob("_C*.so")) == ["_C.abi3.so"]
    log = (out / "build.log").read_text()
    assert log.startswith(f"$ {sys.executable} setup.py build_ext --inplace")
    assert "CUDA 13" in build["detail"] or "CUDA 12" in build["detail"]
