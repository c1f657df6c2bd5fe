"""The table scripts behind RESULTS.md: their tables (scripts/calibrated_table.py) and their runs through the sweep store."""

import sys
from dataclasses import asdict, replace
from pathlib import Path

from actsparse.artifacts import append_jsonl_atomic, read_jsonl
from actsparse.eval import run as run_module
from actsparse.eval.run import EvalSettings
from actsparse.sweep.runner import matches_keyless
from conftest import save_tiny_model_dir, vocab_text

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

import allocation_table as at  # noqa: E402
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


# ---- the allocation table ---------------------------------------------------------------------

UNIFORM = {"pattern": "8:16", "criterion": "amber", "mitigation": "none", "backend": "auto", "layers": None,
           "prefill_only": False, "roles": None, "seed": 0, "skip": []}  # fmt: skip


def _allocation_record(settings, row, config, allocation=None, **fields):
    """A run record as the allocation table wrote it before it ran through the sweep runner (no key)."""
    record = {"kind": "run", "row": row, "model": settings.model, "target": fields.pop("target", "activations"),
              "data": settings.data, "settings": asdict(settings), "config": config, "sparse_ppl": 80.0,
              "dense_ppl": 40.0, "sparse_flop_fraction": 1.0, "row_seconds": 5.0, **fields}  # fmt: skip
    if allocation is not None:
        record["allocation"] = allocation
    return record


def _per_layer(settings, row, mitigation, sensitivity, choices=(4, 6, 8, 10, 12, 14, 16), in_config=True, in_settings=True):
    """A per-layer row: its config holds the resolved map, its ``allocation`` how the map was chosen."""
    config = {**UNIFORM, "mitigation": mitigation, "allocation": {"q@0": "6:16", "v@0": "dense"}}
    objective = "sum of e_q^2" if sensitivity == "eq" else "sum of Fisher loss-increase estimates"
    how = {"choices": list(choices), "criterion": "amber", "mitigation": mitigation, "seqlen": 512, "source": "sensitivity",
           "windows": settings.calib_windows, "objective": objective}  # fmt: skip
    if in_config:
        config["sensitivity"] = sensitivity
    if in_settings:
        how["sensitivity"] = sensitivity
    allocation = {"m": 16, "density": 0.5, "met": True, "data": settings.calib_data, "settings": how}
    return _allocation_record(settings, row, config, allocation)


def test_allocation_table_rows_match_the_records_they_were_computed_for():
    """Old records of the allocation table (no key) count as done for exactly their own row: a per-layer
    row by how its map was chosen, ``eq`` where the config has no ``sensitivity`` (records written before
    ``fisher`` existed or became the default), so an old e_q row is never taken for a Fisher row."""
    settings = EvalSettings(model="smollm2-135m", data="brown:news", calib_windows=8, max_tokens=32768)
    fraction = at.skip_fraction("8:16", "4:16")
    budget = {"skip": ["v@2,3", "up"], "fraction": fraction, "target_fraction": fraction, "met": True,
              "calibration": {"data": "brown:belles_lettres+learned", "windows": 8}}  # fmt: skip
    skipping = {**UNIFORM, "pattern": "4:16", "mitigation": "lowrank", "skip": budget["skip"]}
    sparsegpt = {"calib_windows": 128, "layers": None, "method": "sparsegpt", "pattern": "8:16", "roles": None, "seed": 0}
    copied = {"target": "weights", "from_store": "results/weights-smollm2-135m.jsonl"}
    records = {
        at.ROWS[0]: _allocation_record(settings, at.ROWS[0], UNIFORM),
        at.ROWS[1]: _allocation_record(settings, at.ROWS[1], {**UNIFORM, "mitigation": "lowrank"}),
        # e_q rows written before the Fisher estimate existed: neither the config nor the allocation names it
        at.ROWS[2]: _per_layer(settings, at.ROWS[2], "none", "eq", in_config=False, in_settings=False),
        # ... and while eq was the default: the config left it out, the allocation's settings name it
        at.ROWS[3]: _per_layer(settings, at.ROWS[3], "lowrank", "eq", in_config=False),
        at.SKIP_ROW: _allocation_record(settings, at.SKIP_ROW, skipping, budget=budget),
        at.ROWS[5]: _per_layer(settings, at.ROWS[5], "none", "fisher"),
        at.ROWS[6]: _per_layer(settings, at.ROWS[6], "lowrank", "fisher"),
        at.FINE_ROW: _per_layer(settings, at.FINE_ROW, "lowrank", "fisher", choices=range(4, 17)),
        at.SPARSEGPT_ROW: _allocation_record(replace(settings, calib_windows=128), at.SPARSEGPT_ROW, sparsegpt, **copied),
    }
    assert at.skip_choice(list(records.values()), settings, "4:16", fraction) == budget
    planned = at.runs(settings, "8:16", "4:16", at.ROWS, budget)
    here, from_weights = at.sparsegpt_runs(settings, "8:16")
    assert [r.tags["row"] for r in planned] == list(at.ROWS) and planned[7].choices == tuple(range(4, 17))
    assert planned[4].config.skip == ("v@2,3", "up") and planned[4].tags["budget"] == budget
    by_row = {r.tags["row"]: r for r in planned}
    by_row[at.SPARSEGPT_ROW] = from_weights
    for row, record in records.items():
        assert [name for name, run in by_row.items() if matches_keyless(run, record)] == [row], row
        assert not matches_keyless(here, record)  # the weights table's run (its settings), not one made here
    eq_none, eq_lowrank, fisher_none = records[at.ROWS[2]], records[at.ROWS[3]], records[at.ROWS[5]]
    unnamed = {k: v for k, v in fisher_none["config"].items() if k != "sensitivity"}
    assert not matches_keyless(by_row[at.ROWS[2]], {**fisher_none, "config": unnamed})  # the allocation says fisher
    contradicting = {**eq_lowrank, "config": {**eq_lowrank["config"], "sensitivity": "fisher"}}  # the allocation says eq
    assert not any(matches_keyless(run, contradicting) for run in by_row.values())
    assert not matches_keyless(by_row[at.ROWS[2]], {**eq_none, "settings": {**eq_none["settings"], "calib_windows": 4}})
    by_map = {**eq_none["allocation"], "settings": {**eq_none["allocation"]["settings"], "source": "map"}}
    assert not matches_keyless(by_row[at.ROWS[2]], {**eq_none, "allocation": by_map})
    assert not matches_keyless(by_row[at.ROWS[2]], {**eq_none, "allocation": None})
    # the layer choice of the skipping row: only for the same settings, pattern and fraction
    assert at.skip_choice([records[at.SKIP_ROW]], replace(settings, calib_windows=4), "4:16", fraction) is None
    assert at.skip_choice([records[at.SKIP_ROW]], settings, "2:16", fraction) is None
    assert at.skip_choice([records[at.SKIP_ROW]], settings, "4:16", 0.5) is None
    own = {"kind": "sensitivity", "row": at.SKIP_ROW, "pattern": "4:16", "settings": asdict(settings),
           "budget": {**budget, "skip": ["k"]}}  # fmt: skip
    assert at.skip_choice([records[at.SKIP_ROW], own], settings, "4:16", fraction)["skip"] == ["k"]  # its own record first
    assert at.row_seconds(records[at.ROWS[0]]) == 5.0
    assert at.row_seconds({"run_seconds": 2.0, "budget": {"calibration": {"seconds": 3.0}}}) == 5.0


def test_allocation_table_records_in_results_match_their_rows():
    """Every row of the allocation table's stores in results/ is the result of exactly the run of its row,
    as the script plans it for the settings it was made with, so their commands skip it."""
    stores = sorted((Path(__file__).resolve().parents[1] / "results").glob("allocation-*.jsonl"))
    assert stores
    names = set(EvalSettings.__dataclass_fields__)
    for store in stores:
        records = read_jsonl(store)
        rows_made = [r for r in records if r.get("kind") == "run" and r["row"] != at.SPARSEGPT_ROW]
        settings = EvalSettings(**{k: v for k, v in rows_made[0]["settings"].items() if k in names})
        budget = at.skip_choice(records, settings, "4:16", at.skip_fraction("8:16", "4:16"))
        wanted = [row for row in at.ROWS if row != at.SKIP_ROW or budget is not None]
        by_row = {run.tags["row"]: run for run in at.runs(settings, "8:16", "4:16", wanted, budget)}
        by_row[at.SPARSEGPT_ROW] = at.sparsegpt_runs(settings, "8:16")[1]
        for record in (r for r in records if r.get("kind") == "run"):
            matched = [row for row, run in by_row.items() if matches_keyless(run, record)]
            assert matched == [record["row"]], (store.name, record["row"])


def test_allocation_table_resumes_through_the_sweep_runner(tmp_path, monkeypatch, capsys):
    """The script's rows go through the sweep runner; run again on its store, or on the same records as
    written before (no keys, no sensitivity in an e_q row's config), nothing is evaluated again; a Fisher
    row is not taken from an e_q row, and the stored dense perplexity is reused."""
    model_dir = save_tiny_model_dir(tmp_path / "tiny")
    for name, seed in (("eval", 1), ("calib", 2)):
        (tmp_path / f"{name}.txt").write_text(vocab_text(documents=8, seed=seed))
    store = tmp_path / "alloc.jsonl"
    common = ["allocation_table.py", "--model", str(model_dir), "--data", str(tmp_path / "eval.txt"), "--calib-data",
              str(tmp_path / "calib.txt"), "--seqlen", "32", "--max-tokens", "96", "--calib-windows", "3", "--no-recipe",
              "--no-progress", "--out", str(store)]  # fmt: skip
    monkeypatch.chdir(tmp_path)  # no results/weights-*.jsonl here: no SparseGPT row
    monkeypatch.setattr(sys, "argv", [*common, "--rows", "4,5,8"])
    at.main()
    records = read_jsonl(store)
    assert [r["kind"] for r in records] == ["sensitivity", "run", "run", "run"]  # the layer choice first, at once
    made = {r["row"]: r for r in records[1:]}
    assert list(made) == [at.ROWS[3], at.SKIP_ROW, at.FINE_ROW] and all("key" in r for r in made.values())
    assert made[at.ROWS[3]]["config"]["sensitivity"] == "eq" and isinstance(made[at.ROWS[3]]["config"]["allocation"], dict)
    assert made[at.FINE_ROW]["allocation"]["settings"]["choices"] == list(range(4, 17))
    assert made[at.SKIP_ROW]["budget"] == records[0]["budget"]
    assert made[at.SKIP_ROW]["config"]["skip"] == records[0]["budget"]["skip"]
    shown = rows((tmp_path / "alloc.md").read_text())
    assert [name for name, cells in shown.items() if cells[0] != "–"] == [
        "method (8:16 average)", "dense", at.ROWS[3], at.FINE_ROW, at.SKIP_ROW,
    ]  # fmt: skip
    assert shown[at.ROWS[3]][0] == f"{made[at.ROWS[3]]['sparse_ppl']:.2f}"
    capsys.readouterr()

    def refuse(*args, **kwargs):
        raise AssertionError("evaluated again")

    monkeypatch.setattr(run_module.Evaluator, "__init__", refuse)
    at.main()  # all there: nothing loads
    assert "3 of 3 runs already in" in capsys.readouterr().out and read_jsonl(store) == records
    # the same rows as the script wrote them before the sweep runner: no keys, no layer-choice record, e_q unnamed
    sweep_fields = ("key", "run", "sweep", "worker", "run_seconds", "label", "method_kind")
    old = [{**{k: v for k, v in r.items() if k not in sweep_fields}, "row_seconds": 1.0} for r in records[1:]]
    old[0]["config"] = {k: v for k, v in old[0]["config"].items() if k != "sensitivity"}
    store.unlink()
    for record in old:
        append_jsonl_atomic(store, record)
    at.main()
    assert "3 of 3 runs already in" in capsys.readouterr().out and read_jsonl(store) == old
    again = rows((tmp_path / "alloc.md").read_text())
    assert {k: v[:-1] for k, v in again.items()} == {k: v[:-1] for k, v in shown.items()}  # the same table, seconds aside
    assert again[at.ROWS[3]][-1] == "1"
    store.unlink()
    for record in old:
        append_jsonl_atomic(store, {**record, "dense_ppl": 1234.5})
    monkeypatch.undo()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", [*common, "--rows", "7"])
    at.main()  # Fisher + lowrank: the e_q row is not it, so it runs
    fisher = read_jsonl(store)[-1]
    assert len(read_jsonl(store)) == len(old) + 1
    assert fisher["row"] == at.ROWS[6] and fisher["config"]["sensitivity"] == "fisher" and "key" in fisher
    assert fisher["dense_ppl"] == 1234.5  # the dense perplexity stored with the earlier rows, not measured again
