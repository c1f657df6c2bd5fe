"""The error-mitigation paper's headline number: how many times smaller a pattern's drop from dense is than 2:4's.

For a metric and a method, drop(p) = dense − value(p) for accuracies (value(p) − dense for
perplexity), and the ratio is drop(2:4) / drop(p): 2.7 means the pattern loses 2.7 times less
than 2:4 at the same sparsity. Undefined (None) when 2:4 itself shows no drop; infinite when
the pattern shows none.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

from actsparse.core.patterns import parse_pattern
from actsparse.report.collect import Point, Study

REFERENCE = "2:4"


@dataclass(frozen=True)
class Metric:
    """A number read from a point: perplexity, or one score of one lm-eval task."""

    name: str  # "ppl" or "TASK:acc"
    label: str
    higher_is_better: bool

    def value(self, point: Point | None) -> float | None:
        if point is None:
            return None
        if self.name == "ppl":
            return point.ppl
        task, _, score = self.name.rpartition(":")
        value = point.tasks.get(task, {}).get(score)
        return float(value) if isinstance(value, (int, float)) else None


PPL = Metric("ppl", "perplexity", False)


def task_label(name: str, proxies: dict) -> str:
    """Task names as reported: actsparse's own proxies are always marked as such."""
    if name in proxies or name.startswith("actsparse_"):
        kind = "LAMBADA-style last word" if "lastword" in name else "HellaSwag-style continuation"
        return f"{name} (actsparse proxy: {kind})"
    return name


def metrics(study: Study) -> list[Metric]:
    """Perplexity, then acc and acc_norm of each task (where recorded)."""
    found = [PPL]
    for task in study.task_names():
        scores = set().union(*(p.tasks.get(task, {}).keys() for p in study.points.values()))
        for score in ("acc", "acc_norm"):
            if score in scores:
                found.append(Metric(f"{task}:{score}", f"{task} {score}", True))
    return found


def drop(metric: Metric, dense: float | None, value: float | None) -> float | None:
    if dense is None or value is None:
        return None
    return dense - value if metric.higher_is_better else value - dense


def times_smaller(reference_drop: float | None, pattern_drop: float | None) -> float | None:
    """drop(2:4) / drop(pattern); None when 2:4 shows no drop, inf when the pattern shows none."""
    if reference_drop is None or pattern_drop is None or reference_drop <= 0:
        return None
    if pattern_drop <= 0:
        return math.inf
    return reference_drop / pattern_drop


def same_density_patterns(study: Study, target: str = "activations") -> list[str]:
    """The study's patterns at 2:4's density, other than 2:4 (the headline compares at equal sparsity)."""
    density = parse_pattern(REFERENCE).density
    return [p for p in study.patterns(target) if p != REFERENCE and math.isclose(parse_pattern(p).density, density)]


def ratios(study: Study, metric: Metric, target: str = "activations") -> dict[str, dict[str, float | None]]:
    """method -> pattern -> times smaller than 2:4's drop (methods that have a 2:4 point)."""
    dense = metric.value(study.dense())
    out = {}
    for method in study.methods(target):
        reference = study.get(target, REFERENCE, method)
        if reference is None:
            continue
        ref_drop = drop(metric, dense, metric.value(reference))
        out[method] = {
            pattern: times_smaller(ref_drop, drop(metric, dense, metric.value(study.get(target, pattern, method))))
            for pattern in same_density_patterns(study, target)
        }
    return out


def median_ratio(table: dict[str, dict[str, float | None]], pattern: str) -> tuple[float | None, int]:
    """Median over methods of one pattern's ratio, and how many methods it is over."""
    values = [row[pattern] for row in table.values() if row.get(pattern) is not None]
    return (statistics.median(values) if values else None), len(values)


def fmt_ratio(value: float | None) -> str:
    if value is None:
        return "–"
    if math.isinf(value):
        return "no drop"
    return f"{value:.2f}×"
