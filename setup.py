"""Builds the optional C++ extension ``fastdpo._C`` from csrc/ (metadata lives in pyproject.toml).

Install with ``pip install --no-build-isolation -e .`` so the build sees the torch you have.
FASTDPO_NO_NATIVE=1 skips the extension; FASTDPO_DEBUG=1 builds it with -O0 -g. A failed
compile does not fail the install: the package falls back to the torch backend.
"""

import glob
import os
import sys

from setuptools import setup


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
    flags = ["-O0", "-g"] if debug else ["-O3", "-fopenmp", "-DNDEBUG"]
    ext = CppExtension(
        "fastdpo._C",
        sources,
        extra_compile_args={"cxx": flags + ["-std=c++17"]},
        extra_link_args=["-fopenmp"],
        py_limited_api=False,
    )

    class OptionalBuildExtension(BuildExtension.with_options(use_ninja=True)):
        def build_extension(self, extension):
            try:
                super().build_extension(extension)
            except Exception as exc:  # no compiler, bad toolchain: keep the pure-Python package
                print(
                    f"fastdpo: native kernel not built ({exc}); the torch backend will be used",
                    file=sys.stderr,
                )

    return [ext], {"build_ext": OptionalBuildExtension}


ext_modules, cmdclass = native_extension()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
