"""``fastdiff bench``: a quick side-by-side speed table on this machine (the full suite is ``pytest benchmarks/``).

Each row times an op the ways users would otherwise write it — eager PyTorch, ``F.scaled_dot_product_attention``
for attention, and with ``--compile`` torch.compile of the eager code — and through fastdiff (the path ``fastdiff
info`` reports: compiled Triton on CUDA, the reference or native code on CPU), in one run, and prints the ratios
baseline / fastdiff (> 1: fastdiff is faster) against eager and against the strongest baseline. The CPU model and
thread count head the table. With diffusers installed, the last row samples the shipped digits UNet end to end in
both libraries with identical weights.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable

import torch
import torch.nn.functional as F

from fastdiff import ops
from fastdiff.validation import check_positive_int


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


def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo on Linux, else what platform knows)."""
    import platform

    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def machine_line(device: torch.device) -> str:
    """What the numbers were measured on: the CPU model and torch's thread count (and the GPU on CUDA)."""
    line = f"CPU: {cpu_model()}, torch threads: {torch.get_num_threads()}"
    if device.type == "cuda":
        line = f"GPU: {torch.cuda.get_device_name(device)}; {line}"
    return line


class _Row:
    """One op at one shape: the baselines' times by name, fastdiff's time, and compile times (seconds)."""

    def __init__(self, op: str, shape: str):
        self.op, self.shape = op, shape
        self.baselines: dict[str, float] = {}
        self.compile_s: float | None = None
        self.fastdiff = float("nan")

    def best(self) -> tuple[str, float]:
        name = min(self.baselines, key=self.baselines.get)
        return name, self.baselines[name]


def _compiled(fn: Callable, backend: str) -> tuple[Callable, float]:
    """torch.compile(fn) and the seconds its first call (the compile) took."""
    compiled = torch.compile(fn, backend=backend)
    start = time.perf_counter()
    compiled()
    return compiled, time.perf_counter() - start


def op_rows(device: torch.device, repeats: int, compile_backend: str | None = None) -> list[_Row]:
    """Each op timed against what users would otherwise write: the eager code, SDPA for attention, and with
    ``compile_backend`` (e.g. "inductor") torch.compile of the eager code (its compile time kept apart)."""
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    x = torch.randn(8, 256, 32, 32, device=device, dtype=dtype)
    w, b = torch.randn(256, device=device, dtype=dtype), torch.randn(256, device=device, dtype=dtype)
    xc = torch.randn(8, 128, 32, 32, device=device, dtype=dtype).contiguous(memory_format=torch.channels_last)
    wc = (0.03 * torch.randn(128, 128, 3, 3, device=device, dtype=dtype)).contiguous(memory_format=torch.channels_last)
    q = torch.randn(2, 8, 1024, 64, device=device, dtype=dtype)
    k77 = torch.randn(2, 8, 77, 64, device=device, dtype=dtype)
    s = torch.randn(16, 4, 32, 32, device=device, dtype=dtype)
    out = torch.randn(32, 4, 32, 32, device=device, dtype=dtype)
    z = torch.randn(16384, 64, device=device)
    e = torch.randn(512, 64, device=device)
    cases = [  # op, shape, eager baseline, SDPA baseline or None, fastdiff
        ("group_norm_silu", "8×256×32²", lambda: F.silu(F.group_norm(x, 32, w, b)), None,
         lambda: ops.group_norm_silu(x, 32, w, b)),
        ("conv3x3", "8×128×32², 128 out, NHWC", lambda: F.conv2d(xc, wc, b[:128], padding=1), None,
         lambda: ops.conv3x3(xc, wc, b[:128])),
        ("attention (self)", "2×8×1024, D=64", lambda: _eager_attention(q, q, q),
         lambda: F.scaled_dot_product_attention(q, q, q), lambda: ops.attention(q, q, q)),
        ("attention (cross)", "2×8×1024×77, D=64", lambda: _eager_attention(q, k77, k77),
         lambda: F.scaled_dot_product_attention(q, k77, k77), lambda: ops.attention(q, k77, k77)),
        ("ddim_step + CFG", "16×4×32²", lambda: _eager_ddim_cfg(s, out, 0.5, 0.6, 3.0), None,
         lambda: ops.ddim_step(s, out, 0.5, 0.6, guidance_scale=3.0)),
        ("vq_nearest", "N=16384 K=512 D=64", lambda: torch.cdist(z, e).argmin(1), None,
         lambda: ops.vq_nearest(z, e)),
    ]
    rows = []
    with torch.no_grad():
        for op, shape, eager, sdpa, ours in cases:
            row = _Row(op, shape)
            row.baselines["eager"] = _time(eager, device, repeats)
            if sdpa is not None:
                row.baselines["sdpa"] = _time(sdpa, device, repeats)
            if compile_backend is not None:
                compiled, row.compile_s = _compiled(eager, compile_backend)
                row.baselines["compile"] = _time(compiled, device, repeats)
            row.fastdiff = _time(ours, device, repeats)
            rows.append(row)
    return rows


def pipeline_row(device: torch.device, repeats: int) -> _Row | None:
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
    row = _Row("pipeline: digits-ddpm", "DDIM 25 steps, batch 16")
    row.fastdiff = _time(lambda: pipe(generator=0, progress=False, **kw), device, max(1, repeats // 2))
    row.baselines["diffusers"] = _time(lambda: theirs(generator=torch.Generator().manual_seed(0), **kw), device,
                                       max(1, repeats // 2))
    return row


COLUMNS = ("eager", "sdpa", "compile", "diffusers")


def measure(device: torch.device, repeats: int = 5, *, compile_backend: str | None = None,
            pipeline: bool = True) -> list[_Row]:
    """The rows of :func:`quick_table`: every op (and, with diffusers installed and ``pipeline``, the sampler)."""
    repeats = check_positive_int("repeats", repeats)
    rows = op_rows(device, repeats, compile_backend)
    row = pipeline_row(device, repeats) if pipeline else None
    return rows + ([row] if row is not None else [])


def format_table(rows: list[_Row], device: torch.device, repeats: int) -> str:
    shown = [c for c in COLUMNS if any(c in r.baselines for r in rows)]
    lines = [f"fastdiff bench on {device.type}: median of {repeats} calls, times in ms",
             machine_line(device),
             f"{'op':22s} {'shape':24s}" + "".join(f" {c:>9s}" for c in shown)
             + f" {'fastdiff':>9s} {'speed-up':>9s} {'vs best':>15s}"]
    for r in rows:
        cells = "".join(f" {r.baselines[c] * 1e3:9.2f}" if c in r.baselines else f" {'—':>9s}" for c in shown)
        first = next(iter(r.baselines.values()))
        best_name, best = r.best()
        lines.append(f"{r.op:22s} {r.shape:24s}{cells} {r.fastdiff * 1e3:9.2f} {first / r.fastdiff:8.2f}× "
                     f"{best / r.fastdiff:6.2f}× ({best_name})")
    compiled = [r for r in rows if r.compile_s is not None]
    if compiled:
        lines.append("compile times (first call, not in the table): "
                     + ", ".join(f"{r.op} {r.compile_s:.1f} s" for r in compiled))
    lines.append("speed-up: the first baseline (eager PyTorch, or diffusers) / fastdiff; vs best: the fastest "
                 "baseline / fastdiff (> 1: fastdiff is faster), and which baseline that is")
    return "\n".join(lines)


def quick_table(device: torch.device, repeats: int = 5, *, compile_backend: str | None = None,
                pipeline: bool = True) -> str:
    """The table ``fastdiff bench`` prints: per op the baselines side by side (eager, SDPA for attention, torch.compile
    with ``compile_backend``, diffusers for the pipeline), fastdiff, and fastdiff's speed-up over the first baseline
    and over the strongest one. Headed by the CPU model and thread count (and the GPU)."""
    rows = measure(device, repeats, compile_backend=compile_backend, pipeline=pipeline)
    return format_table(rows, device, repeats)
