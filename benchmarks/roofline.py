"""The H200's lower bound for one benchmark case: the least time any kernel could take, from the bytes it must move
and the FLOPs it must do, so a measured GPU time reads as a fraction of the hardware limit.

    bound = max(min_bytes / copy bandwidth, flops / matrix rate)

``min_bytes``: each input read once and each output written once (what no kernel can avoid); ``flops``: the
multiply-adds of the op's matrix products (2 per multiply-add; softmax, norms and elementwise work not counted).
Rates: copy bandwidth ≈ 4.3 TB/s (a measured device-to-device copy on an H200, read + write counted) and dense
bf16/fp16 matrix throughput ≈ 790 TFLOP/s (a measured large GEMM; the data sheet says 989). TF32 tensor cores run at
half the bf16 rate and fp32 CUDA cores at 67 TFLOP/s (data sheet; not yet measured here). ``benchmarks/gpu_check.sh``
measures the copy bandwidth and the fp16 matmul rate on the machine it runs on and prints them beside the table.
"""

from __future__ import annotations

import torch

H200_COPY_BYTES_PER_S = 4.3e12
H200_FLOPS_PER_S = {"fp16": 790e12, "bf16": 790e12, "tf32": 395e12, "fp32": 67e12}


def dtype_name(dtype) -> str:
    return {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}.get(dtype, str(dtype))


def lower_bound_s(min_bytes: float, flops: float = 0.0, dtype: str = "fp16") -> float:
    """The H200 lower bound in seconds for moving ``min_bytes`` and doing ``flops`` in ``dtype``'s matrix rate."""
    if min_bytes < 0 or flops < 0:
        raise ValueError(f"min_bytes and flops must be ≥ 0, got {min_bytes}, {flops}")
    if dtype not in H200_FLOPS_PER_S:
        raise ValueError(f"dtype must be one of {sorted(H200_FLOPS_PER_S)}, got {dtype!r}")
    return max(min_bytes / H200_COPY_BYTES_PER_S, flops / H200_FLOPS_PER_S[dtype])


def record(extra_info: dict, min_bytes: int, flops: int, dtype) -> None:
    """Store the case's minimum bytes, FLOPs and H200 lower bound in a benchmark's ``extra_info``."""
    name = dtype if isinstance(dtype, str) else dtype_name(dtype)
    extra_info.update(min_bytes=int(min_bytes), flops=int(flops),
                      h200_bound_us=lower_bound_s(min_bytes, flops, name) * 1e6)
