"""Why the page selection misses the needle: where the bound ranks the page holding it.

What it measures. SmolLM2-135M-Instruct (float32, CPU, transformers, the Runner of
``bench_accuracy.py``) prefills the needle cases of ``benchmarks/passkey.py`` (the accuracy
benchmarks' case set) and decodes ``--steps`` greedy tokens densely, keeping each step's query
of every layer. For each case, decode step, sparse layer and KV head (a "triple"), every page
of the context is scored by several page scores, reduced over the GQA group by several
reductions, and the page holding the hidden number (the "needle page": the page of any token
of the number; the best-ranked one where the number spans two pages) is ranked among the
selection's candidate pages (neither sink nor window) of each sink/window split. Reported per
(score, reduction):

- the needle page's median rank (1 = best) and the share of triples where it is in the top
  ``k`` at each budget (``k`` = selected pages of that budget and split), over all triples and
  over the retrieval triples (those where the needle page is in the top 12 by true attention
  mass: the heads that look at the needle);
- the dense attention mass the attended set (sink + top ``k`` + window) captures, per query
  head, averaged over the triples.

Page scores (``q`` one query head's post-RoPE query, a page's post-RoPE keys ``k_t``; rotary
pair ``i`` is dimensions ``(i, i + D/2)``, pair 0 the fastest-rotating):

- ``box``: Quest's bound ``sum_d max(q_d lo_d, q_d hi_d)`` over the element-wise min/max box
  (the paper's, FreeKV's default);
- ``pair_norm``: ``sum_i |q_i| max_t |k_t,i|`` with ``q_i``, ``k_t,i`` the 2-vectors of rotary
  pair ``i`` (a bound that ignores the pair's angle);
- ``pair_min``: per pair the smaller of the box's and the norm's bound (also a bound);
- ``box_lo_half``, ``box_hi_half``: the box bound over the slower (pairs ``>= D/4``) or the
  faster half of the rotary pairs only (not bounds: scores);
- ``box_skip8``: the box bound without the 8 fastest pairs;
- ``sub16``, ``sub8``: the box bound of sub-pages of 16 or 8 tokens, the page's score the
  largest of its sub-pages';
- ``mean_key``: ``q . mean_t k_t``;
- ``rep2``, ``rep4``: ``max q . k_t`` over the 2 or 4 keys of largest norm of the page;
- ``exact_max``: ``max_t q . k_t`` (the true best logit of the page, what the box bounds);
- ``oracle``: the page's dense attention mass summed over the group (`oracle_pages`).

Reductions over the group: ``sm_sqrt`` (softmax over candidate pages of ``score / sqrt(D)``,
then mean: the serving default), ``sm_raw`` (softmax of the raw score, then mean), ``mean``,
``max`` (of the raw scores). The oracle has only its own (sum of mass).

Usage::

    python benchmarks/bench_selection_diag.py                 # 10 needle cases at 4K, step 0
    python benchmarks/bench_selection_diag.py --steps 12      # pooled over 12 decode steps

With more than one step it also reports the candidate turnover (`turnover`): how many of the
default selection's best ``R x k`` pages per KV head are new at each step.

Writes ``benchmarks/results/selection_diag.json`` and ``.md`` (``--out`` to change).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

if str(Path(__file__).resolve().parents[1]) not in sys.path:  # run as a file
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_accuracy import Runner, Variant, load_model_and_cases, write_report
from benchmarks.passkey import Case
from freekv_sglang.config import FreeKVConfig
from freekv_sglang.retrieval import candidate_mask, page_digests, reduce_gqa

RESULTS = Path(__file__).resolve().parent / "results"
SCORES = (
    "box",
    "pair_norm",
    "pair_min",
    "box_lo_half",
    "box_hi_half",
    "box_skip8",
    "sub16",
    "sub8",
    "mean_key",
    "rep2",
    "rep4",
    "exact_max",
)
REDUCTIONS = ("sm_sqrt", "sm_raw", "mean", "max")
#: The retrieval triples: the needle page is within this many pages by true attention mass.
RETRIEVAL_TOP = 12


class CaptureRunner(Runner):
    """bench_accuracy's Runner that also keeps every decode step's query of every layer."""

    def __init__(self, model: Any, rows: int, capacity: int) -> None:
        super().__init__(model, rows, capacity)
        self.queries: list[list[Tensor]] = [[] for _ in range(self.num_layers)]

    def _attention(
        self,
        module: Any,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        attention_mask: Any,
        scaling: float | None = None,
        **kw: Any,
    ) -> tuple[Tensor, None]:
        if self.mode == "decode":
            self.queries[module.layer_idx].append(query[:, :, 0].detach().clone())
        return super()._attention(module, query, key, value, attention_mask, scaling, **kw)


def needle_tokens(tokenizer: Any, case: Case) -> list[int]:
    """Token positions of every occurrence of the hidden number in the case's prompt."""
    enc = tokenizer(case.prompt, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    if ids != list(case.input_ids):
        raise ValueError(f"{case.case_id}: the prompt does not re-tokenize to its input_ids")
    spans, at = [], case.prompt.find(case.answer)
    while at >= 0:
        spans.append((at, at + len(case.answer)))
        at = case.prompt.find(case.answer, at + 1)
    return [
        t
        for t, (s, e) in enumerate(enc["offset_mapping"])
        if any(s < b and e > a for a, b in spans)
    ]


def _pair_norms(x: Tensor) -> Tensor:
    """``[..., D]`` -> ``[..., D/2]``: the norm of each rotary pair ``(i, i + D/2)``."""
    half = x.shape[-1] // 2
    return torch.sqrt(x[..., :half] ** 2 + x[..., half:] ** 2)


def _box_terms(q: Tensor, pages: Tensor) -> Tensor:
    """``q [H_q, D]``, ``pages [P, p, H, D]`` -> ``[H_q, P, D]`` per-dimension box bounds."""
    h_q = q.shape[0]
    h = pages.shape[2]
    dig = page_digests(pages, "minmax").float()  # [P, 2, H, D]
    lo = dig[:, 0].repeat_interleave(h_q // h, dim=1).transpose(0, 1)  # [H_q, P, D]
    hi = dig[:, 1].repeat_interleave(h_q // h, dim=1).transpose(0, 1)
    qf = q.float().unsqueeze(1)
    return torch.maximum(qf * lo, qf * hi)


def page_scores(q: Tensor, keys: Tensor, page_size: int) -> dict[str, Tensor]:
    """Every raw page score of ``SCORES`` for one query ``q [H_q, D]`` over the full pages of
    ``keys [L, H, D]``; each ``[H_q, P]`` float32 (``P = L // page_size``)."""
    h_q, d = q.shape
    length, h, _ = keys.shape
    n_p = length // page_size
    group = h_q // h
    pages = keys[: n_p * page_size].float().reshape(n_p, page_size, h, d)
    qf = q.float()
    half, quarter = d // 2, d // 4
    box = _box_terms(qf, pages)  # [H_q, P, D]
    box_pair = box[..., :half] + box[..., half:]  # [H_q, P, D/2]
    kmax = _pair_norms(pages).amax(dim=1)  # [P, H, D/2]
    kmax = kmax.repeat_interleave(group, dim=1).transpose(0, 1)  # [H_q, P, D/2]
    norm_pair = _pair_norms(qf).unsqueeze(1) * kmax
    out = {
        "box": box.sum(-1),
        "pair_norm": norm_pair.sum(-1),
        "pair_min": torch.minimum(box_pair, norm_pair).sum(-1),
        "box_lo_half": box_pair[..., quarter:].sum(-1),
        "box_hi_half": box_pair[..., :quarter].sum(-1),
        "box_skip8": box_pair[..., 8:].sum(-1),
    }
    for sub in (16, 8):
        subs = pages.reshape(n_p * (page_size // sub), sub, h, d)
        s = _box_terms(qf, subs).sum(-1).view(h_q, n_p, page_size // sub)
        out[f"sub{sub}"] = s.amax(-1)
    kg = pages.repeat_interleave(group, dim=2)  # [P, p, H_q, D]
    logits = torch.einsum("gd,ptgd->gpt", qf, kg)  # [H_q, P, p]
    out["mean_key"] = torch.einsum("gd,pgd->gp", qf, kg.mean(1))
    norms = pages.norm(dim=-1).repeat_interleave(group, dim=2).permute(2, 0, 1)  # [H_q, P, p]
    order = norms.argsort(dim=-1, descending=True, stable=True)
    for r in (2, 4):
        out[f"rep{r}"] = logits.gather(-1, order[..., :r]).amax(-1)
    out["exact_max"] = logits.amax(-1)
    return out


def _reduce(raw: Tensor, cand: Tensor, h: int, how: str, d: int) -> Tensor:
    """``raw [H_q, P]`` -> ``[H, P]`` (non-candidates -inf)."""
    if how in ("sm_sqrt", "sm_raw"):
        scale = d**-0.5 if how == "sm_sqrt" else 1.0
        return reduce_gqa(raw[None], cand[None], h, "softmax_mean", scale)[0]
    return reduce_gqa(raw[None], cand[None], h, how, 1.0)[0]


def _ranks(red: Tensor) -> Tensor:
    """``[H, P]`` -> ``[H, P]`` rank of each page (0 = best; stable: ties to the lower page,
    as `topk_pages`); non-candidates (-inf) rank after every candidate."""
    order = torch.sort(red, dim=-1, descending=True, stable=True).indices
    ranks = torch.empty_like(order)
    ranks.scatter_(-1, order, torch.arange(red.shape[-1]).expand_as(order).contiguous())
    return ranks


def analyse_step(
    q: Tensor,
    keys: Tensor,
    seq_len: int,
    needle: list[int],
    splits: list[tuple[str, FreeKVConfig, dict[int, int]]],
    scale: float,
) -> list[dict[str, Any]]:
    """One (case, step, layer): a record per KV head, with per (split, score, reduction) the
    needle page's rank and per budget whether it is selected and the mass attended."""
    h_q, d = q.shape
    keys = keys[:seq_len]
    h = keys.shape[1]
    group = h_q // h
    p = splits[0][1].page_size
    raw = page_scores(q, keys, p)
    n_p = seq_len // p
    logits = torch.einsum("gd,lgd->gl", q.float(), keys.float().repeat_interleave(group, dim=1))
    probs = torch.softmax(logits * scale, dim=-1)  # [H_q, L]
    n_all = -(-seq_len // p)
    pad = n_all * p - seq_len
    page_mass = torch.nn.functional.pad(probs, (0, pad)).view(h_q, n_all, p).sum(-1)
    group_mass = page_mass.view(h, group, n_all).sum(1)  # [H, P_all]
    needle_pages = sorted({t // p for t in needle})
    recs: list[dict[str, Any]] = [
        {
            "head": hh,
            "needle_pages": needle_pages,
            "needle_mass": float(group_mass[hh, needle_pages].sum() / group),
        }
        for hh in range(h)
    ]
    seq = torch.tensor([seq_len])
    for name, cfg, budgets in splits:
        cand_all = candidate_mask(seq, n_all, cfg)[0]
        cand = cand_all[:n_p]
        fixed = ~cand_all & (torch.arange(n_all) < n_all)
        fixed_mass = (page_mass * fixed).view(h, group, n_all).sum(-1)  # [H, G]
        in_cand = [j for j in needle_pages if j < n_p and bool(cand[j])]
        # Selected-page mass per query head; column n_p (zero) takes non-candidates.
        cm = torch.cat(
            (page_mass[:, :n_p].view(h, group, n_p), page_mass.new_zeros(h, group, 1)), -1
        )
        reds: dict[str, Tensor] = {}
        oracle = torch.where(cand, group_mass[:, :n_p], torch.tensor(float("-inf")))
        reds["oracle/sum"] = oracle
        for s in SCORES:
            for r in REDUCTIONS:
                reds[f"{s}/{r}"] = _reduce(raw[s], cand, h, r, d)
        oracle_ranks = _ranks(oracle)
        for key, red in reds.items():
            ranks = _ranks(red)
            srt = torch.sort(red, dim=-1, descending=True, stable=True)
            order = torch.where(torch.isneginf(srt.values), n_p, srt.indices)
            for hh in range(h):
                rec = recs[hh].setdefault(name, {}).setdefault(key, {})
                rec["rank"] = int(ranks[hh, in_cand].min()) + 1 if in_cand else None
                for b, k in budgets.items():
                    top = order[hh, :k]
                    sel_mass = cm[hh][:, top].sum(-1)  # [G]
                    rec[f"mass_{b}"] = float((fixed_mass[hh] + sel_mass).mean())
                    rec[f"in_{b}"] = (rec["rank"] is not None and rec["rank"] <= k) or not in_cand
                    if key == TURNOVER_KEY:
                        # How deep the oracle's pages lie under the bound, and the candidate
                        # sets a re-ranking would read.
                        deep = ranks[hh][(oracle_ranks[hh] < k) & cand]
                        rec[f"oracle_depth_{b}"] = {
                            m: int((deep < m * k).sum()) / len(deep) if len(deep) else 1.0
                            for m in DEPTHS
                        }
                        rec[f"cand_{b}"] = {
                            m: sorted(j for j in order[hh, : m * k].tolist() if j < n_p)
                            for m in TURNOVER_DEPTHS
                        }
    return recs


def turnover(
    records: list[dict[str, Any]], splits: list[tuple[str, FreeKVConfig, dict[int, int]]]
) -> list[dict[str, Any]]:
    """Per split, budget and depth ``R``: of the default score's best ``R x k`` pages of a
    (case, layer, KV head) at a decode step, the share (and mean count) that were not among its
    best ``R x k`` at the previous step: what a device cache of the candidates' keys would
    fetch per step (``R = 1``: the selection itself, the delta recall's share)."""
    rows = []
    by = {(r["case"], r["layer"], r["head"], r["step"]): r for r in records}
    for name, _, budgets in splits:
        for b, k in budgets.items():
            for m in TURNOVER_DEPTHS:
                new, total, steps = 0, 0, 0
                for (case, layer, head, step), r in by.items():
                    prev = by.get((case, layer, head, step - 1))
                    if step == 0 or prev is None or not r.get(name) or not prev.get(name):
                        continue
                    now_set = set(r[name][TURNOVER_KEY][f"cand_{b}"][m])
                    old_set = set(prev[name][TURNOVER_KEY][f"cand_{b}"][m])
                    new += len(now_set - old_set)
                    total += len(now_set)
                    steps += 1
                rows.append({
                    "split": name, "budget": b, "depth": m, "candidates": m * k,
                    "head_steps": steps, "new_share": new / total if total else None,
                    "new_per_head_step": new / steps if steps else None,
                })  # fmt: skip
    return rows


#: The score whose candidate sets `turnover` follows (the serving default) and the depths R.
TURNOVER_KEY = "box/sm_sqrt"
TURNOVER_DEPTHS = (1, 2, 4)
#: Depths R of `depth`: a re-ranking of the bound's best R x k pages.
DEPTHS = (1, 2, 4, 8, 16, 32)


def depth(
    records: list[dict[str, Any]], splits: list[tuple[str, FreeKVConfig, dict[int, int]]]
) -> list[dict[str, Any]]:
    """Per split, budget and depth ``R``: how much of what the oracle selects lies within the
    default score's (`TURNOVER_KEY`) best ``R x k`` pages, i.e. what a re-ranking of that many
    candidates can still find: the mean share of the oracle's ``k`` pages there (over every
    (case, step, layer, KV head)), and the share of retrieval triples whose needle page is there
    (its rank by the bound at most ``R x k``)."""
    rows = []
    for name, _, budgets in splits:
        recs = [r for r in records if r.get(name)]
        retr = [
            r
            for r in recs
            if r[name]["oracle/sum"]["rank"] is not None
            and r[name]["oracle/sum"]["rank"] <= RETRIEVAL_TOP
        ]
        for b, k in budgets.items():
            for m in DEPTHS:
                cover = [r[name][TURNOVER_KEY][f"oracle_depth_{b}"][m] for r in recs]
                needle = [r[name][TURNOVER_KEY]["rank"] <= m * k for r in retr]
                rows.append({
                    "split": name, "budget": b, "depth": m, "candidates": m * k,
                    "oracle_pages_within": sum(cover) / len(cover) if cover else None,
                    "needle_within_retrieval": sum(needle) / len(needle) if needle else None,
                })  # fmt: skip
    return rows


def _median(xs: list[int]) -> float | None:
    return statistics.median(xs) if xs else None


def summarise(
    records: list[dict[str, Any]], splits: list[tuple[str, FreeKVConfig, dict[int, int]]]
) -> list[dict[str, Any]]:
    """Per split and (score, reduction): median rank, share in top-k, mass captured."""
    rows = []
    keys = ["oracle/sum", *(f"{s}/{r}" for s in SCORES for r in REDUCTIONS)]
    for name, _, budgets in splits:
        recs = [r for r in records if r.get(name)]
        cand_recs = [r for r in recs if r[name]["oracle/sum"]["rank"] is not None]
        retr = [r for r in cand_recs if r[name]["oracle/sum"]["rank"] <= RETRIEVAL_TOP]
        for key in keys:
            ranks = [r[name][key]["rank"] for r in cand_recs]
            row: dict[str, Any] = {
                "split": name,
                "score": key.split("/")[0],
                "reduction": key.split("/")[1],
                "triples": len(recs),
                "needle_candidate": len(cand_recs),
                "retrieval_triples": len(retr),
                "median_rank": _median(ranks),
                "median_rank_retrieval": _median([r[name][key]["rank"] for r in retr]),
            }
            for b in budgets:
                row[f"in_top_{b}"] = (
                    sum(r[name][key][f"in_{b}"] for r in cand_recs) / len(cand_recs)
                    if cand_recs
                    else None
                )
                row[f"in_top_{b}_retrieval"] = (
                    sum(r[name][key][f"in_{b}"] for r in retr) / len(retr) if retr else None
                )
                row[f"mass_{b}"] = sum(r[name][key][f"mass_{b}"] for r in recs) / len(recs)
            rows.append(row)
    return rows


def heads_table(
    records: list[dict[str, Any]], split: str, budget: int, top: int
) -> list[dict[str, Any]]:
    """The (layer, KV head) pairs that attend to the needle most (median needle mass over
    cases and steps), with the needle page's ranks by mass and by the box bound."""
    by: dict[tuple[int, int], list[dict[str, Any]]] = {}
    for r in records:
        by.setdefault((r["layer"], r["head"]), []).append(r)
    out = []
    for (layer, head), rs in by.items():
        cand = [r for r in rs if r[split]["oracle/sum"]["rank"] is not None]
        row: dict[str, Any] = {
            "layer": layer,
            "head": head,
            "needle_mass": statistics.median(r["needle_mass"] for r in rs),
            "mass_rank": _median([r[split]["oracle/sum"]["rank"] for r in cand]),
        }
        for key in ("box/sm_sqrt", "pair_min/sm_sqrt", "sub8/sm_sqrt", "rep4/sm_sqrt",
                    "exact_max/sm_sqrt"):  # fmt: skip
            row[key.split("/")[0] + "_rank"] = _median([r[split][key]["rank"] for r in cand])
            row[key.split("/")[0] + "_in"] = (
                sum(r[split][key][f"in_{budget}"] for r in cand) / len(cand) if cand else None
            )
        out.append(row)
    out.sort(key=lambda x: -x["needle_mass"])
    return out[:top]


def _f(x: float | None, pct: bool = False, nd: int = 3) -> str:
    if x is None:
        return "-"
    return f"{100 * x:.0f}%" if pct else (f"{x:.{nd}f}" if isinstance(x, float) else str(x))


def markdown(report: dict[str, Any]) -> str:
    size, st = report["size"], report["settings"]
    lines = [
        "# Where the page selection ranks the needle (first decode step"
        + (f" and the next {size['steps'] - 1}" if size["steps"] > 1 else "")
        + ")",
        "",
        f"Model: {report['model']}; {size['num_cases']} cases ({size['kinds']}) of "
        f"{size['min_tokens']}-{size['max_tokens']} prompt tokens, {size['steps']} dense decode "
        f"step(s); sparse layers {st['sparse_layers']}, {size['kv_heads']} KV heads: "
        f"{report['summary'][0]['triples']} (case, step, layer, KV head) triples. Pages of "
        f"{st['page_size']} tokens. Rank: the needle page's among the candidate pages (1 = "
        "best); top-k: share of triples where it is selected; retrieval triples: those where "
        f"it is within the top {RETRIEVAL_TOP} by true attention mass; mass: dense attention "
        "mass in sink + selected + window per query head.",
        "",
    ]
    for split in st["splits"]:
        name, budgets = split["name"], split["budgets"]
        rows = [r for r in report["summary"] if r["split"] == name]
        r0 = rows[0]
        lines += [
            f"## sink/window {name}: needle page a candidate in {r0['needle_candidate']} of "
            f"{r0['triples']} triples, {r0['retrieval_triples']} retrieval triples",
            "",
            "| score | reduction | median rank (all / retrieval) | "
            + " | ".join(f"top-{k} @{b} (all / retr.)" for b, k in budgets.items())
            + " | "
            + " | ".join(f"mass @{b}" for b in budgets)
            + " |",
            "|---|---|---|" + "---|" * (2 * len(budgets)),
        ]
        for r in rows:
            lines.append(
                f"| {r['score']} | {r['reduction']} | {_f(r['median_rank'], nd=1)} / "
                f"{_f(r['median_rank_retrieval'], nd=1)} | "
                + " | ".join(
                    f"{_f(r[f'in_top_{b}'], True)} / {_f(r[f'in_top_{b}_retrieval'], True)}"
                    for b in budgets
                )
                + " | "
                + " | ".join(_f(r[f"mass_{b}"]) for b in budgets)
                + " |"
            )
        lines.append("")
    h = report["heads"]
    lines += [
        f"## The heads that look at the needle (split {h['split']}, top-k at budget "
        f"{h['budget']}, ranks and top-k shares over cases and steps)",
        "",
        "| layer | KV head | median needle mass | rank by mass | box rank | box in | pair_min "
        "rank | pair_min in | sub8 rank | sub8 in | rep4 rank | rep4 in | exact_max rank | "
        "exact_max in |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in h["rows"]:
        lines.append(
            f"| {r['layer']} | {r['head']} | {r['needle_mass']:.3f} | {_f(r['mass_rank'], nd=1)} | "
            + " | ".join(
                f"{_f(r[s + '_rank'], nd=1)} | {_f(r[s + '_in'], True)}"
                for s in ("box", "pair_min", "sub8", "rep4", "exact_max")
            )
            + " |"
        )
    if report.get("depth"):
        lines += [
            "",
            f"## How deep the oracle's pages lie under the bound ({TURNOVER_KEY}): within its "
            "best R x k pages, the mean share of the oracle's k pages (all triples) and the "
            "share of retrieval triples whose needle page is there",
            "",
            "| split | budget | R | candidates | oracle's pages within | needle page within |",
            "|---|---|---|---|---|---|",
        ]
        for t in report["depth"]:
            lines.append(
                f"| {t['split']} | {t['budget']} | {t['depth']} | {t['candidates']} | "
                f"{_f(t['oracle_pages_within'], True)} | "
                f"{_f(t['needle_within_retrieval'], True)} |"
            )
    if report.get("turnover"):
        lines += [
            "",
            f"## Candidate turnover per step ({TURNOVER_KEY}): of the best R x k pages of a "
            "(case, layer, KV head), the share new since the previous step (R = 1: the "
            "selection itself)",
            "",
            "| split | budget | R | candidates | head-steps | new share | new pages per head-step |",
            "|---|---|---|---|---|---|---|",
        ]
        for t in report["turnover"]:
            lines.append(
                f"| {t['split']} | {t['budget']} | {t['depth']} | {t['candidates']} | "
                f"{t['head_steps']} | {_f(t['new_share'], True)} | "
                f"{_f(t['new_per_head_step'], nd=2)} |"
            )
    lines += [
        "",
        f"Command: `{report['command']}`; wall time {report['wall_seconds']:.0f} s (prefill "
        f"{report['prefill_seconds']:.0f} s, analysis {report['analysis_seconds']:.0f} s) on "
        f"{report['host']}.",
        "",
    ]
    return "\n".join(lines)


def _splits(args: argparse.Namespace) -> list[tuple[str, FreeKVConfig, dict[int, int]]]:
    out = []
    for split in args.splits.split(","):
        sink, window = (int(x) for x in split.split("/"))
        budgets = {}
        for b in (int(x) for x in args.budgets.split(",")):
            if b - sink - window >= args.page_size:
                budgets[b] = (b - sink - window) // args.page_size
        if not budgets:
            continue
        cfg = FreeKVConfig(
            page_size=args.page_size,
            sink_tokens=sink,
            window_tokens=window,
            selected_pages=1,
        )
        out.append((split, cfg, budgets))
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description="Where the page selection ranks the needle")
    ap.add_argument("--model", help="model folder (default: SmolLM2-135M-Instruct)")
    ap.add_argument("--context", type=int, default=4096, help="as bench_accuracy.py")
    ap.add_argument("--cases", type=int, default=10)
    ap.add_argument("--kinds", default="needle", help="passkey,needle or one of them")
    ap.add_argument("--gen-tokens", type=int, default=12, help="as bench_accuracy.py (prompt size)")
    ap.add_argument("--steps", type=int, default=1, help="decode steps analysed (from the first)")
    ap.add_argument("--budgets", default="512,1024,2048")
    ap.add_argument("--splits", default="64/64,512/512", help="sink/window token splits")
    ap.add_argument("--page-size", type=int, default=32)
    ap.add_argument("--dense-layers", default="0")
    ap.add_argument("--heads-top", type=int, default=12, help="rows of the heads table")
    ap.add_argument("--batch", type=int, default=10, help="requests decoded together")
    ap.add_argument("--threads", type=int, default=2, help="torch threads")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(RESULTS / "selection_diag"), help="path without suffix")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    model_name, tok, model, cases = load_model_and_cases(args)
    splits = _splits(args)
    dense_layers = {int(x) for x in args.dense_layers.split(",") if x}
    capacity = max(c.num_tokens for c in cases) + args.steps + 1
    runner = CaptureRunner(model, min(args.batch, len(cases)), capacity)
    sparse = [i for i in range(runner.num_layers) if i not in dense_layers]
    scale = runner.d**-0.5
    dense = Variant("dense", None, "dense", None, None)
    records: list[dict[str, Any]] = []
    prefill_s = analysis_s = 0.0
    for start in range(0, len(cases), args.batch):
        chunk = cases[start : start + args.batch]
        t0 = time.perf_counter()
        first = [runner.prefill(i, c.input_ids) for i, c in enumerate(chunk)]
        prefill_s += time.perf_counter() - t0
        runner.queries = [[] for _ in range(runner.num_layers)]
        lens = [c.num_tokens for c in chunk]
        runner.decode(dense, lens, first, args.steps)
        t0 = time.perf_counter()
        for i, c in enumerate(chunk):
            needle = needle_tokens(tok, c)
            for step in range(args.steps):
                seq_len = c.num_tokens + step + 1
                for layer in sparse:
                    q = runner.queries[layer][step][i]
                    keys = runner.k[layer][i, :, :seq_len].transpose(0, 1)
                    for rec in analyse_step(q, keys, seq_len, needle, splits, scale):
                        rec.update(case=c.case_id, step=step, layer=layer)
                        records.append(rec)
        analysis_s += time.perf_counter() - t0
        print(f"  cases {start}-{start + len(chunk) - 1} done", flush=True)
    summary = summarise(records, splits)
    h_split, h_budgets = splits[0][0], splits[0][2]
    h_budget = min(h_budgets)
    report: dict[str, Any] = {
        "model": model_name,
        "command": " ".join(
            ["python benchmarks/bench_selection_diag.py", *(sys.argv[1:] if argv is None else argv)]
        ),
        "host": f"{platform.machine()}, {args.threads} CPU threads, torch {torch.__version__}",
        "size": {
            "num_cases": len(cases),
            "min_tokens": min(c.num_tokens for c in cases),
            "max_tokens": max(c.num_tokens for c in cases),
            "kinds": args.kinds.replace(",", "+"),
            "steps": args.steps,
            "kv_heads": runner.h,
            "cases": [
                {"id": c.case_id, "tokens": c.num_tokens, "needle_tokens": needle_tokens(tok, c)}
                for c in cases
            ],
        },
        "settings": {
            "page_size": args.page_size,
            "sparse_layers": f"{sparse[0]}-{sparse[-1]}" if sparse else "none",
            "splits": [{"name": n, "budgets": b} for n, _, b in splits],
            "retrieval_top": RETRIEVAL_TOP,
        },
        "summary": summary,
        "turnover": turnover(records, splits) if args.steps > 1 else [],
        "depth": depth(records, splits),
        "heads": {
            "split": h_split,
            "budget": h_budget,
            "rows": heads_table(records, h_split, h_budget, args.heads_top),
        },
        "prefill_seconds": prefill_s,
        "analysis_seconds": analysis_s,
        "wall_seconds": time.perf_counter() - t_start,
    }
    write_report(args.out, report, markdown(report))
    return report


if __name__ == "__main__":
    main()
