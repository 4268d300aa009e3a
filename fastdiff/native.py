"""The native extension fastdiff._C (VQ nearest-codebook search): loading, just-in-time build, and dispatch.

The extension registers ``torch.ops.fastdiff.vq_nearest(z, codebook) -> (indices, distances)`` (C++ and, where
torch has CUDA, CUDA kernels); this module registers its fake (meta) implementation. Where the extension comes
from, in order (first use in a process decides, once):

1. ``fastdiff._C``, built by ``pip install --no-build-isolation .`` (setup.py);
2. a just-in-time build of the shipped sources (``fastdiff/csrc``) with ``torch.utils.cpp_extension.load`` into
   ``$FASTDIFF_CACHE`` (default ``~/.cache/fastdiff``), once per version of the sources, torch and Python. A file
   lock makes concurrent processes wait for one build. ``FASTDIFF_NO_JIT=1`` turns this step off;
3. nothing: ``vq_nearest`` runs the PyTorch reference after one logged warning (``backend="native"`` raises).

``FASTDIFF_NATIVE=0`` skips the extension altogether. ``DEBUG=1`` builds the JIT copy with ``-O0 -g``.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import logging
import os
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor

from fastdiff import dispatch, reference

logger = logging.getLogger("fastdiff")

OP = "fastdiff::vq_nearest"
SOURCE_DIR = Path(__file__).resolve().parent / "csrc"  # installed as package data; a symlink to ../csrc in a checkout
CPU_SOURCES = ("ops.cpp", "vq_nearest_cpu.cpp", "rows_matmul_cpu.cpp")
CUDA_BINDING = "vq_nearest_cuda.cpp"

_lock = threading.Lock()
_loaded: Optional[bool] = None  # None: not tried yet
_origin = ""                    # where the loaded extension came from
_error = ""                     # why it could not be loaded
_fake_registered = False
_kernels: dict[str, bool] = {}  # device type -> the loaded extension has a kernel for it (plain dict: traceable)
_rows_matmul = False            # the loaded extension has fastdiff::rows_matmul for CPU tensors


# --------------------------------------------------------------------------------------------- flags (as in setup.py)
def openmp_flags() -> list[str]:
    """``-fopenmp`` where torch's ATen runs parallel_for on OpenMP (its header-inlined loop needs it)."""
    return ["-fopenmp"] if "OpenMP" in torch.__config__.parallel_info() else []


def cxx_flags() -> list[str]:
    """C++ flags of the JIT build: no -march (the micro-kernel ISA is chosen at run time from CPUID)."""
    debug = os.environ.get("DEBUG", "0") == "1"
    return (["-O0", "-g"] if debug else ["-O3", "-DNDEBUG"]) + openmp_flags()


# --------------------------------------------------------------------------------------------- loading
def _cuda_build_possible() -> bool:
    from torch.utils import cpp_extension

    return torch.version.cuda is not None and torch.cuda.is_available() and cpp_extension.CUDA_HOME is not None


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """An exclusive advisory lock on ``path`` (fcntl), held for the block; a no-op where fcntl is missing."""
    try:
        import fcntl
    except ImportError:  # not POSIX: torch's own build baton still guards the build directory
        yield
        return
    with open(path, "a+") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def cache_dir() -> Path:
    """Where JIT builds live: ``$FASTDIFF_CACHE`` or ``~/.cache/fastdiff``."""
    return Path(os.environ.get("FASTDIFF_CACHE") or Path.home() / ".cache" / "fastdiff").expanduser()


def _jit_build() -> str:
    """Build (or reuse) the extension from SOURCE_DIR, load it, and return the shared library's path."""
    from torch.utils import cpp_extension

    if not (SOURCE_DIR / CPU_SOURCES[0]).is_file():
        raise RuntimeError(f"the C++ sources are not installed (looked in {SOURCE_DIR})")
    with_cuda = _cuda_build_possible()
    sources = [SOURCE_DIR / name for name in CPU_SOURCES]
    if with_cuda:
        sources += [SOURCE_DIR / CUDA_BINDING, *sorted((SOURCE_DIR / "cuda").glob("*.cu"))]
    cflags = cxx_flags() + (["-DFASTDIFF_WITH_CUDA"] if with_cuda else [])
    cuda_flags = ["-O3", "-DFASTDIFF_WITH_CUDA"] if with_cuda else None

    digest = hashlib.sha256()
    for path in sorted(p for p in SOURCE_DIR.rglob("*") if p.suffix in (".cpp", ".h", ".cu", ".cuh")):
        digest.update(path.relative_to(SOURCE_DIR).as_posix().encode() + b"\0" + path.read_bytes())
    digest.update(repr((torch.__version__, sys.version, with_cuda, cflags, cuda_flags)).encode())
    tag = digest.hexdigest()[:16]
    name = f"fastdiff_C_{tag}"
    root = cache_dir()
    build_dir = root / name
    build_dir.mkdir(parents=True, exist_ok=True)
    library = build_dir / f"{name}.so"

    with _file_lock(root / f"{name}.lock"):
        if library.is_file():
            try:
                torch.ops.load_library(str(library))
                return str(library)
            except OSError as exc:  # a broken earlier build: build again
                logger.info("fastdiff: rebuilding %s (%s)", library, exc)
        logger.warning("fastdiff: building the native VQ extension into %s (once; takes about a minute)", build_dir)
        cpp_extension.load(
            name=name,
            sources=[str(s) for s in sources],
            extra_cflags=cflags,
            extra_cuda_cflags=cuda_flags,
            extra_ldflags=openmp_flags(),
            extra_include_paths=[str(SOURCE_DIR)],
            build_directory=str(build_dir),
            with_cuda=with_cuda,
            is_python_module=False,
            verbose=os.environ.get("FASTDIFF_VERBOSE_BUILD", "0") == "1",
        )
    return str(library)


def _register_fake() -> None:
    global _fake_registered
    if _fake_registered:
        return

    @torch.library.register_fake(OP)
    def _(z: Tensor, codebook: Tensor) -> tuple[Tensor, Tensor]:
        n = z.shape[0]
        return z.new_empty((n,), dtype=torch.int64), z.new_empty((n,), dtype=torch.float32)

    _fake_registered = True


def _try_load() -> bool:
    global _origin, _error, _rows_matmul
    if os.environ.get("FASTDIFF_NATIVE", "1") == "0":
        _error = "disabled by FASTDIFF_NATIVE=0"
        return False
    try:
        module = importlib.import_module("fastdiff._C")
        _origin = f"prebuilt {module.__file__}"
    except Exception as prebuilt_exc:  # ImportError, or an extension built for another torch (undefined symbol)
        prebuilt = f"{type(prebuilt_exc).__name__}: {prebuilt_exc}"
        if os.environ.get("FASTDIFF_NO_JIT", "0") == "1":
            _error = f"fastdiff._C not importable ({prebuilt}) and FASTDIFF_NO_JIT=1"
            return False
        try:
            _origin = f"jit {_jit_build()}"
        except Exception as exc:  # no compiler, no ninja, no sources, a compile error...
            _error = f"fastdiff._C not importable ({prebuilt}); JIT build failed: {type(exc).__name__}: {exc}"
            return False
    if not hasattr(torch.ops.fastdiff, "vq_nearest"):
        _error = f"{_origin} loaded but registered no fastdiff::vq_nearest"
        return False
    _register_fake()
    for device_type, key in (("cpu", "CPU"), ("cuda", "CUDA")):
        _kernels[device_type] = torch._C._dispatch_has_kernel_for_dispatch_key(OP, key)
    _rows_matmul = hasattr(torch.ops.fastdiff, "rows_matmul") and torch._C._dispatch_has_kernel_for_dispatch_key(
        "fastdiff::rows_matmul", "CPU")
    return True


def load() -> bool:
    """Load (building if needed) the extension once per process; True when ``torch.ops.fastdiff.vq_nearest`` exists.

    Once it has run, this and the dispatch below only read module globals, so torch.compile(fullgraph=True)
    traces through :func:`fastdiff.ops.vq_nearest` (the first call, which may build, should happen eagerly).
    """
    global _loaded
    if _loaded is None:
        with _lock:
            if _loaded is None:
                _loaded = _try_load()
                if not _loaded:
                    logger.debug("fastdiff: native extension unavailable: %s", _error)
    return bool(_loaded)


def has_rows_matmul() -> bool:
    """True when ``torch.ops.fastdiff.rows_matmul`` (the batch-invariant CPU GEMM) can run here (loads first)."""
    return load() and _rows_matmul


def _has_kernel(device: torch.device) -> bool:
    return _kernels.get(device.type, False)


# --------------------------------------------------------------------------------------------- reporting
def status() -> str:
    """One line on the extension: where it came from and what it runs (for ``fastdiff.info()``)."""
    if _loaded is None:
        return "not loaded yet (loads on the first vq_nearest call)"
    if not _loaded:
        return f"unavailable: {_error}"
    return f"{_origin} ({torch.ops.fastdiff._native_info()})"


def vq_path(device: torch.device) -> str:
    """The path vq_nearest takes for tensors on ``device`` under FASTDIFF_BACKEND: "native" or "torch"."""
    if dispatch.env_backend() == "torch":
        return "torch"
    return "native" if load() and _has_kernel(device) else "torch"


# --------------------------------------------------------------------------------------------- dispatch
def _select(device: torch.device, backend: str) -> str:
    if backend == "auto":
        backend = dispatch.env_backend()
    if backend == "torch":
        return "torch"
    if load() and _has_kernel(device):
        return "native"
    why = _error if not _loaded else f"the extension has no {device.type} kernel ({status()})"
    if backend == "native":
        raise RuntimeError(f"fastdiff: backend='native' requested for vq_nearest but it cannot run here: {why}")
    dispatch.warn_once(f"vq-native-{device.type}", f"fastdiff: native vq_nearest unavailable ({why}); "
                                                     "using the PyTorch reference")
    return "torch"


def vq_nearest(
    z: Tensor, codebook: Tensor, *, return_distances: bool = False, backend: str = "auto"
) -> Tensor | tuple[Tensor, Tensor]:
    """Dispatch for :func:`fastdiff.ops.vq_nearest` (which validates first; see there for the contract).

    ``backend``: "auto" (FASTDIFF_BACKEND, then the extension where it has a kernel for the device), "torch"
    (the reference) or "native" (the extension; RuntimeError when it cannot run here). When autograd needs
    gradients of the distances the reference runs, whatever the backend.
    """
    needs_grad = return_distances and torch.is_grad_enabled() and (z.requires_grad or codebook.requires_grad)
    path = "torch" if needs_grad else _select(z.device, backend)
    dispatch.record("vq_nearest", path)
    if path == "native":
        indices, distances = torch.ops.fastdiff.vq_nearest(z.detach(), codebook.detach())  # no autograd kernel
    else:
        indices, distances = reference.vq_nearest(z, codebook)
    return (indices, distances) if return_distances else indices
