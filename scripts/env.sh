#!/usr/bin/env bash
# Creates (or reuses) the project's virtual environment and installs this checkout into it.
#
#   bash scripts/env.sh          # set up, print the environment's path
#   source scripts/env.sh        # set up and activate it in this shell
#
# The environment lives outside the checkout, in
#   ${FREEKV_CACHE_DIR:-${XDG_CACHE_HOME:-~/.cache}/freekv-sglang}/venv-<sha of requirements/base.txt>
# so every clone on one machine shares it, while a new pin (or a new machine) builds a new one.
# A stamp file records the hash of every requirements file that was installed: a partial
# install (interrupted, or a dev tool added) is completed in place on the next call.
# The Rust extension is rebuilt from this checkout every time (cargo only recompiles what
# changed; its target directory is cached next to the environment).
set -euo pipefail

_freekv_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
_freekv_python=${FREEKV_PYTHON:-$(command -v python3.11 || command -v python3)}
export FREEKV_CACHE_DIR=${FREEKV_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/freekv-sglang}
_freekv_key=$(sha256sum "$_freekv_root/requirements/base.txt" | cut -c1-12)
export FREEKV_VENV=$FREEKV_CACHE_DIR/venv-$_freekv_key
_freekv_want=$(cat "$_freekv_root"/requirements/*.txt | sha256sum | cut -c1-64)
_freekv_stamp=$FREEKV_VENV/.freekv-requirements

_freekv_log() { printf '[env] %s\n' "$*" >&2; }

"$_freekv_python" -c 'import sys; assert sys.version_info >= (3, 11), sys.version' ||
  { _freekv_log "Python 3.11 or newer is required (set FREEKV_PYTHON)"; exit 1; }
command -v cargo >/dev/null || { _freekv_log "a Rust toolchain (cargo) is required"; exit 1; }

mkdir -p "$FREEKV_CACHE_DIR"
if [ ! -x "$FREEKV_VENV/bin/python" ]; then
  _freekv_log "creating $FREEKV_VENV"
  "$_freekv_python" -m venv "$FREEKV_VENV"
fi
if [ "$(cat "$_freekv_stamp" 2>/dev/null)" != "$_freekv_want" ]; then
  _freekv_log "installing requirements (a fresh install downloads about 4.5 GB)"
  _freekv_t0=$SECONDS
  "$FREEKV_VENV/bin/python" -m pip install -q "uv==0.13.8"
  "$FREEKV_VENV/bin/uv" pip install --python "$FREEKV_VENV/bin/python" \
    -r "$_freekv_root/requirements/base.txt" -r "$_freekv_root/requirements/dev.txt"
  "$FREEKV_VENV/bin/uv" pip install --python "$FREEKV_VENV/bin/python" --no-deps \
    -r "$_freekv_root/requirements/nodeps.txt"
  printf '%s' "$_freekv_want" >"$_freekv_stamp"
  _freekv_log "requirements installed in $((SECONDS - _freekv_t0)) s"
fi
# Bytecode for every installed module, once per environment: uv does not write it, and where
# PYTHONDONTWRITEBYTECODE is set nothing else does, so each process (every SGLang server a test
# starts) would compile sglang, torch and transformers from source again (about a minute).
if [ ! -f "$FREEKV_VENV/.freekv-bytecode" ]; then
  _freekv_t0=$SECONDS
  "$FREEKV_VENV/bin/python" -m compileall -q -j 0 \
    "$("$FREEKV_VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" \
    >/dev/null 2>&1 || true  # a few vendored files are not valid Python 3; they stay uncompiled
  touch "$FREEKV_VENV/.freekv-bytecode"
  _freekv_log "bytecode compiled in $((SECONDS - _freekv_t0)) s"
fi

export VIRTUAL_ENV=$FREEKV_VENV
export PATH=$FREEKV_VENV/bin:$PATH
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$FREEKV_CACHE_DIR/target}
if [ -z "${FREEKV_SKIP_BUILD:-}" ]; then
  _freekv_log "building the Rust extension (maturin develop --release)"
  (cd "$_freekv_root" && maturin develop --release --uv -q >&2)
fi

# Executed rather than sourced: print the environment for the caller.
if [ "${BASH_SOURCE[0]}" = "$0" ]; then
  echo "$FREEKV_VENV"
fi
