#!/usr/bin/env bash
# The whole test suite, as CI runs it: set-up, Rust checks, Python lint, mypy, the import
# contracts, stubs, the CUDA compile check, the emulated CUDA build under sanitizers, then pytest
# (unit, integration and end-to-end tests on the real SGLang server; the op grid through the
# emulated build).
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -k rotary`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/env.sh

step() { printf '\n==> %s\n' "$*"; }
t0=$SECONDS

step "cargo fmt --check"
cargo fmt --all --check
step "cargo clippy -D warnings"
cargo clippy --workspace --all-targets --locked -- -D warnings
step "cargo test (freekv-core)"
cargo test -p freekv-core --locked

step "ruff check / ruff format --check"
ruff check .
ruff format --check .

step "clang-format --dry-run --Werror (cuda/)"
bash scripts/clang_format.sh

step "mypy (python/freekv_sglang, configured in pyproject.toml)"
mypy

step "import-linter (lint-imports: the contracts in pyproject.toml)"
lint-imports

step "stubtest (python/freekv_sglang/_native.pyi against the built module)"
python -m mypy.stubtest freekv_sglang._native --allowlist scripts/stubtest-allowlist.txt

if compgen -G "cuda/csrc/*.cu" >/dev/null; then
  step "nvcc compile check (sm_80, sm_90, warnings as errors)"
  bash scripts/compile_cuda.sh
fi

step "emulated CUDA build under ASan and UBSan (select and recall checks)"
bash scripts/emu_sanitize.sh

step "pytest"
python -m pytest "$@"
printf '\n==> all checks passed in %d s\n' "$((SECONDS - t0))"
