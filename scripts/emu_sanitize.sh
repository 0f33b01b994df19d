#!/usr/bin/env bash
# The emulated CUDA build (cuda/emu) under AddressSanitizer and UndefinedBehaviorSanitizer:
# builds the emulated extension with -fsanitize=address,undefined (FREEKV_EMU_SANITIZE=1, its own
# cache entry) and runs the select and recall op checks under it, with the compiler's runtime
# libraries preloaded into Python. Any out-of-bounds access or undefined behaviour in a kernel or
# launcher ends the run with the sanitizer's report. Called by scripts/test.sh; extra arguments
# go to pytest.
#
# Leak detection is off: Python and torch keep allocations until exit by design.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

cxx=$(command -v c++ || command -v g++)
asan=$("$cxx" -print-file-name=libasan.so)
ubsan=$("$cxx" -print-file-name=libubsan.so)
for lib in "$asan" "$ubsan"; do
  if [ ! -e "$lib" ]; then
    echo "emu_sanitize: $cxx has no sanitizer runtime ($lib); install libasan and libubsan" >&2
    exit 1
  fi
done
preload="$asan:$ubsan"
export FREEKV_OPS=emulated FREEKV_EMU_SANITIZE=1
export ASAN_OPTIONS=detect_leaks=0:alloc_dealloc_mismatch=0:abort_on_error=1
export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
LD_PRELOAD="$preload" python -m pytest -q -p no:cacheprovider tests/kernels/test_ops_emulated.py \
  -k "serving_sizes or ties or nan or D64-p16 or D128-p32" "$@"
