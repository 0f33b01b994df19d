"""FreeKV serving a long document over its budget, next to dense: what ``make demo`` runs.

By default it builds a document of about 3K tokens with one fact hidden in it (a needle of
``benchmarks/passkey.py``: "The secret number of the <adjective> <animal> is NNNNN."), starts
the real SGLang server (``python -m sglang.launch_server``, CPU, float32) with
``--kv-offload freekv`` at a budget of 512 tokens per layer and KV head, and beside it a dense
server (``--kv-offload none``), asks both for the fact (greedy), and prints the two answers and
FreeKV's figures for that request, read from the server's ``/server_info``: the context against
the tokens each sparse layer keeps on the device, the token slots given back to SGLang, the
host pool pages in use, the pages recalled from the host pool and the correction rate.

The document (3,064 tokens, the number at 70% depth, seed 0) is one that SmolLM2 answers at
this budget as dense does; at 512 tokens it finds fewer than half of the needles of
``benchmarks/bench_passkey_server.py``, and ``--depth``/``--seed``/``--budget`` show others.
The dense server costs little wall time: both servers start side by side (start-up is mostly
single-threaded imports), and its answer adds one prefill of the document.

Progress goes to standard error, one line per stage with its time (model conversion, the
document, the servers' start-up, each answer); results go to standard output and, with
``--json``, to a file. The exit status is 0 whenever both servers answered, whatever they
answered; the printed verdict says whether the hidden number came back.

Options: ``--prompt TEXT`` sends one short chat instead (it fits the budget, so FreeKV
attends to all of it); ``--model`` takes ``smollm2`` (default), ``tiny`` (the random
test model) or a local Hugging Face model folder; ``--dense expected`` skips the dense server
and compares with the hidden number only. Extra server arguments follow ``--``.

Threads: the main thread drives the stages; the servers start side by side on worker threads
(``launch_servers``), a ticker thread prints the elapsed time while a stage waits, and a
sampler thread reads ``/server_info`` while the FreeKV request runs. The servers run in their
own sessions (``freekv_sglang.testing.server``); once they are up, every one is stopped when
the demo ends, also on an error or Ctrl-C.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import requests

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a file: python scripts/demo.py
    sys.path.insert(0, str(ROOT))

from benchmarks.passkey import Case, answer_found, make_case  # noqa: E402
from freekv_sglang.testing.models import smollm2_path, tiny_llama_path  # noqa: E402
from freekv_sglang.testing.server import ServerHandle, launch_server, launch_servers  # noqa: E402

#: FreeKV settings per built-in model: (document tokens, budget, sink, window, page size,
#: dense layers). SmolLM2: 512 of ~3K tokens, layer 0 dense as in the paper's accuracy runs.
#: The tiny test model (2 layers, 8K positions): 128 of ~1K tokens, no dense layer.
PRESETS: dict[str, tuple[int, int, int, int, int, str]] = {
    "smollm2": (3072, 512, 64, 64, 32, "0"),
    "tiny": (1024, 128, 32, 32, 16, ""),
    "path": (3072, 512, 64, 64, 32, "0"),
}


class Progress:
    """Stage lines on standard error: ``[demo  41 s] name: done in 12.3 s``."""

    def __init__(self, tick_s: float = 30.0) -> None:
        self.t0 = time.monotonic()
        self.tick_s = tick_s

    def say(self, text: str) -> None:
        print(f"[demo {time.monotonic() - self.t0:4.0f} s] {text}", file=sys.stderr, flush=True)

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Announce ``name``, print the time it has taken every ``tick_s`` seconds, and its
        total time at the end."""
        t = time.monotonic()
        self.say(f"{name} ...")
        done = threading.Event()

        def tick() -> None:
            while not done.wait(self.tick_s):
                self.say(f"{name}: still running ({time.monotonic() - t:.0f} s)")

        ticker = threading.Thread(target=tick, daemon=True)
        ticker.start()
        try:
            yield
        finally:
            done.set()
            ticker.join()
        self.say(f"{name}: done in {time.monotonic() - t:.1f} s")


def resolve_model(spec: str) -> tuple[Path, str]:
    """``smollm2``, ``tiny`` or a folder -> (path, preset key)."""
    if spec == "smollm2":
        return smollm2_path(), "smollm2"
    if spec == "tiny":
        return tiny_llama_path(), "tiny"
    path = Path(spec).expanduser()
    if not (path / "config.json").is_file():
        raise SystemExit(f"--model {spec}: not smollm2, tiny, or a folder with a config.json")
    return path, "path"


#: The longest context the demo's servers accept (``--context-length`` when the model allows
#: more): FreeKV's host pool must hold one request of the context length.
MAX_CONTEXT = 8192


def model_limits(path: Path) -> tuple[int, int, int]:
    """(layers, positions, K and V bytes of one token over all layers in float32, what the CPU
    server stores) from the model's ``config.json``."""
    cfg = json.loads((path / "config.json").read_text())
    heads = cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    layers = cfg["num_hidden_layers"]
    per_token = 2 * layers * cfg.get("num_key_value_heads", heads) * head_dim * 4
    return layers, cfg.get("max_position_embeddings", MAX_CONTEXT), per_token


def freekv_flags(a: argparse.Namespace, path: Path) -> list[str]:
    """``--kv-offload freekv`` with the demo's budget and a host pool sized to one request of
    the context length (the default takes up to half of the host's free memory)."""
    _, positions, per_token = model_limits(path)
    context = min(positions, MAX_CONTEXT)
    pool_gb = 1.25 * context * per_token / 2**30 + 0.05
    return [
        "--kv-offload", "freekv", "--freekv-budget", str(a.budget),
        "--freekv-sink", str(a.sink), "--freekv-window", str(a.window),
        "--freekv-page-size", str(a.page_size), "--freekv-dense-layers", a.dense_layers,
        "--freekv-host-pool-gb", f"{pool_gb:.2f}", *context_flags(path),
    ]  # fmt: skip


def context_flags(path: Path) -> list[str]:
    """``--context-length`` capped at :data:`MAX_CONTEXT` for models that allow more."""
    _, positions, _ = model_limits(path)
    return ["--context-length", str(MAX_CONTEXT)] if positions > MAX_CONTEXT else []


def ask(server: ServerHandle, input_ids: list[int], max_new_tokens: int) -> dict[str, Any]:
    """Greedy ``/generate`` on token ids; returns the JSON body."""
    body: dict[str, Any] = {
        "input_ids": input_ids,
        "sampling_params": {"temperature": 0, "max_new_tokens": max_new_tokens},
    }
    r = requests.post(f"{server.base_url}/generate", json=body, timeout=1800)
    r.raise_for_status()
    return dict(r.json())


def request_figures(
    before: dict[str, Any], samples: list[dict[str, Any]], after: dict[str, Any]
) -> dict[str, Any]:
    """FreeKV's figures for one request on an otherwise idle server: differences of the
    cumulative counters across it, and the most host pages the samples taken while it ran
    (and the state after it, where the prefix cache keeps its pages) saw in use."""

    def delta(key: str) -> float:
        return float(after[key]) - float(before[key])

    checks, corrections = delta("checks"), delta("corrections")
    return {
        "pages_recalled": int(delta("pages_recalled")),
        "mib_recalled": delta("bytes_recalled") / 2**20,
        "head_checks": int(checks),
        "corrections": int(corrections),
        "correction_rate": corrections / checks if checks else 0.0,
        "device_tokens_reclaimed": int(delta("device_tokens_reclaimed_total")),
        "host_pages_used": int(max(s["host_pages_used"] for s in [*samples, after])),
        "host_pages_capacity": int(after["host_pages_capacity"]),
        "pools_consistent": bool(after["pools_consistent"]),
    }


def answer_line(prefix: str, text: str) -> str:
    """The answer as the model would say it: the prompt's answer prefix and the continuation,
    up to its first line break."""
    return (prefix + text).split("\n")[0].strip()


def run_needle(a: argparse.Namespace, path: Path, progress: Progress) -> dict[str, Any]:
    with progress.stage(f"document of {a.tokens} tokens with a fact at {a.depth:.0%} depth"):
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(path)
        case: Case = make_case(tok, "needle", a.tokens, a.depth, a.seed)
    prompt_ids = list(case.input_ids)
    question = case.prompt.rsplit("?", 1)[0].rsplit("\n", 1)[-1] + "?"
    answer_prefix = case.prompt.rsplit("\n", 1)[-1]
    specs = {"freekv": (*freekv_flags(a, path), *a.server_args)}
    if a.dense == "server":
        specs["dense"] = ("--kv-offload", "none", *context_flags(path), *a.server_args)
    managers: dict[str, contextlib.AbstractContextManager[ServerHandle]] = {
        name: launch_server(path, *flags, max_total_tokens=MAX_CONTEXT)
        for name, flags in specs.items()
    }
    result: dict[str, Any] = {
        "model": str(path) if a.model not in PRESETS else a.model,
        "question": question, "expected": case.answer, "depth": a.depth,
        "prompt_tokens": len(prompt_ids),
        "budget": {"tokens": a.budget, "sink": a.sink, "window": a.window,
                   "page_size": a.page_size, "dense_layers": a.dense_layers},
        "comparison": "dense server" if a.dense == "server" else "expected answer",
    }  # fmt: skip
    what = " and ".join(f"{n} ({' '.join(specs[n][:2])})" for n in specs)
    with progress.stage(f"starting the {what} server{'s' if len(specs) > 1 else ''}"):
        servers = launch_servers(managers)
        handles = servers.__enter__()
    try:
        fk = handles["freekv"]
        before = fk.freekv_state()
        with progress.stage("FreeKV answers"), fk.sampling_freekv(every_s=0.25) as samples:
            out = ask(fk, prompt_ids, a.max_tokens)
        after = fk.wait_freekv_idle()
        result["freekv"] = {
            "text": out["text"], "answer": answer_line(answer_prefix, out["text"]),
            "correct": answer_found(case.answer, out["text"]),
            "completion_tokens": out["meta_info"]["completion_tokens"],
            "figures": request_figures(before, samples, after),
        }  # fmt: skip
        if "dense" in handles:
            with progress.stage("dense answers"):
                dense = ask(handles["dense"], prompt_ids, a.max_tokens)
            result["dense"] = {
                "text": dense["text"], "answer": answer_line(answer_prefix, dense["text"]),
                "correct": answer_found(case.answer, dense["text"]),
            }  # fmt: skip
    finally:
        with progress.stage(f"stopping the server{'s' if len(specs) > 1 else ''}"):
            servers.__exit__(None, None, None)
    return result


def run_chat(a: argparse.Namespace, path: Path, progress: Progress) -> dict[str, Any]:
    flags = (*freekv_flags(a, path), *a.server_args)
    with progress.stage("starting the FreeKV server (--kv-offload freekv)"):
        server_cm = launch_server(path, *flags, max_total_tokens=MAX_CONTEXT)
        server = server_cm.__enter__()
    try:
        before = server.freekv_state()
        with progress.stage("FreeKV answers"), server.sampling_freekv(every_s=0.25) as samples:
            body = server.chat(a.prompt, max_tokens=a.max_tokens)
        after = server.wait_freekv_idle()
    finally:
        with progress.stage("stopping the server"):
            server_cm.__exit__(None, None, None)
    usage = body["usage"]
    return {
        "model": str(path) if a.model not in PRESETS else a.model,
        "question": a.prompt, "prompt_tokens": usage["prompt_tokens"],
        "budget": {"tokens": a.budget, "sink": a.sink, "window": a.window,
                   "page_size": a.page_size, "dense_layers": a.dense_layers},
        "freekv": {"answer": body["choices"][0]["message"]["content"].strip(),
                   "completion_tokens": usage["completion_tokens"],
                   "figures": request_figures(before, samples, after)},
    }  # fmt: skip


def context_figures(result: dict[str, Any], num_layers: int) -> None:
    """Adds the context and what the device keeps of it to ``result["freekv"]["figures"]``."""
    b, fk = result["budget"], result["freekv"]
    f = fk["figures"]
    # The last token attends to the prompt and every generated token before it.
    f["context_tokens"] = result["prompt_tokens"] + fk["completion_tokens"] - 1
    f["kept_tokens"] = min(b["tokens"], f["context_tokens"])
    dense = [int(x) for x in b["dense_layers"].split(",") if x.strip()]
    f["sparse_layers"] = num_layers - len(dense)
    f["layers"] = num_layers


def report(result: dict[str, Any]) -> str:
    b, fk = result["budget"], result["freekv"]
    f = fk["figures"]
    n, kept = f["context_tokens"], f["kept_tokens"]
    selected = b["tokens"] - b["sink"] - b["window"]
    lines = [f"question: {result['question']}"]
    if "expected" in result:
        lines[0] += f"  (hidden at {result['depth']:.0%} depth; expected {result['expected']})"

    def verdict(r: dict[str, Any]) -> str:
        return "correct" if r["correct"] else "missed"

    if "correct" in fk:
        lines.append(f"FreeKV (--kv-offload freekv): {fk['answer']}  [{verdict(fk)}]")
    else:
        lines.append(f"FreeKV (--kv-offload freekv): {fk['answer']}")
    if "dense" in result:
        d = result["dense"]
        same = "same text as FreeKV" if d["text"] == fk["text"] else "differs from FreeKV"
        lines.append(f"dense  (--kv-offload none):   {d['answer']}  [{verdict(d)}; {same}]")
    elif "expected" in result:
        lines.append(f"expected (no dense server):   {result['expected']}")
    over = n > kept
    dense = f"dense layers: {b['dense_layers']}" if b["dense_layers"] else "no dense layer"
    pad = " " * 29
    lines += [
        "",
        "FreeKV's figures for this request (server's /server_info):",
        f"  context                    {n:,} tokens ({result['prompt_tokens']:,} prompt + "
        f"{fk['completion_tokens'] - 1} generated before the last)",
        f"  kept on the device         {kept:,} tokens per sparse layer and KV head, "
        f"{100 * kept / n:.1f}% of the context",
        f"{pad}({b['sink']} sink + {selected} selected + {b['window']} window, pages of "
        f"{b['page_size']};",
        f"{pad}{f['sparse_layers']} of {f['layers']} layers sparse, {dense})",
        f"  device slots given back    {f['device_tokens_reclaimed']:,} token slots "
        "(their K/V lives in the host pool)",
        f"  host pool pages in use     {f['host_pages_used']:,} of {f['host_pages_capacity']:,}",
        f"  pages recalled             {f['pages_recalled']:,} (page x layer x KV head, "
        f"{f['mib_recalled']:.2f} MiB) from the host pool",
        f"  correction rate            {f['correction_rate']:.3f} ({f['corrections']} of "
        f"{f['head_checks']} head checks re-selected with the current query)",
    ]
    if not over:
        lines.append("  (the context fits the budget: FreeKV attends to all of it, as dense does)")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        epilog="Extra sglang.launch_server arguments follow --, e.g. -- --log-level info",
    )
    p.add_argument("--model", default="smollm2", help="smollm2, tiny, or a model folder")
    p.add_argument("--prompt", help="send this one short chat message instead of the document")
    p.add_argument(
        "--dense",
        choices=("server", "expected"),
        default="server",
        help="compare with a dense server's answer, or with the hidden number only",
    )
    p.add_argument("--tokens", type=int, help="document length in tokens (chat template in)")
    p.add_argument("--depth", type=float, default=0.7, help="where the fact sits (0..1)")
    p.add_argument("--seed", type=int, default=0, help="the document's seed")
    p.add_argument("--budget", type=int, help="--freekv-budget (tokens per layer and KV head)")
    p.add_argument("--sink", type=int, help="--freekv-sink")
    p.add_argument("--window", type=int, help="--freekv-window")
    p.add_argument("--page-size", type=int, help="--freekv-page-size")
    p.add_argument("--dense-layers", help="--freekv-dense-layers (comma-separated)")
    p.add_argument("--max-tokens", type=int, help="tokens to generate (12; 48 with --prompt)")
    p.add_argument("--json", type=Path, help="also write the results to this file")
    p.add_argument("server_args", nargs="*", help="extra sglang.launch_server arguments")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    progress = Progress()
    note = " (a first run converts it from GGUF, about 2 min)" if a.model == "smollm2" else ""
    with progress.stage(f"model {a.model}{note}"):
        path, preset = resolve_model(a.model)
    defaults = dict(zip(("tokens", "budget", "sink", "window", "page_size", "dense_layers"),
                        PRESETS[preset], strict=True))  # fmt: skip
    defaults["max_tokens"] = 12 if a.prompt is None else 48
    for key, value in defaults.items():
        if getattr(a, key) is None:
            setattr(a, key, value)
    run = run_chat if a.prompt is not None else run_needle
    result = run(a, path, progress)
    context_figures(result, model_limits(path)[0])
    result["total_s"] = time.monotonic() - progress.t0
    print(report(result), flush=True)
    progress.say(f"finished in {result['total_s']:.0f} s")
    if a.json is not None:
        a.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
