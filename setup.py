"""Build of the native extension fastdiff._C (VQ nearest-codebook search). Metadata lives in pyproject.toml.

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


def _sources(*patterns: str) -> list[str]:
    """Sources relative to setup.py, as setuptools requires (it runs from this directory)."""
    return [p.relative_to(ROOT).as_posix() for pattern in patterns for p in sorted(CSRC.glob(pattern))]


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

    debug = _flag("DEBUG")
    openmp = ["-fopenmp"] if "OpenMP" in torch.__config__.parallel_info() else []  # as fastdiff.native.openmp_flags
    cxx = (["-O0", "-g"] if debug else ["-O3", "-DNDEBUG"]) + openmp  # no -march: the ISA is picked at run time
    sources = _sources("ops.cpp", "vq_nearest_cpu.cpp", "rows_matmul_cpu.cpp")
    with_cuda = torch.version.cuda is not None and CUDA_HOME is not None and not _flag("FASTDIFF_SKIP_CUDA")
    if with_cuda:
        sources += _sources("vq_nearest_cuda.cpp", "cuda/*.cu")
        nvcc = (["-O0", "-g", "-lineinfo"] if debug else ["-O3"]) + ["-DFASTDIFF_WITH_CUDA"]
        extension = CUDAExtension(
            "fastdiff._C",
            sources,
            include_dirs=[str(CSRC)],
            extra_compile_args={"cxx": cxx + ["-DFASTDIFF_WITH_CUDA"], "nvcc": nvcc},
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
