"""Decode speed of FreeKV through the real SGLang server on CPU, next to its two baselines.

What it measures. For each model and each variant, one ``python -m sglang.launch_server`` on
CPU (float32, ``torch_native`` attention; `freekv_sglang.testing.server.launch_server`) serves
every cell of the grid (context x batch). All servers start at once (`start_servers`, one
worker thread per start-up) and sleep when idle; the cells then run one at a time, from the
cheapest to the dearest, each on every variant before the next. A cell sends ``batch`` concurrent streaming
``/generate`` requests, each a passkey/needle prompt of the cell's context
(``benchmarks/passkey.py``, sent as token ids), greedy, ``--gen-tokens`` new tokens with EOS
ignored, and records the arrival time and token count of every streamed chunk. It reports:

- decode tokens/s: tokens that arrived while every request of the cell was decoding (after the
  last first token), divided by that span;
- time per output token (TPOT) p50 / p99: inter-arrival gaps of the streamed tokens in that
  span (a chunk of n tokens counts as n gaps of 1/n of its delay);
- time to first token (mean), passkey accuracy (the hidden number appears in the output);
- for the FreeKV variants, correction rate (corrected / checked KV-head checks) and pages
  recalled per generated token (all layers and KV heads) and per (token, sparse layer, KV
  head), from the differences of the server's cumulative ``freekv:`` log line
  (`freekv_sglang.metrics.format_line`, printed every decode step with
  ``--decode-log-interval 1``) before and after the cell.

Variants, each its own server: ``dense`` (``--kv-offload none``), ``freekv`` (speculative
retrieval with correction at ``--tau``) and ``sync`` (``--freekv-selection current``: the
synchronous-retrieval baseline of ArkVale and Quest, which selects pages with the current
query and recalls them before attention; no speculation, so no correction). Ratios: FreeKV over
dense and over sync, per cell.

The FreeKV budget defaults to 1024 tokens (128 sink + 768 selected + 128 window, page 32,
layer 0 dense), so that every context of the grid exceeds it and the sparse path runs.

Usage (defaults: both models, contexts 2048/4096/8192, batches 1/4/16, 32 new tokens; about
an hour on a 2-core CPU with ``--gen-tokens 16``)::

    python benchmarks/bench_serving_cpu.py --gen-tokens 16
    python benchmarks/bench_serving_cpu.py --grid tiny:2048,4096:1,4 --grid smollm2:2048:1

``--grid MODEL:CONTEXTS:BATCHES`` (repeatable) replaces the default grid. Merges its cells into
``benchmarks/results/serving_cpu.json`` (``--out``), which holds every run's cells keyed by
configuration (cell and FreeKV settings; :func:`merge`): a cell measured again replaces the
stored one, and each run's settings and size are kept under ``runs``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a file: python benchmarks/bench_serving_cpu.py
    sys.path.insert(0, str(ROOT))

from benchmarks.passkey import answer_found, make_case  # noqa: E402
from freekv_sglang.testing.models import smollm2_path, tiny_llama_path  # noqa: E402
from freekv_sglang.testing.server import ServerHandle, free_port, launch_server  # noqa: E402

MODELS = {"tiny": tiny_llama_path, "smollm2": smollm2_path}
VARIANTS = ("dense", "freekv", "sync")
DEFAULT_CONTEXTS = (2048, 4096, 8192)
DEFAULT_BATCHES = (1, 4, 16)

_LINE = re.compile(
    r"freekv: correction rate [\d.]+ \((\d+)/(\d+) head checks\), pages recalled (\d+) "
    r"\(([\d.]+) MiB\)"
)


@dataclass
class RequestTrace:
    """Streamed chunks of one request: ``(arrival s, completion tokens so far)``."""

    start: float
    chunks: list[tuple[float, int]] = field(default_factory=list)
    text: str = ""
    error: str = ""


def parse_grid(specs: list[str]) -> dict[str, list[tuple[int, int]]]:
    """``["tiny:2048,4096:1,4"]`` -> ``{"tiny": [(2048, 1), (2048, 4), (4096, 1), ...]}``."""
    out: dict[str, list[tuple[int, int]]] = {}
    for spec in specs:
        try:
            model, ctxs, batches = spec.split(":")
            cells = [(int(c), int(b)) for c in ctxs.split(",") for b in batches.split(",")]
        except ValueError as e:
            raise SystemExit(f"--grid {spec!r}: expected MODEL:CONTEXTS:BATCHES ({e})") from e
        if model not in MODELS:
            raise SystemExit(f"--grid {spec!r}: model must be one of {tuple(MODELS)}")
        out.setdefault(model, []).extend(cells)
    return out


def sync_mode_args() -> tuple[list[str], str]:
    """Server flags of the synchronous-retrieval baseline, and their description for the JSON."""
    return ["--freekv-selection", "current"], "--freekv-selection current"


def code_version() -> dict[str, Any]:
    """The commit of the ``freekv_sglang`` the servers import, and whether its sources differ
    from that commit (the servers find the package through ``sys.path``, so ``PYTHONPATH`` can
    point them at a clean checkout of a commit while the working tree changes)."""
    import freekv_sglang

    pkg = Path(freekv_sglang.__file__).resolve().parent

    def git(*args: str) -> str:
        r = subprocess.run(["git", "-C", str(pkg), *args], capture_output=True, text=True)
        return r.stdout.strip() if r.returncode == 0 else ""

    return {
        "commit": git("rev-parse", "HEAD") or "unknown",
        "package_sources_modified": bool(git("status", "--porcelain", "--", ".")),
        "package_in_this_checkout": pkg.is_relative_to(ROOT),
    }


def server_args(variant: str, a: argparse.Namespace, sync_args: list[str]) -> list[str]:
    # --sleep-on-idle: an idle scheduler polls its sockets instead of spinning a core, so the
    # servers of the other variants, started side by side, do not slow the one measured.
    common = ["--decode-log-interval", "1", "--stream-interval", "1", "--sleep-on-idle"]
    if variant == "dense":
        return ["--kv-offload", "none", *common]
    freekv = [
        "--kv-offload", "freekv", "--freekv-budget", str(a.budget), "--freekv-sink", str(a.sink),
        "--freekv-window", str(a.window), "--freekv-page-size", str(a.page_size),
        "--freekv-dense-layers", a.dense_layers, "--freekv-tau", str(a.tau), *common,
    ]  # fmt: skip
    return freekv + sync_args if variant == "sync" else freekv


def freekv_totals(server: ServerHandle) -> tuple[int, int, int] | None:
    """(corrections, checks, pages recalled) of the server's last ``freekv:`` line."""
    last = None
    for m in _LINE.finditer(server.log_path.read_text(errors="replace")):
        last = m
    if last is None:
        return None
    return int(last[1]), int(last[2]), int(last[3])


def stream_one(base_url: str, ids: list[int], gen: int, trace: RequestTrace) -> None:
    body = {
        "input_ids": ids,
        "stream": True,
        "sampling_params": {"temperature": 0, "max_new_tokens": gen, "ignore_eos": True},
    }
    try:
        with requests.post(f"{base_url}/generate", json=body, stream=True, timeout=3600) as r:
            r.raise_for_status()
            for raw in r.iter_lines():
                if not raw or not raw.startswith(b"data: "):
                    continue
                data = raw[len(b"data: ") :]
                if data == b"[DONE]":
                    break
                out = json.loads(data)
                if "error" in out:
                    trace.error = str(out["error"])
                    break
                n = int(out["meta_info"]["completion_tokens"])
                trace.chunks.append((time.perf_counter(), n))
                trace.text = out.get("text", trace.text)
    except requests.RequestException as e:
        trace.error = repr(e)


def _pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    if not s:
        return float("nan")
    i = min(len(s) - 1, max(0, round(q * (len(s) - 1))))
    return s[i]


def summarize(traces: list[RequestTrace]) -> dict[str, Any]:
    """Decode tokens/s and TPOT over the span in which every request decodes."""
    firsts = [t.chunks[0][0] for t in traces]
    t0 = max(firsts)
    t_end = max(t.chunks[-1][0] for t in traces)
    tokens, gaps = 0, []
    for t in traces:
        prev_t, prev_n = t.chunks[0]
        for at, n in t.chunks[1:]:
            if at > t0 and n > prev_n:
                tokens += n - prev_n
                if prev_t >= t0:
                    gaps.extend([(at - prev_t) / (n - prev_n)] * (n - prev_n))
            prev_t, prev_n = at, n
    span = t_end - t0
    return {
        "decode_tokens_per_s": tokens / span if span > 0 else float("nan"),
        "decode_span_s": span,
        "decode_tokens_in_span": tokens,
        "tpot_p50_ms": 1e3 * _pct(gaps, 0.5),
        "tpot_p99_ms": 1e3 * _pct(gaps, 0.99),
        "ttft_mean_s": sum(f - t.start for f, t in zip(firsts, traces, strict=True)) / len(traces),
        "generated_tokens": sum(t.chunks[-1][1] for t in traces),
    }


def run_cell(server: ServerHandle, cases: list[Any], gen: int, sparse_units: int) -> dict:
    before = freekv_totals(server)
    traces = [RequestTrace(time.perf_counter()) for _ in cases]
    threads = [
        threading.Thread(target=stream_one, args=(server.base_url, list(c.input_ids), gen, tr))
        for c, tr in zip(cases, traces, strict=True)
    ]
    for th, tr in zip(threads, traces, strict=True):
        tr.start = time.perf_counter()
        th.start()
    for th in threads:
        th.join()
    errors = [t.error for t in traces if t.error or not t.chunks]
    if errors:
        print(f"server log tail:\n{server.log_tail(2000)}", flush=True)
        return {"error": errors[0] or "no tokens streamed"}
    time.sleep(1.0)  # the scheduler's log line of the last step
    res = summarize(traces)
    res["passkey_correct"] = sum(
        answer_found(c.answer, t.text) for c, t in zip(cases, traces, strict=True)
    )
    res["passkey_accuracy"] = res["passkey_correct"] / len(cases)
    res["prompt_tokens"] = [c.num_tokens for c in cases]
    after = freekv_totals(server)
    if after is not None:
        c0, k0, p0 = before or (0, 0, 0)
        corr, checks, pages = after[0] - c0, after[1] - k0, after[2] - p0
        decode_tokens = res["generated_tokens"] - len(cases)
        res["correction_rate"] = corr / checks if checks else 0.0
        res["head_checks"] = checks
        res["pages_recalled"] = pages
        res["pages_recalled_per_token"] = pages / max(decode_tokens, 1)
        res["pages_recalled_per_head_step"] = pages / max(decode_tokens, 1) / sparse_units
    return res


def model_info(path: Path) -> dict[str, int]:
    cfg = json.loads((path / "config.json").read_text())
    heads = cfg["num_attention_heads"]
    return {
        "layers": cfg["num_hidden_layers"],
        "kv_heads": cfg.get("num_key_value_heads", heads),
        "head_dim": cfg.get("head_dim") or cfg["hidden_size"] // heads,
        "max_positions": cfg.get("max_position_embeddings", 8192),
    }


def host_pool_gb(info: dict[str, int], tokens: int) -> float:
    """``--freekv-host-pool-gb`` for ``tokens`` float32 tokens of the model, plus a quarter.

    Without the flag the adapter sizes each server's host pool from the host's free memory (up
    to half of it), so several FreeKV servers started side by side exhaust a small host."""
    per_token = 2 * info["layers"] * info["kv_heads"] * info["head_dim"] * 4
    return round(1.25 * tokens * per_token / 2**30 + 0.05, 2)


def ratios(results: list[dict]) -> list[dict]:
    """FreeKV over dense and over sync, per (model, context, batch)."""
    by = {(r["model"], r["context"], r["batch"], r["variant"]): r for r in results}
    out = []
    for (model, ctx, batch, variant), r in sorted(by.items()):
        if variant != "freekv" or "error" in r:
            continue
        row: dict[str, Any] = {"model": model, "context": ctx, "batch": batch}
        for base in ("dense", "sync"):
            b = by.get((model, ctx, batch, base))
            if b and "error" not in b:
                row[f"tokens_per_s_vs_{base}"] = r["decode_tokens_per_s"] / b["decode_tokens_per_s"]
                row[f"tpot_p50_vs_{base}"] = r["tpot_p50_ms"] / b["tpot_p50_ms"]
        out.append(row)
    return out


def table(results: list[dict], rat: list[dict]) -> str:
    head = (
        f"{'model':<8} {'ctx':>5} {'B':>3} {'variant':<7} {'tok/s':>7} {'p50 ms':>7} "
        f"{'p99 ms':>7} {'corr':>5} {'pg/tok':>7} {'passkey':>7}"
    )
    lines = [head, "-" * len(head)]
    for r in results:
        if "error" in r:
            lines.append(f"{r['model']:<8} {r['context']:>5} {r['batch']:>3} {r['variant']:<7} "
                         f"error: {r['error'][:60]}")  # fmt: skip
            continue
        corr = f"{r['correction_rate']:.2f}" if "correction_rate" in r else "-"
        pg = f"{r['pages_recalled_per_token']:.1f}" if "pages_recalled_per_token" in r else "-"
        lines.append(
            f"{r['model']:<8} {r['context']:>5} {r['batch']:>3} {r['variant']:<7} "
            f"{r['decode_tokens_per_s']:>7.2f} {r['tpot_p50_ms']:>7.1f} {r['tpot_p99_ms']:>7.1f} "
            f"{corr:>5} {pg:>7} {r['passkey_correct']:>3}/{r['batch']:<3}"
        )
    lines.append("")
    lines.append(f"{'model':<8} {'ctx':>5} {'B':>3}  freekv/dense tok/s  freekv/sync tok/s")
    for x in rat:
        d = x.get("tokens_per_s_vs_dense", float("nan"))
        s = x.get("tokens_per_s_vs_sync", float("nan"))
        lines.append(f"{x['model']:<8} {x['context']:>5} {x['batch']:>3}  {d:>18.2f}  {s:>17.2f}")
    return "\n".join(lines)


def config_key(model: str, context: int, batch: int, meta: dict[str, Any]) -> str:
    """A cell's key in the results file: the cell and the run settings its numbers depend on."""
    f = meta["freekv"]
    return (
        f"{model} context={context} batch={batch} gen_tokens={meta['gen_tokens']} "
        f"budget={f['budget']} sink={f['sink']} window={f['window']} page_size={f['page_size']} "
        f"tau={f['tau']} dense_layers={f['dense_layers']}"
    )


def load_results(path: Path) -> dict[str, Any]:
    """The results file, empty when there is none yet; exits on a file of another format."""
    if not path.is_file():
        return {"runs": {}, "configurations": {}}
    doc = json.loads(path.read_text())
    if not isinstance(doc, dict) or set(doc) != {"runs", "configurations"}:
        raise SystemExit(f"{path}: not a results file of this script (runs, configurations)")
    return doc


def merge(
    doc: dict[str, Any], meta: dict[str, Any], results: list[dict[str, Any]]
) -> dict[str, Any]:
    """``doc`` (a results file) with this run's cells in it.

    The file holds ``runs`` (each run's ``meta``, keyed by its ``started_utc``) and
    ``configurations`` (keyed by :func:`config_key`): per cell, the run that measured it, its
    rows (one per variant) and its ratios. A cell that this run measured on at least one variant
    replaces the stored one, all variants together, so that a cell's ratios always compare
    measurements of one run; a cell that this run only skipped or failed is stored only where
    there was none. Runs that no cell refers to any more are dropped.
    """
    run_id = meta["started_utc"]
    configs = dict(doc["configurations"])
    cells: dict[tuple[str, int, int], list[dict[str, Any]]] = {}
    for r in results:
        cells.setdefault((r["model"], r["context"], r["batch"]), []).append(r)
    for (model, ctx, batch), rows in cells.items():
        key = config_key(model, ctx, batch, meta)
        stored = configs.get(key)
        if stored and stored["run"] != run_id and all("error" in r for r in rows):
            continue
        entry: dict[str, Any] = {"run": run_id, "results": rows}
        rat = ratios(rows)
        if rat:
            entry["ratios"] = rat[0]
        configs[key] = entry
    runs = {**doc["runs"], run_id: meta}
    used = {c["run"] for c in configs.values()}

    def order(item: tuple[str, dict[str, Any]]) -> tuple[str, int, int, str]:
        row = item[1]["results"][0]
        return row["model"], row["context"], row["batch"], item[0]

    return {
        "runs": {k: runs[k] for k in sorted(runs) if k in used},
        "configurations": dict(sorted(configs.items(), key=order)),
    }


def write(out: Path, meta: dict[str, Any], results: list[dict[str, Any]]) -> list[dict]:
    """Merge this run's cells into the results file ``out`` (after every cell, so an
    interrupted run keeps what it measured); returns the run's ratios."""
    # What the run did not measure and why (time budget, a server that failed), per cell.
    missing: dict[tuple[str, int, int], dict[str, Any]] = {}
    for r in results:
        if "error" in r:
            m = missing.setdefault((r["model"], r["context"], r["batch"]), {"variants": []})
            m["variants"].append(r["variant"])
            m.setdefault("reason", r["error"].split("\n")[0][:200])
    meta["not_measured"] = [
        {"model": k[0], "context": k[1], "batch": k[2], **v} for k, v in missing.items()
    ]
    doc = merge(load_results(out), meta, results)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=2) + "\n")
    return ratios(results)


def cell_order(cells: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Cells from the cheapest (fewest prompt tokens, ``context * batch``) to the dearest, so a
    time budget cuts the most expensive cells; ties: the shorter context first."""
    return sorted(set(cells), key=lambda cb: (cb[0] * cb[1], cb[0], cb[1]))


def predicted_cell_s(done: list[tuple[int, int, float]], ctx: int, batch: int) -> float:
    """Seconds the cell ``(ctx, batch)`` is expected to take on all variants, scaled from the
    dearest measured cell by prompt tokens times context (prefill's attention grows with the
    square of the context); 0 before any cell was measured."""
    if not done:
        return 0.0
    c0, b0, s0 = max(done, key=lambda d: d[0] * d[1])
    return s0 * (batch * ctx * ctx) / (b0 * c0 * c0)


@contextlib.contextmanager
def start_servers(
    specs: dict[Any, tuple[Path, list[str], int]], startup_timeout_s: float = 900.0
) -> Iterator[dict[Any, ServerHandle | str]]:
    """Start one server per ``key: (model path, flags, max total tokens)``, all at once
    (start-up is mostly single-threaded imports, so starting them side by side takes less wall
    time than one after another); yields each key's handle, or the error text of a server that
    failed to start. Every server that
    came up is stopped on exit. Each start-up runs ``launch_server``'s ``__enter__`` on a
    worker thread; ``abandon`` tells a worker whose server comes up after the caller gave up
    (an exception or SIGTERM in the caller) to stop it at once, so giving up during start-up
    returns once the pending start-ups have ended (at most the start-up timeout)."""
    cms = {
        k: launch_server(p, *f, max_total_tokens=n, startup_timeout_s=startup_timeout_s)
        for k, (p, f, n) in specs.items()
    }
    abandon = threading.Event()

    def enter(v: Any) -> ServerHandle:
        h = cms[v].__enter__()
        if abandon.is_set():
            cms[v].__exit__(None, None, None)
            raise RuntimeError("abandoned")
        return h

    out: dict[Any, ServerHandle | str] = {}
    with contextlib.ExitStack() as stack, ThreadPoolExecutor(len(cms)) as pool:
        futures = {v: pool.submit(enter, v) for v in cms}
        try:
            for v, fut in futures.items():
                try:
                    out[v] = fut.result()
                    stack.push(cms[v])
                except Exception as e:  # a server that fails to start: record, go on
                    out[v] = f"{type(e).__name__}: {e}"
        except BaseException:
            abandon.set()
            for v, fut in futures.items():
                if v not in out and fut.done() and fut.exception() is None:
                    stack.push(cms[v])
            raise
        yield out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--grid", action="append", default=[], metavar="MODEL:CONTEXTS:BATCHES",
                    help="cells to run, e.g. tiny:2048,4096:1,4 (repeatable; default: both "
                    "models x 2048,4096,8192 x 1,4,16)")  # fmt: skip
    ap.add_argument("--variants", default=",".join(VARIANTS), help="subset of dense,freekv,sync")
    ap.add_argument("--gen-tokens", type=int, default=32, help="new tokens per request")
    ap.add_argument("--budget", type=int, default=1024)
    ap.add_argument("--sink", type=int, default=128)
    ap.add_argument("--window", type=int, default=128)
    ap.add_argument("--page-size", type=int, default=32)
    ap.add_argument("--tau", type=float, default=0.8)
    ap.add_argument("--dense-layers", default="0")
    ap.add_argument("--seed", type=int, default=0, help="passkey data set seed")
    ap.add_argument("--time-budget-s", type=float, default=None,
                    help="a cell is skipped when the run would pass this many seconds before "
                    "it ends (its time predicted from the cells before it)")  # fmt: skip
    ap.add_argument("--startup-timeout-s", type=float, default=900.0,
                    help="how long a server may take to become healthy")  # fmt: skip
    ap.add_argument("--one-variant-at-a-time", action="store_true",
                    help="run one variant's servers at a time (every cell on it, then the next "
                    "variant) instead of all side by side: for grids whose servers do not fit "
                    "in memory together")  # fmt: skip
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/serving_cpu.json")
    a = ap.parse_args(argv)
    load_results(a.out)  # refuse a file of another format before any server starts
    # SIGTERM (e.g. from `timeout`) unwinds like Ctrl-C, so every server's group is stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    grid = parse_grid(a.grid) or {
        m: [(c, b) for c in DEFAULT_CONTEXTS for b in DEFAULT_BATCHES] for m in MODELS
    }
    variants = [v for v in a.variants.split(",") if v]
    bad = set(variants) - set(VARIANTS)
    if bad:
        raise SystemExit(f"--variants: unknown {sorted(bad)}; choose from {VARIANTS}")
    sync_args, sync_mode = sync_mode_args()
    from transformers import AutoTokenizer

    t_start = time.perf_counter()

    def elapsed() -> float:
        return time.perf_counter() - t_start

    results: list[dict[str, Any]] = []
    meta: dict[str, Any] = {
        "python": platform.python_version(), "cpu_count": os.cpu_count(),
        "machine": platform.machine(), "argv": sys.argv[1:] if argv is None else argv,
        "grid": {m: [list(c) for c in cell_order(cells)] for m, cells in grid.items()},
        "variants": variants, "gen_tokens": a.gen_tokens, "sync_mode": sync_mode,
        "freekv": {"budget": a.budget, "sink": a.sink, "window": a.window,
                   "page_size": a.page_size, "tau": a.tau, "dense_layers": a.dense_layers},
        "time_budget_s": a.time_budget_s,
        "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "loadavg_start": os.getloadavg(), "code": code_version(),
    }  # fmt: skip

    def record(model: str, variant: str, ctx: int, batch: int, r: dict[str, Any]) -> None:
        results.append({"model": model, "variant": variant, "context": ctx, "batch": batch, **r})
        msg = r.get("error") or f"{r['decode_tokens_per_s']:.2f} tok/s"
        print(f"[{elapsed():7.1f}s] {model} {variant} ctx={ctx} B={batch}: {msg[:300]}",
              flush=True)  # fmt: skip

    @dataclass
    class ModelRun:
        path: Path
        cells: list[tuple[int, int]]
        sparse_units: int
        target: dict[int, int]
        max_tokens: int
        tok: Any
        info: dict[str, int]

    runs: dict[str, ModelRun] = {}
    for model, grid_cells in grid.items():
        path = MODELS[model]()
        info = model_info(path)
        dense_layers = [int(x) for x in a.dense_layers.split(",") if x]
        cells = cell_order(grid_cells)
        runs[model] = ModelRun(
            path=path,
            cells=cells,
            sparse_units=(info["layers"] - len(dense_layers)) * info["kv_heads"],
            # Leave room for the generated tokens inside the model's positions.
            target={c: min(c, info["max_positions"]) - a.gen_tokens - 8 for c, _ in cells},
            max_tokens=max(b * (c + a.gen_tokens) for c, b in cells) + 1024,
            tok=AutoTokenizer.from_pretrained(path),
            info=info,
        )

    def flags(m: str, v: str) -> list[str]:
        f = server_args(v, a, sync_args)
        if v != "dense":
            f += ["--freekv-host-pool-gb", str(host_pool_gb(runs[m].info, runs[m].max_tokens))]
        # Servers started side by side can pick the same distributed-init port; give each one.
        return [*f, "--nccl-port", str(free_port())]

    def measure_group(servers: dict[Any, ServerHandle | str], group: list[str]) -> None:
        for key, h in servers.items():
            if not isinstance(h, ServerHandle):
                print(f"{key} did not start:\n{h}", flush=True)
        for key, h in list(servers.items()):
            if isinstance(h, ServerHandle):
                try:
                    h.generate("Warm up the server.", max_new_tokens=4)
                except Exception as e:  # a server that dies at once: record, go on
                    servers[key] = f"warm-up failed: {type(e).__name__}: {e}"
        for model, run in runs.items():
            measured: list[tuple[int, int, float]] = []
            for ctx, batch in run.cells:
                need = predicted_cell_s(measured, ctx, batch)
                skip = bool(a.time_budget_s) and elapsed() + need > a.time_budget_s
                t_cell = elapsed()
                cases = None
                for v in group:
                    h = servers[(model, v)]
                    if not isinstance(h, ServerHandle):
                        # The first line only: the log tail (printed) holds machine paths.
                        err = f"server did not start: {h.splitlines()[0] if h else ''}"
                        record(model, v, ctx, batch, {"error": err[:300]})
                        continue
                    if skip:
                        err = f"skipped: time budget (predicted {need:.0f} s)"
                        record(model, v, ctx, batch, {"error": err})
                        continue
                    if cases is None:
                        cases = [
                            make_case(run.tok, ("passkey", "needle")[i % 2], run.target[ctx],
                                      (0.1 + 0.8 * i / 15) % 1.0, a.seed + i)
                            for i in range(batch)
                        ]  # fmt: skip
                    try:
                        r = run_cell(h, cases, a.gen_tokens, run.sparse_units)
                    except Exception as e:  # a server that dies mid-cell: record, go on
                        print(f"{model} {v}: {e}\n{h.log_tail(2000)}", flush=True)
                        r = {"error": f"{type(e).__name__}: {e}".splitlines()[0][:300]}
                    record(model, v, ctx, batch, r)
                    write(a.out, meta, results)
                if not skip and cases is not None:
                    measured.append((ctx, batch, elapsed() - t_cell))

    # All variants side by side (each cell measured on every variant before the next), or,
    # with --one-variant-at-a-time, one variant's servers at a time (for cells whose servers do
    # not fit in memory together); the cases of a cell are the same either way (seeded).
    groups = [[v] for v in variants] if a.one_variant_at_a_time else [variants]
    meta["server_start_s"] = []
    for group in groups:
        specs = {
            (m, v): (run.path, flags(m, v), run.max_tokens)
            for m, run in runs.items()
            for v in group
        }
        print(f"[{elapsed():7.1f}s] starting {len(specs)} servers", flush=True)
        t_group = elapsed()
        with start_servers(specs, a.startup_timeout_s) as servers:
            meta["server_start_s"].append(elapsed() - t_group)
            print(f"[{elapsed():7.1f}s] servers started", flush=True)
            measure_group(servers, group)
    meta["total_s"] = elapsed()
    meta["loadavg_end"] = os.getloadavg()
    rat = write(a.out, meta, results)
    print(f"wrote {a.out.relative_to(ROOT) if a.out.is_relative_to(ROOT) else a.out}")
    print(table(results, rat))
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
