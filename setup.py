"""Build of the native extension fastdiff._C (``vq_nearest``, the VQ nearest-codebook search, and ``rows_matmul``,
the batch-invariant CPU GEMM). Metadata lives in pyproject.toml.

Install with the torch you want already installed, and without build isolation, so the extension is built
against that torch (build isolation would install a second, possibly multi-GB CUDA, torch just for the build):

    pip install --no-build-isolation .        # or -e . for development

What gets built:
- ``CppExtension`` (csrc/*.cpp) wherever torch imports and a C++ compiler works;
- plus the CUDA kernels (csrc/cuda/*.cu) and their binding as a ``CUDAExtension`` where torch was built with CUDA
  and the CUDA toolkit is found (CUDA_HOME);
- nothing where torch cannot be imported at build time, or the build fails: the pure-Python package installs
  and fastdiff builds the extension just in time on first use (or runs the PyTorch reference).

Environment: FASTDIFF_SKIP_EXT=1 (no extension), FASTDIFF_SKIP_CUDA=1 (CPU part only), FASTDIFF_REQUIRE_EXT=1
(a failed build fails the install), DEBUG=1 (-O0 -g), MAX_JOBS (ninja's parallelism).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from setuptools import setup

log = logging.getLogger("fastdiff.setup")
ROOT = Path(__file__).resolve().parent
# The sources: csrc/ in a checkout; fastdiff/csrc (the package-data copy) in an sdist made without them.
CSRC = ROOT / "csrc" if (ROOT / "csrc").is_dir() else ROOT / "fastdiff" / "csrc"  # absolute: ninja runs elsewhere


def _native_build_config():
    """fastdiff/native.py, loaded by path: the one place that lists the extension's sources and flags (it imports
    nothing from fastdiff, so this works before fastdiff is installed)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("_fastdiff_native_build", ROOT / "fastdiff" / "native.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _relative(paths) -> list[str]:
    """Sources relative to setup.py, as setuptools requires (it runs from this directory)."""
    return [p.relative_to(ROOT).as_posix() for p in paths]


def _flag(name: str) -> bool:
    return os.environ.get(name, "0") == "1"


def _extension_setup() -> dict:
    """ext_modules and cmdclass for setup(), or {} when the extension is not built here."""
    if _flag("FASTDIFF_SKIP_EXT"):
        log.warning("fastdiff: FASTDIFF_SKIP_EXT=1, installing without the native extension")
        return {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except Exception as exc:  # torch absent from the build environment (pip's build isolation, say)
        log.warning("fastdiff: torch is not importable at build time (%s); installing without the native "
                    "extension (it builds just in time on first use). Use `pip install --no-build-isolation .`", exc)
        return {}

    build = _native_build_config()
    openmp = build.openmp_flags()
    sources = _relative(build.cpu_sources(CSRC))
    with_cuda = torch.version.cuda is not None and CUDA_HOME is not None and not _flag("FASTDIFF_SKIP_CUDA")
    cxx = build.cxx_flags(with_cuda)
    if with_cuda:
        sources += _relative(build.cuda_sources(CSRC))
        extension = CUDAExtension(
            "fastdiff._C",
            sources,
            include_dirs=[str(CSRC)],
            extra_compile_args={"cxx": cxx, "nvcc": build.nvcc_flags()},
            extra_link_args=openmp,
        )
    else:
        extension = CppExtension(
            "fastdiff._C",
            sources,
            include_dirs=[str(CSRC)],
            extra_compile_args={"cxx": cxx},
            extra_link_args=openmp,
        )

    class OptionalBuildExtension(BuildExtension):
        """A failed build (no compiler, say) leaves the pure-Python package, unless FASTDIFF_REQUIRE_EXT=1."""

        def run(self) -> None:
            try:
                super().run()
            except Exception as exc:
                if _flag("FASTDIFF_REQUIRE_EXT"):
                    raise
                log.warning("fastdiff: building the native extension failed (%s: %s); installing without it "
                            "(it builds just in time on first use, or the PyTorch reference runs)",
                            type(exc).__name__, exc)

    return {"ext_modules": [extension], "cmdclass": {"build_ext": OptionalBuildExtension.with_options(use_ninja=True)}}


setup(**_extension_setup())
