"""Build: the Python packages plus the native extension ``prefopt_fast._C`` (CPU kernels,
and CUDA kernels when a CUDA toolkit is found).

The extension is bound through the LibTorch stable ABI, built against the torch that is
installed (``TORCH_TARGET_VERSION`` = that torch's major.minor, at most 2.13), so one ``abi3``
build serves that torch and every later one, and every CPython >= 3.10. Built with torch
>= 2.13 it serves every torch >= 2.13; with torch 2.10 - 2.12 every torch from that one on.
Torch older than 2.10 lacks what the binding needs from the stable ABI (parallel_for,
get_num_threads): no extension then, the package is pure Python and
``prefopt_fast.build_info()["extension_error"]`` says why. The CUDA kernels
(csrc/cuda/*.cu) are compiled by nvcc without torch headers and linked with the static CUDA
runtime, so one wheel serves every such torch's CUDA builds whose driver supports the
toolkit's CUDA version. Environment (see tools/cuda_build.py and docs/cuda.md):

    PREFOPT_CUDA=0|1|auto      no CUDA code / require it / build it if a toolkit is found
    CUDA_HOME                  the toolkit (else `nvcc` on PATH, else /usr/local/cuda)
    PREFOPT_CUDA_ARCHS         e.g. "80;90+PTX"; default: "80;86;89;90;100;120+PTX" for
                               wheels, "80;90+PTX" for in-place / editable builds
    PREFOPT_LOCAL_VERSION      local version suffix of the wheel: default "cuXYZ" for a
                               CUDA build (0.1.0+cu130), none for a CPU-only one; "" = none
    PREFOPT_NO_EXTENSION=1     pure Python (no _C at all)
    PREFOPT_REQUIRE_EXTENSION=1  a failed build of _C fails the install (also with
                               PREFOPT_CUDA=1); otherwise the failure is printed, the
                               install goes on pure Python, and build_info() /
                               available_backends() report why (prefopt_fast/_C.skipped)
"""

import glob
import os
import re
import sys
from pathlib import Path

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _package_version() -> str:
    text = open(os.path.join(ROOT, "prefopt_fast", "_version.py")).read()
    return re.search(r'^__version__\s*=\s*"([^"]+)"', text, re.M).group(1)


# The oldest torch whose stable ABI has what csrc/*/bindings.cpp uses (torch::stable::
# parallel_for and get_num_threads came with 2.10), and the newest target: the stable-ABI
# feature set the binding is written for (Stream::nativeHandle, 2.13; older targets get
# the CUDA stream through the AOTI C shim instead, csrc/cuda/bindings.cpp).
TORCH_ABI_FLOOR = (2, 10)
TORCH_ABI_TARGET_MAX = (2, 13)
SKIPPED = os.path.join("prefopt_fast", "_C.skipped")  # why there is no _C (read by build_info)


def _torch_abi_target():
    """(major, minor) for TORCH_TARGET_VERSION, or the reason the installed torch cannot
    build the extension."""
    import torch

    m = re.match(r"(\d+)\.(\d+)", torch.__version__)
    tv = (int(m.group(1)), int(m.group(2)))
    if tv < TORCH_ABI_FLOOR:
        return None, (
            f"torch {torch.__version__} at build time: the native extension needs torch >= "
            f"{TORCH_ABI_FLOOR[0]}.{TORCH_ABI_FLOOR[1]} (its stable ABI's parallel_for / get_num_threads)"
        )
    return min(tv, TORCH_ABI_TARGET_MAX), None


def _require_extension() -> bool:
    on = ("1", "true", "yes", "on")
    return (
        os.environ.get("PREFOPT_REQUIRE_EXTENSION", "0").strip().lower() in on
        or os.environ.get("PREFOPT_CUDA", "auto").strip().lower() in on
    )


version = _package_version()
ext_modules = []
cmdclass = {}
abi_target, abi_skip = (None, None)
if os.path.exists(os.path.join(ROOT, SKIPPED)):  # a reason left by an earlier build
    os.remove(os.path.join(ROOT, SKIPPED))
if os.environ.get("PREFOPT_NO_EXTENSION", "0") != "1":
    abi_target, abi_skip = _torch_abi_target()
    if abi_skip:
        if _require_extension():
            raise RuntimeError(f"prefopt_fast: cannot build the native extension: {abi_skip}")
        print(f"prefopt_fast: WARNING no native extension: {abi_skip}", file=sys.stderr)
        # read by build_info() from the source tree (editable installs) or the wheel
        with open(os.path.join(ROOT, SKIPPED), "w") as f:
            f.write(abi_skip + "\n")
if abi_target is not None:
    from torch.utils.cpp_extension import BuildExtension, CppExtension

    sys.path.insert(0, os.path.join(ROOT, "tools"))
    import cuda_build  # tools/cuda_build.py

    cxx_flags = [
        "-O3",
        "-std=c++17",
        # stable ABI: compile against the installed torch's feature set (at most 2.13's), run
        # on that torch and any later one
        "-DTORCH_TARGET_VERSION=0x%02x%02x000000000000" % abi_target,
        # `omp simd` reductions vectorise without -ffast-math and without an OpenMP runtime
        "-fopenmp-simd",
        # FMA contraction where the ISA has it (pf_exp_poly needs it: -ffp-contract=off is
        # ~40% slower); x = z * inv_temp is rounded explicitly where it matters (mul_rn in
        # csrc/cpu/row_kernels.cpp)
        "-ffp-contract=fast",
        "-fvisibility=hidden",
    ]
    sources = sorted(glob.glob("csrc/cpu/*.cpp"))
    depends = sorted(glob.glob("csrc/*.h") + glob.glob("csrc/cpu/*.h"))

    want_cuda = os.environ.get("PREFOPT_CUDA", "auto").strip().lower()
    cuda_home = None
    if want_cuda not in ("0", "false", "no", "off"):
        cuda_home = cuda_build.find_cuda_home()
        if cuda_home is None and want_cuda in ("1", "true", "yes", "on"):
            raise RuntimeError("PREFOPT_CUDA=1 but no CUDA toolkit was found: set CUDA_HOME")
    link_args = []
    if cuda_home:
        cuda_ver = cuda_build.cuda_version(cuda_home)
        sources += sorted(glob.glob("csrc/cuda/*.cpp"))  # the binding, host compiler
        depends += sorted(glob.glob("csrc/cuda/*.h") + glob.glob("csrc/cuda/*.cuh"))
        link_args = cuda_build.link_args(cuda_home)
        local = os.environ.get("PREFOPT_LOCAL_VERSION", "cu" + cuda_ver.replace(".", ""))
    else:
        print("prefopt_fast: no CUDA toolkit (or PREFOPT_CUDA=0): CPU-only extension", file=sys.stderr)
        local = os.environ.get("PREFOPT_LOCAL_VERSION", "")
    if local:
        version += "+" + local

    class BuildExt(BuildExtension):
        """torch's BuildExtension for the C++ sources; the .cu files go through nvcc here
        (our flags, no torch headers), their objects linked into the extension."""

        def run(self):
            # setuptools clears `inplace` while it builds (then copies into the tree)
            self._prefopt_dev = bool(self.inplace or getattr(self, "editable_mode", False))
            super().run()

        def build_extension(self, ext):
            # A failed build (unless required) leaves its reason as _C.skipped where _C would
            # be: the source tree for in-place / editable builds, else build_lib (-> the wheel).
            out_dir = ROOT if self._prefopt_dev else self.build_lib
            skipped = os.path.join(out_dir, SKIPPED)
            if os.path.exists(skipped):
                os.remove(skipped)
            try:
                self._build_extension(ext)
            except Exception as exc:
                if _require_extension():
                    raise
                reason = f"the build of the native extension failed ({type(exc).__name__}: {exc})".replace("\n", " ")
                print(f"prefopt_fast: WARNING {reason}; installing without it", file=sys.stderr)
                os.makedirs(os.path.dirname(skipped), exist_ok=True)
                with open(skipped, "w") as f:
                    f.write(reason + "\n")

        def copy_extensions_to_source(self):
            # after an in-place build setuptools copies each built extension into the tree:
            # one whose build failed above has nothing to copy
            self.extensions = [
                e
                for e in self.extensions
                if os.path.exists(os.path.join(self.build_lib, self.get_ext_filename(e.name)))
            ]
            super().copy_extensions_to_source()

        def _build_extension(self, ext):
            print(f"prefopt_fast: stable ABI target torch {abi_target[0]}.{abi_target[1]}", file=sys.stderr)
            if cuda_home:
                # PREFOPT_CUDA_ARCHS, else: in-place / editable (development) builds the small
                # set (sm_80 + sm_90 SASS, compute_90 PTX: every GPU >= sm_80 runs it), wheels
                # the release set
                dev = getattr(self, "_prefopt_dev", False)
                spec = os.environ.get("PREFOPT_CUDA_ARCHS", "").strip() or (
                    cuda_build.DEV_ARCHS if dev else cuda_build.DEFAULT_ARCHS
                )
                cuda_archs = cuda_build.parse_archs(spec)
                names = cuda_build.arch_names(cuda_archs)
                print(f"prefopt_fast: CUDA {cuda_ver} kernels ({cuda_home}) for {', '.join(names)}", file=sys.stderr)
                # read back at run time by prefopt_fast.build_info()
                ext.extra_compile_args["cxx"] = ext.extra_compile_args["cxx"] + [
                    "-DPREFOPT_CUDA_ARCHS=" + ",".join(names)
                ]
                compiled = cuda_build.compile_sources(
                    cuda_home,
                    [Path(s) for s in sorted(glob.glob("csrc/cuda/*.cu"))],
                    # a fixed place (editable installs build in throw-away temp dirs): an
                    # unchanged source with the same nvcc command line is not recompiled
                    cuda_build.object_dir(Path(ROOT), cuda_home, cuda_archs),
                    cuda_archs,
                    [os.path.abspath("csrc"), os.path.abspath("csrc/cuda")],
                    depends=depends,
                    force=self.force,
                )
                reports = [r for c in compiled for r in cuda_build.parse_ptxas(c.log)]
                spills = [r for r in reports if r.spill_stores or r.spill_loads]
                if any(c.rebuilt for c in compiled):
                    print(
                        f"prefopt_fast: {len(reports)} CUDA kernels compiled, max "
                        f"{max((r.registers for r in reports), default=0)} registers, "
                        f"{len(spills)} with register spills",
                        file=sys.stderr,
                    )
                for r in spills:
                    print(
                        f"prefopt_fast: WARNING register spill in {r.kernel} ({r.arch}): "
                        f"{r.spill_stores} B stores, {r.spill_loads} B loads",
                        file=sys.stderr,
                    )
                ext.extra_objects = list(ext.extra_objects or []) + [str(c.obj) for c in compiled]
            super().build_extension(ext)

    ext_modules.append(
        CppExtension(
            name="prefopt_fast._C",
            sources=sources,
            include_dirs=[os.path.abspath("csrc")],
            depends=depends + sorted(glob.glob("csrc/cuda/*.cu")),
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=link_args,
            py_limited_api=True,
        )
    )
    cmdclass["build_ext"] = BuildExt

setup(
    version=version,
    packages=[
        "prefopt_fast",
        "prefopt_fast.backends",
        "prefopt_fast.ops",
        "prefopt_fast.losses",
        "prefopt_fast.integrations",
        "prefopt_fast.kernels",
    ],
    ext_modules=ext_modules,
    # the reason there is no _C, where a build left one (see SKIPPED)
    package_data={"prefopt_fast": ["_C.skipped"]},
    cmdclass=cmdclass,
    options={"bdist_wheel": {"py_limited_api": "cp310"}},
)
