"""Accuracy of FreeKV retrieval on a real model at several budgets, next to dense attention,
synchronous selection and an oracle that picks pages by their true attention mass.

What it measures. SmolLM2-135M-Instruct (float32, CPU, transformers) answers the passkey/needle
cases of ``benchmarks/passkey.py`` (the same case set as ``bench_passkey_server.py``: one
context length, five depths per round, a new seed per round) with its attention replaced by
`freekv_sglang.attention.freekv_attention`, the reference of the server's decode step. Prefill
is dense; the first decode step selects with its own query and recalls before attending, as
the server does; every later step runs what the engine runs. Per variant it reports:

- accuracy (the hidden number appears in the greedy continuation) and the share of cases whose
  continuation is the same text as dense's;
- greedy-token agreement with dense (share of positions with the same token);
- attention-mass recall: the dense softmax mass inside the attended set (sink + selected +
  window pages), per query head, averaged over decode steps and sparse layers; next to the
  ``sink+window`` row (no selected pages) it shows the share the selected pages capture;
- relative L2 error of the attention output, correction rate, page miss rate between steps.

Variants, all on the same prompts and the same prefill: ``dense``; per budget ``freekv``
(speculative selection with correction at ``--tau``), ``sync`` (select with the current query
every step, recall before attending: the server's ``--freekv-selection current``) and
``oracle`` (the pages of most dense attention mass each step: the best any selection of that
budget can do); one ``sink+window`` row. ``--select-scales`` runs ``freekv`` and ``sync`` with
each temperature of the selection's group softmax: ``sqrt_d`` divides the bound scores by
``sqrt(head_dim)`` before the softmax (the attention scale the server passes), ``raw`` takes
the softmax of the raw scores (the FreeKV paper's accuracy runs); see ``docs/selection.md``.
``--digests`` adds ``freekv`` and ``sync`` rows per page digest and group reduction
(``KIND[/REDUCTION]``, e.g. ``mean`` or ``minmax_slow/max``; ``minmax`` with the config's
reduction is the default rows), at the first selection scale. ``--rerank R[,R...]`` adds
``freekv`` and ``sync`` rows whose selections re-rank the bound's best ``R x k`` pages per KV
head (``k`` the budget's selected pages) by their exact best logit (``freekv_sglang.attention.rerank_pages``, a study of a two-stage
selection: it reads the candidates' keys, which the server does not keep on the device).

Usage::

    python benchmarks/bench_accuracy.py                 # SmolLM2, 4K, 10 needle cases
    python benchmarks/bench_accuracy.py --kinds passkey,needle --cases 20 --gen-tokens 32

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

from benchmarks.passkey import Case, answer_found, spread_cases
from freekv_sglang.attention import dense_attention, freekv_attention, prime_after_prefill
from freekv_sglang.config import FreeKVConfig
from freekv_sglang.state import FreeKVState

ATTN_NAME = "freekv_bench"
RESULTS = Path(__file__).resolve().parent / "results"
#: Temperatures of the selection's group softmax: None = the attention scale (1 / sqrt(d)).
SELECT_SCALES: dict[str, float | None] = {"sqrt_d": None, "raw": 1.0}


@dataclass(frozen=True)
class Variant:
    """One column of the comparison: ``cfg is None`` means dense attention."""

    name: str
    budget: int | None
    selection: str  # dense, speculative, current, oracle, none
    select_scale: str | None  # a key of SELECT_SCALES, None where nothing is selected by digest
    cfg: FreeKVConfig | None
    digest: str = "minmax"  # KIND[/REDUCTION] of the selection (--digests)
    rerank: int = 0  # the bound's best R x k pages re-ranked by exact best logit (--rerank)
    rerank_bits: int = 0  # ... from keys of that many bits (--rerank-bits; 0: the cache's)
    rerank_score: str = "max"  # ... by best logit, summed attention or share (--rerank-score)


def make_variants(
    budgets: list[int],
    tau: float | None,
    page_size: int,
    sink: int,
    window: int,
    dense_layers: tuple[int, ...],
    select_scales: tuple[str, ...] = ("sqrt_d",),
    digests: tuple[str, ...] = (),
    reranks: tuple[int, ...] = (),
    rerank_bits: tuple[int, ...] = (0,),
    rerank_scores: tuple[str, ...] = ("max",),
) -> list[Variant]:
    """dense; per budget freekv and sync per selection scale, then per extra digest and per
    re-ranking depth (at the first scale), then oracle; one sink+window."""

    def cfg(budget: int, selection: str, digest: str = "minmax") -> FreeKVConfig:
        kind, _, reduction = digest.partition("/")
        extra = {"gqa_reduction": reduction} if reduction else {}
        return FreeKVConfig(
            page_size=page_size,
            sink_tokens=sink,
            window_tokens=window,
            budget_tokens=budget,
            tau=tau,
            dense_layers=dense_layers,
            selection=selection,  # type: ignore[arg-type]
            digest_kind=kind,  # type: ignore[arg-type]
            **extra,  # type: ignore[arg-type]
        )

    out = [Variant("dense", None, "dense", None, None)]
    for b in budgets:
        for s in select_scales:
            tag = "" if s == "sqrt_d" else f"-{s}"
            out.append(Variant(f"freekv{tag}-b{b}", b, "speculative", s, cfg(b, "speculative")))
            out.append(Variant(f"sync{tag}-b{b}", b, "current", s, cfg(b, "current")))
        s0 = select_scales[0]
        for dg in digests:
            tag = "-" + dg.replace("/", ".") + ("" if s0 == "sqrt_d" else f"-{s0}")
            for name, sel in (("freekv", "speculative"), ("sync", "current")):
                c = cfg(b, sel, dg)
                out.append(Variant(f"{name}{tag}-b{b}", b, sel, s0, c, dg))
        for m in reranks:
            for bits in rerank_bits:
                for score in rerank_scores:
                    tag = (
                        f"-rr{m}" + (f"q{bits}" if bits else "") + ("" if score == "max" else score)
                        + ("" if s0 == "sqrt_d" else f"-{s0}")
                    )  # fmt: skip
                    for name, sel in (("freekv", "speculative"), ("sync", "current")):
                        c = cfg(b, sel)
                        out.append(
                            Variant(f"{name}{tag}-b{b}", b, sel, s0, c, rerank=m,
                                    rerank_bits=bits, rerank_score=score)
                        )  # fmt: skip
        out.append(Variant(f"oracle-b{b}", b, "oracle", None, cfg(b, "current")))
    b0 = min(budgets)
    out.append(Variant("sink+window", b0, "none", None, cfg(b0, "none")))
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
        self.mode = "prefill"
        self.row = 0
        self.batch = 0
        self.pos = torch.zeros(0, dtype=torch.int64)
        self.max_len = 0
        self.state: FreeKVState | None = None
        self.variant: Variant | None = None

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
        v = self.variant
        if self.state is None or v is None:
            out = dense_attention(q, kv, vv, seq, scale)
        else:
            sel = None if v.select_scale is None else SELECT_SCALES[v.select_scale]
            out = freekv_attention(
                q, kv, vv, seq, self.state, layer, ar, scale=scale, collect_metrics=True,
                select_scale=sel, oracle=v.selection == "oracle", rerank=v.rerank,
                rerank_bits=v.rerank_bits, rerank_score=v.rerank_score,
            )  # fmt: skip
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
        self.state, self.variant = None, variant
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
                prime_after_prefill(self.state, layer, rows, kv, lens)
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
        self.state, self.variant = None, None
        return out, counters


def _agreement(tokens: list[int], ref: list[int]) -> float:
    return sum(int(a == b) for a, b in zip(tokens, ref, strict=True)) / len(ref)


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
        log(f"  cases {start}-{start + len(chunk) - 1} prefill {time.perf_counter() - t0:.1f} s")
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
            log(f"  cases {start}-{start + len(chunk) - 1} {v.name:24s} {dt:7.1f} s")
    dense = per_variant["dense"]["tokens"]
    dense_text = {c.case_id: tokenizer.decode(dense[c.case_id], skip_special_tokens=True)
                  for c in cases}  # fmt: skip
    results = []
    for v in variants:
        rec = per_variant[v.name]
        solved, same, agree, outputs = 0, 0, [], {}
        for c in cases:
            toks = rec["tokens"][c.case_id]
            text = tokenizer.decode(toks, skip_special_tokens=True)
            outputs[c.case_id] = text
            solved += int(answer_found(c.answer, text))
            same += int(text == dense_text[c.case_id])
            agree.append(_agreement(toks[1:], dense[c.case_id][1:]))
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
            "select_scale": v.select_scale,
            "digest": v.digest if v.select_scale is not None else None,
            "budget_tokens": v.budget,
            "tau": v.cfg.tau if v.selection == "speculative" and v.cfg else None,
            "solved": solved,
            "accuracy": solved / len(cases),
            "same_text_as_dense": same / len(cases),
            "token_agreement": sum(agree) / len(agree),
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
    return f"{100 * x:.0f}%" if pct else f"{x:.3f}"


def markdown(report: dict[str, Any]) -> str:
    size, st = report["size"], report["settings"]
    n = size["num_cases"]
    lines = [
        "# FreeKV accuracy by budget (reference decode step on a real model)",
        "",
        f"Model: {report['model']}; {n} cases ({size['kinds']}) of "
        f"{size['min_tokens']}-{size['max_tokens']} prompt tokens, {size['gen_tokens']} greedy "
        f"tokens. Pages of {st['page_size']} tokens, sink {st['sink_tokens']}, window "
        f"{st['window_tokens']}, dense layers {st['dense_layers']}, tau {st['tau']}. Mass "
        "recall: dense attention mass inside the attended set (sink + selected + window) per "
        "query head over sparse layers and decode steps; miss rate = pages recalled / pages "
        "selected.",
        "",
        "| variant | budget | digest | group softmax | solved | same text as dense | token "
        "agree | mass recall | rel. error | correction rate | page miss rate |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["variants"]:
        lines.append(
            f"| {r['variant']} | {r['budget_tokens'] or 'all'} | {r.get('digest') or '-'} | "
            f"{r['select_scale'] or '-'} | "
            f"{r['solved']}/{n} | {_fmt(r['same_text_as_dense'], True)} | "
            f"{_fmt(r['token_agreement'], True)} | {_fmt(r['mass_recall'])} | "
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


def load_model_and_cases(args: argparse.Namespace) -> tuple[str, Any, Any, list[Case]]:
    """The model of ``--model`` (default SmolLM2-135M-Instruct; float32, eval) with its name
    and tokenizer, and the cases of ``--kinds``/``--cases``/``--seed`` sized as the server benchmark's
    prompts: ``--context`` minus ``--gen-tokens`` and a margin of 8."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if args.model is None:
        from freekv_sglang.testing.models import smollm2_path

        model_path, model_name = str(smollm2_path()), "SmolLM2-135M-Instruct"
    else:
        model_path, model_name = args.model, Path(args.model).name
    tok = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    kinds = tuple(k for k in args.kinds.split(",") if k)
    cases = spread_cases(tok, args.context - args.gen_tokens - 8, args.cases, args.seed, kinds)
    return model_name, tok, model, cases


def write_report(out_path: str, report: dict[str, Any], md: str) -> None:
    """``report`` as ``OUT.json`` and its table ``md`` as ``OUT.md`` (also printed)."""
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=1) + "\n")
    out.with_suffix(".md").write_text(md)
    print(md)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description="FreeKV accuracy by budget against dense attention")
    ap.add_argument("--model", help="model folder (default: SmolLM2-135M-Instruct)")
    ap.add_argument("--context", type=int, default=4096, help="prompt + generated tokens")
    ap.add_argument("--cases", type=int, default=10)
    ap.add_argument("--kinds", default="needle", help="passkey,needle or one of them")
    ap.add_argument("--gen-tokens", type=int, default=12, help="greedy decode steps")
    ap.add_argument("--budgets", default="512,1024,2048")
    ap.add_argument("--select-scales", default="sqrt_d,raw", help="subset of sqrt_d,raw")
    ap.add_argument(
        "--digests",
        default="",
        help="extra selections, KIND[/REDUCTION] each (e.g. mean,minmax_slow/max): digest "
        "kinds of FreeKVConfig, reductions softmax_mean, mean, max",
    )
    ap.add_argument(
        "--rerank",
        default="",
        help="extra selections that re-rank the bound's best R x k pages per KV head (k: the "
        "budget's selected pages) by their exact best logit, R each (e.g. 2,4; a study: "
        "attention.rerank_pages)",
    )
    ap.add_argument(
        "--rerank-bits",
        default="0",
        help="bits per key element the re-ranking reads, each (e.g. 0,4; 0: the cache's keys; "
        "attention.quantize_keys: per page, KV head and channel between its min and max)",
    )
    ap.add_argument(
        "--rerank-score",
        default="max",
        help="what the re-ranking ranks pages by, each (max,mass,share): the page's best logit, "
        "its tokens' summed attention (log-sum-exp of their logits), or that attention as a "
        "share of each query head's sink, window and candidates, summed over the group "
        "(attention.rerank_pages)",
    )
    ap.add_argument(
        "--families",
        default="dense,freekv,sync,oracle,sink+window",
        help="variant families to run (dense always runs: the others are compared to it)",
    )
    ap.add_argument("--tau", default="0.8", help="correction threshold, or off")
    ap.add_argument("--page-size", type=int, default=32)
    ap.add_argument("--sink", type=int, default=64)
    ap.add_argument("--window", type=int, default=64)
    ap.add_argument("--dense-layers", default="0")
    ap.add_argument("--batch", type=int, default=10, help="requests decoded together")
    ap.add_argument("--threads", type=int, default=2, help="torch threads")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(RESULTS / "accuracy"), help="path without suffix")
    args = ap.parse_args(argv)
    scales = tuple(s for s in args.select_scales.split(",") if s)
    if set(scales) - set(SELECT_SCALES):
        raise SystemExit(f"--select-scales: choose from {tuple(SELECT_SCALES)}")
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    model_name, tok, model, cases = load_model_and_cases(args)
    dense_layers = tuple(int(x) for x in args.dense_layers.split(",") if x)
    tau = _parse_tau(args.tau)
    budgets = [int(b) for b in args.budgets.split(",")]
    digests = tuple(x for x in args.digests.split(",") if x)
    reranks = tuple(int(x) for x in args.rerank.split(",") if x)
    bits = tuple(int(x) for x in args.rerank_bits.split(",") if x)
    rr_scores = tuple(x for x in args.rerank_score.split(",") if x)
    variants = make_variants(
        budgets, tau, args.page_size, args.sink, args.window, dense_layers, scales, digests,
        reranks, bits, rr_scores,
    )  # fmt: skip
    families = {"dense", *args.families.split(",")}
    variants = [v for v in variants if v.name.split("-")[0] in families]
    print(f"{len(cases)} cases, {len(variants)} variants, {args.gen_tokens} steps", flush=True)
    res = run(model, tok, cases, variants, args.gen_tokens, args.batch)
    report: dict[str, Any] = {
        "model": model_name,
        "command": " ".join(
            ["python benchmarks/bench_accuracy.py", *(sys.argv[1:] if argv is None else argv)]
        ),
        "host": f"{platform.machine()}, {args.threads} CPU threads, torch {torch.__version__}",
        "size": {
            "num_cases": len(cases),
            "min_tokens": min(c.num_tokens for c in cases),
            "max_tokens": max(c.num_tokens for c in cases),
            "kinds": args.kinds.replace(",", "+"),
            "gen_tokens": args.gen_tokens,
            "cases": [{"id": c.case_id, "tokens": c.num_tokens, "answer": c.answer} for c in cases],
        },
        "settings": {
            "page_size": args.page_size,
            "sink_tokens": args.sink,
            "window_tokens": args.window,
            "dense_layers": list(dense_layers),
            "tau": tau,
            "budgets": budgets,
            "digests": list(digests),
        },
        **res,
        "wall_seconds": time.perf_counter() - t_start,
    }
    write_report(args.out, report, markdown(report))
    return report


if __name__ == "__main__":
    main()
