"""Nothing of this repository shadows an installed distribution, and the Triton kernels are
``prefopt_fast.kernels`` wherever the package comes from (kernels/README.md says why).

The repository's top-level ``kernels/`` folder once was a regular package: with the root on
``sys.path`` (``python -m pytest``, ``python -m benchmarks``, a prompt opened here) it
shadowed Hugging Face's ``kernels`` distribution, and transformers >= 5.25 failed to import
(``cannot import name 'CUDAProperties' from 'kernels'``).
"""

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import expected

ROOT = Path(__file__).resolve().parents[1]
TOP_LEVEL = ["kernels", "csrc", "prefopt_fast", "benchmarks", "tests", "tools", "examples", "scripts", "docs"]


def _python(code: str, cwd: Path, *args: str) -> str:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    res = subprocess.run(
        [sys.executable, *args, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )
    assert res.returncode == 0, res.stdout + res.stderr
    return res.stdout.strip()


def test_transformers_hub_kernels_import_from_the_repository_root():
    # cwd first on sys.path, as with `python -m pytest` / `python -m benchmarks` from the root
    expected.require("kernels")
    expected.require("transformers")
    out = _python(
        "import sys, kernels, transformers.integrations.hub_kernels; "
        "from kernels import CUDAProperties; print(kernels.__file__)",
        ROOT,
    )
    assert Path(out).resolve().parents[1] != ROOT, f"`import kernels` found this repository: {out}"


def test_no_top_level_folder_is_a_regular_package_that_shadows_a_distribution():
    # a top-level folder with __init__.py wins over any installed package of that name;
    # benchmarks/ is one on purpose (`python -m benchmarks`) and no distribution is named so
    from importlib.metadata import packages_distributions

    installed = set(packages_distributions())
    shadowing = [d for d in TOP_LEVEL if (ROOT / d / "__init__.py").exists() and d in installed and d != "prefopt_fast"]
    assert not shadowing, f"top-level packages shadowing installed distributions: {shadowing}"
    assert not (ROOT / "kernels" / "__init__.py").exists(), "kernels/ must stay a plain folder (kernels/README.md)"


def test_prefopt_fast_kernels_from_the_source_tree_and_elsewhere():
    code = (
        "import prefopt_fast.kernels.row_forward as f, prefopt_fast.kernels.row_backward as b, "
        "prefopt_fast.kernels.config as c; import os; print(os.path.realpath(f.__file__))"
    )
    here = Path(_python(code, ROOT))
    away = Path(_python(code, Path("/")))  # the installed (here: editable) package
    for p in (here, away):
        assert p.name == "row_forward.py"
    assert here.parent.resolve() == (ROOT / "kernels").resolve()


def test_wheel_carries_the_kernels_as_prefopt_fast_kernels(tmp_path):
    # pure-Python wheel (no extension: seconds); setuptools copies kernels/ through the link
    env = dict(os.environ, PREFOPT_NO_EXTENSION="1")
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "--quiet",
            "--wheel-dir",
            str(tmp_path),
            str(ROOT),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    (wheel,) = tmp_path.glob("prefopt_fast-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for f in sorted(p.name for p in (ROOT / "kernels").glob("*.py")):
        assert f"prefopt_fast/kernels/{f}" in names
    assert not any(n.startswith("kernels/") for n in names), "the wheel must not install a top-level kernels package"
