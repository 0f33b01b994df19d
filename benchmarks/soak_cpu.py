"""Soak: many random requests, aborts and client disconnects against one FreeKV CPU server.

Question: after thousands of requests of random length, some aborted through SGLang's
``/abort_request`` and some dropped by the client mid-stream, does the server hold no leaked
host pages, budget regions, rows or KV tokens once idle, does its RSS stay bounded, and is the
latency of the last quarter of the run the same as that of the first?

What runs: one real server (``python -m sglang.launch_server`` on 127.0.0.1 only, CPU, the tiny
random Llama, ``--kv-offload freekv`` at a 128-token budget so prompts over ~128 tokens take the
sparse path). A pool of ``--concurrency`` client threads sends ``--requests`` streaming
``/generate`` requests drawn from a seeded generator: prompt lengths from a handful of words to
about 600 tokens, ``max_new_tokens`` 1-64, and per request one of: read to the end, abort
through ``/abort_request`` after a few chunks, or close the connection after a few chunks.
A sampler thread reads the server's counters (``GET /server_info`` ->
``internal_states[0]["freekv"]``, ``GET /v1/loads``) and the RSS of every process of the
server's process group (``/proc/<pid>/status``) every ``--sample-every-s`` seconds. The run is
bounded by the request count and by ``--max-time-s`` (requests not yet started are skipped),
and then waits for the server to go idle and reads the counters a last time.

Baseline in the same run: the first quarter of the requests that ran (by submission order)
against the last quarter (latency p50/p99 of completed requests; RSS at the first sample after
the first quarter against the end). Output: JSON (``--out``, default
``benchmarks/results/soak_cpu.json``), written at the end.

Threads: the client threads only do HTTP and append to per-request records (one record per
thread at a time, a lock around the shared list); the sampler thread only reads.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import requests

REPO = Path(__file__).resolve().parents[1]
if str(REPO / "python") not in sys.path:
    sys.path.insert(0, str(REPO / "python"))

from freekv_sglang.testing.models import tiny_llama_path  # noqa: E402
from freekv_sglang.testing.server import launch_server  # noqa: E402

WORDS = (
    "the of and to in is was for on that with river mountain city garden letter window "
    "morning passkey number remember document story alpha beta gamma delta"
).split()

KINDS = ("complete", "abort", "disconnect")


@dataclass
class Record:
    index: int
    kind: str
    prompt_words: int
    max_new_tokens: int
    start_s: float = 0.0
    latency_s: float = 0.0
    outcome: str = ""  # completed / aborted / disconnected / error: ...
    completion_tokens: int = 0
    prompt_tokens: int = 0


def server_freekv(base: str) -> dict:
    """The runtime's counters from ``/server_info`` (``internal_states[0]["freekv"]``)."""
    r = requests.get(f"{base}/server_info", timeout=120)
    r.raise_for_status()
    return dict(r.json()["internal_states"][0]["freekv"])


def server_loads(base: str) -> dict:
    """SGLang's own load figures of DP rank 0 from ``/v1/loads``."""
    r = requests.get(f"{base}/v1/loads", timeout=120)
    r.raise_for_status()
    body = r.json()
    loads = body.get("loads", body) if isinstance(body, dict) else body
    first = loads[0] if isinstance(loads, list) and loads else loads
    return {
        k: first.get(k)
        for k in ("num_used_tokens", "token_usage", "num_running_reqs", "num_waiting_reqs")
        if isinstance(first, dict)
    }


def group_rss_kib(pgid: int) -> dict[int, int]:
    """VmRSS (KiB) of every live process in process group ``pgid``."""
    out = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            if int(stat.rsplit(")", 1)[1].split()[2]) != pgid:
                continue
            for line in Path(f"/proc/{entry}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    out[int(entry)] = int(line.split()[1])
        except (OSError, ValueError, IndexError):
            continue
    return out


def prompt(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words))


def plan(n: int, seed: int, abort_frac: float, disconnect_frac: float) -> list[Record]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        u = rng.random()
        kind = (
            "abort"
            if u < abort_frac
            else "disconnect"
            if u < abort_frac + disconnect_frac
            else "complete"
        )
        # Half short (fits the budget), half long (sparse path), a few near 600 tokens.
        words = rng.randint(3, 60) if rng.random() < 0.5 else rng.randint(60, 300)
        out.append(Record(i, kind, words, rng.randint(1, 64)))
    return out


def run_one(base: str, rec: Record, seed: int) -> None:
    rng = random.Random(seed * 1_000_003 + rec.index)
    rid = f"soak-{seed}-{rec.index}"
    body = {
        "text": prompt(rng, rec.prompt_words),
        "rid": rid,
        "stream": True,
        "sampling_params": {
            "temperature": rng.choice([0.0, 0.7]),
            "max_new_tokens": rec.max_new_tokens,
            "ignore_eos": True,
        },
    }
    cut_after = rng.randint(1, 4)
    rec.start_s = time.monotonic()
    try:
        with requests.post(f"{base}/generate", json=body, stream=True, timeout=600) as resp:
            resp.raise_for_status()
            chunks = 0
            last: dict = {}
            for line in resp.iter_lines():
                if not line.startswith(b"data:"):
                    continue
                data = line[5:].strip()
                if data == b"[DONE]":
                    break
                msg = json.loads(data)
                if "error" in msg:
                    rec.outcome = "error: " + str(msg["error"])[:200]
                    break
                last = msg
                chunks += 1
                if rec.kind == "disconnect" and chunks >= cut_after:
                    rec.outcome = "disconnected"
                    break  # leaving the with-block closes the connection mid-stream
                if rec.kind == "abort" and chunks == cut_after:
                    requests.post(f"{base}/abort_request", json={"rid": rid}, timeout=60)
            meta = last.get("meta_info", {})
            rec.completion_tokens = int(meta.get("completion_tokens", 0))
            rec.prompt_tokens = int(meta.get("prompt_tokens", 0))
            if not rec.outcome:
                reason = (meta.get("finish_reason") or {}).get("type")
                rec.outcome = "aborted" if reason == "abort" else "completed"
    except requests.RequestException as e:
        rec.outcome = f"error: {type(e).__name__}: {str(e)[:200]}"
    rec.latency_s = time.monotonic() - rec.start_s


def percentile(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, round(q * (len(s) - 1))))]


def quarter_stats(records: list[Record]) -> dict:
    lat = [r.latency_s for r in records if r.outcome == "completed"]
    per_tok = [
        r.latency_s / r.completion_tokens
        for r in records
        if r.outcome == "completed" and r.completion_tokens
    ]
    return {
        "requests": len(records),
        "completed": len(lat),
        "latency_p50_s": percentile(lat, 0.5),
        "latency_p99_s": percentile(lat, 0.99),
        "latency_per_token_p50_s": percentile(per_tok, 0.5),
        "latency_per_token_p99_s": percentile(per_tok, 0.99),
    }


def wait_idle(base: str, timeout_s: float) -> tuple[dict, dict, float]:
    """Poll until no request runs and no request row is left (or the timeout); returns the last
    FreeKV counters, SGLang loads and the seconds waited."""
    t0 = time.monotonic()
    fk, loads = server_freekv(base), server_loads(base)
    while time.monotonic() - t0 < timeout_s:
        busy = (loads.get("num_running_reqs") or 0) + (loads.get("num_waiting_reqs") or 0)
        if fk["rows"] == 0 and not busy:
            break
        time.sleep(1.0)
        fk, loads = server_freekv(base), server_loads(base)
    return fk, loads, time.monotonic() - t0


def soak(base: str, pgid: int, args: argparse.Namespace) -> dict:
    """Run the plan against the server at ``base`` whose processes form group ``pgid``."""
    records = plan(args.requests, args.seed, args.abort_fraction, args.disconnect_fraction)
    samples: list[dict] = []
    stop = threading.Event()
    t_start = time.monotonic()
    done_count = [0]
    lock = threading.Lock()

    def sample() -> None:
        rss = group_rss_kib(pgid)
        try:
            fk = server_freekv(base)
        except requests.RequestException as e:
            fk = {"error": str(e)[:200]}
        with lock:
            done = done_count[0]
        samples.append(
            {
                "t_s": round(time.monotonic() - t_start, 1),
                "requests_done": done,
                "rss_kib_total": sum(rss.values()),
                "rss_kib": {str(k): v for k, v in sorted(rss.items())},
                "freekv": fk,
            }
        )

    def sampler() -> None:
        while not stop.wait(args.sample_every_s):
            sample()

    sample()
    sampler_thread = threading.Thread(target=sampler, daemon=True)
    sampler_thread.start()
    deadline = t_start + args.max_time_s

    def task(rec: Record) -> None:
        if time.monotonic() > deadline:
            rec.outcome = "skipped (time bound)"
            return
        run_one(base, rec, args.seed)
        with lock:
            done_count[0] += 1

    with ThreadPoolExecutor(max_workers=args.concurrency) as pool:
        list(pool.map(task, records))
    stop.set()
    sampler_thread.join()
    run_s = time.monotonic() - t_start
    fk_idle, loads_idle, waited = wait_idle(base, args.idle_timeout_s)
    sample()
    health = requests.get(f"{base}/health", timeout=60).status_code

    # Quarters of the requests that ran (a time bound skips the tail of the plan).
    ran = [r for r in records if not r.outcome.startswith("skipped")]
    n = len(ran)
    q = max(1, n // 4)
    first, last = ran[:q], ran[n - q :]
    first_q, last_q = quarter_stats(first), quarter_stats(last)
    # RSS baseline: the first sample taken once the first quarter finished (warm caches).
    warm = next((s for s in samples if s["requests_done"] >= q), samples[0])
    outcomes: dict[str, int] = {}
    for r in records:
        key = r.outcome if not r.outcome.startswith("error") else "error"
        outcomes[key] = outcomes.get(key, 0) + 1

    def ratio(a: float | None, b: float | None) -> float | None:
        return None if a is None or not b else a / b

    peak_host = max(
        (s["freekv"].get("host_pages_used", 0) for s in samples if "error" not in s["freekv"]),
        default=0,
    )
    return {
        "meta": {
            "script": "benchmarks/soak_cpu.py",
            "argv": sys.argv[1:],
            "settings": {k: v for k, v in vars(args).items() if k != "out"},
            "server_args": list(server_args(args)),
            "cpu_count": os.cpu_count(),
            "load_avg_end": os.getloadavg(),
            "run_s": round(run_s, 1),
            "idle_wait_s": round(waited, 1),
        },
        "outcomes": outcomes,
        "idle": {
            "health_status": health,
            # Pages held by no request and not cached for a prefix.
            "leaked_host_pages": fk_idle["host_pages_used"] - fk_idle.get("prefix_cache_pages", 0),
            "prefix_cache_pages": fk_idle.get("prefix_cache_pages", 0),
            "host_pages_capacity": fk_idle["host_pages_capacity"],
            "rows": fk_idle["rows"],
            "budget_regions_in_use": fk_idle["budget_regions_in_use"],
            "sglang_loads": loads_idle,
            "freekv": fk_idle,
        },
        "peak_host_pages_used": peak_host,
        "rss": {
            "start_kib": samples[0]["rss_kib_total"],
            "after_first_quarter_kib": warm["rss_kib_total"],
            "end_kib": samples[-1]["rss_kib_total"],
            "end_over_after_first_quarter": ratio(
                samples[-1]["rss_kib_total"], warm["rss_kib_total"]
            ),
        },
        "latency": {
            "first_quarter": first_q,
            "last_quarter": last_q,
            "p50_last_over_first": ratio(last_q["latency_p50_s"], first_q["latency_p50_s"]),
            "p99_last_over_first": ratio(last_q["latency_p99_s"], first_q["latency_p99_s"]),
            "p99_per_token_last_over_first": ratio(
                last_q["latency_per_token_p99_s"], first_q["latency_per_token_p99_s"]
            ),
        },
        "samples": [{k: v for k, v in s.items() if k != "rss_kib"} for s in samples],
        "requests": [asdict(r) for r in records] if args.keep_requests else [],
    }


def server_args(args: argparse.Namespace) -> tuple[str, ...]:
    return (
        "--kv-offload",
        "freekv",
        "--freekv-budget",
        str(args.budget),
        "--freekv-sink",
        str(args.sink),
        "--freekv-window",
        str(args.window),
        "--freekv-page-size",
        str(args.page_size),
        "--freekv-dense-layers",
        "",
        "--decode-log-interval",
        "200",
        "--max-running-requests",
        str(args.max_running_requests),
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=2000, help="requests to send (default 2000)")
    p.add_argument("--concurrency", type=int, default=8, help="client threads (default 8)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--abort-fraction", type=float, default=0.1)
    p.add_argument("--disconnect-fraction", type=float, default=0.1)
    p.add_argument(
        "--max-time-s",
        type=float,
        default=3600.0,
        help="no request starts after this many seconds (default 3600)",
    )
    p.add_argument("--sample-every-s", type=float, default=10.0)
    p.add_argument("--idle-timeout-s", type=float, default=120.0)
    p.add_argument("--budget", type=int, default=128)
    p.add_argument("--sink", type=int, default=32)
    p.add_argument("--window", type=int, default=32)
    p.add_argument("--page-size", type=int, default=16)
    p.add_argument("--max-total-tokens", type=int, default=16384)
    p.add_argument("--max-running-requests", type=int, default=16)
    p.add_argument(
        "--url",
        default="",
        help="soak a running loopback server (e.g. http://127.0.0.1:30000) instead of starting one",
    )
    p.add_argument("--pgid", type=int, default=0, help="process group of --url's server (RSS)")
    p.add_argument("--keep-requests", action="store_true", help="store every request record")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "soak_cpu.json")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.url:
        # An already running server (started with server_args()); it is left running.
        result = soak(args.url.rstrip("/"), args.pgid, args)
        result["meta"]["attached_to_running_server"] = True
    else:
        with launch_server(
            tiny_llama_path(),
            *server_args(args),
            max_total_tokens=args.max_total_tokens,
            startup_timeout_s=1800,
        ) as server:
            result = soak(server.base_url, server.process.pid, args)
        result["meta"]["leftover_processes_after_stop"] = server.leftovers
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    idle, lat, rss = result["idle"], result["latency"], result["rss"]
    print(
        f"soak: {args.requests} requests in {result['meta']['run_s']} s, outcomes "
        f"{result['outcomes']}; idle: leaked host pages {idle['leaked_host_pages']}, rows "
        f"{idle['rows']}, budget regions {idle['budget_regions_in_use']}, SGLang used tokens "
        f"{idle['sglang_loads'].get('num_used_tokens')}; RSS end/after-first-quarter "
        f"{rss['end_over_after_first_quarter']}; p99 last/first {lat['p99_last_over_first']}"
    )
    return result


if __name__ == "__main__":
    main()
