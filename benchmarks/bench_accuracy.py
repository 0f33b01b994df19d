"""Accuracy of FreeKV retrieval on a real model, next to dense attention and two baselines.

What it measures. SmolLM2-135M-Instruct (float32, CPU, transformers) answers the long-document
passkey/needle cases of ``benchmarks/passkey.py`` with its attention replaced by
`freekv_sglang.attention.freekv_attention`. Prefill is dense (as in FreeKV); every decode step
then runs, per layer, exactly what the engine does. For each token budget and correction
threshold tau it reports:

- passkey/needle accuracy (the number appears in the greedy continuation), next to dense;
- greedy-token agreement with dense (share of positions with the same token; and the share
  before the first divergence), over ``--gen-tokens`` decode steps;
- attention-mass recall (dense softmax mass inside the attended set) and the relative L2 error
  of the attention output, averaged over query heads, decode steps and sparse layers;
- correction rate (corrected KV-head checks / checks) and page miss rate between steps
  (pages recalled / pages selected).

Variants, all in the same run: ``dense``; ``freekv`` (speculative selection with q_{t-1}, tau
off / 0.8 / 0.9); ``quest`` (non-speculative: select with the current query each step, as
Quest/ArkVale); ``sink+window`` (no selection). Layer 0 is dense for all sparse variants
(paper), unless ``--dense-layers`` says otherwise.

Size. The default run takes 4 cases spread over the grid of contexts up to 3072 tokens
(passkey and needle, 2048 and 3072 tokens) and 64 decode steps: 35 minutes on 2 CPU cores
shared with other jobs (load about 10), less on an idle host. ``--num-cases`` and
``--max-tokens`` scale it; ``--full`` runs all 60 cases up to 8192 tokens (hours on CPU). The
results name the size that ran. ``sink+window`` does not depend on the budget (only its
dense-while-it-fits rule does), so its three rows agree whenever the prompts exceed 1024.

Usage::

    python benchmarks/bench_accuracy.py                       # default size, SmolLM2
    python benchmarks/bench_accuracy.py --full
    python benchmarks/bench_accuracy.py --num-cases 4 --max-tokens 2048 --gen-tokens 16

Writes ``benchmarks/results/accuracy.json`` and ``accuracy.md`` (``--out`` to change).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

if str(Path(__file__).resolve().parents[1]) not in sys.path:  # run as a file
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.passkey import Case, answer_found, make_cases, pick
from freekv_sglang.attention import dense_attention, freekv_attention, prime_after_prefill
from freekv_sglang.config import FreeKVConfig
from freekv_sglang.state import FreeKVState

ATTN_NAME = "freekv_bench"
RESULTS = Path(__file__).resolve().parent / "results"


@dataclass(frozen=True)
class Variant:
    """One column of the comparison: ``cfg is None`` means dense attention."""

    name: str
    budget: int | None
    tau: float | None
    selection: str
    cfg: FreeKVConfig | None


def make_variants(
    budgets: list[int],
    taus: list[float | None],
    page_size: int,
    sink: int,
    window: int,
    dense_layers: tuple[int, ...],
) -> list[Variant]:
    out = [Variant("dense", None, None, "dense", None)]
    for budget in budgets:

        def cfg(selection: str, tau: float | None, budget: int = budget) -> FreeKVConfig:
            return FreeKVConfig(
                page_size=page_size,
                sink_tokens=sink,
                window_tokens=window,
                budget_tokens=budget,
                tau=tau,
                dense_layers=dense_layers,
                selection=selection,  # type: ignore[arg-type]
            )

        for tau in taus:
            label = "off" if tau is None else f"{tau:g}"
            out.append(Variant(f"freekv-b{budget}-tau{label}", budget, tau, "speculative", cfg(
                "speculative", tau
            )))  # fmt: skip
        out.append(Variant(f"quest-b{budget}", budget, None, "current", cfg("current", None)))
        out.append(Variant(f"sink+window-b{budget}", budget, None, "none", cfg("none", None)))
    return out


class Runner:
    """Owns the model's KV caches and routes each attention call to dense or FreeKV.

    The model runs with ``use_cache=False``: this object keeps the caches itself, as HND
    tensors ``[rows, H, capacity, D]`` per layer (seen by the attention functions through NHD
    views), so a ragged decode batch is just per-row positions. Prefill writes rows one
    request at a time; decode writes the new token of every row at its own position. Prompt
    KV is written once and shared by every variant (decode only writes past the prompt).
    """

    def __init__(self, model: Any, rows: int, capacity: int) -> None:
        from transformers import AttentionInterface

        AttentionInterface.register(ATTN_NAME, self._attention)
        self.model = model
        model.set_attn_implementation(ATTN_NAME)
        c = model.config
        self.num_layers = c.num_hidden_layers
        self.h_q = c.num_attention_heads
        self.h = c.num_key_value_heads
        self.d = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        self.capacity = capacity
        shape = (rows, self.h, capacity, self.d)
        self.k = [torch.zeros(shape) for _ in range(self.num_layers)]
        self.v = [torch.zeros(shape) for _ in range(self.num_layers)]
        self.q_last = [torch.zeros(rows, self.h_q, self.d) for _ in range(self.num_layers)]
        self.mode = "prefill"
        self.row = 0
        self.batch = 0
        self.pos = torch.zeros(0, dtype=torch.int64)
        self.max_len = 0
        self.state: FreeKVState | None = None

    def _attention(
        self,
        module: Any,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: Any,
        scaling: float | None = None,
        **_: Any,
    ) -> tuple[torch.Tensor, None]:
        layer = module.layer_idx
        scale = self.d**-0.5 if scaling is None else scaling
        if self.mode == "prefill":
            t = key.shape[2]
            self.k[layer][self.row, :, :t] = key[0]
            self.v[layer][self.row, :, :t] = value[0]
            self.q_last[layer][self.row] = query[0, :, -1]
            out = torch.nn.functional.scaled_dot_product_attention(
                query, key, value, is_causal=True, scale=scale, enable_gqa=True
            )
            return out.transpose(1, 2), None
        b = self.batch
        ar = torch.arange(b)
        self.k[layer][ar, :, self.pos] = key[:, :, 0]
        self.v[layer][ar, :, self.pos] = value[:, :, 0]
        seq = self.pos + 1
        kv = self.k[layer][:b, :, : self.max_len].transpose(1, 2)
        vv = self.v[layer][:b, :, : self.max_len].transpose(1, 2)
        q = query[:, :, 0]
        if self.state is None:
            out = dense_attention(q, kv, vv, seq, scale)
        else:
            out = freekv_attention(
                q, kv, vv, seq, self.state, layer, ar, scale=scale, collect_metrics=True
            )
        return out.unsqueeze(1), None

    @torch.inference_mode()
    def prefill(self, row: int, ids: list[int] | tuple[int, ...]) -> int:
        """Dense prefill of one request into ``row``; returns its first greedy token."""
        self.mode, self.row = "prefill", row
        x = torch.tensor([list(ids)])
        logits = self.model(input_ids=x, use_cache=False, logits_to_keep=1).logits
        return int(logits[0, -1].argmax())

    @torch.inference_mode()
    def decode(
        self, variant: Variant, prompt_lens: list[int], first: list[int], steps: int
    ) -> tuple[list[list[int]], dict[str, float]]:
        """Greedy decode ``steps`` tokens for rows ``0..B-1`` under ``variant``."""
        b = len(prompt_lens)
        lens = torch.tensor(prompt_lens)
        self.state = None
        if variant.cfg is not None:
            self.state = FreeKVState(
                variant.cfg,
                num_layers=self.num_layers,
                num_q_heads=self.h_q,
                num_kv_heads=self.h,
                head_dim=self.d,
                max_requests=b,
                max_seq_len=self.capacity,
            )
            rows = torch.arange(b)
            self.state.add_request(rows)
            top = int(lens.max())
            for layer in range(self.num_layers):
                kv = self.k[layer][:b, :, :top].transpose(1, 2)
                prime_after_prefill(self.state, layer, rows, self.q_last[layer][:b], kv, lens)
        self.mode, self.batch = "decode", b
        tok = torch.tensor(first)
        out: list[list[int]] = [[] for _ in range(b)]
        for _ in range(steps):
            self.pos = lens.clone()
            self.max_len = int(lens.max()) + 1
            logits = self.model(
                input_ids=tok.view(b, 1), position_ids=self.pos.view(b, 1), use_cache=False
            ).logits
            tok = logits[:, -1].argmax(-1)
            for i, t in enumerate(tok.tolist()):
                out[i].append(t)
            lens = lens + 1
        counters = self.state.counters() if self.state is not None else {}
        self.state = None
        return out, counters


def _agreement(tokens: list[int], ref: list[int]) -> tuple[float, float]:
    n = len(ref)
    same = sum(int(a == b) for a, b in zip(tokens, ref, strict=True)) / n
    prefix = next((i for i, (a, b) in enumerate(zip(tokens, ref, strict=True)) if a != b), n)
    return same, prefix / n


def run(
    model: Any,
    tokenizer: Any,
    cases: list[Case],
    variants: list[Variant],
    gen_tokens: int,
    batch: int,
    log: Any = print,
) -> dict[str, Any]:
    """Every variant on every case; returns per-variant aggregates and per-case outputs."""
    capacity = max(c.num_tokens for c in cases) + gen_tokens + 1
    runner = Runner(model, min(batch, len(cases)), capacity)
    per_variant: dict[str, dict[str, Any]] = {
        v.name: {"tokens": {}, "counters": [], "seconds": 0.0} for v in variants
    }
    prefill_s = 0.0
    for start in range(0, len(cases), batch):
        chunk = cases[start : start + batch]
        t0 = time.perf_counter()
        first = [runner.prefill(i, c.input_ids) for i, c in enumerate(chunk)]
        prefill_s += time.perf_counter() - t0
        lens = [c.num_tokens for c in chunk]
        for v in variants:
            t0 = time.perf_counter()
            toks, counters = runner.decode(v, lens, first, gen_tokens)
            dt = time.perf_counter() - t0
            rec = per_variant[v.name]
            rec["seconds"] += dt
            rec["counters"].append(counters)
            for c, f, t in zip(chunk, first, toks, strict=True):
                rec["tokens"][c.case_id] = [f, *t]
            log(f"  cases {start}-{start + len(chunk) - 1} {v.name:28s} {dt:7.1f} s")
    dense = per_variant["dense"]["tokens"]
    results = []
    for v in variants:
        rec = per_variant[v.name]
        solved, agree, prefix, outputs = 0, [], [], {}
        for c in cases:
            toks = rec["tokens"][c.case_id]
            text = tokenizer.decode(toks, skip_special_tokens=True)
            outputs[c.case_id] = text
            solved += int(answer_found(c.answer, text))
            a, p = _agreement(toks[1:], dense[c.case_id][1:])
            agree.append(a)
            prefix.append(p)
        tot: dict[str, float] = {}
        for cnt in rec["counters"]:
            for key in ("checks", "corrections", "pages_selected", "pages_recalled", "steps"):
                tot[key] = tot.get(key, 0) + cnt.get(key, 0)
            for key in ("mass_recall", "rel_err"):
                if key in cnt:
                    tot[key + "_w"] = tot.get(key + "_w", 0.0) + cnt[key] * cnt["steps"]
        steps = tot.get("steps", 0)
        row: dict[str, Any] = {
            "variant": v.name,
            "selection": v.selection,
            "budget_tokens": v.budget,
            "tau": v.tau,
            "accuracy": solved / len(cases),
            "token_agreement": sum(agree) / len(agree),
            "prefix_agreement": sum(prefix) / len(prefix),
            "mass_recall": tot["mass_recall_w"] / steps if steps else None,
            "rel_err": tot["rel_err_w"] / steps if steps else None,
            "correction_rate": tot["corrections"] / tot["checks"] if tot.get("checks") else None,
            "page_miss_rate": (
                tot["pages_recalled"] / tot["pages_selected"] if tot.get("pages_selected") else None
            ),
            "decode_seconds": rec["seconds"],
            "outputs": outputs,
        }
        if v.cfg is not None:
            row["config"] = {
                k: (list(x) if isinstance(x, tuple) else x)
                for k, x in asdict(v.cfg).items()
                if not k.startswith("_")
            }
            row["selected_pages"] = v.cfg.num_selected_pages
        results.append(row)
    return {"prefill_seconds": prefill_s, "variants": results}


def _fmt(x: float | None, pct: bool = False) -> str:
    if x is None:
        return "-"
    return f"{100 * x:.1f}%" if pct else f"{x:.3f}"


def markdown(report: dict[str, Any]) -> str:
    size = report["size"]
    lines = [
        "# FreeKV accuracy (reference decode step on a real model)",
        "",
        f"Model: {report['model']}; {size['num_cases']} cases of "
        f"{size['min_tokens']}-{size['max_tokens']} prompt tokens "
        f"({size['kinds']}), {size['gen_tokens']} greedy decode steps"
        f"{' (full sweep)' if size['full'] else ' (default size; --full for all 60 cases)'}. "
        f"Pages of {report['settings']['page_size']} tokens, sink "
        f"{report['settings']['sink_tokens']}, window {report['settings']['window_tokens']}, "
        f"dense layers {report['settings']['dense_layers']}. Agreement is against dense "
        "greedy tokens; mass recall and error are per query head, over sparse layers and "
        "decode steps; miss rate = pages recalled / pages selected.",
        "",
        "| variant | budget | tau | accuracy | token agree | prefix agree | mass recall "
        "| rel. error | correction rate | page miss rate |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["variants"]:
        tau = "-" if r["selection"] != "speculative" else ("off" if r["tau"] is None else r["tau"])
        lines.append(
            f"| {r['variant']} | {r['budget_tokens'] or 'all'} | {tau} | "
            f"{_fmt(r['accuracy'], True)} | {_fmt(r['token_agreement'], True)} | "
            f"{_fmt(r['prefix_agreement'], True)} | {_fmt(r['mass_recall'])} | "
            f"{_fmt(r['rel_err'])} | {_fmt(r['correction_rate'], True)} | "
            f"{_fmt(r['page_miss_rate'], True)} |"
        )
    lines += [
        "",
        f"Command: `{report['command']}`; wall time {report['wall_seconds']:.0f} s "
        f"(prefill {report['prefill_seconds']:.0f} s) on {report['host']}.",
        "",
    ]
    return "\n".join(lines)


def _parse_tau(s: str) -> float | None:
    return None if s == "off" else float(s)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description="FreeKV accuracy against dense attention")
    ap.add_argument("--model", help="model folder (default: SmolLM2-135M-Instruct)")
    ap.add_argument("--num-cases", type=int, default=4, help="cases spread over the grid")
    ap.add_argument("--max-tokens", type=int, default=3072, help="longest prompt length")
    ap.add_argument("--full", action="store_true", help="all 60 cases, 2K-8K tokens")
    ap.add_argument("--gen-tokens", type=int, default=64, help="greedy decode steps")
    ap.add_argument("--budgets", default="256,512,1024")
    ap.add_argument("--taus", default="off,0.8,0.9")
    ap.add_argument("--page-size", type=int, default=32)
    ap.add_argument("--sink", type=int, default=32)
    ap.add_argument("--window", type=int, default=64)
    ap.add_argument("--dense-layers", default="0")
    ap.add_argument("--batch", type=int, default=8, help="requests decoded together")
    ap.add_argument(
        "--threads", type=int, default=1, help="torch threads (1 is fastest on a shared host)"
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(RESULTS / "accuracy"), help="path without suffix")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if args.model is None:
        from freekv_sglang.testing.models import smollm2_path

        model_path = str(smollm2_path())
        model_name = "SmolLM2-135M-Instruct"
    else:
        model_path = args.model
        model_name = Path(args.model).name
    tok = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    from benchmarks.passkey import LENGTHS

    if args.full:
        lengths = LENGTHS
        cases = make_cases(tok, lengths=lengths, seed=args.seed)
    else:
        lengths = tuple(n for n in LENGTHS if n <= args.max_tokens) or (args.max_tokens,)
        cases = pick(make_cases(tok, lengths=lengths, seed=args.seed), args.num_cases)
    dense_layers = tuple(int(x) for x in args.dense_layers.split(",") if x)
    variants = make_variants(
        [int(b) for b in args.budgets.split(",")],
        [_parse_tau(t) for t in args.taus.split(",")],
        args.page_size,
        args.sink,
        args.window,
        dense_layers,
    )
    print(f"{len(cases)} cases, {len(variants)} variants, {args.gen_tokens} steps")
    res = run(model, tok, cases, variants, args.gen_tokens, args.batch)
    report: dict[str, Any] = {
        "model": model_name,
        "command": " ".join(
            ["python benchmarks/bench_accuracy.py", *(sys.argv[1:] if argv is None else argv)]
        ),
        "host": f"{platform.machine()}, {args.threads} CPU threads, torch {torch.__version__}",
        "size": {
            "full": args.full,
            "num_cases": len(cases),
            "min_tokens": min(c.num_tokens for c in cases),
            "max_tokens": max(c.num_tokens for c in cases),
            "kinds": "+".join(sorted({c.kind for c in cases})),
            "gen_tokens": args.gen_tokens,
            "cases": [{"id": c.case_id, "tokens": c.num_tokens, "answer": c.answer} for c in cases],
        },
        "settings": {
            "page_size": args.page_size,
            "sink_tokens": args.sink,
            "window_tokens": args.window,
            "dense_layers": list(dense_layers),
        },
        **res,
        "wall_seconds": time.perf_counter() - t_start,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=1) + "\n")
    md = markdown(report)
    out.with_suffix(".md").write_text(md)
    print(md)
    return report


if __name__ == "__main__":
    main()
