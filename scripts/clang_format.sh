#!/usr/bin/env bash
# clang-format over every C++/CUDA source of cuda/ (kernels, launchers, compile checks, the
# emulation headers), with the style of the root .clang-format and the pinned clang-format of
# requirements/dev.txt:
#
#   bash scripts/clang_format.sh           # check: report each file that is not formatted, fail
#   bash scripts/clang_format.sh --apply   # reformat in place
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

files=(cuda/include/freekv/*.cuh cuda/csrc/*.cu cuda/csrc/*.h cuda/tests/*.cu cuda/tests/*.cpp
  cuda/emu/*.h cuda/emu/freekv_emu/*.h)
if [ "${1:-}" = "--apply" ]; then
  clang-format -i "${files[@]}"
else
  clang-format --dry-run --Werror "${files[@]}"
fi
