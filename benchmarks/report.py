"""Turn ``pytest benchmarks/ --benchmark-json=out.json`` into a Markdown table of speed ratios and a bar chart.

    python benchmarks/report.py out.json [more.json ...] [--md BENCH_TABLE.md] [--png bench_ratios.png]

For every benchmark group (one op at one shape, or one end-to-end case) the table lists each provider's median
time and the ratio baseline time / fastdiff time for every baseline (> 1 means fastdiff is faster), plus the rate
(GB/s or TFLOP/s) where the benchmark recorded one. On a GPU it adds the H200 lower bound of the case (see
``benchmarks/roofline.py``) and "% of roofline": that bound over the time per call (the device time by CUDA events
where the benchmark measured one). The chart shows the same ratios, one bar per (group, baseline).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections import defaultdict
from pathlib import Path

FASTDIFF = "fastdiff"
RATE_KEYS = (("gpu_tflops", "TFLOP/s (device)"), ("tflops", "TFLOP/s"), ("gpu_gbps", "GB/s (device)"),
             ("gbps", "GB/s"), ("gb_per_s", "GB/s"), ("gflops", "GFLOP/s"))


def _provider(bench: dict) -> str:
    params = bench.get("params") or {}
    return str(params.get("provider") or bench.get("extra_info", {}).get("provider") or bench["name"])


def _median(bench: dict) -> float:
    """The median time of one call (a benchmark that times several calls per round says so in calls_per_round)."""
    stats = bench.get("stats") or {}
    calls = (bench.get("extra_info") or {}).get("calls_per_round", 1)
    calls = calls if isinstance(calls, int) and calls >= 1 else 1
    return float(stats.get("median", float("nan"))) / calls


def _rate(bench: dict) -> str:
    info = bench.get("extra_info", {})
    for key, unit in RATE_KEYS:
        if isinstance(info.get(key), (int, float)):
            return f"{info[key]:.3g} {unit}"
    return ""


def _call_seconds(bench: dict) -> float:
    """Time of one call: the device time (CUDA events) when recorded, else the per-call time, else the median."""
    info = bench.get("extra_info", {})
    for key, scale in (("gpu_ms", 1e-3), ("device_us", 1e-6), ("us_per_call", 1e-6)):
        if isinstance(info.get(key), (int, float)):
            return float(info[key]) * scale
    return _median(bench)


def roofline(bench: dict) -> tuple[str, str]:
    """(H200 lower bound, % of roofline) for a benchmark run on a GPU that recorded its bound; ("", "") otherwise."""
    info = bench.get("extra_info", {})
    bound = info.get("h200_bound_us")
    if not isinstance(bound, (int, float)) or "cuda" not in str(info.get("device", "")):
        return "", ""
    t = _call_seconds(bench)
    percent = f"{100 * bound * 1e-6 / t:.0f}%" if t > 0 and math.isfinite(t) else ""
    return f"{bound:.1f} µs", percent


def collect(data: dict) -> dict[str, dict[str, dict]]:
    """group → provider → benchmark entry."""
    groups: dict[str, dict[str, dict]] = defaultdict(dict)
    for bench in data.get("benchmarks", []):
        groups[bench.get("group") or bench["name"]][_provider(bench)] = bench
    return dict(groups)


def ratios(groups: dict[str, dict[str, dict]]) -> list[tuple[str, str, float]]:
    """(group, baseline, baseline time / fastdiff time) for every group that has a fastdiff entry."""
    rows = []
    for group, providers in sorted(groups.items()):
        if FASTDIFF not in providers:
            continue
        ours = _median(providers[FASTDIFF])
        for name, bench in sorted(providers.items()):
            if name != FASTDIFF and ours > 0 and math.isfinite(ours):
                rows.append((group, name, _median(bench) / ours))
    return rows


def markdown(data: dict) -> str:
    groups = collect(data)
    machine = data.get("machine_info", {})
    commit = data.get("commit_info", {})
    lines = [
        f"Machine: {machine.get('cpu', {}).get('brand_raw', machine.get('processor', '?'))}, "
        f"Python {machine.get('python_version', '?')}; commit {str(commit.get('id', '?'))[:10]}; "
        f"{data.get('datetime', '')}",
        "",
        "| benchmark | provider | median per call | rate | speed-up of fastdiff (baseline / fastdiff) | H200 bound "
        "| % of roofline |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for group, providers in sorted(groups.items()):
        ours = _median(providers[FASTDIFF]) if FASTDIFF in providers else None
        for name in sorted(providers, key=lambda p: (p != FASTDIFF, p)):
            bench = providers[name]
            t = _median(bench)
            ratio = "" if name == FASTDIFF or ours is None else f"{t / ours:.2f}×"
            bound, percent = roofline(bench)
            lines.append(f"| {group} | {name} | {t * 1e3:.3f} ms | {_rate(bench)} | {ratio} | {bound} | {percent} |")
    return "\n".join(lines) + "\n"


def summary(data: dict) -> str:
    """One line per benchmark group: fastdiff's time, the fastest other provider (the copy anchor aside) and
    fastdiff's speed-up over it, and fastdiff's % of roofline: the short table gpu_check.sh prints last."""
    lines = [f"{'benchmark':58s} {'fastdiff':>10s} {'best other':>22s} {'speed-up':>9s} {'roofline':>8s}"]
    for group, providers in sorted(collect(data).items()):
        if FASTDIFF not in providers:
            continue
        ours = _median(providers[FASTDIFF])
        others = {name: _median(b) for name, b in providers.items() if name not in (FASTDIFF, "copy")}
        best = min(others, key=others.get) if others else None
        other = f"{best} {others[best] * 1e3:.3f} ms" if best else "—"
        speedup = f"{others[best] / ours:.2f}×" if best and ours > 0 else "—"
        percent = roofline(providers[FASTDIFF])[1] or "—"
        lines.append(f"{group[:58]:58s} {ours * 1e3:7.3f} ms {other:>22s} {speedup:>9s} {percent:>8s}")
    return "\n".join(lines) + "\n"


def chart(data: dict, path: Path) -> bool:
    """Bar chart of the ratios (log scale, 1× marked); False when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    rows = ratios(collect(data))
    if not rows:
        return False
    labels = [f"{g} vs {b}" for g, b, _ in rows]
    values = [r for _, _, r in rows]
    fig, ax = plt.subplots(figsize=(10, max(3, 0.28 * len(rows) + 1)))
    colors = ["tab:green" if v >= 1 else "tab:red" for v in values]
    ax.barh(range(len(rows)), values, color=colors)
    ax.set_yticks(range(len(rows)), labels, fontsize=7)
    ax.axvline(1.0, color="black", linewidth=1)
    ax.set_xscale("log")
    ax.set_xlabel("baseline time / fastdiff time (> 1: fastdiff faster)")
    ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json", type=Path, nargs="+",
                        help="pytest-benchmark JSON (--benchmark-json); several are merged (one per benchmark file)")
    parser.add_argument("--md", type=Path, default=None, help="write the table here (default: print it)")
    parser.add_argument("--png", type=Path, default=Path("bench_ratios.png"), help="bar chart of the ratios")
    parser.add_argument("--summary", type=Path, default=None,
                        help="also write one line per benchmark: fastdiff, the fastest other provider, % of roofline")
    args = parser.parse_args(argv)
    data: dict = {"benchmarks": []}
    for path in args.json:
        try:
            part = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            print(f"report: cannot read {path}: {exc}", file=sys.stderr)
            return 2
        data = {**part, **data, "benchmarks": data["benchmarks"] + list(part.get("benchmarks", []))}
    table = markdown(data)
    if args.summary:
        args.summary.write_text(summary(data), encoding="utf-8")
        print(f"wrote {args.summary}")
    if args.md:
        args.md.write_text(table, encoding="utf-8")
        print(f"wrote {args.md}")
    else:
        print(table)
    if chart(data, args.png):
        print(f"wrote {args.png}")
    else:
        print("no chart (matplotlib missing or no fastdiff ratios)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
