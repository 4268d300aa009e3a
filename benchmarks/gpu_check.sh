#!/usr/bin/env bash
# The GPU check: build the CUDA extension, run the CUDA tests and the benchmarks on the GPU, print the ratio table
# last. Installs nothing (needs torch with CUDA, triton, pytest, pytest-benchmark, numpy, safetensors, pillow, tqdm;
# diffusers and faiss are optional anchors). Runs from a checkout without installing fastdiff. About 6-8 minutes on
# an H200; the JSON and the table go to $OUT when it is set (else to ./gpu_check_out).
#
#   bash benchmarks/gpu_check.sh            # everything
#   QUICK=1 bash benchmarks/gpu_check.sh    # kernels only: skip the end-to-end pipeline benchmarks
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu_check_out}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TRITON_INTERPRET=0
PY="${PYTHON:-python3}"
status=0

echo "== device"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,clocks.max.mem --format=csv,noheader || true
$PY -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"

echo "== build the native extension (CPU + CUDA) in place"
start=$(date +%s)
FASTDIFF_REQUIRE_EXT=1 MAX_JOBS=16 $PY setup.py -q build_ext --inplace > "$OUT/build.log" 2>&1 || { echo "build failed:"; tail -n 30 "$OUT/build.log"; status=1; }
echo "built in $(( $(date +%s) - start )) s"
$PY -m fastdiff info

echo "== measured hardware limits (copy bandwidth, matrix rate)"
$PY - <<'EOF' | tee "$OUT/limits.txt"
import torch, triton.testing as tt
x = torch.empty(1 << 28, dtype=torch.uint8, device="cuda")  # 256 MiB
ms = tt.do_bench(lambda: x.clone(), return_mode="median")
print(f"copy bandwidth: {2 * x.numel() / ms / 1e6:.0f} GB/s")
a = torch.randn(8192, 8192, device="cuda", dtype=torch.float16)
ms = tt.do_bench(lambda: a @ a, return_mode="median")
print(f"fp16 matmul: {2 * 8192**3 / ms / 1e9:.0f} TFLOP/s")
EOF

echo "== CUDA tests"
timeout 240 $PY -m pytest -q -p no:cacheprovider tests -k "cuda or CUDA" -x --timeout 120 2>&1 | tail -n 25 || status=1

echo "== benchmarks on CUDA"
sel=()
[ "${QUICK:-0}" = "1" ] && sel=(--ignore=benchmarks/test_bench_pipeline.py)
timeout 300 $PY -m pytest -q -p no:cacheprovider benchmarks/ "${sel[@]}" --benchmark-json="$OUT/bench.json" \
    --benchmark-min-rounds=5 --benchmark-max-time=0.2 --benchmark-warmup=on 2>&1 | tail -n 8 || status=1

echo "== ratio table (baseline time / fastdiff time; > 1 means fastdiff is faster)"
$PY benchmarks/report.py "$OUT/bench.json" --md "$OUT/gpu_table.md" --png "$OUT/gpu_ratios.png" > /dev/null || status=1
cat "$OUT/limits.txt" 2>/dev/null
cat "$OUT/gpu_table.md" 2>/dev/null
exit $status
