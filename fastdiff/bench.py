"""``fastdiff bench``: a quick side-by-side speed table on this machine (the full suite is ``pytest benchmarks/``).

Each row times an op the way users would otherwise write it (eager PyTorch, unfused) and through fastdiff (the path
``fastdiff info`` reports: compiled Triton on CUDA, the reference or native code on CPU), in one run, and prints
the ratio baseline / fastdiff (> 1: fastdiff is faster). With diffusers installed, the last row samples the
shipped digits UNet end to end in both libraries with identical weights.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable

import torch
import torch.nn.functional as F

from fastdiff import ops


def _time(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    """Median seconds of ``repeats`` calls after one warm-up call (CUDA synchronised inside the timing)."""
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _eager_attention(q, k, v):
    scores = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    return torch.softmax(scores.float(), dim=-1).to(q.dtype) @ v


def _eager_ddim_cfg(x, out, a_t, a_prev, s):
    uncond, cond = out.chunk(2)
    eps = uncond + s * (cond - uncond)
    x0 = (x - (1 - a_t) ** 0.5 * eps) / a_t**0.5
    return a_prev**0.5 * x0 + (1 - a_prev) ** 0.5 * eps, x0


def op_rows(device: torch.device, repeats: int) -> list[tuple[str, str, float, float]]:
    """(op, shape, baseline seconds, fastdiff seconds) for each op."""
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    rows = []
    x = torch.randn(8, 256, 32, 32, device=device, dtype=dtype)
    w, b = torch.randn(256, device=device, dtype=dtype), torch.randn(256, device=device, dtype=dtype)
    rows.append(("group_norm_silu", "8×256×32²",
                 _time(lambda: F.silu(F.group_norm(x, 32, w, b)), device, repeats),
                 _time(lambda: ops.group_norm_silu(x, 32, w, b), device, repeats)))
    q = torch.randn(2, 8, 1024, 64, device=device, dtype=dtype)
    k77 = torch.randn(2, 8, 77, 64, device=device, dtype=dtype)
    rows.append(("attention (self)", "2×8×1024, D=64",
                 _time(lambda: _eager_attention(q, q, q), device, repeats),
                 _time(lambda: ops.attention(q, q, q), device, repeats)))
    rows.append(("attention (cross)", "2×8×1024×77, D=64",
                 _time(lambda: _eager_attention(q, k77, k77), device, repeats),
                 _time(lambda: ops.attention(q, k77, k77), device, repeats)))
    s = torch.randn(16, 4, 32, 32, device=device, dtype=dtype)
    out = torch.randn(32, 4, 32, 32, device=device, dtype=dtype)
    rows.append(("ddim_step + CFG", "16×4×32²",
                 _time(lambda: _eager_ddim_cfg(s, out, 0.5, 0.6, 3.0), device, repeats),
                 _time(lambda: ops.ddim_step(s, out, 0.5, 0.6, guidance_scale=3.0), device, repeats)))
    z = torch.randn(16384, 64, device=device)
    e = torch.randn(512, 64, device=device)
    rows.append(("vq_nearest", "N=16384 K=512 D=64",
                 _time(lambda: torch.cdist(z, e).argmin(1), device, repeats),
                 _time(lambda: ops.vq_nearest(z, e), device, repeats)))
    return rows


def pipeline_row(device: torch.device, repeats: int):
    """Sampling the shipped digits-ddpm UNet with 25 DDIM steps, batch 16: diffusers vs fastdiff, same weights."""
    try:
        import diffusers  # noqa: F401

        from fastdiff.interop import to_diffusers
    except ImportError:
        return None
    import fastdiff

    pipe = fastdiff.load("digits-ddpm", device=device)
    theirs = to_diffusers(pipe)
    theirs.set_progress_bar_config(disable=True)
    kw = dict(batch_size=16, num_inference_steps=25, output_type="np")
    ours_t = _time(lambda: pipe(generator=0, progress=False, **kw), device, max(1, repeats // 2))
    theirs_t = _time(lambda: theirs(generator=torch.Generator().manual_seed(0), **kw), device, max(1, repeats // 2))
    return ("pipeline: digits-ddpm", "DDIM 25 steps, batch 16", theirs_t, ours_t)


def quick_table(device: torch.device, repeats: int = 5) -> str:
    rows = op_rows(device, repeats)
    row = pipeline_row(device, repeats)
    if row is not None:
        rows.append(row)
    lines = [f"fastdiff bench on {device.type} (median of {repeats}; baseline = eager PyTorch, or diffusers for the "
             f"pipeline)",
             f"{'op':24s} {'shape':22s} {'baseline':>11s} {'fastdiff':>11s} {'speed-up':>9s}"]
    for op, shape, base, ours in rows:
        lines.append(f"{op:24s} {shape:22s} {base * 1e3:9.2f}ms {ours * 1e3:9.2f}ms {base / ours:8.2f}×")
    return "\n".join(lines)
