"""The report's PNG figures (matplotlib, imported only here; headless Agg backend).

Per study: a heat map of each metric over methods × patterns, the headline bar chart (times
smaller drop than 2:4, per 50% pattern) and activation vs weight pruning bars.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

from actsparse.errors import ActsparseError
from actsparse.report.collect import Study
from actsparse.report.headline import PPL, REFERENCE, Metric, median_ratio, metrics, ratios, same_density_patterns


def require_matplotlib():
    try:
        import matplotlib
    except ImportError as e:
        raise ActsparseError(f"plots need matplotlib ({e}); fix: pip install 'actsparse[eval]', or pass --no-plots") from e
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:60]


def _save(plt, figure, path: Path) -> bool:
    """Write ``figure`` as a PNG and free it; True (the plot was written)."""
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return True


def _heatmap(plt, study: Study, metric: Metric, path: Path) -> bool:
    patterns = study.patterns()
    rows = [(t, m) for t in ("activations", "weights") for m in study.methods(t)]
    dense = metric.value(study.dense())
    if not rows or not patterns or dense is None:
        return False
    values = [[metric.value(study.get(t, p, m)) for p in patterns] for t, m in rows]
    if all(v is None for row in values for v in row):
        return False
    if metric.higher_is_better:  # change from dense, in points
        shade = [[math.nan if v is None else v - dense for v in row] for row in values]
        cmap, label = "RdYlGn", f"{metric.label} − dense ({dense:.3f})"
    else:  # log ratio to dense
        shade = [[math.nan if v is None or v <= 0 else math.log2(v / dense) for v in row] for row in values]
        cmap, label = "viridis_r", f"log2({metric.label} / dense {dense:.2f})"
    figure, axes = plt.subplots(figsize=(2.2 + 1.1 * len(patterns), 1.4 + 0.32 * len(rows)))
    finite = [abs(v) for row in shade for v in row if not math.isnan(v)]
    bound = max(finite) if finite and max(finite) > 0 else 1.0
    image = axes.imshow(shade, cmap=cmap, aspect="auto", vmin=-bound if metric.higher_is_better else 0, vmax=bound)
    axes.set_xticks(range(len(patterns)), patterns, rotation=30, ha="right")
    axes.set_yticks(range(len(rows)), [m for _, m in rows], fontsize=8)
    if len(rows) * len(patterns) <= 600:
        for i, row in enumerate(values):
            for j, v in enumerate(row):
                if v is not None:
                    dark = not metric.higher_is_better and not math.isnan(shade[i][j]) and shade[i][j] > 0.6 * bound
                    text = f"{v:.2f}" if metric.name == "ppl" else f"{v:.3f}"
                    axes.text(j, i, text, ha="center", va="center", fontsize=6, color="white" if dark else "black")
    figure.colorbar(image, ax=axes, label=label)
    axes.set_title(f"{study.model}: {metric.label}", fontsize=10)
    return _save(plt, figure, path)


def _headline(plt, study: Study, path: Path) -> bool:
    patterns = same_density_patterns(study)
    found = []
    for metric in metrics(study):
        table = ratios(study, metric)
        medians = [median_ratio(table, p)[0] for p in patterns]
        if any(v is not None for v in medians):
            found.append((metric, table, medians))
    if not patterns or not found:
        return False
    figure, axes = plt.subplots(figsize=(2.5 + 1.6 * len(patterns), 4.2))
    width = 0.8 / len(found)
    top = 1.0
    for k, (metric, table, medians) in enumerate(found):
        xs = [j - 0.4 + width * (k + 0.5) for j in range(len(patterns))]
        shown = [0.0 if v is None or math.isinf(v) else v for v in medians]
        axes.bar(xs, shown, width, label=metric.label)
        for x, p in zip(xs, patterns):
            points = [row[p] for row in table.values() if row.get(p) is not None and not math.isinf(row[p])]
            axes.scatter([x] * len(points), points, s=6, color="black", zorder=3)
            top = max([top, *points])
        top = max([top, *shown])
    axes.axhline(1.0, color="grey", linestyle="--", linewidth=1)
    axes.set_ylim(0, top * 1.1)
    axes.set_xticks(range(len(patterns)), patterns)
    axes.set_ylabel(f"times smaller drop from dense than {REFERENCE}")
    axes.set_title(f"{study.model}: bars = median over methods, dots = methods", fontsize=10)
    axes.legend(fontsize=7)
    return _save(plt, figure, path)


def _versus(plt, study: Study, path: Path) -> bool:
    weight_methods = study.methods("weights")
    patterns = [p for p in study.patterns() if p in study.patterns("weights")]
    if not weight_methods or not patterns:
        return False
    series = {"best activations": []}
    for p in patterns:
        options = [pt.ppl for m in study.methods("activations") if (pt := study.get("activations", p, m)) is not None]
        series["best activations"].append(min(options) if options else math.nan)
    for w in weight_methods:
        series[w] = [pt.ppl if (pt := study.get("weights", p, w)) is not None else math.nan for p in patterns]
    figure, axes = plt.subplots(figsize=(2.5 + 1.5 * len(patterns), 4.2))
    width = 0.8 / len(series)
    for k, (name, values) in enumerate(series.items()):
        axes.bar([j - 0.4 + width * (k + 0.5) for j in range(len(patterns))], values, width, label=name)
    dense = study.dense()
    if dense is not None:
        axes.axhline(dense.ppl, color="black", linestyle="--", linewidth=1, label=f"dense {dense.ppl:.2f}")
    axes.set_yscale("log")
    axes.set_xticks(range(len(patterns)), patterns)
    axes.set_ylabel("perplexity (log scale)")
    axes.set_title(f"{study.model}: activation vs weight pruning", fontsize=10)
    axes.legend(fontsize=7)
    return _save(plt, figure, path)


def write_plots(study: Study, directory, prefix: str) -> dict[str, str]:
    """Write a study's PNGs into ``directory``; returns {kind or metric name: file name} of those written."""
    plt = require_matplotlib()
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    base = f"{prefix}-{_slug(study.model)}"
    written = {}
    for metric in metrics(study):
        name = f"{base}-{_slug(metric.name)}.png"
        if _heatmap(plt, study, metric, directory / name):
            written["ppl" if metric.name == PPL.name else metric.name] = name
    if _headline(plt, study, directory / f"{base}-headline.png"):
        written["headline"] = f"{base}-headline.png"
    if _versus(plt, study, directory / f"{base}-versus.png"):
        written["versus"] = f"{base}-versus.png"
    return written
