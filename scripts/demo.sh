#!/usr/bin/env bash
# The main job: set up, then serve SmolLM2-135M-Instruct with the real SGLang server on CPU,
# once with --kv-offload freekv at a budget well below a 3K-token document and once dense, ask
# both for a fact hidden in the document, and print the answers and FreeKV's figures.
# Arguments go to scripts/demo.py (see --help).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/env.sh
exec python scripts/demo.py "$@"
