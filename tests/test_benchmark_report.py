"""benchmarks/roofline.py and the roofline columns of benchmarks/report.py (no GPU needed: synthetic results)."""

from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import report  # noqa: E402
import roofline  # noqa: E402


def test_lower_bound_is_the_slower_of_bytes_and_flops():
    # self-attention B=2, H=8, N=M=4096, D=64, fp16: 4·B·H·N·M·D FLOPs at 790 TFLOP/s ≈ 87 µs; q, k, v, o once
    # (4·B·H·N·D·2 bytes = 33.5 MB) at 4.3 TB/s ≈ 7.8 µs → compute-bound
    flops = 4 * 2 * 8 * 4096 * 4096 * 64
    nbytes = 4 * 2 * 8 * 4096 * 64 * 2
    assert roofline.lower_bound_s(nbytes, flops, "fp16") == pytest.approx(flops / 790e12)
    assert flops / 790e12 == pytest.approx(87.0e-6, rel=0.01)
    # a DDIM step moving 4 x-sized fp16 tensors of 2·4·64·64: bandwidth-bound, 65536·2 bytes / 4.3 TB/s
    assert roofline.lower_bound_s(4 * 32768 * 2, 0, "fp16") == pytest.approx(4 * 32768 * 2 / 4.3e12)
    assert roofline.lower_bound_s(0, flops, "fp32") == pytest.approx(flops / 67e12)
    with pytest.raises(ValueError, match="dtype"):
        roofline.lower_bound_s(1, 1, "int8")
    with pytest.raises(ValueError, match="≥ 0"):
        roofline.lower_bound_s(-1, 0)


def _bench(provider, median_s, device, **info):
    return {"name": provider, "group": "g", "params": {"provider": provider}, "stats": {"median": median_s},
            "extra_info": {"device": device, **info}}


def test_report_prints_percent_of_roofline_on_a_gpu_only():
    info = {}
    roofline.record(info, 4 * 32768 * 2, 0, "fp16")
    bound_us = info["h200_bound_us"]
    data = {"benchmarks": [
        _bench("fastdiff", 1e-3, "cuda", device_us=4 * bound_us, **info),  # device time: 25% of the bound
        _bench("torch", 2e-3, "cuda", device_us=8 * bound_us, **info),
    ]}
    table = report.markdown(data)
    fastdiff_row = next(line for line in table.splitlines() if "| fastdiff |" in line)
    torch_row = next(line for line in table.splitlines() if "| torch |" in line)
    assert fastdiff_row.endswith(f"| {bound_us:.1f} µs | 25% |")
    assert torch_row.endswith("| 12% |") and "| 2.00× |" in torch_row
    cpu = report.markdown({"benchmarks": [_bench("fastdiff", 1e-3, "cpu", **info)]})
    assert next(line for line in cpu.splitlines() if "| fastdiff |" in line).endswith("|  |  |")


def test_median_is_per_call_when_a_round_times_several_calls():
    rounds = {"benchmarks": [_bench("fastdiff", 2e-3, "cuda", calls_per_round=20),
                             _bench("torch", 4e-3, "cuda", calls_per_round=20)]}
    table = report.markdown(rounds)
    assert "| g | fastdiff | 0.100 ms |" in table and "| g | torch | 0.200 ms |" in table and "2.00×" in table


def test_summary_is_one_line_per_benchmark_against_the_fastest_other_provider():
    data = {"benchmarks": [_bench("fastdiff", 2e-3, "cuda"), _bench("torch", 6e-3, "cuda"),
                           _bench("sdpa", 3e-3, "cuda"), _bench("copy", 1e-3, "cuda")]}
    lines = report.summary(data).splitlines()
    assert len(lines) == 2  # header + the one group
    assert lines[1].split()[:6] == ["g", "2.000", "ms", "sdpa", "3.000", "ms"] and "1.50×" in lines[1]
