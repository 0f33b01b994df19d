"""Passkey accuracy of FreeKV through the real SGLang server at several budgets, next to
``--kv-offload none`` and synchronous selection.

What it measures. For each variant, one ``python -m sglang.launch_server`` on CPU (the same
server flags as `bench_serving_cpu.py`, whose helpers this script reuses) answers ``--cases``
passkey/needle prompts of ``benchmarks/passkey.py`` at ``--context`` tokens (minus the generated
tokens), sent as token ids, greedy, ``--gen-tokens`` new tokens with EOS ignored. A case is
solved when its hidden number appears in the continuation. The cases are spread over five
depths (0.1 to 0.9) and the ``--kinds`` asked for, with one seed per round
(`passkey.spread_cases`, the case set of ``bench_accuracy.py`` too), so every variant answers
the same prompts. Up to ``--concurrency`` requests are in flight at once.

Variants: ``dense`` (``--kv-offload none``) once, and per budget of ``--budgets`` ``freekv``
(speculative retrieval, correction at ``--tau``), ``sync`` (``--freekv-selection current``) and,
when asked, ``rerank`` (``freekv`` with ``--freekv-rerank --rerank`` over key codes of
``--rerank-bits``: the selection's second stage, ``docs/selection.md``), each its own server. Budgets count sink + selected + window tokens (64 + 64 by default, page
32, layer 0 dense). Servers start ``--max-servers`` at a time (side by side; start-up is mostly
imports) and are then asked one after another, so only the measured one works. The JSON holds
per variant the accuracy, the per-case answers, the share of continuations equal to dense's,
and the server's own FreeKV totals (corrections / checks, pages recalled).

Usage::

    python benchmarks/bench_passkey_server.py                 # SmolLM2, 4K, 10 needle cases
    python benchmarks/bench_passkey_server.py --budgets 512 --kinds passkey,needle --cases 20

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
    freekv_totals,
    host_pool_gb,
    model_info,
    server_args,
    start_servers,
    sync_mode_args,
)
from benchmarks.passkey import DEPTHS, KINDS, Case, answer_found, spread_cases
from freekv_sglang.testing.server import ServerHandle, free_port

VARIANTS = ("dense", "freekv", "sync", "rerank")


def build_cases(
    tok: Any, context: int, num: int, seed: int, kinds: tuple[str, ...] = KINDS
) -> list[Case]:
    """``num`` cases: depth x kind in rounds, the seed advancing per round."""
    return spread_cases(tok, context, num, seed, kinds)


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


def variant_keys(variants: list[str], budgets: list[int]) -> list[tuple[str, str, int | None]]:
    """``(key, variant, budget)`` in run order: dense once, then each budget's FreeKV variants."""
    out: list[tuple[str, str, int | None]] = []
    if "dense" in variants:
        out.append(("dense", "dense", None))
    for b in budgets:
        out += [(f"{v}-b{b}", v, b) for v in variants if v != "dense"]
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2", choices=tuple(MODELS))
    ap.add_argument("--context", type=int, default=4096, help="prompt + generated tokens")
    ap.add_argument("--cases", type=int, default=10)
    ap.add_argument("--kinds", default="needle", help="passkey,needle or one of them")
    ap.add_argument(
        "--variants", default="dense,freekv,sync", help="subset of dense,freekv,sync,rerank"
    )
    ap.add_argument("--rerank", type=int, default=8, help="R of the rerank variant")
    ap.add_argument("--rerank-bits", type=int, default=2, help="key bits of the rerank variant")
    ap.add_argument("--gen-tokens", type=int, default=12, help="new tokens per case")
    ap.add_argument("--concurrency", type=int, default=4, help="requests in flight at once")
    ap.add_argument("--budgets", default="512,1024,2048", help="FreeKV budgets (tokens)")
    ap.add_argument("--sink", type=int, default=64)
    ap.add_argument("--window", type=int, default=64)
    ap.add_argument("--page-size", type=int, default=32)
    ap.add_argument("--tau", type=float, default=0.8)
    ap.add_argument("--dense-layers", default="0")
    ap.add_argument("--max-servers", type=int, default=4, help="servers started side by side")
    ap.add_argument("--startup-timeout-s", type=float, default=1500.0)
    ap.add_argument("--seed", type=int, default=0, help="passkey data set seed")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/passkey_server.json")
    a = ap.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    variants = [v for v in a.variants.split(",") if v]
    bad = set(variants) - set(VARIANTS)
    if bad:
        raise SystemExit(f"--variants: unknown {sorted(bad)}; choose from {VARIANTS}")
    budgets = [int(b) for b in a.budgets.split(",") if b]
    keys = variant_keys(variants, budgets)
    sync_args, sync_mode = sync_mode_args()
    from transformers import AutoTokenizer

    path = MODELS[a.model]()
    info = model_info(path)
    tok = AutoTokenizer.from_pretrained(path)
    target = min(a.context, info["max_positions"]) - a.gen_tokens - 8
    kinds = tuple(k for k in a.kinds.split(",") if k)
    cases = build_cases(tok, target, a.cases, a.seed, kinds)
    max_tokens = max(1, a.concurrency) * (target + a.gen_tokens) + 1024
    t_start = time.perf_counter()
    meta: dict[str, Any] = {
        "python": platform.python_version(), "cpu_count": os.cpu_count(),
        "machine": platform.machine(), "argv": sys.argv[1:] if argv is None else argv,
        "model": a.model, "context": a.context, "prompt_tokens_max": target,
        "cases": a.cases, "kinds": list(kinds), "gen_tokens": a.gen_tokens,
        "concurrency": a.concurrency, "variants": [k for k, _, _ in keys],
        "sync_mode": sync_mode,
        "freekv": {"budgets": budgets, "sink": a.sink, "window": a.window,
                   "page_size": a.page_size, "tau": a.tau, "dense_layers": a.dense_layers,
                   "rerank": a.rerank, "rerank_bits": a.rerank_bits},
        "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "loadavg_start": os.getloadavg(), "code": code_version(), "server_start_s": [],
    }  # fmt: skip
    results: dict[str, Any] = {}
    texts: dict[str, list[str]] = {}

    def write() -> None:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps({"meta": meta, "results": results}, indent=2))

    def flags(variant: str, budget: int | None) -> list[str]:
        base = "freekv" if variant == "rerank" else variant
        f = server_args(base, argparse.Namespace(**{**vars(a), "budget": budget}), sync_args)
        if variant == "rerank":
            f += ["--freekv-rerank", str(a.rerank), "--freekv-rerank-bits", str(a.rerank_bits)]
        if variant != "dense":  # a host pool sized to the run, not to the host's free memory
            f += ["--freekv-host-pool-gb", str(host_pool_gb(info, max_tokens))]
        return [*f, "--nccl-port", str(free_port())]

    step = max(1, a.max_servers)
    for g in range(0, len(keys), step):
        group = keys[g : g + step]
        print(f"starting {', '.join(k for k, _, _ in group)} servers", flush=True)
        t0 = time.perf_counter()
        specs = {k: (path, flags(v, b), max_tokens) for k, v, b in group}
        with start_servers(specs, a.startup_timeout_s) as servers:
            meta["server_start_s"].append(time.perf_counter() - t0)
            for key, variant, budget in group:
                results[key] = answer_variant(servers[key], cases, a, texts, key)
                results[key].update(variant=variant, budget=budget)
                r = results[key]
                print(f"[{time.perf_counter() - t_start:7.1f}s] {key}: "
                      + (r["error"][:80] if "error" in r else f"{r['correct']}/{len(cases)}"),
                      flush=True)  # fmt: skip
                write()
    meta["total_s"] = time.perf_counter() - t_start
    meta["loadavg_end"] = os.getloadavg()
    write()
    print(f"wrote {a.out.relative_to(ROOT) if a.out.is_relative_to(ROOT) else a.out}")
    for k, r in results.items():
        same = r.get("same_output_as_dense")
        print(f"{k:<12} " + (r["error"][:80] if "error" in r else f"{r['correct']}/{a.cases}"
              + ("" if same is None else f"  same as dense {same:.0%}")))  # fmt: skip
    return 1 if any("error" in r for r in results.values()) else 0


def answer_variant(
    h: ServerHandle | str,
    cases: list[Case],
    a: argparse.Namespace,
    texts: dict[str, list[str]],
    key: str,
) -> dict[str, Any]:
    """Ask one server every case; its result row (or ``{"error": ...}``)."""
    if not isinstance(h, ServerHandle):
        # The first line only in the JSON: the log tail (printed) holds machine paths.
        print(f"{key} did not start:\n{h}", flush=True)
        return {"error": f"server did not start: {h.splitlines()[0]}"[:300]}
    t1 = time.perf_counter()
    try:
        outs = answer_all(h, cases, a.gen_tokens, a.concurrency)
    except Exception as e:  # a server that dies mid-run: record it, go on
        print(f"{key}: {e}\n{h.log_tail(2000)}", flush=True)
        return {"error": f"{type(e).__name__}: {e}".splitlines()[0][:300]}
    t2 = time.perf_counter()
    texts[key] = outs
    solved = [answer_found(c.answer, t) for c, t in zip(cases, outs, strict=True)]
    rounds = len(DEPTHS) * len(set(c.kind for c in cases))
    row: dict[str, Any] = {
        "correct": sum(solved),
        "accuracy": sum(solved) / len(cases),
        "answer_s": t2 - t1,
        "cases": [
            {"case_id": c.case_id, "seed_round": i // rounds, "prompt_tokens": c.num_tokens,
             "answer": c.answer, "solved": s, "output": t}
            for i, (c, s, t) in enumerate(zip(cases, solved, outs, strict=True))
        ],
    }  # fmt: skip
    if "dense" in texts and key != "dense":
        same = sum(x == y for x, y in zip(texts["dense"], outs, strict=True))
        row["same_output_as_dense"] = same / len(cases)
    totals = freekv_totals(h)
    if totals is not None:
        corrections, checks, recalled = totals
        row["freekv"] = {"corrections": corrections, "checks": checks,
                         "correction_rate": corrections / checks if checks else 0.0,
                         "pages_recalled": recalled}  # fmt: skip
    return row


if __name__ == "__main__":
    sys.exit(main())
