#!/usr/bin/env bash
# Every GPU check of the project in one run, for a GPU host (H200-sized; about 12 minutes):
#
#   1. benchmarks/gpu_check.py: build the CUDA ops, check them (and, where FlashInfer is
#      installed, the serving path's paged decode + merge) against the references, measure;
#   2. the gpu-marked tests (kernels; with the Rust extension, the runtime on the device
#      through the page-table decode and the offload / prefix load-back round trip; where FlashInfer and SGLang are installed, that decode
#      with FlashInfer's kernels and the serving path through the real server);
#   3. benchmarks/bench_decode_gpu.py: the Llama-3.1-8B-shaped decode loop, dense vs FreeKV vs
#      synchronous retrieval vs no overlap.
#
# Needs Python >= 3.10, a CUDA build of torch and nvcc on PATH (or CUDA_HOME); steps whose
# requirements are missing say so and the run goes on. The runtime's GPU case (the page-table
# decode with the reference kernels: CUDA recall op, recall and offload streams, event-gated
# conversions) needs pytest and the Rust extension, not SGLang or FlashInfer: on a host that
# cannot build it, bring the one built here (python/freekv_sglang/_native.abi3.so, abi3 for
# CPython >= 3.11, x86-64). Results: benchmarks/results/ (and a
# copy under $OUT when it is set). Exit status: non-zero when any step failed.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/python${PYTHONPATH:+:$PYTHONPATH}"
status=0
step() { printf '\n== %s (%s)\n' "$1" "$(date -u +%H:%M:%S)"; }

step "gpu_check.py"
timeout 300 python benchmarks/gpu_check.py || status=1

step "pytest -m gpu"
if python -c "import pytest" 2>/dev/null; then
    timeout 600 python -m pytest -q -m gpu tests/kernels tests/sglang/test_freekv_paged_decode.py \
        tests/runtime/test_freekv_prefix_runtime.py tests/e2e/test_server_gpu.py || status=1
else
    echo "pytest is not installed: skipped"
fi

step "bench_decode_gpu.py"
timeout 540 python benchmarks/bench_decode_gpu.py || status=1

if [[ -n "${OUT:-}" ]]; then
    cp benchmarks/results/gpu_check.json benchmarks/results/decode_gpu.json "$OUT"/ 2>/dev/null
fi
exit "$status"
