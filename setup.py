"""Builds the optional native extension `ddpo_kernels._C` (csrc/); everything else is in pyproject.toml.

What gets built:
- the C++ CPU operators (csrc/ops.cpp) whenever a C++ compiler works;
- plus the CUDA kernels (csrc/ops_cuda.cu) when torch was built with CUDA, nvcc is found
  (CUDA_HOME) and SKIP_CUDA_BUILD is not 1.
SKIP_NATIVE_BUILD=1 skips the extension entirely. A failed build never fails the install:
it prints one notice and the package works on its pure-PyTorch paths (ddpo_kernels/chunk_logprob.py
then JIT-builds the CPU operators on first use, or falls back to PyTorch).

Install: `pip install --no-build-isolation -e .` (torch must be importable here).
"""

from __future__ import annotations

import os

from setuptools import setup

NATIVE_NOTICE = "[setup.py] native extension ddpo_kernels._C not built ({}); the pure-PyTorch paths will be used"


def _flag(name: str) -> bool:
    return os.environ.get(name, "0").strip().lower() in ("1", "true", "yes", "on")


def _native_extensions():
    """(ext_modules, cmdclass) for setup(); both empty when the extension is skipped."""
    if _flag("SKIP_NATIVE_BUILD"):
        print(NATIVE_NOTICE.format("SKIP_NATIVE_BUILD=1"))
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError as exc:
        print(NATIVE_NOTICE.format(f"torch is not importable: {exc}; install with --no-build-isolation"))
        return [], {}

    here = os.path.dirname(os.path.abspath(__file__))
    cxx = ["-O3", "-std=c++20", "-fopenmp"]
    with_cuda = torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None and not _flag("SKIP_CUDA_BUILD")
    if with_cuda:
        ext = cpp_extension.CUDAExtension(
            name="ddpo_kernels._C",
            sources=["csrc/ops.cpp", "csrc/ops_cuda.cu"],  # relative to setup.py, as setuptools requires
            include_dirs=[os.path.join(here, "csrc")],
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "-std=c++20", "--expt-relaxed-constexpr"]},
            extra_link_args=["-fopenmp"],
            define_macros=[("DDPO_PYTHON_MODULE", None)],
        )
    else:
        ext = cpp_extension.CppExtension(
            name="ddpo_kernels._C",
            sources=["csrc/ops.cpp"],
            include_dirs=[os.path.join(here, "csrc")],
            extra_compile_args={"cxx": cxx},
            extra_link_args=["-fopenmp"],
            define_macros=[("DDPO_PYTHON_MODULE", None)],
        )

    class OptionalBuildExtension(cpp_extension.BuildExtension):
        """BuildExtension whose failure (no compiler, nvcc error) is a notice, not an error."""

        def run(self):
            try:
                super().run()
            except Exception as exc:  # noqa: BLE001 - any build failure must leave the install working
                last = str(exc).strip().splitlines()[-1] if str(exc).strip() else ""
                print(NATIVE_NOTICE.format(f"{type(exc).__name__}: {last}"))
                # Later stages (editable installs, wheel contents) then expect no extension file.
                self.extensions = []

    return [ext], {"build_ext": OptionalBuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _native_extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
