"""Method objects: one evaluation path for dense, activations, calibrated, saved states and weights;
records name their method, and the sweep and the report use the same objects and labels."""

import pytest

from actsparse.baselines import WeightPruneConfig
from actsparse.calibration.layerwise import CalibrationOptions
from actsparse.config import SparsityConfig
from actsparse.errors import ActsparseError
from actsparse.eval.methods import (
    Activations,
    Calibrated,
    Dense,
    FromState,
    Weights,
    as_method,
    method_label,
    record_label,
)
from actsparse.eval.run import EvalSettings, Evaluator
from actsparse.report import studies
from actsparse.sparsify import sparse_layers
from actsparse.sweep import parse_sweep


@pytest.fixture
def evaluator(tiny_dir, tmp_path):
    calib = tmp_path / "calib.txt"
    calib.write_text("a bird sang in the tree . " * 40)
    settings = EvalSettings(
        model=str(tiny_dir), data=str(tiny_dir / "text.txt"), calib_data=str(calib), calib_windows=4, seqlen=16, max_tokens=64
    )
    return Evaluator(settings, progress=False)


def test_configs_become_method_objects():
    config = SparsityConfig(pattern="2:4", criterion="amber", mitigation="var")
    assert as_method(config) == Activations(config)
    calibrated = SparsityConfig(pattern="2:4", mitigation="spts")
    assert as_method(calibrated) == Calibrated(calibrated) == as_method(Activations(calibrated))
    weights = WeightPruneConfig(pattern="2:4", method="wanda")
    assert as_method(weights) == Weights(weights)
    assert as_method(Dense()) == Dense()
    with pytest.raises(ActsparseError, match="cannot evaluate"):
        as_method("2:4")
    assert Activations(config).title() == "2:4 amber + var" and Weights(weights).title() == "2:4 weights wanda"


def test_every_method_runs_through_one_path_and_names_itself(evaluator, tmp_path):
    config = SparsityConfig(pattern="2:4", criterion="amber", mitigation="var", skip=("k",))
    by_config = evaluator.run(config)
    by_method = evaluator.run(Activations(config))
    assert by_method["sparse_ppl"] == by_config["sparse_ppl"] and by_method["config"] == by_config["config"]
    assert by_method["method_kind"] == "activations" and by_method["label"] == "amber + var [skip k]"
    assert by_method["label"] == method_label("activations", by_method["config"])

    dense = evaluator.run_dense()
    assert dense == {**dense, "method_kind": "dense", "label": "dense", "target": "dense", "sparse_ppl": dense["dense_ppl"]}
    assert evaluator.run(Dense())["sparse_ppl"] == dense["sparse_ppl"] and "sparse_layers" not in dense

    weights = evaluator.run_weights(WeightPruneConfig(pattern="2:4", method="wanda", calib_windows=2))
    assert weights["method_kind"] == "weights" and weights["label"] == "weights wanda" and weights["method"] == "wanda"
    assert weights["calibration"]["windows"] == 2
    assert (
        evaluator.run(Weights(WeightPruneConfig(pattern="2:4", method="wanda", calib_windows=2)))["sparse_ppl"]
        == weights["sparse_ppl"]
    )

    spts = SparsityConfig(pattern="2:4", mitigation="spts")
    state = tmp_path / "state"
    calibrated = evaluator.run(Calibrated(spts, CalibrationOptions(), windows=2, save=str(state)))
    assert calibrated["method_kind"] == "calibrated" and calibrated["label"] == "magnitude + spts"
    assert calibrated["calibration"]["windows"] == 2 and calibrated["state"] == str(state)
    again = evaluator.run_calibrated(spts, calib_windows=2)
    assert again["sparse_ppl"] == pytest.approx(calibrated["sparse_ppl"])
    saved = evaluator.run(FromState(str(state)))
    assert saved["method_kind"] == "state" and saved["label"] == "magnitude + spts"
    assert saved["sparse_ppl"] == pytest.approx(calibrated["sparse_ppl"])
    assert evaluator.run_state(state)["sparse_ppl"] == saved["sparse_ppl"]
    assert not sparse_layers(evaluator.model)


def test_a_failed_method_leaves_the_model_dense(evaluator, monkeypatch):
    import actsparse.eval.methods as methods

    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(methods, "SparsifyReport", type("R", (), {"of": staticmethod(broken)}))
    with pytest.raises(RuntimeError, match="boom"):
        evaluator.run(Calibrated(SparsityConfig(pattern="2:4", mitigation="spts"), windows=2))
    assert not sparse_layers(evaluator.model)
    monkeypatch.setattr(methods, "verify_pattern", broken)
    before = {name: p.clone() for name, p in evaluator.model.named_parameters()}
    with pytest.raises(RuntimeError, match="boom"):
        evaluator.run(Weights(WeightPruneConfig(pattern="2:4", method="magnitude")))
    assert all((p == before[name]).all() for name, p in evaluator.model.named_parameters())


def test_sweep_runs_are_method_objects():
    spec = parse_sweep(
        {
            "models": ["m"],
            "settings": {"data": "brown:news", "seqlen": 16, "calib_windows": 4},
            "grids": [
                {"target": "activations", "patterns": ["2:4"], "criteria": ["amber"], "mitigations": ["none", "oshift"],
                 "calibration": {"windows": 2, "lr": 1e-3}},
                {"target": "weights", "patterns": ["2:4"], "methods": ["wanda"], "calib_windows": 4},
            ],
        }
    )  # fmt: skip
    methods = [run.method() for run in spec.runs]
    assert [type(m) for m in methods] == [Dense, Activations, Calibrated, Weights]
    assert methods[2].windows == 2 and methods[2].options == CalibrationOptions(lr=1e-3, steps=None, seed=0)
    assert [run.label() for run in spec.runs] == [
        "m: dense",
        "m: 2:4 amber + none",
        "m: 2:4 amber + oshift",
        "m: 2:4 weights wanda",
    ]


def test_the_report_reads_labels_from_the_records_and_rebuilds_them_for_old_ones():
    base = {"model": "m", "data": "d", "settings": {"seqlen": 8}, "dense_ppl": 10.0}
    old = {
        **base,
        "target": "activations",
        "config": {"pattern": "2:4", "criterion": "amber", "mitigation": "var"},
        "sparse_ppl": 12.0,
    }
    new = {**old, "config": {**old["config"], "skip": ["k"]}, "label": "amber + var [skip k]", "sparse_ppl": 13.0}
    named = {**old, "config": {**old["config"], "pattern": "8:16"}, "label": "my method", "sparse_ppl": 11.0}
    other = {**old, "config": {**old["config"], "criterion": "magnitude", "mitigation": "none"}, "sparse_ppl": 20.0}
    assert (
        record_label(old) == "amber + var" and record_label(new) == "amber + var [skip k]" and record_label(named) == "my method"
    )
    (study,) = studies([old, new, named, other])
    assert set(study.points) == {
        ("activations", "2:4", "amber + var"),
        ("activations", "2:4", "amber + var [skip k]"),
        ("activations", "8:16", "my method"),
        ("activations", "2:4", "magnitude + none"),
    }
    # grouped by the criterion and ordered by the mitigation of each record's config, not of its label's text
    assert study.methods("activations") == ["amber + var", "amber + var [skip k]", "my method", "magnitude + none"]


def test_whole_decoder_w8a8_and_tagged_sweep_runs(evaluator, tmp_path):
    from actsparse.amber import quantize_rest_
    from actsparse.eval.perplexity import perplexity
    from actsparse.sparsify import sparsify_, unsparsify_
    from actsparse.sweep import Run, SweepSpec, read_records, run_sweep

    config = SparsityConfig(pattern="2:4", criterion="amber", mitigation="w8a8", skip=("k", "v"))
    alone = evaluator.run(Activations(config))
    whole = evaluator.run(Activations(config, quantize_rest=True))
    assert whole["quantize_rest"] is True and "quantize_rest" not in alone and whole["label"] == alone["label"]
    assert not sparse_layers(evaluator.model)
    report = sparsify_(evaluator.model, config)  # the same by hand
    assert quantize_rest_(evaluator.model, config, report) > 0
    by_hand = perplexity(evaluator.model, evaluator.windows, bos_id=evaluator.bos_id, progress=False)
    unsparsify_(evaluator.model)
    assert whole["sparse_ppl"] == pytest.approx(by_hand.ppl) and whole["sparse_ppl"] != alone["sparse_ppl"]

    plain = Run(evaluator.settings, "activations", config)
    tagged = Run(evaluator.settings, "activations", config, tags={"row": "r1"})
    quantized = Run(evaluator.settings, "activations", config, quantize_rest=True, tags={"row": "r2"})
    assert plain.key == tagged.key != quantized.key and "quantize_rest" not in plain.identity()
    assert quantized.method() == Activations(config, quantize_rest=True)
    store = tmp_path / "store.jsonl"
    summary = run_sweep(
        SweepSpec("t", (tagged, quantized)),
        store,
        progress=False,
        log=lambda text: None,
        evaluators={evaluator.settings.model: evaluator},
    )
    assert len(summary.done) == 2
    records = read_records(store)
    assert [r["row"] for r in records] == ["r1", "r2"]
    assert records[1]["sparse_ppl"] == pytest.approx(whole["sparse_ppl"])
