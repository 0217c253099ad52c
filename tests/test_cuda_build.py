"""The CUDA backend where no GPU is (CI): it compiles for sm_80 / sm_90 (+PTX) without
register spills, its fatbinary holds those targets, the built package imports without a
driver and falls back cleanly, the wheel is named after the CUDA version, and the CPU
and CUDA paths share their math (one header, identical results from both compilers).

Needs a CUDA toolkit (skipped otherwise). tools/cuda_build_check.py builds into
build/cuda_check (kept: a rerun with unchanged sources only relinks); cold, about a
minute on two busy cores.
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import cuda_build  # noqa: E402
import expected  # noqa: E402

HOME = cuda_build.find_cuda_home()
pytestmark = pytest.mark.skipif(HOME is None, reason="no CUDA toolkit (CUDA_HOME / nvcc)")


def test_arch_spec():
    p = cuda_build.parse_archs
    assert cuda_build.arch_names(p("80;86;89;90;100;120+PTX")) == [
        "sm_80",
        "sm_86",
        "sm_89",
        "sm_90",
        "sm_100",
        "sm_120",
        "compute_120",
    ]
    assert cuda_build.arch_names(p("sm_90, 8.0 compute_90")) == ["sm_80", "sm_90", "compute_90"]
    assert cuda_build.gencode_flags(p("90+PTX")) == ["-gencode=arch=compute_90,code=[sm_90,compute_90]"]
    for bad in ("70", "sm_90a", "banana", ""):
        with pytest.raises(ValueError, match="PREFOPT_CUDA_ARCHS"):
            p(bad)


def test_build_check(tmp_path):
    """Build (sm_80, sm_90 + PTX), no spills, fatbinary contents, import without a driver."""
    out = tmp_path / "check.json"
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "PREFOPT_BACKEND")}
    res = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "cuda_build_check.py"), "--arch", "80;90+PTX", "--json", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert res.returncode == 0, res.stdout[-6000:] + res.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["failures"] == []
    kernels = r["kernels"]
    assert {k["arch"] for k in kernels} == {"sm_80", "sm_90"}
    assert len(kernels) == 2 * (3 * 6 + 3 * 3)
    assert all(k["spill_stores"] == 0 and k["spill_loads"] == 0 for k in kernels)
    imp = r["import"]
    assert imp["build_info"]["cuda"] == cuda_build.cuda_version(HOME)
    assert imp["build_info"]["cuda_archs"] == ["sm_80", "sm_90", "compute_90"]
    assert "cuda" not in imp["available_backends"] and imp["auto_cpu_tensors"] == "cpu"
    assert "not available" in imp["backend_cuda_error"]
    if r["fatbin"] is None:
        expected.missing("cuobjdump", "the fatbinary was not listed: no cuobjdump")
    elf = "\n".join(r["fatbin"]["elf"])
    assert ".sm_80.cubin" in elf and ".sm_90.cubin" in elf
    assert ".sm_90.ptx" in "\n".join(r["fatbin"]["ptx"])


def test_wheel_version_names_the_cuda_version():
    def version(**env):
        e = dict(os.environ, **env)
        res = subprocess.run(
            [sys.executable, "setup.py", "--version"], cwd=ROOT, env=e, capture_output=True, text=True, timeout=300
        )
        assert res.returncode == 0, res.stderr[-3000:]
        return res.stdout.strip().splitlines()[-1]

    cu = "cu" + cuda_build.cuda_version(HOME).replace(".", "")
    assert version(PREFOPT_CUDA="1", CUDA_HOME=str(HOME)).endswith("+" + cu)
    assert "+" not in version(PREFOPT_CUDA="0")
    assert version(PREFOPT_CUDA="1", CUDA_HOME=str(HOME), PREFOPT_LOCAL_VERSION="") == version(PREFOPT_CUDA="0")


# ----------------------------------------------------------------------------- shared math


def _run(cmd, **kw):
    res = subprocess.run(cmd, capture_output=True, text=True, **kw)
    assert res.returncode == 0, f"{' '.join(map(str, cmd))}\n{res.stdout}\n{res.stderr}"
    return res.stdout


def test_cpu_and_cuda_paths_share_the_math_header(tmp_path):
    header = (ROOT / "csrc" / "prefopt_math.h").resolve()
    nvcc = str(cuda_build.nvcc_path(HOME))
    cxx = os.environ.get("CXX", "g++")
    # 1. both kernel translation units include the one header
    deps_cpu = _run([cxx, "-std=c++17", "-M", f"-I{ROOT / 'csrc'}", str(ROOT / "csrc" / "cpu" / "row_kernels.cpp")])
    assert str(header) in deps_cpu.replace("\\\n", " ")
    for cu in ("forward.cu", "backward.cu"):
        deps = _run([nvcc, "-std=c++17", "-M", f"-I{ROOT / 'csrc'}", str(ROOT / "csrc" / "cuda" / cu)])
        assert str(header) in deps.replace("\\\n", " "), cu

    # 2. and call the same functions of it (the merge, the rescale, the KL rebase, the
    #    finishers and the gradient) -- names, not copies
    def called(paths):
        text = "\n".join(Path(p).read_text() for p in paths)
        return set(re.findall(r"\b(pf_[a-z0-9_]+)\s*(?:<[^>]*>)?\s*\(", text))

    cpu = called([ROOT / "csrc" / "cpu" / "row_kernels.cpp"])
    cuda = called(sorted((ROOT / "csrc" / "cuda").glob("*.cuh")))
    shared = {
        "pf_lse_merge",
        "pf_lse_rescale",
        "pf_kl_rebase",
        "pf_kl_value",
        "pf_lse_value",
        "pf_lse_entropy",
        "pf_lse_log_sum_sq",
        "pf_grad_coef",
        "pf_grad_fast",
        "pf_grad_fast_kl",
        "pf_grad_elem",
        "pf_grad_elem_kl",
        "pf_grad_elem_noent",
        "pf_exp_poly_arg",
        "pf_bf16_to_f32",
    }
    assert shared <= cpu, shared - cpu
    assert shared <= cuda, shared - cuda
    # 3. the header compiled by g++ (CPU build) and by nvcc as CUDA (host side of the
    #    CUDA build; the same functions also compiled for sm_80 device code) gives the
    #    same bits on a grid of inputs
    src = ROOT / "tools" / "pf_math_probe.cpp"
    _run([cxx, "-std=c++17", "-O2", f"-I{ROOT / 'csrc'}", str(src), "-o", str(tmp_path / "probe_cxx")])
    _run(
        [
            nvcc,
            "-std=c++17",
            "-O2",
            "-x",
            "cu",
            f"-I{ROOT / 'csrc'}",
            "-gencode=arch=compute_80,code=[sm_80]",
            str(src),
            "-o",
            str(tmp_path / "probe_nvcc"),
        ]
    )
    a = _run([str(tmp_path / "probe_cxx")])
    b = _run([str(tmp_path / "probe_nvcc")])
    assert len(a.splitlines()) > 300
    assert a == b
