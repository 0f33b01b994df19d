#!/usr/bin/env bash
# The project's GPU checks, as separate steps sized for a borrowed device (an H200: 15 minutes
# of device time in all, at most 10 per command). Usage:
#
#   bash scripts/gpu_run.sh [--dry-run] [STEP ...]      # default: every step, in this order
#
# step    budget  what
# build    120 s  build (or load from the cache) the CUDA extension, as a server does at start-up
# check    120 s  benchmarks/gpu_check.py: every op against its reference over the shape grid,
#                 select at 4096 pages / top-k 512 compared whole, select then recall, the
#                 FlashInfer decode pieces where FlashInfer is installed (skipped otherwise;
#                 with a model's own softmax scale, GQA group sizes 1 to 8; the fixed form
#                 captured, re-planned and replayed; the two-part merge)
# sanitize  45 s  compute-sanitizer memcheck and racecheck over benchmarks/gpu_sanitize.py (a
#                 small select and its recall), where compute-sanitizer is installed
# tests    145 s  the gpu-marked tests: kernels, the runtime on the device with the Rust arena
#                 (several decode steps, prefix load-back, budget slots equal to the host pages
#                 bit for bit, the recall stream against the synchronous CPU path), FlashInfer's
#                 page-table decode and its single decode at GQA 5 and 7 where it is installed
# bench    115 s  benchmarks/bench_decode_gpu.py: dense (two kinds) vs FreeKV vs synchronous,
#                 eager at 32K x 1 and 16 with FreeKV's overlap measured (noovl), then each step
#                 in a CUDA graph at 32K and 128K x 1, 16, 32
# graph     45 s  benchmarks/graph_check.py: FreeKV's decode of a Llama-3.1-8B-shaped stack in the
#                 form SGLang's graph runner drives (GraphDecode, FlashInfer's graph wrappers
#                 where FlashInfer is installed) captured once in a CUDA graph, replayed after
#                 each step's host part, outputs and state equal to the eager step bit for
#                 bit; graph vs eager time
#
# Total at most 590 s. Every step prints its records as they are made and writes its JSON
# (benchmarks/results/; copies under $OUT when it is set); gpu_run.json sums the steps up.
# --dry-run runs every step on the CPU with tiny sizes (CI runs it: tests/kernels).
# Needs a CUDA build of torch (in python3, or $PYTHON) and nvcc on PATH (or CUDA_HOME); the
# tests step needs pytest and the Rust extension (python/freekv_sglang/_native.abi3.so, abi3 for
# CPython >= 3.11, x86-64). Neither SGLang nor FlashInfer is needed: their tests then skip.
# Exit status: non-zero when any step failed.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/python${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
# The interpreter: $PYTHON, else python3 (a bare GPU image may have no `python`).
PY=${PYTHON:-$(command -v python3 || command -v python)}

dry=()
steps=()
for arg in "$@"; do
    case "$arg" in
        --dry-run) dry=(--dry-run) ;;
        build | check | sanitize | tests | bench | graph) steps+=("$arg") ;;
        *) echo "usage: $0 [--dry-run] [build|check|sanitize|tests|bench|graph ...]" >&2; exit 2 ;;
    esac
done
((${#steps[@]})) || steps=(build check sanitize tests bench graph)
results=benchmarks/results
[[ ${#dry[@]} -eq 0 ]] || results="${TMPDIR:-/tmp}/freekv-gpu-run-dry"
mkdir -p "$results"
summary="$results/gpu_run.json"
echo "[]" >"$summary"
status=0

record() { # step rc seconds
    "$PY" - "$summary" "$1" "$2" "$3" <<'EOF'
import json, sys
path, step, rc, seconds = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
rows = json.load(open(path))
rows.append({"step": step, "ok": rc == 0, "rc": rc, "seconds": seconds})
json.dump(rows, open(path, "w"), indent=1)
print(json.dumps(rows[-1]), flush=True)
EOF
}

run_build() {
    if [[ ${#dry[@]} -gt 0 ]]; then
        FREEKV_OPS=emulated timeout 120 "$PY" -c \
            'import torch; from freekv_sglang.ops import require_kernels; print(require_kernels(torch.device("cpu")))'
    else
        timeout 120 "$PY" -c \
            'import torch; from freekv_sglang.ops import require_kernels; print(require_kernels(torch.device("cuda")))'
    fi
}

run_check() {
    timeout 120 "$PY" benchmarks/gpu_check.py "${dry[@]}" --out "$results/gpu_check.json"
}

run_sanitize() {
    if [[ ${#dry[@]} -gt 0 ]]; then
        FREEKV_OPS=emulated timeout 45 "$PY" benchmarks/gpu_sanitize.py --dry-run
        return
    fi
    if ! command -v compute-sanitizer >/dev/null; then
        echo "compute-sanitizer is not installed: skipped"
        return 0
    fi
    local tool
    for tool in memcheck racecheck; do
        timeout 22 compute-sanitizer --tool "$tool" --error-exitcode 1 \
            "$PY" benchmarks/gpu_sanitize.py || return 1
    done
}

run_tests() {
    local tests=(tests/kernels tests/sglang/test_freekv_paged_decode.py
        tests/runtime/test_freekv_prefix_runtime.py tests/native/test_native_numa.py
        tests/e2e/test_server_gpu.py)
    if ! "$PY" -c "import pytest" 2>/dev/null; then
        echo "pytest is not installed: skipped"
        return 0
    fi
    if [[ ${#dry[@]} -gt 0 ]]; then
        timeout 145 "$PY" -m pytest -q --collect-only -m gpu -p no:cacheprovider "${tests[@]}"
    else
        timeout 145 "$PY" -m pytest -q -rA -m gpu -p no:cacheprovider "${tests[@]}" \
            --junitxml "$results/gpu_tests.xml"
    fi
}

run_bench() {
    if [[ ${#dry[@]} -gt 0 ]]; then
        timeout 115 "$PY" benchmarks/bench_decode_gpu.py --dry-run --out "$results/decode_gpu.json"
        return
    fi
    timeout 40 "$PY" benchmarks/bench_decode_gpu.py --contexts 32768 --batches 1,16 \
        --time-limit-s 25 --out "$results/decode_gpu.json" || return 1
    timeout 75 "$PY" benchmarks/bench_decode_gpu.py --graph --contexts 32768,131072 \
        --batches 1,16,32 --variants dense,dense_mm,freekv,sync --time-limit-s 55 \
        --out "$results/decode_gpu_graph.json"
}

run_graph() {
    timeout 45 "$PY" benchmarks/graph_check.py "${dry[@]}" --out "$results/graph_check.json"
}

for step in "${steps[@]}"; do
    printf '\n== %s%s (%s)\n' "$step" "${dry[*]:+ (dry run)}" "$(date -u +%H:%M:%S)"
    t0=$SECONDS
    "run_$step"
    rc=$?
    record "$step" "$rc" "$((SECONDS - t0))"
    ((rc == 0)) || status=1
done

if [[ -n "${OUT:-}" ]]; then
    cp "$results"/gpu_run.json "$results"/gpu_check.json "$results"/decode_gpu.json \
        "$results"/decode_gpu_graph.json "$results"/gpu_tests.xml "$results"/graph_check.json \
        "$OUT"/ 2>/dev/null
fi
exit "$status"
