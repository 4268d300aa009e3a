"""Batch-invariant execution: row i of a batched forward pass gives the same bits whatever the batch around it.

A float32 model is not batch-invariant by default: BLAS and oneDNN choose their kernels (and with them the order of
every sum) by tensor shape, so the same image computed in a batch of 1, 2 or 256 can differ in the last bits —
measured on CPU for ``F.linear`` with 2-D inputs at every batch size, and for ``conv2d`` / ``conv_transpose2d`` at
some small batch sizes. Inside :func:`batch_invariant` the three ops run with shapes that do not depend on the batch:

- ``linear``: one GEMM per batch row (``bmm`` of each row's (tokens, in) block with the shared weight), so every row's
  GEMM has the same shape whatever the batch;
- ``conv2d`` / ``conv_transpose2d``: the batch is cut into chunks of :data:`CHUNK` rows (the last chunk padded with
  copies of its last row, which are dropped), so every convolution call has the same shape.

The other ops fastdiff's models use (group norm, softmax attention per (batch, head), element-wise maths, the
samplers' updates) already compute each row on its own. ``fastdiff generate`` uses this mode on the CPU so the files
it writes do not depend on ``--batch`` or on the number of ranks (tested: byte-identical PNG/NPZ files for batch 1, 3,
8 and 20, with 1 or 2 processes). On CUDA it is off by default: the same construction applies, but cuBLAS and cuDNN
heuristics have not been checked for invariance there, and chunked convolutions cost throughput on a GPU.

Cost: the Python dispatch of a ``TorchFunctionMode``, one convolution call per chunk and the padded last chunk.
Measured on the 2-core CPU (96 digits-ddpm images, 5 DDIM steps, guidance 2, one run each, other work running):
1.5 s plain, 2.2 s in this mode; with chunks of 32 the cost shrank to a few percent but a batch of 1 costs 32 rows.
The checks are in ``tests/test_batch_invariance.py`` and ``tests/test_generate.py``.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

__all__ = ["CHUNK", "batch_invariant"]

CHUNK = 16  # rows per convolution call inside batch_invariant()


def _chunked(func, x: torch.Tensor, args: tuple, kwargs: dict) -> torch.Tensor:
    """func(x, *args, **kwargs) computed CHUNK rows at a time, the last chunk padded to CHUNK rows."""
    n = x.shape[0]
    outs = []
    for start in range(0, n, CHUNK):
        part = x[start:start + CHUNK]
        rows = part.shape[0]
        if rows < CHUNK:
            part = torch.cat([part, part[-1:].expand(CHUNK - rows, *part.shape[1:])])
        outs.append(func(part, *args, **kwargs)[:rows])
    return outs[0] if len(outs) == 1 else torch.cat(outs)


def _linear(x: torch.Tensor, weight: torch.Tensor, bias=None) -> torch.Tensor:
    if x.ndim < 2 or x.shape[0] == 0:
        return F.linear(x, weight, bias)
    b = x.shape[0]
    rows = x.reshape(b, -1, x.shape[-1])  # (B, tokens, in)
    y = torch.bmm(rows, weight.t().unsqueeze(0).expand(b, -1, -1))  # one (tokens × in) @ (in × out) GEMM per row
    y = y.reshape(*x.shape[:-1], weight.shape[0])
    return y + bias if bias is not None else y


class _BatchInvariantMode(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear:
            return _linear(*args, **kwargs)
        if func is F.conv2d or func is F.conv_transpose2d:
            x, rest = args[0], args[1:]
            if isinstance(x, torch.Tensor) and x.ndim == 4 and x.shape[0] > 0:
                return _chunked(func, x, rest, kwargs)
        return func(*args, **kwargs)


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
