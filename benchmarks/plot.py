"""PNG of decode tokens/s against context length, from the benchmarks' JSON results.

One panel per (source, model): the cells of ``serving_cpu.json`` (`bench_serving_cpu.py`, one
panel per model) and, when it holds GPU measurements (not a dry run), ``decode_gpu.json``
(`bench_decode_gpu.py`). One line per (variant, batch); cells that failed are left out.

    python benchmarks/plot.py                       # writes benchmarks/results/decode_tokens_per_s.png
    python benchmarks/plot.py --serving X.json --gpu Z.json --out P.png
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
COLOR = {"dense": "C0", "freekv": "C3", "sync": "C2", "noovl": "C1"}
MARKERS = ("o", "s", "^", "D", "v", "x")
LINES = ("-", "--", ":", "-.")


def series(rows: list[dict[str, Any]], key: str) -> dict[tuple[str, int], list[tuple[int, float]]]:
    """``{(variant, batch): [(context, value), ...]}`` sorted by context."""
    out: dict[tuple[str, int], list[tuple[int, float]]] = {}
    for r in rows:
        if key in r and "error" not in r:
            out.setdefault((r["variant"], r["batch"]), []).append((r["context"], r[key]))
    return {k: sorted(v) for k, v in sorted(out.items())}


def serving_rows(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """The rows of a ``bench_serving_cpu.py`` results file, one per (model, variant, context,
    batch): where cells of one model were measured with different settings, the latest run's."""
    cells = sorted(doc["configurations"].values(), key=lambda c: c["run"])
    rows = {
        (r["model"], r["variant"], r["context"], r["batch"]): r for c in cells for r in c["results"]
    }
    return list(rows.values())


def panels(serving: dict[str, Any] | None, gpu: dict[str, Any] | None) -> list[tuple[str, Any]]:
    out = []
    if serving:
        for model in sorted({r["model"] for r in serving["results"]}):
            rows = [r for r in serving["results"] if r["model"] == model]
            data = series(rows, "decode_tokens_per_s")
            if data:  # a model whose cells all failed or were skipped gets no panel
                out.append((f"CPU, SGLang server: {model}", data))
    if gpu and not gpu.get("dry_run", True):
        name = gpu.get("device", "GPU")
        out.append(
            (f"{name}: Llama-3.1-8B-shaped decode loop", series(gpu["rows"], "tokens_per_s"))
        )
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--serving",
        type=Path,
        default=RESULTS / "serving_cpu.json",
        help="bench_serving_cpu.py results (default: results/serving_cpu.json)",
    )
    ap.add_argument("--gpu", type=Path, default=RESULTS / "decode_gpu.json")
    ap.add_argument("--out", type=Path, default=RESULTS / "decode_tokens_per_s.png")
    a = ap.parse_args(argv)

    def load(p: Path) -> dict[str, Any] | None:
        return json.loads(p.read_text()) if p.is_file() else None

    doc = load(a.serving)
    serving = {"results": serving_rows(doc)} if doc else None
    ps = panels(serving, load(a.gpu))
    if not ps:
        print("no results to plot", file=sys.stderr)
        return 1
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, axes = plt.subplots(1, len(ps), figsize=(5.5 * len(ps), 4.2), squeeze=False)
    for ax, (title, data) in zip(axes[0], ps, strict=True):
        batches = sorted({b for _, b in data})
        for (variant, batch), pts in data.items():
            xs, ys = zip(*pts, strict=True)
            i = batches.index(batch)
            ax.plot(xs, ys, LINES[i % len(LINES)], marker=MARKERS[i % len(MARKERS)],
                    color=COLOR.get(variant), label=f"{variant}, batch {batch}")  # fmt: skip
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted({x for pts in data.values() for x, _ in pts}))
        ax.get_xaxis().set_major_formatter(matplotlib.ticker.FuncFormatter(
            lambda x, _: f"{x / 1024:g}K" if x >= 1024 else f"{int(x)}"))  # fmt: skip
        ax.set_xlabel("context (tokens)")
        ax.set_ylabel("decode tokens/s")
        ax.set_title(title, fontsize=10)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    a.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(a.out, dpi=120)
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
