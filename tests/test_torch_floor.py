"""Installing where the native extension cannot be built: a torch older than the stable ABI the
binding needs (2.10) makes setup.py go on without ``prefopt_fast._C`` (unless it is required),
leaving the reason in ``prefopt_fast/_C.skipped``, and the package then imports and says why
(``build_info()``, the cpu backend's reason, ``available_backends()``)."""

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# setup.py run with the installed torch pretending to be 2.9 (`--version`: nothing is built)
OLD_TORCH_SETUP = """
import runpy, sys, torch
torch.__version__ = "2.9.1+cu128"
sys.argv = ["setup.py", "--version"]
runpy.run_path("setup.py", run_name="__main__")
"""


def _tree(tmp_path):
    tree = tmp_path / "tree"
    tree.mkdir()
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, tree / name)
    for name in ("csrc", "prefopt_fast", "tools"):
        shutil.copytree(ROOT / name, tree / name, ignore=shutil.ignore_patterns("*.so", "__pycache__", "_C.skipped"))
    return tree


def _setup(tree, **env):
    import os

    e = {k: v for k, v in os.environ.items() if not k.startswith("PREFOPT_")}
    e.update(env)
    return subprocess.run(
        [sys.executable, "-c", OLD_TORCH_SETUP], cwd=tree, env=e, capture_output=True, text=True, timeout=120
    )


def test_torch_older_than_the_floor_installs_without_the_extension_and_says_why(tmp_path):
    tree = _tree(tmp_path)
    res = _setup(tree)
    assert res.returncode == 0, res.stderr
    assert "prefopt_fast: WARNING no native extension: torch 2.9.1+cu128 at build time" in res.stderr
    skipped = (tree / "prefopt_fast" / "_C.skipped").read_text()
    assert "needs torch >= 2.10 (its stable ABI's parallel_for / get_num_threads)" in skipped
    probe = (
        # an editable install's import hook would find its own tree before PYTHONPATH's
        "import sys\n"
        "sys.meta_path[:] = [f for f in sys.meta_path if '__editable__' not in getattr(f, '__module__', '')]\n"
        "import prefopt_fast as pf\n"
        "assert pf.__file__.startswith(sys.argv[1]), pf.__file__\n"
        "from prefopt_fast.backends import cpu\n"
        "print(pf.build_info()['extension_error'])\n"
        "print(cpu.unavailable_reason())\n"
        "print(pf.available_backends())\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe, str(tree)],
        cwd=tmp_path,
        env={"PYTHONPATH": str(tree), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    err, reason, backends = out.stdout.strip().splitlines()
    assert err.startswith("ImportError: ") and "; at install time: torch 2.9.1+cu128 at build time" in err
    assert "could not be imported" in reason and "at install time: torch 2.9.1+cu128" in reason
    assert "cpu" not in backends and "torch" in backends


def test_a_required_extension_fails_the_install_on_a_torch_below_the_floor(tmp_path):
    tree = _tree(tmp_path)
    res = _setup(tree, PREFOPT_REQUIRE_EXTENSION="1")
    assert res.returncode != 0
    assert "cannot build the native extension: torch 2.9.1+cu128 at build time" in res.stderr
    assert not (tree / "prefopt_fast" / "_C.skipped").exists()
