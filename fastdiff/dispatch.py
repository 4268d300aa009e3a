"""The one place that decides which implementation an op runs (see DESIGN.md, "The dispatch rule").

| input                                            | path                                  |
|--------------------------------------------------|---------------------------------------|
| CUDA tensors                                     | ``triton``: compiled Triton kernels    |
| CPU tensors                                      | ``torch``: the reference PyTorch path; ``native``  |
|                                                  | for ``group_norm_silu`` where the extension has it |
| CPU tensors and ``TRITON_INTERPRET=1``           | ``interpreter``: the same Triton kernels through Triton's interpreter |
| ``FASTDIFF_BACKEND=torch`` or ``backend="torch"`` | ``torch`` anywhere                     |
| autograd needs gradients                         | ``torch`` (the public op calls the reference directly) |
| Triton unavailable                               | ``torch``, one log line, never an error |
| ``conv3x3`` (no Triton kernel)                   | ``native`` (Winograd, :func:`fastdiff.ops.conv3x3`) on  |
|                                                  | CPU tensors where the extension has it; ``torch``       |
|                                                  | (cuDNN / oneDNN) elsewhere, no log line                 |
| ``vq_nearest`` (a native op, no Triton kernel)    | ``native`` where the extension has a kernel for the     |
|                                                  | device, else ``torch`` (one log line)  |
| linear / matmul / mm / bmm inside                | ``native`` (``rows_matmul``) for fp32 CPU tensors, else |
| :func:`fastdiff.batch_invariant`                 | ``torch`` (BLAS in fixed-shape chunks); counted as the |
|                                                  | op ``rows_matmul`` (:func:`counts`)    |

``backend="triton"`` forces the Triton kernels (compiled on CUDA, interpreted on CPU) and ``backend="native"`` the
extension (:mod:`fastdiff.native` loads it and says which kernels it has); both raise if they cannot run. An op
without a native kernel for the device takes ``torch`` under ``backend="native"``.

Everything here is cheap (an environment lookup and a cached import check), so it runs on every call.
"""

from __future__ import annotations

import collections
import functools
import importlib
import logging
import os
import threading

import torch

logger = logging.getLogger("fastdiff")

BACKENDS = ("auto", "torch", "triton", "native")
TRITON_OPS = ("group_norm_silu", "attention", "ddim_step", "ddpm_step", "linear_step")
NATIVE_OPS = ("vq_nearest",)  # ops whose fast path is the native extension (fastdiff._C)
# Ops without a Triton kernel whose CPU fast path is a native kernel (the extension's operator name); elsewhere torch's
# own kernel (cuDNN, oneDNN) is the fast path.
CPU_NATIVE_OPS = {"conv3x3": "conv3x3_winograd_native"}
# Triton ops whose CPU path is a native kernel (the extension's operator name), where the extension has it.
NATIVE_CPU_KERNELS = {"group_norm_silu": "group_norm_silu_native"}

_lock = threading.Lock()
_triton_checked: bool | None = None
_triton_error: str | None = None
_warned: set[str] = set()
_counts: collections.Counter = collections.Counter()


def interpret_enabled() -> bool:
    """True when Triton's interpreter is requested (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def env_backend() -> str:
    """The backend forced by ``FASTDIFF_BACKEND`` ("auto" when unset)."""
    value = os.environ.get("FASTDIFF_BACKEND", "auto").strip().lower() or "auto"
    if value not in BACKENDS:
        raise ValueError(f"FASTDIFF_BACKEND must be one of {BACKENDS}, got {value!r}")
    return value


def check_backend(backend: str | None) -> str:
    """Validate a ``backend=`` argument; None means "auto"."""
    if backend is None:
        return "auto"
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} or None, got {backend!r}")
    return backend


def triton_available() -> bool:
    """Whether ``import triton`` works here (checked once, then cached)."""
    global _triton_checked, _triton_error
    if _triton_checked is None:
        with _lock:
            if _triton_checked is None:
                try:
                    importlib.import_module("triton")
                    _triton_checked = True
                except Exception as exc:  # ImportError, or a broken install
                    _triton_error = f"{type(exc).__name__}: {exc}"
                    _triton_checked = False
    return bool(_triton_checked)


def warn_once(key: str, message: str) -> None:
    """Log ``message`` once per process for ``key``."""
    if key not in _warned:
        _warned.add(key)
        logger.warning(message)


def _select_native(op: str, device: torch.device, backend: str, kernel: str | None = None) -> str:
    """"native" where the extension has ``kernel`` (default: ``op``) for ``device``; else "torch" after one warning,
    or RuntimeError under ``backend="native"``."""
    from fastdiff import native

    if backend == "torch":
        return "torch"
    if native.has_kernel(kernel or op, device.type):
        return "native"
    why = native.error() or f"the extension has no {device.type} kernel ({native.status()})"
    if backend == "native":
        raise RuntimeError(f"fastdiff: backend='native' requested for {op} but it cannot run here: {why}")
    warn_once(f"native-{op}-{device.type}", f"fastdiff: native {op} unavailable ({why}); using the PyTorch reference")
    return "torch"


def select(op: str, device: torch.device, backend: str = "auto") -> str:
    """Return the path ``op`` takes for tensors on ``device``: "triton", "interpreter", "native" or "torch".

    Raises RuntimeError when ``backend="triton"`` / ``"native"`` is forced but that path cannot run here.
    """
    if backend == "auto":
        backend = env_backend()
    if op in NATIVE_OPS:
        return _select_native(op, device, backend)
    if op in CPU_NATIVE_OPS:
        if device.type != "cpu" or backend in ("torch", "triton"):
            return "torch"
        return _select_native(op, device, backend, CPU_NATIVE_OPS[op])
    native_cpu = NATIVE_CPU_KERNELS.get(op) if device.type == "cpu" else None
    if backend == "native":
        return _select_native(op, device, backend, native_cpu) if native_cpu else "torch"
    if backend == "torch":
        return "torch"
    on_cuda = device.type == "cuda"
    can_triton = triton_available() and (on_cuda or (device.type == "cpu" and interpret_enabled()))
    if backend == "triton":
        if not can_triton:
            why = _triton_error if not triton_available() else (
                f"tensors on {device.type} need CUDA or TRITON_INTERPRET=1 (set before fastdiff imports its kernels)"
            )
            raise RuntimeError(f"fastdiff: backend='triton' requested for {op} but Triton cannot run here: {why}")
        return "triton" if on_cuda else "interpreter"
    # auto
    if can_triton:
        return "triton" if on_cuda else "interpreter"
    if on_cuda and not triton_available():
        warn_once("triton-missing", f"fastdiff: Triton is not available ({_triton_error}); using the PyTorch reference")
    if native_cpu:
        return _select_native(op, device, backend, native_cpu)
    return "torch"


@functools.cache
def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes in bf16 natively (AVX512_BF16 or AMX-BF16 in /proc/cpuinfo's flags), so that
    oneDNN's bf16 convolutions and matmuls run at twice the fp32 rate or more. False where that cannot be read
    (not Linux): bf16 emulated on older AVX-512 is slower than fp32, so "auto" only picks it where it is native."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as handle:
            for line in handle:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"avx512_bf16", "amx_bf16"})
    except OSError:
        pass
    return False


def auto_dtype(device_type: str) -> torch.dtype | None:
    """What ``dtype="auto"`` (``--dtype auto``) computes in on a ``device_type`` device: bf16 on a CPU with native
    bf16 (:func:`cpu_has_native_bf16`); None (the weights' own dtype) elsewhere, CUDA included."""
    return torch.bfloat16 if device_type == "cpu" and cpu_has_native_bf16() else None


def record(op: str, path: str) -> None:
    """Count one call of ``op`` on ``path`` (see :func:`counts`)."""
    _counts[(op, path)] += 1


def counts() -> dict[tuple[str, str], int]:
    """Calls per (op, path) since the last :func:`reset_counts`: shows which implementation really ran."""
    return dict(_counts)


def reset_counts() -> None:
    _counts.clear()


def load_kernels(family: str):
    """Import ``fastdiff.kernels.<family>`` (the Triton kernels); only called when the Triton path was chosen."""
    return importlib.import_module(f"fastdiff.kernels.{family}")


def info() -> dict:
    """Which path each op takes here, plus versions and devices (also ``fastdiff info``)."""
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    paths = {op: select(op, device) for op in TRITON_OPS + NATIVE_OPS + tuple(CPU_NATIVE_OPS)}
    from fastdiff import native

    triton_version = None
    if triton_available():
        triton_version = getattr(importlib.import_module("triton"), "__version__", "unknown")
    return {
        "ops": paths,
        "device": torch.cuda.get_device_name(0) if cuda else "cpu",
        "torch": torch.__version__,
        "triton": triton_version,
        "triton_interpret": interpret_enabled(),
        "backend_env": os.environ.get("FASTDIFF_BACKEND", "auto"),
        "native_extension": native.status(),
        "batch_invariant_gemm": "native rows_matmul" if native.has_rows_matmul() else "BLAS in fixed-shape chunks",
        "cpu_native_bf16": cpu_has_native_bf16(),
        "dtype_auto": str(auto_dtype(device.type) or "the weights' own (fp32)").replace("torch.", ""),
    }
