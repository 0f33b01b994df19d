#!/usr/bin/env bash
# nvcc compile check of cuda/ without a GPU (called by scripts/test.sh when cuda/csrc/*.cu
# exists), warnings as errors (-Werror all-warnings, -Xcompiler -Wall,-Werror):
#
#   1. kernels: cuda/tests/compile_kernels.cu instantiates every kernel template of
#      cuda/include/freekv (both 16-bit dtypes, head_dim 64/128/256, page size 16/32/64) with no
#      torch headers, for sm_80 and sm_90 (~15 s);
#   2. launchers: cuda/tests/compile_launchers.cu includes every cuda/csrc/*.cu (one translation
#      unit, so torch's headers are parsed once) against the torch headers of the active
#      environment, for sm_90 only (their device code is the kernels of step 1). Parsing torch's
#      headers takes minutes on a small machine, so a successful check is remembered by the
#      hash of the sources, the torch version and the pins, and skipped while nothing changed.
#
# nvcc comes from PyPI, in a small virtual environment of its own with one consistent CUDA
# minor (mixed nvcc/runtime/cccl versions fail with "CUDA compiler and CUDA toolkit headers are
# incompatible"); it is created once under $FREEKV_CACHE_DIR/nvcc-<hash of the pins>. The minor
# is torch's CUDA version (13.0), which an extension build needs as well.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

PINS=(
  nvidia-cuda-nvcc==13.0.88
  nvidia-cuda-crt==13.0.88
  nvidia-nvvm==13.0.88
  nvidia-cuda-runtime==13.0.96
  nvidia-cuda-cccl==13.0.85
)
cache=${FREEKV_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/freekv-sglang}
key=$(printf '%s\n' "${PINS[@]}" | sha256sum | cut -c1-12)
venv=$cache/nvcc-$key
py=${FREEKV_PYTHON:-$(command -v python3)}
log() { printf '[compile_cuda] %s\n' "$*" >&2; }

if [ ! -f "$venv/.complete" ]; then
  log "creating $venv (${PINS[*]})"
  rm -rf "$venv"
  mkdir -p "$cache"
  if command -v uv >/dev/null; then
    uv venv -q --python "$py" "$venv"
    uv pip install -q --python "$venv/bin/python" "${PINS[@]}"
  else
    "$py" -m venv "$venv"
    "$venv/bin/python" -m pip install -q "${PINS[@]}"
  fi
  touch "$venv/.complete"
fi
cuda_root=$(echo "$venv"/lib/python3*/site-packages/nvidia/cu13)
nvcc=$cuda_root/bin/nvcc
[ -x "$nvcc" ] || { log "no nvcc in $cuda_root"; exit 1; }

out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
# The -D flags are the ones torch's extension builder adds (no implicit 16-bit conversions).
strict=(-std=c++20 -O2 -Werror all-warnings -Xcompiler -Wall,-Werror -I cuda/include -I cuda/csrc
  -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__ -D__CUDA_NO_BFLOAT16_CONVERSIONS__
  -D__CUDA_NO_HALF2_OPERATORS__)

t0=$SECONDS
log "kernels: cuda/tests/compile_kernels.cu for sm_80 and sm_90"
"$nvcc" "${strict[@]}" \
  -gencode arch=compute_80,code=sm_80 -gencode arch=compute_90,code=sm_90 \
  -c cuda/tests/compile_kernels.cu -o "$out/kernels.o"
log "kernels compiled in $((SECONDS - t0)) s"

# Launchers, against the active environment's torch (headers only; nothing is linked).
read -r torch_inc torch_ver py_inc site_inc < <(python - <<'PY'
import os, sysconfig, torch
base = os.path.dirname(torch.__file__)
site = os.path.join(os.path.dirname(base), "nvidia", "cu13", "include")
print(os.path.join(base, "include"), torch.__version__, sysconfig.get_paths()["include"], site)
PY
)
stamp_key=$(
  { cat cuda/csrc/*.cu cuda/csrc/*.h cuda/include/freekv/*.cuh cuda/tests/compile_launchers.cu
    printf '%s\n' "$torch_ver" "${PINS[@]}"; } | sha256sum | cut -c1-16
)
stamp=$venv/launchers-$stamp_key.ok
if [ -f "$stamp" ]; then
  log "launchers: unchanged since their last successful check ($stamp_key), skipped"
else
  t1=$SECONDS
  log "launchers: cuda/csrc/*.cu against torch $torch_ver headers, sm_90 (a few minutes)"
  # The main environment's CUDA headers (cuBLAS, cuSPARSE, which torch's headers include) are
  # searched after nvcc's own, so the pinned toolkit's headers win.
  "$nvcc" "${strict[@]}" \
    -isystem "$torch_inc" -isystem "$torch_inc/torch/csrc/api/include" -isystem "$py_inc" \
    -Xcompiler "-idirafter,$site_inc" \
    -DTORCH_EXTENSION_NAME=freekv_ops -D_GLIBCXX_USE_CXX11_ABI=1 \
    -gencode arch=compute_90,code=sm_90 \
    -c cuda/tests/compile_launchers.cu -o "$out/launchers.o"
  touch "$stamp"
  log "launchers compiled in $((SECONDS - t1)) s"
fi
log "done in $((SECONDS - t0)) s"
