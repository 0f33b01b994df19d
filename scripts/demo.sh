#!/usr/bin/env bash
# The main job: set up, then serve SmolLM2-135M-Instruct with the real SGLang server on CPU and
# print the completion of one chat request. Arguments go to scripts/demo.py (see --help).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/env.sh
exec python scripts/demo.py "$@"
