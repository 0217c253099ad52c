"""Build-time verification of the CUDA backend on a machine without a GPU (CI).

    python tools/cuda_build_check.py [--arch "80;90+PTX"] [--workdir build/cuda_check] [--json out.json]

1. builds prefopt_fast._C through setup.py (PREFOPT_CUDA=1) in a copy of the source tree
   (--workdir, default build/cuda_check: kept, so a rerun with unchanged sources only
   relinks), for the given architectures;
2. reads the ptxas -v report of every kernel: registers, stack, spills; FAILS on any
   spill and when a kernel variant is missing;
3. lists the extension's fatbinary (cuobjdump --list-elf / --list-ptx; from CUDA_HOME/bin,
   PATH or `pip install nvidia-cuda-cuobjdump`) and FAILS if a requested SASS or PTX
   target is absent;
4. imports the built package in a fresh interpreter: the CUDA implementations of the ops
   are registered, build_info() reports the CUDA version and architectures, the kernels'
   probe reports the missing driver, the cuda backend is unavailable with a clear reason
   (and warns once where a GPU is present but the kernels cannot run), auto selection
   picks another backend and backend="cuda" raises a clear error.
Exit status 0 when everything holds.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import cuda_build  # noqa: E402

# kernel variants per architecture: 3 dtypes x 6 forward flag sets + 3 dtypes x 3 backward modes
EXPECTED_KERNELS = 3 * 6 + 3 * 3

# what a build needs from the tree
_TREE = ["setup.py", "pyproject.toml", "README.md", "csrc", "prefopt_fast", "kernels", "tools"]


def sync_tree(dst: Path) -> None:
    """Copy the build inputs into dst, preserving mtimes and leaving unchanged files alone
    (incremental rebuilds); stale files under dst that are gone from the tree are removed."""
    wanted = set()
    for item in _TREE:
        src = ROOT / item
        if not src.exists():
            continue
        files = [src] if src.is_file() else [p for p in src.rglob("*") if p.is_file()]
        for f in files:
            rel = f.relative_to(ROOT)
            if "__pycache__" in rel.parts or f.suffix in (".so", ".pyc"):
                continue
            wanted.add(rel)
            out = dst / rel
            st = f.stat()
            if out.exists() and out.stat().st_mtime == st.st_mtime and out.stat().st_size == st.st_size:
                continue
            out.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(f, out)
    for item in _TREE:
        base = dst / item
        if base.is_dir():
            for f in base.rglob("*"):
                rel = f.relative_to(dst)
                if f.is_file() and rel not in wanted and "__pycache__" not in rel.parts and f.suffix != ".so":
                    f.unlink()


def find_cuobjdump(home: Path):
    cands = [home / "bin" / "cuobjdump", shutil.which("cuobjdump")]
    try:  # the PyPI package nvidia-cuda-cuobjdump
        import nvidia  # noqa: F401

        for base in getattr(nvidia, "__path__", []):
            cands += sorted(Path(base).glob("cu*/bin/cuobjdump"))
    except ImportError:
        pass
    for c in cands:
        if c and Path(c).exists():
            return Path(c)
    return None


IMPORT_CHECK = textwrap.dedent(r"""
    import ctypes, json, warnings
    import torch
    import prefopt_fast
    from prefopt_fast import _build_info, _dispatch
    from prefopt_fast.backends import cuda
    res = {}
    res["file"] = prefopt_fast.__file__
    res["build_info"] = _build_info.build_info()
    res["cuda_kernels_registered"] = all(
        torch._C._dispatch_has_kernel_for_dispatch_key(f"prefopt_fast::{op}", "CUDA")
        for op in ("row_forward", "row_backward", "row_backward_"))
    probe = _build_info.cuda_symbol("prefopt_fast_cuda_probe")
    arch, msg = ctypes.c_int(0), ctypes.create_string_buffer(256)
    res["probe"] = [probe(0, ctypes.byref(arch), msg, 256), msg.value.decode()]
    res["cuda_available"] = cuda.is_available()
    res["cuda_reason"] = cuda.unavailable_reason()
    res["available_backends"] = prefopt_fast.available_backends()
    x = torch.randn(2, 5)
    res["auto_cpu_tensors"] = _dispatch.resolve_backend("auto", x).NAME
    try:
        prefopt_fast.token_logprobs(x, torch.tensor([0, 1]), backend="cuda")
        res["backend_cuda_error"] = None
    except Exception as exc:
        res["backend_cuda_error"] = f"{type(exc).__name__}: {exc}"
    # as on a machine whose GPU the kernels cannot serve (here: no driver): the device
    # checks pass, the kernels' probe fails, and the fallback is announced once
    cuda._extension_reason.cache_clear(); cuda._device_reason.cache_clear()
    torch.cuda.is_available = lambda: True
    torch.cuda.current_device = lambda: 0
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        res["gpu_sim_available"] = [cuda.is_available(), cuda.is_available()]
    res["gpu_sim_reason"] = cuda.unavailable_reason()
    res["gpu_sim_warnings"] = [str(x.message) for x in w if issubclass(x.category, RuntimeWarning)]
    print("IMPORT_CHECK_JSON " + json.dumps(res))
""")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arch", default=cuda_build.DEV_ARCHS, help="PREFOPT_CUDA_ARCHS (default %(default)s)")
    ap.add_argument("--workdir", default=str(ROOT / "build" / "cuda_check"))
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)

    home = cuda_build.find_cuda_home()
    if home is None:
        print("FAIL: no CUDA toolkit (set CUDA_HOME)")
        return 2
    archs = cuda_build.parse_archs(args.arch)
    names = cuda_build.arch_names(archs)
    work = Path(args.workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    sync_tree(work)
    failures = []
    results = {"cuda_home": str(home), "cuda": cuda_build.cuda_version(home), "archs": names}
    print(f"CUDA {results['cuda']} at {home}; targets {', '.join(names)}; work dir {work}")

    # 1. build through setup.py, as a user's build does
    env = dict(os.environ, PREFOPT_CUDA="1", PREFOPT_CUDA_ARCHS=args.arch, CUDA_HOME=str(home))
    env.pop("PREFOPT_NO_EXTENSION", None)
    res = subprocess.run(
        [sys.executable, "setup.py", "-q", "build_ext", "--inplace"], cwd=work, env=env, capture_output=True, text=True
    )
    if res.returncode != 0:
        print(res.stdout[-4000:], res.stderr[-8000:])
        print("FAIL: the build failed")
        return 1
    so = sorted((work / "prefopt_fast").glob("_C*.so"))
    if not so:
        print("FAIL: no extension was produced")
        return 1
    so = so[0]
    results["extension"] = str(so)

    # 2. registers and spills
    reports = []
    for log in sorted(cuda_build.object_dir(work, home, archs).glob("*.ptxas.log")):
        reports += cuda_build.parse_ptxas(log.read_text())
    print("\nptxas -v (registers / spill bytes / stack bytes):")
    print(cuda_build.format_table(reports))
    results["kernels"] = [r._asdict() for r in reports]
    spills = [r for r in reports if r.spill_stores or r.spill_loads]
    for r in spills:
        failures.append(f"register spill in {r.kernel} ({r.arch}): {r.spill_stores} B stored, {r.spill_loads} B loaded")
    for a in archs:
        if a.sass:
            n = sum(1 for r in reports if r.arch == f"sm_{a.num}")
            if n != EXPECTED_KERNELS:
                failures.append(f"sm_{a.num}: {n} kernels compiled, expected {EXPECTED_KERNELS}")

    # 3. the fatbinary
    tool = find_cuobjdump(home)
    if tool is None:
        results["fatbin"] = None
        print("\nfatbinary: cuobjdump not found (pip install nvidia-cuda-cuobjdump): not listed")
    else:
        elf = subprocess.run([str(tool), "--list-elf", str(so)], capture_output=True, text=True).stdout
        ptx = subprocess.run([str(tool), "--list-ptx", str(so)], capture_output=True, text=True).stdout
        print(f"\nfatbinary of {so.name} ({tool}):\n{elf}{ptx}")
        results["fatbin"] = {"elf": elf.split("\n"), "ptx": ptx.split("\n")}
        for a in archs:
            if a.sass and f".sm_{a.num}.cubin" not in elf:
                failures.append(f"no sm_{a.num} cubin in the fatbinary")
            if a.ptx and f".sm_{a.num}.ptx" not in ptx:
                failures.append(f"no compute_{a.num} PTX in the fatbinary")
        others = {ln.rsplit(".", 2)[-2] for ln in elf.splitlines() + ptx.splitlines() if ln.strip()}
        extra = others - {f"sm_{a.num}" for a in archs}
        if extra:
            failures.append(f"unexpected targets in the fatbinary: {sorted(extra)}")

    # 4. import without a driver
    ienv = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "PREFOPT_BACKEND")}
    ienv["PYTHONPATH"] = str(work)
    res = subprocess.run([sys.executable, "-c", IMPORT_CHECK], cwd=work, env=ienv, capture_output=True, text=True)
    line = [ln for ln in res.stdout.splitlines() if ln.startswith("IMPORT_CHECK_JSON ")]
    if res.returncode != 0 or not line:
        failures.append(f"importing the built package failed:\n{res.stdout[-2000:]}{res.stderr[-4000:]}")
    else:
        imp = json.loads(line[0].split(" ", 1)[1])
        results["import"] = imp
        print("import check:", json.dumps(imp, indent=1))
        bi = imp["build_info"]

        def expect(cond, what):
            if not cond:
                failures.append(what)

        expect(
            Path(imp["file"]).resolve().parent == (work / "prefopt_fast").resolve(),
            f"imported {imp['file']} instead of the built copy",
        )
        expect(bi["cuda"] == results["cuda"], f"build_info cuda {bi['cuda']} != {results['cuda']}")
        expect(bi["cuda_archs"] == names, f"build_info archs {bi['cuda_archs']} != {names}")
        expect(imp["cuda_kernels_registered"], "the ops have no CUDA implementation registered")
        expect(imp["probe"][0] != 0 and imp["probe"][1], f"the probe did not report the missing driver: {imp['probe']}")
        expect(
            not imp["cuda_available"] and "cuda" not in imp["available_backends"],
            "the cuda backend claims to be available without a GPU",
        )
        expect(imp["auto_cpu_tensors"] != "cuda", "auto selection picked cuda")
        expect(
            imp["backend_cuda_error"] is not None and "not available" in imp["backend_cuda_error"],
            f"backend='cuda' did not raise a clear error: {imp['backend_cuda_error']}",
        )
        expect(
            imp["gpu_sim_available"] == [False, False] and imp["probe"][1] in imp["gpu_sim_reason"],
            f"with a (simulated) GPU the probe failure was not reported: {imp['gpu_sim_reason']}",
        )
        expect(
            len(imp["gpu_sim_warnings"]) == 1 and "triton" in imp["gpu_sim_warnings"][0],
            f"expected one fallback warning naming triton, got {imp['gpu_sim_warnings']}",
        )

    results["failures"] = failures
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    print(f"\n{len(reports)} kernels, {len(spills)} with spills, {len(failures)} failing")
    for f in failures:
        print("FAIL:", f)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
