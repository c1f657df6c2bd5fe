"""From result records to studies: one model under one protocol, its points by pattern and method.

Works on any Evaluator record — sweep stores, the table scripts' stores, ``eval --out`` files —
because it reads only the fields every record has (model, data, settings, target, config,
perplexities) plus ``tasks`` and ``generation`` where present. A point's method is the
record's ``label`` (written by the method object that made it, ``eval/methods.py``); records
written before labels were get the same label from their config (``method_label``). Records of the same point
(same model, protocol, target and config) are merged: the last perplexity written wins, task
scores and generations are gathered from all of them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import actsparse.calibration.mitigations  # noqa: F401  (registers the calibrated mitigations, listed in order)
from actsparse.core.mitigation import MITIGATIONS
from actsparse.core.patterns import parse_pattern
from actsparse.eval.methods import method_label, record_label

__all__ = ["PROTOCOL", "Point", "Study", "method_label", "pattern_order", "record_label", "studies"]

PROTOCOL = ("data", "calib_data", "seqlen", "max_tokens", "dtype")  # what must match to compare numbers


def pattern_order(name: str) -> tuple:
    """Dense first, then by sparsity; N:M before unstructured at equal sparsity, smaller M first."""
    return parse_pattern(name).sort_key


@dataclass
class Point:
    """One (target, pattern, method) of a study, merged over its records."""

    target: str
    pattern: str
    method: str
    ppl: float
    dense_ppl: float
    causal: bool = True
    tasks: dict = field(default_factory=dict)  # task name -> {"acc": ..., "acc_norm": ..., ...}
    generation: list = field(default_factory=list)  # [{"prompt", "continuation"}]
    records: int = 0
    criterion: str | None = None  # activations: from the record's config (the order of the tables)
    mitigation: str | None = None


@dataclass
class Study:
    """One model under one protocol."""

    model: str
    protocol: dict
    points: dict = field(default_factory=dict)  # (target, pattern, method) -> Point
    first: dict = field(default_factory=dict)  # a record, for the protocol line (windows, tokens, versions)
    lm_eval: dict = field(default_factory=dict)  # lm-eval settings seen (version, batch size, limit)
    proxies: dict = field(default_factory=dict)  # proxy task name -> how it was built

    @property
    def title(self) -> str:
        return f"{self.model} — {self.protocol['data']}"

    def dense(self) -> Point | None:
        found = [p for p in self.points.values() if p.target == "dense"]
        if found:
            return found[0]
        any_point = next(iter(self.points.values()), None)
        if any_point is None:
            return None
        return Point("dense", "dense", "dense", any_point.dense_ppl, any_point.dense_ppl)

    def patterns(self, target: str | None = None) -> list[str]:
        names = {p.pattern for p in self.points.values() if p.target != "dense" and (target is None or p.target == target)}
        return sorted(names, key=pattern_order)

    def methods(self, target: str) -> list[str]:
        """Methods of a target: activation methods grouped by criterion (in the order first seen),
        each criterion's mitigations in registry order (none, var, dpts, ..., the calibrated and
        learned ones); anything else in the order first seen."""
        points = [p for p in self.points.values() if p.target == target]
        seen = list(dict.fromkeys(p.method for p in points))
        if target != "activations":
            return seen
        registry = {name: index for index, name in enumerate(MITIGATIONS)}
        named = {p.method: (p.criterion, p.mitigation) for p in points}
        criteria = list(dict.fromkeys(criterion for criterion, _ in named.values()))

        def order(method: str) -> tuple:
            criterion, mitigation = named[method]
            return (criteria.index(criterion), registry.get(mitigation, len(registry)), seen.index(method))

        return sorted(seen, key=order)

    def get(self, target: str, pattern: str, method: str) -> Point | None:
        return self.points.get((target, pattern, method))

    def task_names(self) -> list[str]:
        return list(dict.fromkeys(name for p in self.points.values() for name in p.tasks))


def _protocol(record: dict) -> dict:
    settings = record.get("settings", {})
    return {key: settings.get(key, record.get(key)) for key in PROTOCOL} | {"data": record.get("data", settings.get("data"))}


def studies(records: list[dict]) -> list[Study]:
    """Group records into studies (in the order first seen) and merge each point's records."""
    out: dict[str, Study] = {}
    for record in records:
        if "sparse_ppl" not in record or "config" not in record:
            continue
        protocol = _protocol(record)
        model = record.get("model", "?")
        sid = json.dumps([model, protocol], sort_keys=True, default=str)
        study = out.setdefault(sid, Study(model, protocol, first=record))
        target = record.get("target", "activations")
        config = record["config"]
        pattern = "dense" if target == "dense" else str(parse_pattern(config["pattern"]))
        method = record_label(record)
        point = study.points.get((target, pattern, method))
        if point is None:
            point = study.points[(target, pattern, method)] = Point(
                target, pattern, method, record["sparse_ppl"], record["dense_ppl"],
                criterion=config.get("criterion"), mitigation=config.get("mitigation"),
            )  # fmt: skip
        point.ppl, point.dense_ppl = record["sparse_ppl"], record["dense_ppl"]
        point.causal = bool(record.get("causal", True))
        point.records += 1
        for name, scores in (record.get("tasks") or {}).items():
            point.tasks[name] = scores
            if "proxy" in scores:
                study.proxies[name] = scores["proxy"]
        if record.get("lm_eval"):
            study.lm_eval = record["lm_eval"]
        if record.get("generation"):
            point.generation = record["generation"].get("outputs", [])
    return list(out.values())
