"""Batch-invariant execution: row i of a batched forward pass gives the same bits whatever the batch around it.

A float32 model is not batch-invariant by default: BLAS and oneDNN choose their kernels (and with them the order of
every sum) by tensor shape, thread count and even memory alignment, so the same image computed in a batch of 1, 2 or
256 can differ in the last bits. Measured on CPU: ``F.linear`` with 2-D inputs at every batch size; ``conv2d`` /
``conv_transpose2d`` at some small batch sizes; on an AVX-512 CPU without AMX, MKL's threaded SGEMM for a batch of one
(7 × 12) @ (12 × 32) cross-attention product sums in another order than the batched GEMM that computes the same row
in a larger batch; and MKL's batched GEMM gives a row other bits at other positions in the batch when the rows of its
output are not 64-byte aligned. Inside :func:`batch_invariant`:

- ``linear``, ``matmul`` / ``@`` with a 2-D right operand, ``mm`` and ``bmm`` run on fastdiff's own CPU GEMM
  (``torch.ops.fastdiff.rows_matmul``, in the native extension): every output element is one chain of fused
  multiply-adds in increasing k, so no batch size, row position, alignment, thread count or micro-kernel (AVX-512,
  AVX2, portable — ``FASTDIFF_CPU_ISA``) changes a row's bits. On the five ``F.linear`` shapes of
  ``benchmarks/test_bench_rows_matmul.py`` it took 0.76–1.03× the time of ``F.linear`` (MKL; 2-core AMD EPYC,
  2026-12-04); ``bmm`` (one call per batch entry) and other shapes were not measured.
  Without the extension (or for other dtypes, devices, or when autograd needs gradients) the mode falls back to
  BLAS with a shape that does not depend on the batch (chunks of :data:`CHUNK` rows), which is invariant only where
  BLAS's result does not depend on alignment. ``dispatch.counts()`` counts each routed product as
  ``("rows_matmul", "native")`` or ``("rows_matmul", "torch")`` (the fallback);
- ``conv2d`` / ``conv_transpose2d`` with a 4-D input: the batch is cut into chunks of :data:`CHUNK` rows (the last
  chunk padded with copies of its last row, which are dropped), so every convolution call has the same shape.

Arguments may be given by position or by torch's keyword names (``input=``, ``weight=``, ``other=``, ``mat2=``...).
A call the mode does not handle goes to torch unchanged, so torch's own result or error comes out: ``out=``, operands
of other shapes (1-D, mismatched inner sizes, ``mm`` of a 3-D tensor...), empty operands (K = 0 included), mixed
dtypes or devices. Under autocast (``torch.is_autocast_enabled`` for the operands' device) the matrix products also
go to torch, so autocast picks their dtype as it would outside the mode: they are then not batch-invariant (logged
once); convolutions are still chunked, each chunk under autocast.

The other ops fastdiff's models use (group norm, softmax attention per (batch, head), element-wise maths, the
samplers' updates) already compute each row on its own. ``fastdiff generate`` uses this mode on the CPU so the files
it writes do not depend on ``--batch``, on the thread count or on the number of ranks. Tested: the forward passes of
four small models give sub-batches of 1, 2, 3, 5, 16 and 17 rows the bits of a batch of 21, at 1 and 2 threads
(``tests/test_batch_invariance.py``); ``fastdiff generate`` writes byte-identical files at ``--batch`` 1, 3, 4 and 10
and with 2 processes at ``--batch`` 3 (1 thread, ``tests/test_generate.py``), and at ``--batch`` 1 (1 thread), 5 and
12 (2 threads) and 2 processes at ``--batch`` 5 under each of the six ISA-cap rows of ``tests/test_isa_matrix.py``
that the test machine can run. What changes the bits is the code path: :func:`cpu_code_path` says what fastdiff
knows of it (``fastdiff generate`` records it in its manifest). On CUDA the mode is off by default: the same
construction applies, but cuBLAS and cuDNN heuristics have not been checked for invariance there, and chunked
convolutions cost throughput on a GPU.

Cost: the Python dispatch of a ``TorchFunctionMode``, one convolution call per chunk and the padded last chunk.
Measured on the quiet 2-core AMD EPYC (AVX-512, no AMX; 96 digits-ddpm images, 5 DDIM steps, guidance 2, median
of 3, 2026-12-04): 0.97 s plain, 1.22 s in this mode (1.26×). With chunks of 32 the convolution cost shrinks, but a
batch of 1 then costs 32 rows.
The checks are in ``tests/test_batch_invariance.py``, ``tests/test_generate.py`` and ``tests/test_isa_matrix.py``.
"""

from __future__ import annotations

import contextlib
import functools
import os
import platform
import re

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from fastdiff import dispatch, native

__all__ = ["CHUNK", "batch_invariant", "cpu_code_path"]

CHUNK = 16  # rows per convolution (and fallback GEMM) call inside batch_invariant()


def _chunked(func, tensors: tuple, args: tuple = (), kwargs: dict | None = None) -> torch.Tensor:
    """func(*tensors, *args, **kwargs) computed CHUNK rows (of dim 0) at a time, every call padded to CHUNK rows.

    All ``tensors`` share dim 0 (at least one row) and are cut alike; the pad rows repeat each chunk's last row and
    are dropped.
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
        native.cpu_isa()  # FASTDIFF_CPU_ISA may have changed since the extension loaded: checked before each call
        return True
    dispatch.warn_once("batch-invariant-gemm", "fastdiff: batch_invariant() without the native extension "
                       f"({native.status()}): matrix products fall back to BLAS in fixed-shape chunks, batch-invariant "
                       "only where BLAS ignores memory alignment")
    return False


def _rows_matmul(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x (B, *, in) @ weight (out, in)ᵀ → (B, *, out), each row of x on its own (see the module docstring).

    The caller has checked the shapes: x has at least 2 dims and one element, ``in`` > 0, weight is (out > 0, in).
    """
    k = x.shape[-1]
    if _native_ok(x, weight):
        dispatch.record("rows_matmul", "native")
        y = torch.ops.fastdiff.rows_matmul(x.reshape(-1, k), weight)
    else:  # one fixed-shape (CHUNK, tokens, in) @ (in, out) batched GEMM per chunk of rows
        dispatch.record("rows_matmul", "torch")
        rows = x.reshape(x.shape[0], -1, k)
        y = _chunked(torch.bmm, (rows,), (weight.t().unsqueeze(0).expand(CHUNK, -1, -1),))
    return y.reshape(*x.shape[:-1], weight.shape[0])


def _bmm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    if _native_ok(a, b):
        dispatch.record("rows_matmul", "native")
        return torch.stack([torch.ops.fastdiff.rows_matmul(a[i], b[i].t()) for i in range(a.shape[0])])
    dispatch.record("rows_matmul", "torch")
    return _chunked(torch.bmm, (a, b))


# The calls the mode routes, with the parameter names torch gives them (keyword forms are accepted under these names;
# anything else, e.g. ``out=``, goes to torch unchanged).
_LINEAR = ("input", "weight", "bias")
_MATMULS = {torch.matmul: ("input", "other"), torch.Tensor.matmul: ("self", "other"),
            torch.Tensor.__matmul__: ("self", "other")}  # a 2-D right operand: rows_matmul
_MMS = {torch.mm: ("input", "mat2"), torch.Tensor.mm: ("self", "mat2")}
_BMMS = {torch.bmm: ("input", "mat2"), torch.Tensor.bmm: ("self", "mat2")}
_CONVS = {F.conv2d, F.conv_transpose2d}


def _bind(args: tuple, kwargs: dict, names: tuple) -> dict | None:
    """The call's arguments by parameter name, or None if it has any other (or a repeated) argument."""
    if len(args) > len(names):
        return None
    bound = dict(zip(names, args))
    for key, value in kwargs.items():
        if key not in names or key in bound:
            return None
        bound[key] = value
    return bound


def _operands(bound: dict | None, first: str, second: str) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The two tensor operands of a product, when they can take the mode's path: same dtype and device, no empty
    operand (so K > 0), and autocast off for their device (autocast picks its own dtype: torch runs the call)."""
    if bound is None or set(bound) != {first, second}:
        return None
    a, b = bound[first], bound[second]
    if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
        return None
    if a.dtype != b.dtype or a.device != b.device or a.numel() == 0 or b.numel() == 0:
        return None
    if _autocast(a):
        return None
    return a, b


def _autocast(t: torch.Tensor) -> bool:
    """Autocast is on for ``t``'s device: the mode leaves the matrix products to torch (and says so once)."""
    try:
        on = torch.is_autocast_enabled(t.device.type)
    except RuntimeError:  # a device type autocast does not know (meta, ...)
        return False
    if on:
        dispatch.warn_once(f"batch-invariant-autocast-{t.device.type}", "fastdiff: batch_invariant() under autocast: "
                           "matrix products run as torch's autocast runs them, not batch-invariantly")
    return on


def _route_gemm(func, args: tuple, kwargs: dict):
    """The mode's product for this call, or NotImplemented when torch should run it as it is (then any error is
    torch's own)."""
    if func is F.linear:
        bound = _bind(args, kwargs, _LINEAR)
        bias = None if bound is None else bound.pop("bias", None)
        ops = _operands(bound, "input", "weight")
        if ops is None:
            return NotImplemented
        x, weight = ops
        if x.ndim < 2 or weight.ndim != 2 or x.shape[-1] != weight.shape[1]:
            return NotImplemented
        if bias is not None and not (isinstance(bias, torch.Tensor) and bias.shape == (weight.shape[0],)
                                     and bias.dtype == x.dtype and bias.device == x.device):
            return NotImplemented
        y = _rows_matmul(x, weight)
        return y + bias if bias is not None else y
    if func in _MATMULS or func in _MMS:
        names = _MATMULS.get(func) or _MMS[func]
        ops = _operands(_bind(args, kwargs, names), *names)
        if ops is None:
            return NotImplemented
        a, b = ops
        if b.ndim != 2 or a.ndim < 2 or (func in _MMS and a.ndim != 2) or a.shape[-1] != b.shape[0]:
            return NotImplemented
        return _rows_matmul(a, b.t())
    if func in _BMMS:
        ops = _operands(_bind(args, kwargs, _BMMS[func]), *_BMMS[func])
        if ops is None:
            return NotImplemented
        a, b = ops
        if a.ndim != 3 or b.ndim != 3 or a.shape[0] != b.shape[0] or a.shape[2] != b.shape[1]:
            return NotImplemented
        return _bmm(a, b)
    return NotImplemented


def _route_conv(func, args: tuple, kwargs: dict):
    """The convolution in chunks of CHUNK rows (input given by position or as ``input=``), or NotImplemented."""
    if args:
        x, call, rest = args[0], functools.partial(func, **kwargs), args[1:]
    elif "input" in kwargs:
        others = {k: v for k, v in kwargs.items() if k != "input"}
        x, call, rest = kwargs["input"], (lambda part: func(input=part, **others)), ()
    else:
        return NotImplemented
    if not (isinstance(x, torch.Tensor) and x.ndim == 4 and x.shape[0] > 0):
        return NotImplemented
    return _chunked(call, (x,), rest)


class _BatchInvariantMode(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _CONVS:
            out = _route_conv(func, args, kwargs)
        else:
            out = _route_gemm(func, args, kwargs)
        return func(*args, **kwargs) if out is NotImplemented else out


# --------------------------------------------------------------------------------------------- the CPU code path
# oneDNN's x86 ISAs (the ONEDNN_MAX_CPU_ISA values of oneDNN's "CPU Dispatcher Control" page), lowest first. oneDNN
# documents a partial order: SSE41 < AVX < AVX2 < AVX2_VNNI < AVX2_VNNI_2; AVX2 < AVX512_CORE < AVX512_CORE_VNNI
# < AVX512_CORE_BF16 < AVX512_CORE_FP16 < AVX512_CORE_AMX < AVX512_CORE_AMX_FP16; AVX2_VNNI < AVX512_CORE_FP16.
# A cap admits the ISAs below or equal to it (_onednn_admits); the preview ISAs a cap can switch on are not modelled.
ONEDNN_ISAS = ("SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE", "AVX512_CORE_VNNI",
               "AVX512_CORE_BF16", "AVX512_CORE_FP16", "AVX512_CORE_AMX", "AVX512_CORE_AMX_FP16")
ONEDNN_ALIASES = {"AVX10_1_512": "AVX512_CORE_FP16", "AVX10_1_512_AMX": "AVX512_CORE_AMX",
                  "AVX10_1_512_AMX_FP16": "AVX512_CORE_AMX_FP16"}
_ONEDNN_NO_CAP = ("", "ALL", "DEFAULT")
# ISA: (the ISA it extends, what this CPU needs on top): "torch:x" is torch.cpu._is_x_supported(), as torch sees it
# (AMX only where the OS grants the tile state); other names are Linux /proc/cpuinfo flags
_ONEDNN_CPU = {
    "SSE41": (None, ("sse4_1",)),
    "AVX": ("SSE41", ("avx",)),
    "AVX2": ("AVX", ("torch:avx2",)),
    "AVX2_VNNI": ("AVX2", ("avx_vnni",)),
    "AVX2_VNNI_2": ("AVX2_VNNI", ("avx_vnni_int8", "avx_ne_convert")),
    "AVX512_CORE": ("AVX2", ("torch:avx512",)),
    "AVX512_CORE_VNNI": ("AVX512_CORE", ("torch:vnni",)),
    "AVX512_CORE_BF16": ("AVX512_CORE_VNNI", ("torch:avx512_bf16",)),
    "AVX512_CORE_FP16": ("AVX512_CORE_BF16", ("avx512_fp16",)),
    "AVX512_CORE_AMX": ("AVX512_CORE_FP16", ("torch:amx_tile",)),
    "AVX512_CORE_AMX_FP16": ("AVX512_CORE_AMX", ("torch:amx_fp16",)),
}
_ONEDNN_ALSO_BELOW = {"AVX512_CORE_FP16": ("AVX2_VNNI",)}  # the one order edge that is not "extends"


def _onednn_admits(cap: str) -> set:
    """The ISAs a cap of this (modelled) name admits: itself and everything below it."""
    below, todo = set(), [cap]
    while todo:
        isa = todo.pop()
        if isa and isa not in below:
            below.add(isa)
            todo += [_ONEDNN_CPU[isa][0], *_ONEDNN_ALSO_BELOW.get(isa, ())]
    return below


@functools.lru_cache(maxsize=1)
def _cpuinfo_flags() -> frozenset | None:
    """The CPU flags Linux reports (/proc/cpuinfo), or None where there is no such file."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as handle:
            for line in handle:
                if line.startswith("flags"):
                    return frozenset(line.partition(":")[2].split())
    except OSError:
        pass
    return None


def _cpu_has(feature: str, flags: frozenset | None) -> bool | None:
    if feature.startswith("torch:"):
        return bool(getattr(torch.cpu, f"_is_{feature[6:]}_supported")())
    if flags is None:  # no /proc/cpuinfo: SSE4.1 and AVX come with AVX2, anything else is not known
        return True if feature in ("sse4_1", "avx") and torch.cpu._is_avx2_supported() else None
    return feature in flags


def _onednn_has(isa: str, flags: frozenset | None) -> bool | None:
    """This CPU has ``isa`` as oneDNN checks it (False / True / None: not known here)."""
    base, needs = _ONEDNN_CPU[isa]
    answers = [_onednn_has(base, flags) if base else True] + [_cpu_has(f, flags) for f in needs]
    if False in answers:
        return False
    return None if None in answers else True


def _onednn_isa() -> str:
    """oneDNN's ISA here, as fastdiff models it: the highest ISA this CPU has that ONEDNN_MAX_CPU_ISA (or
    DNNL_MAX_CPU_ISA) admits. Not oneDNN's own report (torch does not expose it); what the model does not know is
    named in the value: a cap it does not model, verbatim, and ISAs whose CPU flags cannot be read here. The cap is
    read from the environment now; oneDNN reads it once, at its first use in the process."""
    if not torch.backends.mkldnn.is_available():
        return "unavailable"
    if not torch.backends.mkldnn.enabled:
        return "disabled (torch.backends.mkldnn.enabled = False)"
    var = "ONEDNN_MAX_CPU_ISA" if os.environ.get("ONEDNN_MAX_CPU_ISA") else "DNNL_MAX_CPU_ISA"
    raw = os.environ.get(var) or ""
    cap = raw.strip().upper()
    cap = ONEDNN_ALIASES.get(cap, cap)
    machine = platform.machine()
    if machine.lower() not in ("x86_64", "amd64"):
        return f"not modelled on {machine}" + ("" if cap in _ONEDNN_NO_CAP else f", {var}={raw}")
    modelled = cap in ONEDNN_ISAS
    admitted = _onednn_admits(cap) if modelled else set(ONEDNN_ISAS)
    flags = _cpuinfo_flags()
    best, unknown = "SSE41", []
    for isa in ONEDNN_ISAS:
        if isa in admitted:
            has = _onednn_has(isa, flags)
            if has:
                best = isa
            elif has is None:
                unknown.append(isa)
    if not modelled and cap not in _ONEDNN_NO_CAP:  # a preview ISA, an old name, a typo...
        best = f"{best}, {var}={raw} (not modelled)"
    if unknown:
        best = f"{best} (not known here: {', '.join(unknown)})"
    return best


def _aten_isa() -> str:
    """ATen's vector ISA as ATen reports it; an ATEN_CPU_CAPABILITY that did not come out as that ISA (ATen ignores
    values it does not know, and compares them case-sensitively) is appended verbatim."""
    isa = torch.backends.cpu.get_cpu_capability()
    raw = os.environ.get("ATEN_CPU_CAPABILITY")
    return isa if raw is None or raw == isa.lower() else f"{isa}, ATEN_CPU_CAPABILITY={raw}"


@functools.lru_cache(maxsize=1)
def _mkl_version() -> str:
    if not torch.backends.mkl.is_available():
        return "unavailable"
    found = re.search(r"Math Kernel Library Version (.+?) for ", torch.__config__.show())
    return found.group(1) if found else "available (version not reported)"


def _mkl() -> str:
    """torch's MKL build (MKL picks its own kernels by CPU; which ones is not reported), with any environment variable
    that changes its choice, verbatim."""
    settings = [f"{var}={os.environ[var]}" for var in ("MKL_ENABLE_INSTRUCTIONS", "MKL_CBWR", "MKL_DEBUG_CPU_TYPE")
                if os.environ.get(var)]
    return ", ".join([_mkl_version(), *settings])


# rows_matmul's micro-kernel for each level _native_info reports (csrc/rows_matmul_cpu.cpp: kernels_for)
_ROWS_MATMUL_KERNEL = {"amx": "avx512", "avx512": "avx512", "avx2": "avx2", "generic": "generic"}


def cpu_code_path() -> dict:
    """What fastdiff knows of the CPU code path of a batch-invariant run. Equal dicts should mean equal bytes; they
    do not prove it (MKL's and oneDNN's own kernel choices are modelled or named, not read back).

    - ``aten``: ATen's vector ISA (``torch.backends.cpu.get_cpu_capability()``), plus ATEN_CPU_CAPABILITY verbatim
      when that is set to anything but this ISA's name;
    - ``onednn``: oneDNN's ISA as fastdiff models it from the CPU's flags and ONEDNN_MAX_CPU_ISA (see
      :func:`_onednn_isa`): a cap it does not model is recorded verbatim, a flag it cannot read is named;
      "disabled" / "unavailable" when torch does not use oneDNN;
    - ``native``: the CPU level the native extension reports (``torch.ops.fastdiff._native_info``): the micro-kernel
      of ``vq_nearest`` (amx, avx512, avx2 or generic; capped by FASTDIFF_CPU_ISA), or "unavailable";
    - ``rows_matmul``: the micro-kernel the batch-invariant GEMM runs at that level (avx512, avx2 or generic:
      AMX runs avx512), or "unavailable" (the mode then uses BLAS in fixed-shape chunks);
    - ``mkl``: torch's MKL version (the BLAS behind every product the mode leaves to torch), with
      MKL_ENABLE_INSTRUCTIONS / MKL_CBWR / MKL_DEBUG_CPU_TYPE verbatim when set, or "unavailable";
    - ``torch``: the torch version; ``machine``: the CPU architecture.

    Raises ValueError for a FASTDIFF_CPU_ISA value the extension does not know (:func:`fastdiff.native.cpu_isa`).
    """
    native.cpu_isa()
    if native.load():
        native_isa = str(torch.ops.fastdiff._native_info()).split()[0].removeprefix("cpu=")
    else:
        native_isa = "unavailable"
    if native.has_rows_matmul():
        rows_matmul = _ROWS_MATMUL_KERNEL.get(native_isa, f"unknown (native {native_isa})")
    else:
        rows_matmul = "unavailable"
    return {
        "aten": _aten_isa(),
        "onednn": _onednn_isa(),
        "native": native_isa,
        "rows_matmul": rows_matmul,
        "mkl": _mkl(),
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
