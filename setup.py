"""Build: the Python packages plus the native CPU extension ``prefopt_fast._C``.

The extension is bound through the LibTorch stable ABI, so one ``abi3`` build serves
every torch >= 2.13 and every CPython >= 3.10.
"""
import glob
import os

from setuptools import setup

ext_modules = []
cmdclass = {}
if os.environ.get("PREFOPT_NO_EXTENSION", "0") != "1":
    from torch.utils.cpp_extension import BuildExtension, CppExtension

    cxx_flags = [
        "-O3",
        "-std=c++17",
        # stable ABI: compile against the torch 2.13 feature set, run on any later torch
        "-DTORCH_TARGET_VERSION=0x020d000000000000",
        # `omp simd` reductions vectorise without -ffast-math and without an OpenMP runtime
        "-fopenmp-simd",
        # FMA contraction where the ISA has it (the kernels' math is accurate either way)
        "-ffp-contract=fast",
        "-fvisibility=hidden",
    ]
    ext_modules.append(
        CppExtension(
            name="prefopt_fast._C",
            sources=sorted(glob.glob("csrc/cpu/*.cpp")),
            include_dirs=[os.path.abspath("csrc")],
            depends=sorted(glob.glob("csrc/*.h") + glob.glob("csrc/cpu/*.h")),
            extra_compile_args={"cxx": cxx_flags},
            py_limited_api=True,
        )
    )
    cmdclass["build_ext"] = BuildExtension

setup(
    packages=["prefopt_fast", "prefopt_fast.backends", "prefopt_fast.ops", "prefopt_fast.losses", "prefopt_fast.integrations", "prefopt_fast.kernels"],
    package_dir={"prefopt_fast.kernels": "kernels"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    options={"bdist_wheel": {"py_limited_api": "cp310"}},
)
