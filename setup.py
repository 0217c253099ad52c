"""Build: the Python packages plus the native extension ``prefopt_fast._C`` (CPU kernels,
and CUDA kernels when a CUDA toolkit is found).

The extension is bound through the LibTorch stable ABI, so one ``abi3`` build serves
every torch >= 2.13 and every CPython >= 3.10. The CUDA kernels (csrc/cuda/*.cu) are
compiled by nvcc without torch headers and linked with the static CUDA runtime, so
one wheel serves every torch >= 2.13 CUDA build whose driver supports the toolkit's
CUDA version. Environment (see tools/cuda_build.py and docs/cuda.md):

    PREFOPT_CUDA=0|1|auto      no CUDA code / require it / build it if a toolkit is found
    CUDA_HOME                  the toolkit (else `nvcc` on PATH, else /usr/local/cuda)
    PREFOPT_CUDA_ARCHS         e.g. "80;90+PTX"; default: "80;86;89;90;100;120+PTX" for
                               wheels, "80;90+PTX" for in-place / editable builds
    PREFOPT_LOCAL_VERSION      local version suffix of the wheel: default "cuXYZ" for a
                               CUDA build (0.1.0+cu130), none for a CPU-only one; "" = none
    PREFOPT_NO_EXTENSION=1     pure Python (no _C at all)
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


version = _package_version()
ext_modules = []
cmdclass = {}
if os.environ.get("PREFOPT_NO_EXTENSION", "0") != "1":
    from torch.utils.cpp_extension import BuildExtension, CppExtension

    sys.path.insert(0, os.path.join(ROOT, "tools"))
    import cuda_build  # tools/cuda_build.py

    cxx_flags = [
        "-O3",
        "-std=c++17",
        # stable ABI: compile against the torch 2.13 feature set, run on any later torch
        "-DTORCH_TARGET_VERSION=0x020d000000000000",
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
    cmdclass=cmdclass,
    options={"bdist_wheel": {"py_limited_api": "cp310"}},
)
