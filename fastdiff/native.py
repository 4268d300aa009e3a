"""The native extension fastdiff._C: its build configuration, loading, just-in-time build and status — a loader only.

The extension registers ``torch.ops.fastdiff.vq_nearest(z, codebook) -> (indices, distances)`` (C++ and, where
torch has CUDA, CUDA kernels), ``torch.ops.fastdiff.rows_matmul(x, weight)`` (CPU) and
``torch.ops.fastdiff.group_norm_silu_native(x, num_groups, weight, bias, eps, silu)`` (CPU) and
``torch.ops.fastdiff.conv3x3_winograd_native(x, u, bias, tile)`` (CPU); this module registers the fake (meta)
implementations of all four and says which kernels the loaded extension has (:func:`has_kernel`). Which
path an op takes is decided in :mod:`fastdiff.dispatch`, like every other op's; this module imports nothing else
from fastdiff, so setup.py reads the build configuration (sources, flags) from this file. Where the extension comes
from, in order (first use in a process decides, once):

1. ``fastdiff._C``, built by ``pip install --no-build-isolation .`` (setup.py);
2. a just-in-time build of the shipped sources (``fastdiff/csrc``) with ``torch.utils.cpp_extension.load`` into
   ``$FASTDIFF_CACHE`` (default ``~/.cache/fastdiff``), once per version of the sources, torch and Python. A file
   lock makes concurrent processes wait for one build. ``FASTDIFF_NO_JIT=1`` turns this step off;
3. nothing: the ops run the PyTorch reference after one logged warning (``backend="native"`` raises).

CUDA kernels: where CUDA devices are usable at run time but the extension that loaded has no CUDA kernel for
``vq_nearest`` (a ``fastdiff._C`` built where nvcc or a CUDA torch was missing, or a just-in-time build whose CUDA part
failed), the CUDA sources alone are built just in time, linked against that extension, into the same cache and loaded
next to it (:func:`_jit_build_cuda`): once per process, logged, skipped under ``FASTDIFF_NO_JIT=1``. A failure is
logged once and leaves what loaded (CUDA tensors then run the reference); :func:`status` says which happened.

``FASTDIFF_NATIVE=0`` skips the extension altogether. ``DEBUG=1`` builds the JIT copy with ``-O0 -g``.
``FASTDIFF_CPU_ISA`` caps the CPU micro-kernels of the CPU ops (:data:`CPU_ISA_VALUES`, any case): the C++ side reads
it on every call and compares it exactly, so :func:`cpu_isa` checks it, raises ValueError on any other value and
writes it back in lower case; it runs before the extension loads, in :func:`fastdiff.batch_invariant` before every
native product, and in :func:`fastdiff.batch_invariance.cpu_code_path`. A value set later and read only by a direct
``torch.ops.fastdiff.*`` call reaches the C++ side unchecked (there, unknown values mean no cap).
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

logger = logging.getLogger("fastdiff")

OP = "fastdiff::vq_nearest"
SOURCE_DIR = Path(__file__).resolve().parent / "csrc"  # installed as package data; a symlink to ../csrc in a checkout

_lock = threading.Lock()
_loaded: Optional[bool] = None  # None: not tried yet
_origin = ""                    # where the loaded extension came from
_error = ""                     # why it could not be loaded
_fake_registered = False
_kernels: dict[tuple[str, str], bool] = {}  # (op, device type) -> the loaded extension has it (plain dict: traceable)
_library = ""                   # the loaded extension's shared library (what the CUDA-only build links against)
_cuda_jit: Optional[str] = None  # the CUDA-only JIT build: None not tried, else what happened (for status())
# the operators fastdiff._C may register (torch.ops.fastdiff.<op>)
OPS = ("vq_nearest", "rows_matmul", "group_norm_silu_native", "conv3x3_winograd_native")
CPU_ISA_VALUES = ("auto", "avx512", "avx2", "generic")  # FASTDIFF_CPU_ISA: "auto" (or unset, or empty) is no cap


def cpu_isa() -> str:
    """``FASTDIFF_CPU_ISA``, checked: one of :data:`CPU_ISA_VALUES` ("auto" when unset or empty).

    Any case and surrounding spaces are accepted; the variable is then rewritten in the lower case the C++ side
    compares against (it reads the variable itself, on every call). Any other value raises ValueError.
    """
    raw = os.environ.get("FASTDIFF_CPU_ISA")
    if raw is None:
        return "auto"
    value = raw.strip().lower() or "auto"
    if value not in CPU_ISA_VALUES:
        raise ValueError(f"FASTDIFF_CPU_ISA must be one of {', '.join(CPU_ISA_VALUES)} (any case) or unset, "
                         f"got {raw!r}")
    if value != raw:
        os.environ["FASTDIFF_CPU_ISA"] = value
    return value


# --------------------------------------------------------------------------------------------- build configuration
# The one place that lists the sources and flags: setup.py loads this file by path (it imports nothing from fastdiff).
def cpu_sources(source_dir: Path = SOURCE_DIR) -> list[Path]:
    """The C++ sources of the CPU build: ``*.cpp`` and ``cpu/*.cpp``, except the CUDA bindings (``*_cuda.cpp``)."""
    found = [*sorted(source_dir.glob("*.cpp")), *sorted(source_dir.glob("cpu/*.cpp"))]
    return [p for p in found if not p.name.endswith("_cuda.cpp")]


def cuda_sources(source_dir: Path = SOURCE_DIR) -> list[Path]:
    """What a CUDA build adds: the bindings (``*_cuda.cpp``) and the kernels (``cuda/*.cu``)."""
    return [*sorted(source_dir.glob("*_cuda.cpp")), *sorted(source_dir.glob("cuda/*.cu"))]


def openmp_flags() -> list[str]:
    """``-fopenmp`` where torch's ATen runs parallel_for on OpenMP (its header-inlined loop needs it)."""
    return ["-fopenmp"] if "OpenMP" in torch.__config__.parallel_info() else []


def debug_build() -> bool:
    return os.environ.get("DEBUG", "0") == "1"


def cxx_flags(with_cuda: bool = False) -> list[str]:
    """C++ flags: no -march (the micro-kernel ISA is chosen at run time from CPUID)."""
    flags = (["-O0", "-g"] if debug_build() else ["-O3", "-DNDEBUG"]) + openmp_flags()
    return flags + (["-DFASTDIFF_WITH_CUDA"] if with_cuda else [])


def nvcc_flags() -> list[str]:
    return (["-O0", "-g", "-lineinfo"] if debug_build() else ["-O3"]) + ["-DFASTDIFF_WITH_CUDA"]


# --------------------------------------------------------------------------------------------- loading
def _cuda_runtime_available() -> bool:
    """CUDA devices usable here (ROCm's torch.cuda excluded: the CUDA sources are not hipified)."""
    return torch.version.hip is None and torch.cuda.is_available()


def _cuda_toolchain_problem() -> str:
    """Why CUDA sources cannot be compiled here ("" when they can): torch without CUDA, or no CUDA toolkit."""
    from torch.utils import cpp_extension

    if torch.version.cuda is None:
        return "torch was built without CUDA"
    if cpp_extension.CUDA_HOME is None:
        return "no CUDA toolkit found (set CUDA_HOME, or put nvcc on PATH)"
    return ""


def _cuda_build_possible() -> bool:
    return _cuda_runtime_available() and not _cuda_toolchain_problem()


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


def _sources_digest():  # -> a hashlib sha256 object
    """A sha256 over every C++/CUDA source and header under SOURCE_DIR (their relative paths and contents)."""
    digest = hashlib.sha256()
    for path in sorted(p for p in SOURCE_DIR.rglob("*") if p.suffix in (".cpp", ".h", ".cu", ".cuh")):
        digest.update(path.relative_to(SOURCE_DIR).as_posix().encode() + b"\0" + path.read_bytes())
    return digest


def _build_and_load(name: str, what: str, sources: list[Path], with_cuda: bool,
                    extra_ldflags: Optional[list[str]] = None) -> str:
    """Build ``name`` from ``sources`` into ``cache_dir()/name`` (or reuse that build), load it with
    torch.ops.load_library and return the shared library's path. A file lock makes concurrent processes wait."""
    from torch.utils import cpp_extension

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
        logger.warning("fastdiff: building %s into %s (once; takes a minute or more)", what, build_dir)
        cpp_extension.load(
            name=name,
            sources=[str(s) for s in sources],
            extra_cflags=cxx_flags(with_cuda),
            extra_cuda_cflags=nvcc_flags() if with_cuda else None,
            extra_ldflags=openmp_flags() + (extra_ldflags or []),
            extra_include_paths=[str(SOURCE_DIR)],
            build_directory=str(build_dir),
            with_cuda=with_cuda,
            is_python_module=False,
            verbose=os.environ.get("FASTDIFF_VERBOSE_BUILD", "0") == "1",
        )
    return str(library)


def _jit_build(with_cuda: Optional[bool] = None) -> str:
    """Build (or reuse) the extension from SOURCE_DIR, load it, and return the shared library's path.

    ``with_cuda``: include the CUDA sources (default: where :func:`_cuda_build_possible`)."""
    sources = cpu_sources()
    if not (SOURCE_DIR / "ops.cpp").is_file():
        raise RuntimeError(f"the C++ sources are not installed (looked in {SOURCE_DIR})")
    if with_cuda is None:
        with_cuda = _cuda_build_possible()
    if with_cuda:
        sources += cuda_sources()
    digest = _sources_digest()
    digest.update(repr((torch.__version__, sys.version, with_cuda, cxx_flags(with_cuda),
                        nvcc_flags() if with_cuda else None)).encode())
    return _build_and_load(f"fastdiff_C_{digest.hexdigest()[:16]}",
                           "the native extension (vq_nearest, rows_matmul, group_norm_silu)", sources, with_cuda)


def _jit_build_cuda(base_library: str) -> str:
    """Build (or reuse) the CUDA kernels alone (:func:`cuda_sources`: the binding and the .cu files) as a library
    linked against ``base_library``, the loaded extension that defines the ops and ``check_vq_inputs``; load it (it
    registers the CUDA implementation of ``fastdiff::vq_nearest``) and return its path. Raises on any failure."""
    problem = _cuda_toolchain_problem()
    if problem:
        raise RuntimeError(problem)
    sources = cuda_sources()
    if not any(p.suffix == ".cu" for p in sources):
        raise RuntimeError(f"the CUDA sources are not installed (looked in {SOURCE_DIR})")
    base = Path(base_library).resolve()
    stat = base.stat()
    digest = _sources_digest()
    digest.update(repr((torch.__version__, sys.version, cxx_flags(True), nvcc_flags(), str(base), stat.st_size,
                        stat.st_mtime_ns)).encode())
    # The base library as a link input: DT_NEEDED names it, so the loader reuses the copy already in the process
    # (same file) and resolves fastdiff::check_vq_inputs from it although Python loaded it RTLD_LOCAL.
    return _build_and_load(f"fastdiff_C_cuda_{digest.hexdigest()[:16]}", "the CUDA kernels of the native extension",
                           sources, True, extra_ldflags=[str(base)])


def _register_fake() -> None:
    """The fake (meta) implementations: output shapes and dtypes only, for FakeTensor, torch.compile and opcheck."""
    global _fake_registered
    if _fake_registered:
        return

    @torch.library.register_fake(OP)
    def _(z: Tensor, codebook: Tensor) -> tuple[Tensor, Tensor]:
        n = z.shape[0]
        return z.new_empty((n,), dtype=torch.int64), z.new_empty((n,), dtype=torch.float32)

    if hasattr(torch.ops.fastdiff, "rows_matmul"):

        @torch.library.register_fake("fastdiff::rows_matmul")
        def _(x: Tensor, weight: Tensor) -> Tensor:  # the checks of csrc/rows_matmul_cpu.cpp, same exception types
            torch._check_value(x.dim() == 2, lambda: f"rows_matmul: x must be 2-D (R, K), got {x.dim()}-D")
            torch._check_value(weight.dim() == 2,
                               lambda: f"rows_matmul: weight must be 2-D (N, K), got {weight.dim()}-D")
            torch._check_type(x.dtype == torch.float32 and weight.dtype == torch.float32,
                              lambda: f"rows_matmul: x and weight must be float32, got {x.dtype} and {weight.dtype}")
            torch._check_value(x.shape[1] == weight.shape[1], lambda: "rows_matmul: x (R, K) and weight (N, K) must "
                               f"share K, got {tuple(x.shape)} and {tuple(weight.shape)}")
            return x.new_empty((x.shape[0], weight.shape[0]))

    if hasattr(torch.ops.fastdiff, "group_norm_silu_native"):

        @torch.library.register_fake("fastdiff::group_norm_silu_native")
        def _(x: Tensor, num_groups: int, weight: Optional[Tensor], bias: Optional[Tensor], eps: float,
              silu: bool) -> Tensor:
            return torch.empty_like(x)

    if hasattr(torch.ops.fastdiff, "conv3x3_winograd_native"):

        @torch.library.register_fake("fastdiff::conv3x3_winograd_native")
        def _(x: Tensor, u: Tensor, bias: Optional[Tensor], tile: int) -> Tensor:
            n, _, h, w = x.shape
            return torch.empty((n, u.shape[2], h, w), dtype=x.dtype, device=x.device,
                               memory_format=torch.channels_last)

    _fake_registered = True


def _import_prebuilt() -> str:
    """Import ``fastdiff._C`` (the setup.py build) and return its file; raises whatever the import raises."""
    return importlib.import_module("fastdiff._C").__file__


def _has_dispatch_kernel(op: str, key: str) -> bool:
    return hasattr(torch.ops.fastdiff, op) and torch._C._dispatch_has_kernel_for_dispatch_key(f"fastdiff::{op}", key)


def _refresh_kernels() -> None:
    for op in OPS:
        for device_type, key in (("cpu", "CPU"), ("cuda", "CUDA")):
            _kernels[op, device_type] = _has_dispatch_kernel(op, key)


def _short(exc: BaseException, limit: int = 1500) -> str:
    """``Type: message``, its middle cut where longer than ``limit`` (a compiler's output can be very long)."""
    text = f"{type(exc).__name__}: {exc}"
    return text if len(text) <= limit else f"{text[:limit // 3]} [...] {text[-(2 * limit) // 3:]}"


def _cuda_failed(why: str, level: int = logging.WARNING) -> None:
    """Record (for status()) and log, once per process, why the CUDA kernels are missing."""
    global _cuda_jit
    _cuda_jit = why
    logger.log(level, "fastdiff: the native extension has no CUDA kernels: %s; fastdiff.ops.vq_nearest on CUDA "
               "tensors runs the PyTorch reference", why)


def _ensure_cuda_kernels() -> None:
    """Where CUDA is usable but the loaded extension has no CUDA kernel for vq_nearest, build and load the CUDA
    sources just in time (once per process: a failure is recorded and not retried)."""
    global _cuda_jit
    if _cuda_jit is not None or _kernels.get(("vq_nearest", "cuda"), False) or not _cuda_runtime_available():
        return
    if os.environ.get("FASTDIFF_NO_JIT", "0") == "1":
        _cuda_jit = "none (the loaded extension has none; FASTDIFF_NO_JIT=1)"
        return
    problem = _cuda_toolchain_problem()
    if problem:  # nothing to attempt: said once, quietly (the first CUDA call warns, quoting status())
        _cuda_failed(f"no just-in-time CUDA build possible: {problem}", logging.INFO)
        return
    logger.info("fastdiff: %s has no CUDA kernels but CUDA is available: building them just in time", _origin)
    try:
        library = _jit_build_cuda(_library)
    except Exception as exc:  # a compile or link error, no ninja, a load error...
        _cuda_failed(f"just-in-time CUDA build failed: {_short(exc)}")
        return
    _refresh_kernels()
    if not _kernels.get(("vq_nearest", "cuda"), False):
        _cuda_failed(f"just-in-time CUDA build {library} registered no CUDA kernel for fastdiff::vq_nearest")
        return
    _cuda_jit = f"jit {library}"
    logger.info("fastdiff: CUDA kernels loaded from %s", library)


def _try_load() -> bool:
    global _origin, _error, _library
    cpu_isa()  # a bad FASTDIFF_CPU_ISA raises here, before anything runs with it
    if os.environ.get("FASTDIFF_NATIVE", "1") == "0":
        _error = "disabled by FASTDIFF_NATIVE=0"
        return False
    try:
        _library = _import_prebuilt()
        _origin = f"prebuilt {_library}"
    except Exception as prebuilt_exc:  # ImportError, or an extension built for another torch (undefined symbol)
        prebuilt = f"{type(prebuilt_exc).__name__}: {prebuilt_exc}"
        if os.environ.get("FASTDIFF_NO_JIT", "0") == "1":
            _error = f"fastdiff._C not importable ({prebuilt}) and FASTDIFF_NO_JIT=1"
            return False
        with_cuda = _cuda_build_possible()
        try:
            _library = _jit_build(with_cuda)
        except Exception as exc:  # no compiler, no ninja, no sources, a compile error...
            if not with_cuda:
                _error = f"fastdiff._C not importable ({prebuilt}); JIT build failed: {_short(exc)}"
                return False
            # The CUDA part may be what failed: the C++ part alone still gives the CPU kernels.
            _cuda_failed(f"just-in-time build with CUDA failed: {_short(exc)}")
            try:
                _library = _jit_build(False)
            except Exception as cpu_exc:
                _error = (f"fastdiff._C not importable ({prebuilt}); JIT build failed with CUDA ({_short(exc)}) "
                          f"and without ({_short(cpu_exc)})")
                return False
        _origin = f"jit {_library}"
    if not hasattr(torch.ops.fastdiff, "vq_nearest"):
        _error = f"{_origin} loaded but registered no fastdiff::vq_nearest"
        return False
    _register_fake()
    _refresh_kernels()
    _ensure_cuda_kernels()
    return True


def load() -> bool:
    """Load (building if needed) the extension once per process; True when ``torch.ops.fastdiff.vq_nearest`` exists.
    Raises ValueError (and loads nothing) while ``FASTDIFF_CPU_ISA`` has a value :func:`cpu_isa` rejects.

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


def has_kernel(op: str, device_type: str) -> bool:
    """True when the extension (loaded first if need be) has a kernel for ``torch.ops.fastdiff.<op>`` on
    ``device_type`` ("cpu" or "cuda"). After the first call it only reads a dict (torch.compile traces through)."""
    return load() and _kernels.get((op, device_type), False)


def has_rows_matmul() -> bool:
    """True when ``torch.ops.fastdiff.rows_matmul`` (the batch-invariant CPU GEMM) can run here (loads first)."""
    return has_kernel("rows_matmul", "cpu")


def error() -> str:
    """Why the extension could not be loaded ("" when it was, or was not tried yet)."""
    return _error


# --------------------------------------------------------------------------------------------- reporting
def status() -> str:
    """One line on the extension: where it came from and what it runs (for ``fastdiff.info()``)."""
    if _loaded is None:
        return "not loaded yet (loads on the first native op call)"
    if not _loaded:
        return f"unavailable: {_error}"
    line = f"{_origin} ({torch.ops.fastdiff._native_info()})"
    return f"{line}; CUDA kernels: {_cuda_jit}" if _cuda_jit else line
