"""The report as Markdown: per study, perplexity and task scores per pattern and method, the
headline ratios, activation vs weight pruning, and the generation check."""

from __future__ import annotations

import math

from actsparse.report.collect import Point, Study
from actsparse.report.headline import (
    PPL,
    REFERENCE,
    Metric,
    fmt_ratio,
    median_ratio,
    metrics,
    ratios,
    same_density_patterns,
    task_label,
)

NON_CAUSAL = "†"


def _num(value: float | None, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if abs(value) >= 1e4:
        return f"{value:.3g}"
    return f"{value:.{digits}f}"


def _cell(text: str) -> str:
    return " ".join(str(text).replace("|", "\\|").split())


def _table(header: list[str], rows: list[list[str]], numeric: bool = True) -> list[str]:
    """A Markdown table; the first column left-aligned, the others right-aligned when ``numeric``."""
    lines = ["| " + " | ".join(header) + " |", "|---|" + ("---:|" if numeric else "---|") * (len(header) - 1)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines + [""]


def _score(metric: Metric, point: Point | None) -> str:
    value = metric.value(point)
    return _num(value, 2 if metric.name == "ppl" else 3)


def _protocol(study: Study) -> str:
    first, protocol = study.first, study.protocol
    versions = first.get("versions", {})
    device = versions.get("device", "?")
    parts = [
        f"text {protocol['data']}", f"seqlen {protocol['seqlen']}",
        f"{first.get('windows', '?')} windows ({first.get('tokens', '?')} predicted tokens)",
        f"{protocol.get('dtype')}", f"calibration text {protocol.get('calib_data')}", f"device {device}",
        f"torch {versions.get('torch', '?')}, transformers {versions.get('transformers', '?')}",
    ]  # fmt: skip
    if study.lm_eval:
        e = study.lm_eval
        limit = f", first {e['limit']} documents per task" if e.get("limit") else ""
        parts.append(f"lm-eval {e.get('version')}, {e.get('num_fewshot', 0)}-shot, batch size {e.get('batch_size')}{limit}")
    return "Protocol: " + "; ".join(parts) + "."


def _method_table(study: Study, metric: Metric, target: str) -> list[str]:
    patterns = study.patterns(target)
    dense = study.dense()
    rows = [["**dense**"] + [_score(metric, dense)] * len(patterns)]
    for method in study.methods(target):
        points = [study.get(target, p, method) for p in patterns]
        if all(metric.value(pt) is None for pt in points):
            continue  # e.g. runs made without this task
        mark = NON_CAUSAL if any(pt is not None and not pt.causal for pt in points) else ""
        rows.append([_cell(method) + mark] + [_score(metric, pt) for pt in points])
    return _table(["method"] + patterns, rows)


def _headline(study: Study, images: dict) -> list[str]:
    patterns = same_density_patterns(study)
    if study.patterns("activations").count(REFERENCE) == 0 or not patterns:
        return []
    lines = [
        f"### Headline: how many times smaller the drop from dense is than {REFERENCE}'s", "",
        f"drop = dense − score (perplexity: score − dense); ratio = drop({REFERENCE}) / drop(pattern), at the same 50% sparsity. "
        f"Median over the activation methods run at both patterns; \"no drop\": the pattern is at least as good as dense; "
        f"\"–\": {REFERENCE} itself shows no drop or the point is missing.", "",
    ]  # fmt: skip
    rows = []
    tables = {}
    for metric in metrics(study):
        table = tables[metric.name] = ratios(study, metric)
        cells = []
        for pattern in patterns:
            value, count = median_ratio(table, pattern)
            cells.append(f"{fmt_ratio(value)} (n={count})" if count else "–")
        rows.append([_cell(_metric_label(metric, study))] + cells)
    lines += _table(["metric"] + patterns, rows)
    if images.get("headline"):
        lines += [f"![headline: times smaller drop than {REFERENCE}]({images['headline']})", ""]
    for metric in metrics(study):
        table = tables[metric.name]
        if not table:
            continue
        lines += [f"<details><summary>per method: {_cell(_metric_label(metric, study))}</summary>", ""]
        rows = [
            [_cell(m)] + [fmt_ratio(row.get(p)) for p in patterns]
            for m, row in table.items()
            if any(v is not None for v in row.values())
        ]
        lines += _table(["method"] + patterns, rows)
        lines += ["</details>", ""]
    return lines


def _metric_label(metric: Metric, study: Study) -> str:
    if metric.name == "ppl":
        return "perplexity"
    task, _, score = metric.name.rpartition(":")
    return f"{task_label(task, study.proxies)} {score}"


def _versus(study: Study, images: dict) -> list[str]:
    weight_methods = study.methods("weights")
    if not weight_methods:
        return []
    patterns = [p for p in study.patterns() if p in study.patterns("weights")]
    lines = ["### Activation vs weight pruning", "",
             "Same patterns, same protocol, same dense baseline. \"best activations\": the activation method with the best "
             "score at that pattern (named).", ""]  # fmt: skip
    for metric in metrics(study):
        if metric.name != "ppl" and not metric.name.endswith(":acc"):
            continue
        better = max if metric.higher_is_better else min
        rows = []
        for pattern in patterns:
            options = [(metric.value(study.get("activations", pattern, m)), m) for m in study.methods("activations")]
            options = [(v, m) for v, m in options if v is not None]
            best = better(options) if options else None
            magnitude = study.get("activations", pattern, "magnitude + none")
            rows.append(
                [
                    pattern,
                    f"{_num(best[0], 2 if metric.name == 'ppl' else 3)} ({_cell(best[1])})" if best else "–",
                    _score(metric, magnitude),
                ]
                + [_score(metric, study.get("weights", pattern, w)) for w in weight_methods]
            )
        header = ["pattern", "best activations", "activations magnitude + none"] + [_cell(w) for w in weight_methods]
        lines += [f"**{_cell(_metric_label(metric, study))}** (dense {_score(metric, study.dense())})", ""]
        lines += _table(header, rows)
    if images.get("versus"):
        lines += [f"![activation vs weight pruning]({images['versus']})", ""]
    return lines


def _generation(study: Study) -> list[str]:
    dense = study.dense()
    if dense is None or not dense.generation:
        has_any = any(p.generation for p in study.points.values())
        if not has_any:
            return []
    shown: list[tuple[str, Point]] = []
    if dense is not None and dense.generation:
        shown.append(("dense", dense))
    for pattern in study.patterns():
        for target in ("activations", "weights"):
            options = [p for p in study.points.values() if p.target == target and p.pattern == pattern and p.generation]
            if options:
                best = min(options, key=lambda p: p.ppl)
                shown.append((f"{pattern} {best.method}", best))
    lines = ["### Generation check", "",
             "Greedy continuations of the same prompts: dense, then per pattern the activation and the weight-pruning run "
             "with the lowest perplexity.", ""]  # fmt: skip
    prompts = list(dict.fromkeys(out["prompt"] for _, p in shown for out in p.generation))
    for prompt in prompts:
        rows = []
        for label, point in shown:
            text = next((o["continuation"] for o in point.generation if o["prompt"] == prompt), None)
            if text is not None:
                rows.append([_cell(label), _cell(text) or "(empty)"])
        lines += [f"**Prompt:** {_cell(prompt)}", ""] + _table(["run", "continuation"], rows, numeric=False)
    return lines


def _tasks(study: Study, images: dict) -> list[str]:
    names = study.task_names()
    if not names:
        return []
    lines = ["### Zero-shot tasks (lm-evaluation-harness)", ""]
    if any(n in study.proxies for n in names):
        lines += ["Tasks named `actsparse_*` are actsparse's own offline proxies built from the evaluation text "
                  "(not the published benchmarks): " + "; ".join(
                      f"`{n}`: {p.get('items')} items from {p.get('source')}, seed {p.get('seed')}" for n, p in study.proxies.items()
                  ) + ".", ""]  # fmt: skip
    for task in names:
        for metric in metrics(study):
            if not metric.name.startswith(task + ":"):
                continue
            lines += [f"**{_cell(_metric_label(metric, study))}**", ""]
            for target, title in (("activations", "activation sparsity"), ("weights", "weight pruning")):
                if study.methods(target):
                    lines += [f"*{title}*", ""] + _method_table(study, metric, target)
            if images.get(metric.name):
                lines += [f"![{_cell(metric.label)}]({images[metric.name]})", ""]
    return lines


def study_markdown(study: Study, images: dict | None = None) -> str:
    images = images or {}
    dense = study.dense()
    lines = [f"## {_cell(study.title)}", "", _protocol(study), ""]
    lines += ["### Perplexity", "", f"Dense perplexity {_score(PPL, dense)}. Rows: method; columns: pattern.", ""]
    for target, title in (("activations", "Activation sparsity (criterion + mitigation)"), ("weights", "Weight pruning")):
        if study.methods(target):
            lines += [f"**{title}**", ""] + _method_table(study, PPL, target)
    if any(not p.causal for p in study.points.values()):
        lines += [f"{NON_CAUSAL} non-causal: a token's mask depends on other tokens of the batch.", ""]
    if images.get("ppl"):
        lines += [f"![perplexity per pattern and method]({images['ppl']})", ""]
    lines += _headline(study, images)
    lines += _tasks(study, images)
    lines += _versus(study, images)
    lines += _generation(study)
    return "\n".join(lines)


def report_markdown(studies: list[Study], sources: list[str], images: dict | None = None, command: str | None = None) -> str:
    """The whole report: a header, then one section per study."""
    images = images or {}
    runs = sum(p.records for s in studies for p in s.points.values())
    lines = ["# actsparse results report", ""]
    if command:
        lines += [f"Made by `{command}` from {runs} records in {', '.join(f'`{s}`' for s in sources)}.", ""]
    lines += [
        "Studies: " + "; ".join(f"{_cell(s.title)} ({len(s.points)} points)" for s in studies) + ".", "",
        "Perplexity: lower is better; task accuracy: higher is better. Every number comes from the store's records "
        "(each holds its full config, settings and package versions).", "",
    ]  # fmt: skip
    for index, study in enumerate(studies):
        lines += [study_markdown(study, images.get(index)), ""]
    return "\n".join(lines).rstrip() + "\n"
