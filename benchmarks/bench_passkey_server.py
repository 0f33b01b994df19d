"""Passkey accuracy of FreeKV through the real SGLang server, next to ``--kv-offload none``.

What it measures. For each variant, one ``python -m sglang.launch_server`` on CPU (the same
server flags as `bench_serving_cpu.py`, whose helpers this script reuses) answers ``--cases``
passkey/needle prompts of ``benchmarks/passkey.py`` at ``--context`` tokens (minus the generated
tokens), sent as token ids, greedy, ``--gen-tokens`` new tokens with EOS ignored. A case is
solved when its hidden number appears in the continuation. The cases are spread over five
depths (0.1 to 0.9) and both kinds, with one seed per round of ten, so every variant answers
the same prompts. Up to ``--concurrency`` requests are in flight at once (one batched prefill).

Variants, each its own server (all started at once, then asked one after another): ``dense``
(``--kv-offload none``), ``freekv`` (speculative retrieval, correction at ``--tau``) and, when
asked for, ``sync`` (``--freekv-selection current``). The FreeKV budget defaults to 512 tokens
(64 sink + 384 selected + 64 window, page 32, layer 0 dense), small enough that a 4K context
goes through the sparse path. The JSON holds the accuracy per variant, the per-case answers,
and the share of cases whose continuation equals dense's.

Usage::

    python benchmarks/bench_passkey_server.py                      # SmolLM2, 4K, 20 cases
    python benchmarks/bench_passkey_server.py --variants dense,freekv,sync --cases 10

Writes ``benchmarks/results/passkey_server.json`` (``--out``), after every variant.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import requests

if str(Path(__file__).resolve().parents[1]) not in sys.path:  # run as a file
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_serving_cpu import (
    MODELS,
    ROOT,
    code_version,
    host_pool_gb,
    model_info,
    server_args,
    start_servers,
    sync_mode_args,
)
from benchmarks.passkey import DEPTHS, KINDS, Case, answer_found, make_case
from freekv_sglang.testing.server import ServerHandle, free_port

VARIANTS = ("dense", "freekv", "sync")


def build_cases(tok: Any, context: int, num: int, seed: int) -> list[Case]:
    """``num`` cases: depth x kind in rounds of ten, the seed advancing per round."""
    grid = [(d, k) for d in DEPTHS for k in KINDS]
    return [
        make_case(tok, grid[i % len(grid)][1], context, grid[i % len(grid)][0],
                  seed + i // len(grid))
        for i in range(num)
    ]  # fmt: skip


def generate_ids(server: ServerHandle, ids: tuple[int, ...], gen: int) -> str:
    body = {
        "input_ids": list(ids),
        "sampling_params": {"temperature": 0, "max_new_tokens": gen, "ignore_eos": True},
    }
    r = requests.post(f"{server.base_url}/generate", json=body, timeout=3600)
    r.raise_for_status()
    return str(r.json()["text"])


def answer_all(server: ServerHandle, cases: list[Case], gen: int, concurrency: int) -> list[str]:
    """Continuations of every case, at most ``concurrency`` requests in flight."""
    out: list[str] = [""] * len(cases)
    errors: list[str] = []
    lock = threading.Lock()  # protects `nxt` and `errors` across the worker threads
    nxt = [0]

    def worker() -> None:
        while True:
            with lock:
                i = nxt[0]
                nxt[0] += 1
            if i >= len(cases):
                return
            try:
                out[i] = generate_ids(server, cases[i].input_ids, gen)
            except requests.RequestException as e:
                with lock:
                    errors.append(f"{cases[i].case_id}: {e!r}")

    threads = [threading.Thread(target=worker) for _ in range(max(1, concurrency))]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    if errors:
        raise RuntimeError(errors[0])
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2", choices=tuple(MODELS))
    ap.add_argument("--context", type=int, default=4096, help="prompt + generated tokens")
    ap.add_argument("--cases", type=int, default=20)
    ap.add_argument("--variants", default="dense,freekv", help="subset of dense,freekv,sync")
    ap.add_argument("--gen-tokens", type=int, default=12, help="new tokens per case")
    ap.add_argument("--concurrency", type=int, default=4, help="requests in flight at once")
    ap.add_argument("--budget", type=int, default=512)
    ap.add_argument("--sink", type=int, default=64)
    ap.add_argument("--window", type=int, default=64)
    ap.add_argument("--page-size", type=int, default=32)
    ap.add_argument("--tau", type=float, default=0.8)
    ap.add_argument("--dense-layers", default="0")
    ap.add_argument("--seed", type=int, default=0, help="passkey data set seed")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/passkey_server.json")
    a = ap.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    variants = [v for v in a.variants.split(",") if v]
    bad = set(variants) - set(VARIANTS)
    if bad:
        raise SystemExit(f"--variants: unknown {sorted(bad)}; choose from {VARIANTS}")
    sync_args, sync_mode = sync_mode_args()
    from transformers import AutoTokenizer

    path = MODELS[a.model]()
    info = model_info(path)
    tok = AutoTokenizer.from_pretrained(path)
    target = min(a.context, info["max_positions"]) - a.gen_tokens - 8
    cases = build_cases(tok, target, a.cases, a.seed)
    max_tokens = max(1, a.concurrency) * (target + a.gen_tokens) + 1024
    t_start = time.perf_counter()
    meta: dict[str, Any] = {
        "python": platform.python_version(), "cpu_count": os.cpu_count(),
        "machine": platform.machine(), "argv": sys.argv[1:] if argv is None else argv,
        "model": a.model, "context": a.context, "prompt_tokens_max": target,
        "cases": a.cases, "gen_tokens": a.gen_tokens, "concurrency": a.concurrency,
        "variants": variants, "sync_mode": sync_mode,
        "freekv": {"budget": a.budget, "sink": a.sink, "window": a.window,
                   "page_size": a.page_size, "tau": a.tau, "dense_layers": a.dense_layers},
        "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "loadavg_start": os.getloadavg(), "code": code_version(),
    }  # fmt: skip
    results: dict[str, Any] = {}
    texts: dict[str, list[str]] = {}

    def write() -> None:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps({"meta": meta, "results": results}, indent=2))

    print(f"starting {', '.join(variants)} servers", flush=True)
    t0 = time.perf_counter()

    def flags(v: str) -> list[str]:
        f = server_args(v, a, sync_args)
        if v != "dense":  # a host pool sized to the run, not to the host's free memory
            f += ["--freekv-host-pool-gb", str(host_pool_gb(info, max_tokens))]
        return [*f, "--nccl-port", str(free_port())]

    specs = {v: (path, flags(v), max_tokens) for v in variants}
    with start_servers(specs) as servers:
        meta["server_start_s"] = time.perf_counter() - t0
        for variant in variants:
            h = servers[variant]
            if not isinstance(h, ServerHandle):
                # The first line only in the JSON: the log tail (printed) holds machine paths.
                print(f"{variant} did not start:\n{h}", flush=True)
                results[variant] = {"error": f"server did not start: {h.splitlines()[0]}"[:300]}
                write()
                continue
            t1 = time.perf_counter()
            try:
                outs = answer_all(h, cases, a.gen_tokens, a.concurrency)
            except Exception as e:  # a server that dies mid-run: record it, go on
                print(f"{variant}: {e}\n{h.log_tail(2000)}", flush=True)
                results[variant] = {"error": f"{type(e).__name__}: {e}".splitlines()[0][:300]}
                write()
                continue
            t2 = time.perf_counter()
            texts[variant] = outs
            solved = [answer_found(c.answer, t) for c, t in zip(cases, outs, strict=True)]
            results[variant] = {
                "correct": sum(solved),
                "accuracy": sum(solved) / len(cases),
                "answer_s": t2 - t1,
                "cases": [
                    {"case_id": c.case_id, "seed_round": i // (len(DEPTHS) * len(KINDS)),
                     "prompt_tokens": c.num_tokens, "answer": c.answer, "solved": s,
                     "output": t}
                    for i, (c, s, t) in enumerate(zip(cases, solved, outs, strict=True))
                ],
            }  # fmt: skip
            if "dense" in texts and variant != "dense":
                same = sum(x == y for x, y in zip(texts["dense"], outs, strict=True))
                results[variant]["same_output_as_dense"] = same / len(cases)
            print(f"[{time.perf_counter() - t_start:7.1f}s] {variant}: {sum(solved)}/"
                  f"{len(cases)} solved", flush=True)  # fmt: skip
            write()
    meta["total_s"] = time.perf_counter() - t_start
    meta["loadavg_end"] = os.getloadavg()
    write()
    print(f"wrote {a.out.relative_to(ROOT) if a.out.is_relative_to(ROOT) else a.out}")
    for v, r in results.items():
        print(f"{v:<7} " + (r["error"][:80] if "error" in r else f"{r['correct']}/{a.cases}"))
    return 1 if any("error" in r for r in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
