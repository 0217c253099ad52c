"""The native CPU kernels under AddressSanitizer + UndefinedBehaviorSanitizer.

tests/sanitizer/row_kernels_asan.cpp is compiled together with csrc/cpu/row_kernels.cpp
(one translation unit, so the kernels themselves are instrumented) with the production
flags plus ``-fsanitize=address,undefined,float-cast-overflow``, and run once: strided rows
inside poisoned buffers, exact-size allocations, V = 1 and around the chunk size, long rows
split across threads, out-of-range labels, non-finite and huge inputs, every statistic,
every backward flavour, fresh and in place. Any out-of-bounds access, undefined behaviour
or failed value check fails the test with the sanitizer's report.

About 30 s to build with -O3 on this (loaded, 2-core) machine and 3 s to run; the binary is
cached under build/sanitizer/ keyed by the sources and flags. Marked slow, meant to run in
every CI run (``bash scripts/test.sh`` runs the slow tests).
"""

import hashlib
import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DRIVER = ROOT / "tests" / "sanitizer" / "row_kernels_asan.cpp"
# every shared header (prefopt_math.h, row_args.h, ...): an edit to any of them rebuilds the binary
SOURCES = [DRIVER, ROOT / "csrc" / "cpu" / "row_kernels.cpp", ROOT / "csrc" / "cpu" / "row_kernels.h"] + sorted(
    (ROOT / "csrc").glob("*.h")
)
# the production flags of setup.py (the same vectorized code), plus the sanitizers
FLAGS = [
    "-std=c++17",
    "-O3",
    "-g",
    "-fno-omit-frame-pointer",
    "-fopenmp-simd",
    "-ffp-contract=fast",
    "-fsanitize=address,undefined,float-cast-overflow",
    "-fno-sanitize-recover=all",
]
CXX = os.environ.get("CXX", "g++")


def _compiler_with_asan() -> str:
    if shutil.which(CXX) is None:
        return f"no C++ compiler ({CXX})"
    probe = subprocess.run(
        [CXX, "-fsanitize=address,undefined", "-x", "c++", "-", "-o", os.devnull],
        input="int main() { return 0; }",
        capture_output=True,
        text=True,
    )
    if probe.returncode != 0:
        return f"{CXX} cannot build with -fsanitize=address,undefined: {probe.stderr.strip()[:200]}"
    return ""


def _build() -> Path:
    key = hashlib.sha256()
    for s in SOURCES:
        key.update(s.read_bytes())
    key.update(" ".join([CXX] + FLAGS).encode())
    out_dir = ROOT / "build" / "sanitizer"
    out_dir.mkdir(parents=True, exist_ok=True)
    exe = out_dir / f"row_kernels_asan-{key.hexdigest()[:16]}"
    if not exe.exists():
        tmp = exe.with_suffix(".tmp")
        cmd = [
            CXX,
            *FLAGS,
            "-I",
            str(ROOT / "csrc"),
            "-I",
            str(ROOT / "csrc" / "cpu"),
            str(DRIVER),
            "-o",
            str(tmp),
            "-pthread",
        ]
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        assert res.returncode == 0, f"build failed:\n{' '.join(cmd)}\n{res.stderr[-4000:]}"
        tmp.replace(exe)
    return exe


@pytest.mark.slow
def test_cpu_kernels_under_address_and_ub_sanitizers():
    why = _compiler_with_asan()
    if why:
        pytest.skip(why)
    exe = _build()
    env = dict(os.environ)
    env["ASAN_OPTIONS"] = "detect_leaks=1:abort_on_error=0:halt_on_error=1:detect_stack_use_after_return=1"
    env["UBSAN_OPTIONS"] = "print_stacktrace=1:halt_on_error=1"
    res = subprocess.run([str(exe)], capture_output=True, text=True, timeout=300, env=env)
    report = (res.stdout + res.stderr)[-8000:]
    assert res.returncode == 0, f"sanitizer run failed (exit {res.returncode}):\n{report}"
    assert res.stdout.startswith("OK "), report
    assert "runtime error" not in res.stderr, report  # UBSan, should it ever be told to recover
