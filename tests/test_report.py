"""The report: studies from records, the headline ratio, Markdown and PNGs."""

import math
import sys

import pytest

from actsparse.eval.results import append_jsonl_atomic, write_json_atomic
from actsparse.report import studies, write_report
from actsparse.report.collect import method_label, pattern_order
from actsparse.report.headline import PPL, Metric, fmt_ratio, ratios, times_smaller

TASK = "actsparse_continuation_brown_news"
SETTINGS = {"data": "brown:news", "calib_data": "brown:learned", "seqlen": 512, "max_tokens": 4096, "dtype": "float32"}


def record(target, pattern, ppl, acc=None, criterion="amber", mitigation="none", method=None, generation=None, **extra):
    config = {"pattern": pattern}
    config.update({"method": method} if target == "weights" else {"criterion": criterion, "mitigation": mitigation, "skip": []})
    out = {"model": "m", "data": "brown:news", "settings": SETTINGS, "target": target, "config": config, "sparse_ppl": ppl,
           "dense_ppl": 10.0, "windows": 8, "tokens": 4088, "versions": {"torch": "2", "device": "cpu"}, **extra}  # fmt: skip
    if acc is not None:
        out["tasks"] = {TASK: {"acc": acc, "acc_norm": acc, "proxy": {"source": "brown:news", "seed": 0, "items": 1000}}}
        out["lm_eval"] = {"version": "0.4.13", "batch_size": 16, "limit": None, "num_fewshot": 0}
    if generation:
        out["generation"] = {"outputs": [{"prompt": "The capital of France is", "continuation": generation}]}
    return out


RECORDS = [
    record("dense", "dense", 10.0, acc=0.80, generation=" Paris, a city"),
    record("activations", "2:4", 16.0, acc=0.60, generation=" the the the"),
    record("activations", "4:8", 13.0, acc=0.70),
    record("activations", "8:16", 12.0, acc=0.75, generation=" Paris | and"),
    record("activations", "16:32", 9.5, acc=0.85),  # better than dense: no drop
    record("activations", "unstructured:0.7", 40.0, acc=0.40),
    record("activations", "2:4", 14.0, mitigation="var"),
    record("activations", "8:16", 11.0, mitigation="var"),
    record("activations", "8:16", 13.5, criterion="clact-batch", causal=False),
    record("weights", "2:4", 30.0, acc=0.50, method="sparsegpt", generation=" bad"),
    record("weights", "8:16", 20.0, acc=0.65, method="sparsegpt"),
]


def test_pattern_order_and_labels():
    names = ["unstructured:0.7", "16:32", "2:4", "unstructured:0.5", "8:16", "4:8", "dense"]
    assert sorted(names, key=pattern_order) == ["dense", "2:4", "4:8", "8:16", "16:32", "unstructured:0.5", "unstructured:0.7"]
    assert (
        method_label("activations", {"criterion": "amber", "mitigation": "var", "skip": ["k"], "prefill_only": True})
        == "amber + var [skip k; prefill only]"
    )
    assert method_label("weights", {"method": "wanda", "skip": []}) == "weights wanda"


def test_methods_are_grouped_by_criterion_with_mitigations_in_registry_order():
    mixed = [
        record("activations", "2:4", 15.0, mitigation="oscale"),  # a table store read before the sweep store
        record("activations", "2:4", 14.0, criterion="magnitude", mitigation="spts"),
        record("activations", "2:4", 16.0, mitigation="none"),
        record("activations", "2:4", 14.5, mitigation="var"),
        record("activations", "2:4", 17.0, criterion="magnitude", mitigation="none", skip=["k"]),
        record("activations", "2:4", 18.0, mitigation="not-registered"),
        record("weights", "2:4", 30.0, method="wanda"),
    ]
    mixed[4]["config"]["skip"] = ["k_proj"]
    (study,) = studies(mixed)
    assert study.methods("activations") == [
        "amber + none", "amber + var", "amber + oscale", "amber + not-registered",
        "magnitude + none [skip k_proj]", "magnitude + spts",
    ]  # fmt: skip
    assert study.methods("weights") == ["weights wanda"]


def test_headline_ratio_is_the_drop_of_2_4_over_the_drop_of_the_pattern():
    (study,) = studies(RECORDS)
    table = ratios(study, PPL)
    assert table["amber + none"]["4:8"] == pytest.approx(6.0 / 3.0)
    assert table["amber + none"]["8:16"] == pytest.approx(6.0 / 2.0)
    assert math.isinf(table["amber + none"]["16:32"])  # no drop at all
    assert table["amber + var"]["8:16"] == pytest.approx(4.0 / 1.0) and table["amber + var"]["4:8"] is None  # not run
    assert "clact-batch + none" not in table  # no 2:4 point to compare with
    accuracy = ratios(study, Metric(f"{TASK}:acc", "acc", True))
    assert accuracy["amber + none"]["8:16"] == pytest.approx(0.20 / 0.05)
    assert (
        times_smaller(-1.0, 2.0) is None
        and fmt_ratio(None) == "–"
        and fmt_ratio(math.inf) == "no drop"
        and fmt_ratio(2.71) == "2.71×"
    )
    assert "unstructured:0.7" not in table["amber + none"]  # the headline compares at 2:4's sparsity only


def test_markdown_report_is_readable_without_json(tmp_path, monkeypatch):
    store = tmp_path / "store.jsonl"
    for r in RECORDS:
        append_jsonl_atomic(store, r)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # Markdown alone needs no matplotlib
    text = write_report(
        [store], tmp_path / "report", plots=False, command="actsparse report store.jsonl --out report"
    ).read_text()
    assert "Made by `actsparse report store.jsonl --out report` from 11 records" in text
    assert "| amber + none | 16.00 | 13.00 | 12.00 | 9.50 | 40.00 |" in text
    assert "| amber + var | 14.00 | – | 11.00 | – | – |" in text
    assert "| clact-batch + none† |" in text and "† non-causal" in text
    assert "| weights sparsegpt | 30.00 | 20.00 |" in text
    assert "| perplexity | 2.00× (n=1) | 3.50× (n=2) | no drop (n=1) |" in text  # median of 3.0 and 4.0 at 8:16
    assert f"{TASK} (actsparse proxy: HellaSwag-style continuation) acc" in text
    assert "actsparse's own offline proxies" in text and "1000 items from brown:news" in text
    assert "| 2:4 | 14.00 (amber + var) | – | 30.00 |" in text  # activation vs weight pruning, best method named
    assert "**Prompt:** The capital of France is" in text
    assert "| dense | Paris, a city |" in text and "| 8:16 amber + var |" not in text
    assert "| 8:16 amber + none | Paris \\| and |" in text and "| 2:4 weights sparsegpt | bad |" in text
    assert "lm-eval 0.4.13, 0-shot, batch size 16" in text


def test_records_of_one_point_merge_and_protocols_stay_apart(tmp_path):
    again = record("activations", "2:4", 15.0, acc=None)  # a later perplexity-only record of the same point
    other = dict(record("activations", "2:4", 99.0), settings={**SETTINGS, "seqlen": 2048})
    found = studies(RECORDS + [again, other])
    assert len(found) == 2 and [s.protocol["seqlen"] for s in found] == [512, 2048]
    point = found[0].get("activations", "2:4", "amber + none")
    assert point.ppl == 15.0 and point.tasks[TASK]["acc"] == 0.60 and point.records == 2


def test_report_cli_writes_pngs(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    from actsparse.cli.main import main

    store = tmp_path / "store.jsonl"
    for r in RECORDS[:-1]:
        append_jsonl_atomic(store, r)
    write_json_atomic(tmp_path / "one.json", RECORDS[-1])  # a single record, as `eval --out` writes it
    assert main(["report", str(store), str(tmp_path / "one.json"), "--out", str(tmp_path / "out")]) == 0
    assert "report.md" in capsys.readouterr().out
    pngs = sorted(p.name for p in (tmp_path / "out").glob("*.png"))
    assert pngs == ["01-m-actsparse-continuation-brown-news-acc-norm.png", "01-m-actsparse-continuation-brown-news-acc.png",
                    "01-m-headline.png", "01-m-ppl.png", "01-m-versus.png"]  # fmt: skip
    assert all((tmp_path / "out" / p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)
    text = (tmp_path / "out" / "report.md").read_text()
    assert "![headline: times smaller drop than 2:4](01-m-headline.png)" in text and "](01-m-ppl.png)" in text
    assert "| weights sparsegpt | 30.00 | 20.00 |" in text  # the .json record joined its study
    assert main(["report", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "x")]) == 2
