"""Builds the optional C++ extension `fused_margin._C` from csrc/.

The Python package works without it: `backend="auto"` then falls back to the
PyTorch reference with one warning, and `backend="cpu"` raises. Set
FUSED_MARGIN_NO_EXT=1 to skip the build, DEBUG=1 for an -O0 -g build (the
default is -O3 -g0, stripped). A failed
compile does not fail the install, but tests/test_dispatch.py then fails (the cpu
tests would otherwise all skip) unless FUSED_MARGIN_NO_EXT=1 is set for the test run too.
Build with `pip install --no-build-isolation -e .` after installing torch.
"""
import glob
import os
import sys

from setuptools import setup

ext_modules = []
cmdclass = {}

if os.environ.get("FUSED_MARGIN_NO_EXT", "0") != "1":
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError:  # torch not importable at build time: pure-Python install
        print("fused_margin: torch not found at build time, skipping the C++ extension",
              file=sys.stderr)
    else:
        debug = os.environ.get("DEBUG", "0") == "1"
        # Python's own CFLAGS often carry -g: a release build says -g0 last (the last -g
        # wins) and strips the shared object (-s), 22.5 MB -> about 1 MB
        cxx = ["-O0", "-g"] if debug else ["-O3", "-g0"]
        cxx += ["-fopenmp", "-std=c++17"]
        link = ["-fopenmp"] if debug else ["-fopenmp", "-s"]
        sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))

        class OptionalBuildExtension(BuildExtension):
            """A failed compile leaves a working pure-Python install behind."""

            def run(self):
                try:
                    super().run()
                except Exception as exc:  # noqa: BLE001 - any compiler failure
                    print(f"fused_margin: C++ extension not built ({exc}); the cpu backend "
                          "will be unavailable and the test suite fails unless "
                          "FUSED_MARGIN_NO_EXT=1", file=sys.stderr)

        ext_modules.append(CppExtension(
            "fused_margin._C", sources,
            extra_compile_args={"cxx": cxx},
            extra_link_args=link,
        ))
        cmdclass["build_ext"] = OptionalBuildExtension.with_options(use_ninja=True)

setup(ext_modules=ext_modules, cmdclass=cmdclass)
