"""The Markdown tables of the scripts behind RESULTS.md (scripts/calibrated_table.py)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

from calibrated_table import table  # noqa: E402


def record(pattern, criterion, mitigation, ppl, seconds=None, device="gpu"):
    out = {
        "config": {"pattern": pattern, "criterion": criterion, "mitigation": mitigation}, "sparse_ppl": ppl, "dense_ppl": 10.0,
        "model": "m", "data": "d", "settings": {"seqlen": 8, "dtype": "float32"}, "windows": 2, "tokens": 14,
        "versions": {"device": device},
    }  # fmt: skip
    if seconds is not None:
        out["calibration"] = {"seconds": seconds, "data": "c", "windows": 4, "seqlen": 8, "options": {"lr": 1e-4, "steps": None}}
    return out


def rows(text):
    return {
        line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
        for line in text.splitlines()
        if line.startswith("| ")
    }


def test_cells_missing_cells_and_seconds_per_device():
    records = [
        record("2:4", "magnitude", "none", 20.0),
        record("2:4", "magnitude", "spts", 19.5, seconds=30.0),
        record("8:16", "amber", "spts", 12.25, seconds=50.0),
        record("2:4", "amber", "lpts", 18.0, seconds=400.0),
        record("8:16", "magnitude", "lpts", 11.0, seconds=3000.0, device="cpu"),
    ]
    text = table(records, mitigations=["none", "spts", "lpts"])
    got = rows(text)
    assert got["dense"][:4] == ["10.00"] * 4
    assert got["none"] == ["20.00", "–", "–", "–", "–"]  # no calibration: no seconds
    assert got["spts"] == ["19.50", "–", "–", "12.25", "50.0"]  # max over the row
    assert got["lpts"] == ["–", "18.00", "11.00", "–", "400.0 (gpu) / 3000.0 (cpu)"]
    assert "Device: cpu, gpu" in text
    assert "Device:" in table(records[:3], mitigations=["none"]) and "(calibration seconds by device" not in table(
        records[:3], mitigations=["none"]
    )


def test_table_scripts_resume_their_old_keyless_stores_through_the_sweep_runner(tiny_dir, tmp_path):
    """The table scripts run through the sweep store; records they wrote before (no run key) count as done."""
    import core_table
    import weights_table
    from calibrated_table import runs as calibrated_runs

    from actsparse.artifacts import append_jsonl_atomic, read_jsonl
    from actsparse.eval.run import EvalSettings, Evaluator
    from actsparse.sweep import SweepSpec, run_sweep
    from actsparse.sweep.runner import matches_keyless

    settings = EvalSettings(model=str(tiny_dir), data=str(tiny_dir / "text.txt"), seqlen=16, max_tokens=64, device="cpu")
    planned = core_table.runs(settings)
    assert len(planned) == len(core_table.PATTERNS) * len(core_table.CRITERIA) * len(core_table.MITIGATIONS)
    first, second, third = planned[:3]
    old = Evaluator(settings, progress=False).run(first.config)  # as the script wrote it before: no key
    old = {k: v for k, v in old.items() if k not in ("label", "method_kind")}
    old["config"] = {k: v for k, v in old["config"].items() if k not in ("backend", "prefill_only", "allocation")}
    store = tmp_path / "core.jsonl"
    append_jsonl_atomic(store, old)
    assert matches_keyless(first, old) and not matches_keyless(second, old)
    assert not matches_keyless(first, {**old, "settings": {**old["settings"], "seqlen": 32}})
    summary = run_sweep(
        SweepSpec("core-table", (first, second, third)), store, progress=False, log=lambda text: None, keyless=True
    )
    assert summary.skipped == 1 and summary.done == [second.key, third.key]
    records = read_jsonl(store)
    assert [r.get("key") for r in records] == [None, second.key, third.key]
    assert records[1]["sweep"] == "core-table" and records[1]["label"] == "magnitude + var"
    assert (
        run_sweep(
            SweepSpec("core-table", (first, second, third)), store, progress=False, log=lambda text: None, keyless=True
        ).skipped
        == 3
    )

    weights = weights_table.runs(settings, ["2:4"], 4, 0)
    assert [r.target for r in weights] == ["activations"] * 4 + ["weights"] * 3 and weights[-1].config.calib_windows == 4
    calibrated = calibrated_runs(settings, ["2:4"], ["amber"], ["var", "spts"], lr=1e-3, steps=2, save_states="states")
    assert calibrated[0].calibration is None and calibrated[1].calibration == {"windows": 32, "lr": 1e-3, "steps": 2, "seed": 0}
    assert calibrated[1].save == "states/2-4_amber_spts" and calibrated[1].method().save == calibrated[1].save
    # an old calibrated record matches only with the same calibration options
    record = {**old, "config": {"pattern": "2:4", "criterion": "amber", "mitigation": "spts"},
              "calibration": {"windows": 32, "options": {"lr": 1e-3, "steps": 2, "seed": 0, "clip": 1.0}}}  # fmt: skip
    assert matches_keyless(calibrated[1], record)
    assert not matches_keyless(calibrated[1], {**record, "calibration": {"windows": 32, "options": {"lr": 1e-4, "steps": 2}}})


def test_amber_table_rows_are_tagged_sweep_runs_and_old_rows_count_as_done():
    from amber_table import ROWS, W8A8_DENSE, plan, runs

    from actsparse.eval.run import EvalSettings
    from actsparse.sweep.runner import matches_keyless

    settings = EvalSettings(model="m", data="brown:news", seqlen=16)
    planned = runs(settings, {"2:4": plan("2:4", ("k",), ("v",), ("q@0",))})
    assert [r.tags["row"] for r in planned] == [W8A8_DENSE, *ROWS]
    assert [r.quantize_rest for r in planned] == [True] + [False] * 5 + [True] * 3
    assert all(r.tags["w8a8_whole_decoder"] == r.quantize_rest for r in planned)
    dense_w8a8, naive = planned[0], planned[1]
    old = {"model": "m", "target": "activations", "settings": {"data": "brown:news", "seqlen": 16},
           "config": dense_w8a8.config.to_dict(), "kind": "run", "row": W8A8_DENSE, "w8a8_whole_decoder": True}  # fmt: skip
    assert matches_keyless(dense_w8a8, old) and not matches_keyless(dense_w8a8, {**old, "w8a8_whole_decoder": False})
    assert matches_keyless(naive, {**old, "config": naive.config.to_dict(), "w8a8_whole_decoder": False})
