"""Batch-invariant execution: row i of a batched forward pass gives the same bits whatever the batch around it.

A float32 model is not batch-invariant by default: BLAS and oneDNN choose their kernels (and with them the order of
every sum) by tensor shape, thread count and even memory alignment, so the same image computed in a batch of 1, 2 or
256 can differ in the last bits. Measured on CPU: ``F.linear`` with 2-D inputs at every batch size; ``conv2d`` /
``conv_transpose2d`` at some small batch sizes; on an AVX-512 CPU without AMX, MKL's threaded SGEMM for a batch of one
(7 × 12) @ (12 × 32) cross-attention product sums in another order than the batched GEMM that computes the same row
in a larger batch; and MKL's batched GEMM gives a row other bits at other positions in the batch when the rows of its
output are not 64-byte aligned. Inside :func:`batch_invariant`:

- ``linear``, ``matmul`` / ``@`` / ``mm`` with a 2-D right operand, and ``bmm`` run on fastdiff's own CPU GEMM
  (``torch.ops.fastdiff.rows_matmul``, in the native extension): every output element is one chain of fused
  multiply-adds in increasing k, so no batch size, row position, alignment, thread count or micro-kernel (AVX-512,
  AVX2, portable — ``FASTDIFF_CPU_ISA``) changes a row's bits. It runs at about MKL's speed: 0.76–1.03× the time of
  ``F.linear`` on the five shapes of ``benchmarks/test_bench_rows_matmul.py`` (2-core AMD EPYC, 2026-12-04).
  Without the extension (or for other dtypes, devices, or when autograd needs gradients) the mode falls back to
  BLAS with a shape that does not depend on the batch (chunks of :data:`CHUNK` rows), which is invariant only where
  BLAS's result does not depend on alignment;
- ``conv2d`` / ``conv_transpose2d``: the batch is cut into chunks of :data:`CHUNK` rows (the last chunk padded with
  copies of its last row, which are dropped), so every convolution call has the same shape.

The other ops fastdiff's models use (group norm, softmax attention per (batch, head), element-wise maths, the
samplers' updates) already compute each row on its own. ``fastdiff generate`` uses this mode on the CPU so the files
it writes do not depend on ``--batch``, on the thread count or on the number of ranks (tested: byte-identical PNG/NPZ
files for batch 1, 3, 5, 8, 12 and 20, with 1 or 2 threads and 1 or 2 processes, under every ISA cap of ATen,
oneDNN and the native extension the test machine supports: ``tests/test_isa_matrix.py``). What changes the bits is
the code path: :func:`cpu_code_path` names it (``fastdiff generate`` records it in its manifest). On CUDA the mode
is off by default: the same construction applies, but cuBLAS and cuDNN heuristics have not been checked for
invariance there, and chunked convolutions cost throughput on a GPU.

Cost: the Python dispatch of a ``TorchFunctionMode``, one convolution call per chunk and the padded last chunk.
Measured on the quiet 2-core AMD EPYC (AVX-512, no AMX; 96 digits-ddpm images, 5 DDIM steps, guidance 2, median
of 3, 2026-12-04): 0.97 s plain, 1.22 s in this mode (1.26×). With chunks of 32 the convolution cost shrinks, but a
batch of 1 then costs 32 rows.
The checks are in ``tests/test_batch_invariance.py``, ``tests/test_generate.py`` and ``tests/test_isa_matrix.py``.
"""

from __future__ import annotations

import contextlib
import os
import platform

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from fastdiff import dispatch, native

__all__ = ["CHUNK", "batch_invariant", "cpu_code_path"]

CHUNK = 16  # rows per convolution (and fallback GEMM) call inside batch_invariant()

# oneDNN's x86 ISA levels, lowest first, as ONEDNN_MAX_CPU_ISA names them
ONEDNN_ISAS = ("SSE41", "AVX", "AVX2", "AVX512_CORE", "AVX512_CORE_VNNI", "AVX512_CORE_BF16", "AVX512_CORE_AMX")


def _chunked(func, tensors: tuple, args: tuple = (), kwargs: dict | None = None) -> torch.Tensor:
    """func(*tensors, *args, **kwargs) computed CHUNK rows (of dim 0) at a time, every call padded to CHUNK rows.

    All ``tensors`` share dim 0 and are cut alike; the pad rows repeat each chunk's last row and are dropped.
    """
    kwargs = kwargs or {}
    n = tensors[0].shape[0]
    outs = []
    for start in range(0, n, CHUNK):
        parts = [t[start:start + CHUNK] for t in tensors]
        rows = parts[0].shape[0]
        if rows < CHUNK:
            parts = [torch.cat([p, p[-1:].expand(CHUNK - rows, *p.shape[1:])]) for p in parts]
        outs.append(func(*parts, *args, **kwargs)[:rows])
    return outs[0] if len(outs) == 1 else torch.cat(outs)


def _native_ok(*tensors: torch.Tensor) -> bool:
    """fastdiff's own GEMM can compute this product: fp32 CPU tensors, no gradients needed, extension loaded."""
    if any(t.dtype != torch.float32 or t.device.type != "cpu" for t in tensors):
        return False
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return False
    if native.has_rows_matmul():
        return True
    dispatch.warn_once("batch-invariant-gemm", "fastdiff: batch_invariant() without the native extension "
                       f"({native.status()}): matrix products fall back to BLAS in fixed-shape chunks, batch-invariant "
                       "only where BLAS ignores memory alignment")
    return False


def _rows_matmul(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x (B, *, in) @ weight (out, in)ᵀ → (B, *, out), each row of x on its own (see the module docstring)."""
    k = x.shape[-1]
    if _native_ok(x, weight):
        y = torch.ops.fastdiff.rows_matmul(x.reshape(-1, k), weight)
    else:  # one fixed-shape (CHUNK, tokens, in) @ (in, out) batched GEMM per chunk of rows
        rows = x.reshape(x.shape[0], -1, k)
        y = _chunked(torch.bmm, (rows,), (weight.t().unsqueeze(0).expand(CHUNK, -1, -1),))
    return y.reshape(*x.shape[:-1], weight.shape[0])


def _bmm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    if _native_ok(a, b):
        return torch.stack([torch.ops.fastdiff.rows_matmul(a[i], b[i].t()) for i in range(a.shape[0])])
    return _chunked(torch.bmm, (a, b))


def _linear(x: torch.Tensor, weight: torch.Tensor, bias=None) -> torch.Tensor:
    if x.ndim < 2 or x.shape[0] == 0:
        return F.linear(x, weight, bias)
    y = _rows_matmul(x, weight)
    return y + bias if bias is not None else y


_MATMULS = {torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.mm, torch.Tensor.mm}
_BMMS = {torch.bmm, torch.Tensor.bmm}
_CONVS = {F.conv2d, F.conv_transpose2d}


def _tensor(t, ndim: int) -> bool:
    return isinstance(t, torch.Tensor) and t.ndim == ndim


class _BatchInvariantMode(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear:
            return _linear(*args, **kwargs)
        if not kwargs and len(args) == 2:
            a, b = args
            if (func in _MATMULS and isinstance(a, torch.Tensor) and a.ndim >= 2 and a.shape[0] > 0
                    and _tensor(b, 2) and a.dtype == b.dtype):
                return _rows_matmul(a, b.t())
            if (func in _BMMS and _tensor(a, 3) and _tensor(b, 3) and a.shape[0] == b.shape[0] > 0
                    and a.dtype == b.dtype):
                return _bmm(a, b)
        if func in _CONVS:
            x, rest = args[0], args[1:]
            if _tensor(x, 4) and x.shape[0] > 0:
                return _chunked(func, (x,), rest, kwargs)
        return func(*args, **kwargs)


def _onednn_isa() -> str:
    """oneDNN's ISA here: the best this CPU has, capped by ONEDNN_MAX_CPU_ISA (as oneDNN itself reads it)."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return "default"
    cpu = torch.cpu
    best = ("AVX512_CORE_AMX" if cpu._is_amx_tile_supported() else
            "AVX512_CORE_BF16" if cpu._is_avx512_bf16_supported() else
            "AVX512_CORE_VNNI" if cpu._is_avx512_supported() and cpu._is_vnni_supported() else
            "AVX512_CORE" if cpu._is_avx512_supported() else
            "AVX2" if cpu._is_avx2_supported() else "SSE41")
    cap = (os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA") or "").strip().upper()
    if cap in ONEDNN_ISAS and ONEDNN_ISAS.index(cap) < ONEDNN_ISAS.index(best):
        return cap
    return best


def cpu_code_path() -> dict:
    """The CPU code path that fixes the bits of a batch-invariant run: equal dicts, equal bytes.

    ``aten``: ATen's vector ISA (``torch.backends.cpu.get_cpu_capability()``, capped by ATEN_CPU_CAPABILITY);
    ``onednn``: oneDNN's ISA (capped by ONEDNN_MAX_CPU_ISA); ``native``: fastdiff's extension and its micro-kernel
    ISA (capped by FASTDIFF_CPU_ISA); ``torch``: the torch version; ``machine``: the CPU architecture.
    """
    if native.load():
        native_isa = str(torch.ops.fastdiff._native_info()).split()[0].removeprefix("cpu=")
    else:
        native_isa = "unavailable"
    return {
        "aten": torch.backends.cpu.get_cpu_capability(),
        "onednn": _onednn_isa(),
        "native": native_isa,
        "torch": torch.__version__,
        "machine": platform.machine(),
    }


@contextlib.contextmanager
def batch_invariant(enabled: bool = True):
    """Run the enclosed forward passes batch-invariantly (see the module docstring); ``enabled=False`` is a no-op.

    Example::

        with fastdiff.batch_invariant():
            images = pipe(batch_size=64, generator=[torch.Generator().manual_seed(i) for i in range(64)])
        # images[i] is bit-identical to the same row computed in a batch of any other size (CPU)
    """
    if not enabled:
        yield
        return
    with _BatchInvariantMode():
        yield
