"""Ahead-of-time compilation of every Triton kernel variant for sm_80 and sm_90 (no GPU
needed): tools/triton_aot_check.py must find no compile error, no register spill, no
unrounded temperature product (an FMA taking inv_temp) and no
JIT-specialized int argument. About 1-2 min cold on 2 busy cores, seconds with a warm Triton
cache (~/.triton/cache)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TOOL = ROOT / "tools" / "triton_aot_check.py"

try:
    import triton  # noqa: F401
    from triton.backends.compiler import GPUTarget  # noqa: F401

    _MISSING = None
except Exception as exc:  # pragma: no cover - depends on the environment
    _MISSING = f"triton with the NVIDIA backend is needed ({type(exc).__name__}: {exc})"


@pytest.mark.skipif(_MISSING is not None, reason=_MISSING or "")
def test_every_kernel_variant_compiles_for_sm80_sm90_without_spills():
    # the interpreter must be off in the child: interpreted kernels cannot be compiled
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    res = subprocess.run(
        [sys.executable, str(TOOL), "--arch", "80", "90"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0, f"{res.stdout}\n{res.stderr}"
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith(("forward", "backward"))]
    # 3 dtypes x (6 forward flag sets + 2 x 2 x 2 backward variants) x 2 ALIGN
    assert len(lines) == 3 * (6 + 8) * 2 and all("| sm_80:" in ln and "| sm_90:" in ln for ln in lines), res.stdout
    assert "0 failing" in res.stdout


_TEMPERATURE_CHECK = r"""
import json, sys
sys.path.insert(0, sys.argv[1])
import triton_aot_check as t
out = []
for kind, dname, nw, cx in t.variants():
    biggest = cx.get("ARGMAX") and cx.get("KL") or cx.get("HAS_ENT") and cx.get("HAS_KL")  # every term
    if dname in ("float32", "bfloat16") and cx["ALIGN"] > 1 and biggest:
        for arch in (80, 90):
            products, problems = t.temperature_check(kind, dname, nw, cx, arch)
            out.append(dict(variant=f"sm_{arch} {kind} {dname}", products=len(products), problems=problems))
print(json.dumps(out))
"""


@pytest.mark.skipif(_MISSING is not None, reason=_MISSING or "")
def test_temperature_product_is_rounded_before_the_subtraction():
    # x = z * inv_temp must be rounded to fp32 before x - max / x - lse: contracted into an FMA
    # with the subtraction (Triton compiles with enable_fp_fusion=True by default, and ptxas
    # fuses a plain mul.f32 + sub.f32 too) it made fp32 log-probs slightly positive at
    # temperature != 1 on the cpu/cuda backends. The interpreter cannot show this: the PTX can.
    import json

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    res = subprocess.run(
        [sys.executable, "-c", _TEMPERATURE_CHECK, str(ROOT / "tools")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0, res.stderr
    rows = json.loads(res.stdout.splitlines()[-1])
    # forward + backward + in-place backward, fp32 + bf16, sm_80 + sm_90
    assert len(rows) == 3 * 2 * 2
    for r in rows:
        assert r["products"] >= 1, f"{r['variant']}: no product of inv_temp found (checker out of date?)"
        assert not r["problems"], f"{r['variant']}:\n" + "\n".join(r["problems"])
