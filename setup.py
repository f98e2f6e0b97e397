"""Builds the optional C++ extension ``fastdpo._C`` from csrc/ (metadata lives in pyproject.toml).

Install with ``pip install --no-build-isolation -e .`` so the build sees the torch you have.
The kernels use ATen's ``at::vec`` SIMD types, whose width is fixed at compile time: the build
targets the widest instruction set of the machine it runs on (AVX-512, else AVX2/FMA, else
plain x86-64), like ``-march=native``; FASTDPO_CPU_CAPABILITY=avx512|avx2|default overrides
it (set it when building a wheel for other machines). FASTDPO_NO_NATIVE=1 skips the extension;
FASTDPO_DEBUG=1 builds it with -O0 -g. A failed compile does not fail the install: the package
falls back to the torch backend with a warning.
"""

import glob
import os
import sys

from setuptools import setup

CAPABILITY_FLAGS = {
    "avx512": [
        "-mavx512f",
        "-mavx512bw",
        "-mavx512vl",
        "-mavx512dq",
        "-mavx2",
        "-mfma",
        "-mf16c",
        "-DCPU_CAPABILITY=AVX512",
        "-DCPU_CAPABILITY_AVX512",
    ],
    "avx2": ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"],
    "default": ["-DCPU_CAPABILITY=DEFAULT"],
}


def cpu_capability() -> str:
    chosen = os.environ.get("FASTDPO_CPU_CAPABILITY")
    if chosen:
        return chosen
    try:
        flags = set(open("/proc/cpuinfo").read().split())
    except OSError:
        return "default"
    if {"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx2", "fma"} <= flags:
        return "avx512"
    return "avx2" if {"avx2", "fma", "f16c"} <= flags else "default"


def native_extension():
    sources = sorted(glob.glob("csrc/*.cpp"))
    if os.environ.get("FASTDPO_NO_NATIVE") == "1" or not sources:
        return [], {}
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError:
        print("fastdpo: torch is not importable at build time; skipping the native kernel", file=sys.stderr)
        return [], {}
    debug = os.environ.get("FASTDPO_DEBUG") == "1"
    flags = (
        (["-O0", "-g"] if debug else ["-O3", "-DNDEBUG"])
        + ["-fopenmp", "-Wno-unknown-pragmas"]
        + CAPABILITY_FLAGS[cpu_capability()]
    )
    ext = CppExtension(
        "fastdpo._C",
        sources,
        extra_compile_args={"cxx": flags + ["-std=c++17"]},
        extra_link_args=["-fopenmp"],
        py_limited_api=False,
    )

    class OptionalBuildExtension(BuildExtension.with_options(use_ninja=True)):
        def run(self):
            try:
                super().run()
            except Exception as exc:  # no compiler, bad toolchain: keep the pure-Python package
                print(
                    f"fastdpo: native kernel not built ({exc}); the torch backend will be used",
                    file=sys.stderr,
                )

    return [ext], {"build_ext": OptionalBuildExtension}


ext_modules, cmdclass = native_extension()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
