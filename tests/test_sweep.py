"""Sweeps: expansion into runs, stable keys, the JSONL store, and kill-and-resume of a real sweep process."""

import collections
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from actsparse.config import SparsityConfig
from actsparse.errors import ActsparseError
from actsparse.eval.methods import Activations
from actsparse.eval.run import EvalSettings
from actsparse.sweep import Run, Store, load_sweep, parse_sweep, read_records, run_sweep
from conftest import save_tiny_model_dir, vocab_text

REPO = Path(__file__).resolve().parents[1]


def _spec(**over):
    data = {
        "models": ["m"],
        "settings": {"data": "brown:news", "seqlen": 16},
        "grids": [
            {
                "target": "activations",
                "patterns": ["2:4", "8:16"],
                "criteria": ["magnitude", "amber"],
                "mitigations": ["none", "var"],
            },
            {"target": "weights", "patterns": ["2:4"], "methods": ["magnitude", "wanda"], "calib_windows": 4},
        ],
    }
    data.update(over)
    return data


def test_expansion_order_and_counts():
    spec = parse_sweep(_spec(models=["a", "b"]))
    assert len(spec.runs) == 2 * (1 + 2 * 2 * 2 + 2)
    first = spec.runs[: 1 + 8 + 2]
    assert [r.target for r in first] == ["dense"] + ["activations"] * 8 + ["weights"] * 2
    assert {r.model for r in first} == {"a"} and {r.model for r in spec.runs[11:]} == {"b"}
    assert [r.config.pattern for r in first[1:5]] == ["2:4"] * 4  # patterns outermost, then criteria, then mitigations
    assert first[-1].config.method == "wanda" and first[-1].config.calib_windows == 4


def test_keys_are_stable_unique_and_follow_what_changes_numbers():
    a, b = parse_sweep(_spec()), parse_sweep(_spec())
    keys = [r.key for r in a.runs]
    assert keys == [r.key for r in b.runs] and len(set(keys)) == len(keys)
    assert [r.key for r in a.with_device("cuda:3").runs] == keys  # the device is not part of a run's identity
    longer = parse_sweep(_spec(settings={"data": "brown:news", "seqlen": 32}))
    assert not set(keys) & {r.key for r in longer.runs}
    with_tasks = a.with_tasks(("actsparse_lastword",))
    assert not set(keys) & {r.key for r in with_tasks.runs}
    assert [r.key for r in with_tasks.with_tasks(()).runs] == keys
    # the same run listed twice (two grids overlap) is run once
    twice = _spec()
    twice["grids"].append({"target": "activations", "patterns": ["2:4"], "criteria": ["amber"], "mitigations": ["var"]})
    assert len(parse_sweep(twice).runs) == len(a.runs)


def test_allocation_choices_are_part_of_a_runs_key_only_when_given():
    settings = EvalSettings(model="m", data="brown:news", seqlen=16)
    config = SparsityConfig(pattern="8:16", criterion="amber", allocation="sensitivity")
    plain, fine = Run(settings, "activations", config), Run(settings, "activations", config, choices=(8, 4, 6, 5, 7, 16))
    assert "choices" not in plain.identity() and fine.identity()["choices"] == [4, 5, 6, 7, 8, 16]
    assert plain.key != fine.key == Run(settings, "activations", config, choices=(4, 5, 6, 7, 8, 16)).key
    assert plain.method() == Activations(config) and fine.method().choices == fine.choices
    calibrated = Run(settings, "activations", replace(config, mitigation="spts"), choices=(4, 8, 16))
    with pytest.raises(ActsparseError, match="no allocation choices"):
        calibrated.method()


@pytest.mark.parametrize(
    "change, message",
    [
        (
            {"grids": [{"target": "activations", "patterns": ["2:4"], "criteria": ["bogus"], "mitigations": ["none"]}]},
            "unknown criterion",
        ),
        (
            {"grids": [{"target": "activations", "patterns": ["5:4"], "criteria": ["amber"], "mitigations": ["none"]}]},
            "1 <= N < M",
        ),
        ({"grids": [{"target": "weights", "patterns": ["2:4"], "methods": ["obs"]}]}, "unknown weight pruning method"),
        (
            {"grids": [{"target": "weights", "patterns": ["2:4"], "methods": ["wanda"], "criteria": ["amber"]}]},
            "unknown key(s) criteria",
        ),
        ({"grids": [{"target": "neurons", "patterns": ["2:4"]}]}, "target must be one of"),
        ({"settings": {"seq_len": 16}}, "unknown key(s) seq_len"),
        ({"modles": ["x"]}, "unknown key(s) modles"),
    ],
)
def test_bad_sweep_files_are_refused_before_any_model_loads(change, message):
    with pytest.raises(ActsparseError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_sweep(_spec(**change))


def test_papers_sweep_file_is_the_study():
    from actsparse.calibration.mitigations import CALIBRATED

    spec = load_sweep(REPO / "sweeps" / "papers.yaml")
    assert spec.models == ("smollm2-135m", "gemma3-270m")
    per_model = collections.Counter(r.model for r in spec.runs)
    assert per_model == {"smollm2-135m": 1 + 72 + 18 + 52, "gemma3-270m": 1 + 72 + 18 + 52}
    runs = [r for r in spec.runs if r.model == "smollm2-135m"]
    patterns = {r.config.pattern for r in runs if r.target != "dense"}
    assert patterns == {"2:4", "4:8", "8:16", "16:32", "unstructured:0.5", "unstructured:0.7"}
    activations = [r.config for r in runs if r.target == "activations"]
    assert {c.criterion for c in activations} == {"magnitude", "amber", "clact", "wina"}
    assert {"none", "var", "dpts"} | CALIBRATED <= {c.mitigation for c in activations}
    assert {r.config.method for r in runs if r.target == "weights"} == {"magnitude", "wanda", "sparsegpt"}
    assert all(r.calibration["windows"] == 256 for r in runs if r.calibration)
    assert set(runs[0].tasks.tasks) == {"actsparse_lastword", "actsparse_continuation"} and runs[0].generate is not None
    assert load_sweep(REPO / "sweeps" / "example.yaml").runs  # the small example parses too


def test_extended_sweep_is_the_rest_of_the_calibrated_cross_product():
    from actsparse.calibration.mitigations import CALIBRATED

    papers, extended = (load_sweep(REPO / "sweeps" / name).with_tasks(()) for name in ("papers.yaml", "papers-extended.yaml"))
    assert extended.models == papers.models

    def cells(spec):
        return {(r.model, r.config.pattern, r.config.criterion, r.config.mitigation): r for r in spec.runs if r.calibration}

    ours, theirs = cells(papers), cells(extended)
    assert not ours.keys() & theirs.keys()
    patterns = {r.config.pattern for r in papers.runs if r.target == "activations"}
    criteria = {r.config.criterion for r in papers.runs if r.target == "activations"}
    mitigations = {cell[3] for cell in ours}
    assert mitigations == CALIBRATED  # every calibrated mitigation, crossed with every pattern and criterion once in all
    assert ours.keys() | theirs.keys() == {
        (m, p, c, g) for m in papers.models for p in patterns for c in criteria for g in mitigations
    }
    dense = [r.key for r in extended.runs if r.target == "dense"]
    assert dense == [r.key for r in papers.runs if r.target == "dense"]  # the same settings: one dense baseline for both
    sample = next(iter(theirs.values()))
    assert sample.calibration == next(iter(ours.values())).calibration and sample.settings == next(iter(ours.values())).settings


def test_store_skips_a_partial_line_and_appends_after_it(tmp_path, capsys):
    store = Store(tmp_path / "s.jsonl")
    store.append({"key": "a", "x": 1})
    with open(store.path, "a") as handle:
        handle.write('{"key": "b", "x"')  # what a non-atomic writer killed midway would leave
    assert [r["key"] for r in store.records()] == ["a"]
    assert "skipped 1 line" in capsys.readouterr().err
    store.append({"key": "c", "x": 3})
    assert [r["key"] for r in store.records()] == ["a", "c"] and store.keys() == {"a", "c"}
    with pytest.raises(ValueError):
        store.append({"x": 4})


def _write_sweep(tmp_path, model_dir, runs_text: str, extra: dict | None = None) -> Path:
    (tmp_path / "eval.txt").write_text(vocab_text(documents=40, sentences=60, seed=1))
    (tmp_path / "calib.txt").write_text(vocab_text(documents=4, sentences=30, seed=2))
    data = {
        "name": "tiny",
        "models": [str(model_dir)],
        "settings": {"data": str(tmp_path / "eval.txt"), "calib_data": str(tmp_path / "calib.txt"), "seqlen": 64,
                     "max_tokens": 16384, "calib_windows": 2, "device": "cpu"},
        "grids": yaml.safe_load(runs_text),
        **(extra or {}),
    }  # fmt: skip
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


KILL_GRIDS = """
- {target: activations, patterns: ["2:4", "8:16"], criteria: [magnitude, amber], mitigations: [none, var]}
- {target: activations, patterns: ["2:4"], criteria: [amber], mitigations: [oshift], calibration: {windows: 2, steps: 2}}
- {target: weights, patterns: ["2:4"], methods: [wanda], calib_windows: 2}
"""


def test_sweep_killed_midway_resumes_without_losing_or_repeating_a_run(tmp_path):
    model_dir = save_tiny_model_dir(tmp_path / "tiny")
    path = _write_sweep(tmp_path, model_dir, KILL_GRIDS)
    store = tmp_path / "store.jsonl"
    expected = [r.key for r in load_sweep(path).runs]
    assert len(expected) == 1 + 8 + 1 + 1
    command = [sys.executable, "-m", "actsparse.cli.main", "sweep", str(path), "--out", str(store), "--no-progress"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, cwd=tmp_path)
    deadline = time.monotonic() + 120
    while not (store.exists() and store.read_text().count("\n") >= 1):
        assert process.poll() is None, process.stdout.read().decode()
        assert time.monotonic() < deadline, "no record within 120 s"
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    killed = read_records(store)
    assert 1 <= len(killed) < len(expected), "the sweep should have been killed midway"
    assert all(r["key"] in expected for r in killed)

    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"{len(killed)} of {len(expected)} runs already in" in result.stdout
    records = read_records(store)
    counts = collections.Counter(r["key"] for r in records)
    assert set(counts) == set(expected) and set(counts.values()) == {1}
    assert [r["key"] for r in records[: len(killed)]] == [r["key"] for r in killed]  # finished runs untouched

    by_target = collections.Counter(r["target"] for r in records)
    assert by_target == {"dense": 1, "activations": 9, "weights": 1}
    for record in records:
        assert record["versions"]["torch"] and record["settings"]["seqlen"] == 64 and record["config"]
        assert record["run"]["target"] == record["target"] and record["sweep"] == "tiny"
        assert record["dense_ppl"] == pytest.approx(records[0]["dense_ppl"])
    calibrated = next(r for r in records if r["config"].get("mitigation") == "oshift")
    assert calibrated["calibration"]["windows"] == 2
    # nothing is left to do: the sweep would skip every run
    assert Store(store).keys() == set(expected)


def test_models_load_once_per_sweep_and_lm_eval_is_not_needed_without_tasks(tmp_path, monkeypatch):
    import actsparse.models.loading as loading

    first = save_tiny_model_dir(tmp_path / "llama")
    second = save_tiny_model_dir(tmp_path / "qwen2", family="qwen2")
    path = _write_sweep(
        tmp_path, first, "[{target: activations, patterns: ['2:4', '8:16'], criteria: [amber], mitigations: [none, var]}]"
    )
    data = yaml.safe_load(path.read_text())
    data["models"] = [str(first), str(second)]
    data["settings"]["max_tokens"] = 1024
    data["generate"] = {"max_new_tokens": 3, "prompts": ["the cat sat on", "a bird"]}
    spec = parse_sweep(data)
    loads = []
    real = loading.load_model
    monkeypatch.setattr(loading, "load_model", lambda name, **kw: loads.append(name) or real(name, **kw))
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # as on a machine without lm-eval
    summary = run_sweep(spec, tmp_path / "store.jsonl", progress=False, log=lambda text: None)
    assert loads == [str(first), str(second)]
    assert len(summary.done) == len(spec.runs) == 2 * 5
    records = read_records(tmp_path / "store.jsonl")
    dense = next(r for r in records if r["target"] == "dense" and r["model"] == str(first))
    sparse = next(
        r for r in records if r["model"] == str(first) and r["config"]["pattern"] == "2:4" and r["config"]["mitigation"] == "none"
    )
    assert [o["prompt"] for o in dense["generation"]["outputs"]] == ["the cat sat on", "a bird"]
    assert all(len(o["ids"]) == 3 for o in sparse["generation"]["outputs"])
    assert "tasks" not in dense and dense["versions"]["lm_eval"] in ("not installed", dense["versions"]["lm_eval"])
    # asking for tasks without lm-eval fails before any model loads, and says how to fix it
    loads.clear()
    with pytest.raises(ActsparseError, match=r"actsparse\[eval\]"):
        run_sweep(spec.with_tasks(("actsparse_lastword",)), tmp_path / "other.jsonl", progress=False, log=lambda text: None)
    assert loads == []


def test_sweep_cli_dry_run_lists_done_and_todo(tmp_path, capsys):
    from actsparse.cli.main import main

    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(_spec(models=[str(save_tiny_model_dir(tmp_path / "tiny"))])))
    spec = load_sweep(path)
    Store(tmp_path / "st.jsonl").append({"key": spec.runs[1].key})
    assert main(["sweep", str(path), "--out", str(tmp_path / "st.jsonl"), "--dry-run"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert (
        lines[1].startswith("done")
        and lines[0].startswith("todo")
        and lines[-1] == f"1 of {len(spec.runs)} runs in {tmp_path / 'st.jsonl'}"
    )
    assert main(["sweep", str(path)]) == 2  # no store given anywhere
    assert "--out" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["sweep", "report", "tasks"])
def test_new_commands_have_help(command, capsys):
    from actsparse.cli.main import build_parser

    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args([command, "--help"])
    assert exit_.value.code == 0 and f"usage: actsparse {command}" in capsys.readouterr().out


# ---- several writers on one store ----------------------------------------------------------------


def _claim_and_store(path, keys, worker, barrier):
    store = Store(path)
    barrier.wait()
    for key in keys:
        if store.claim(key, worker):
            store.append({"key": key, "worker": worker})


def test_processes_sharing_a_store_claim_each_run_once(tmp_path):
    import multiprocessing

    path = tmp_path / "shared.jsonl"
    keys = [f"k{i}" for i in range(12)]
    context = multiprocessing.get_context("fork")
    barrier = context.Barrier(3)
    workers = [context.Process(target=_claim_and_store, args=(path, keys[i:] + keys[:i], f"w{i}", barrier)) for i in range(3)]
    for process in workers:
        process.start()
    for process in workers:
        process.join(60)
        assert process.exitcode == 0
    records = read_records(path)
    assert sorted(r["key"] for r in records) == sorted(keys)  # every run stored exactly once
    assert Store(path).claims() == {}  # appending released every claim


def test_append_never_stores_a_key_twice_and_claims_follow_the_store(tmp_path):
    store = Store(tmp_path / "s.jsonl")
    assert store.claim("a", "me") and store.claim("a", "me")  # a worker's own claim is its own
    assert not store.claim("a", "you")  # held by a live process (this one)
    assert store.append({"key": "a", "n": 1}) is True
    assert store.append({"key": "a", "n": 2}) is False
    assert [r["n"] for r in store.records()] == [1]
    assert not store.claim("a", "you")  # stored: nothing to claim
    assert store.claim("b", "me")
    store.release("b", "you")  # not yours: nothing happens
    assert not store.claim("b", "you")
    store.release("b", "me")
    assert store.claim("b", "you")


def test_a_claim_of_a_dead_process_is_stale(tmp_path):
    import socket

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    store = Store(tmp_path / "s.jsonl")
    store.claims_path.write_text(json.dumps({"a": {"worker": "gone", "host": socket.gethostname(), "pid": pid, "time": 0}}))
    assert store.claim("a", "me")
    assert store.claims()["a"]["worker"] == "me"
    # another host's claim cannot be checked: kept, unless stale_after says how old is too old
    store.claims_path.write_text(json.dumps({"b": {"worker": "far", "host": "elsewhere", "pid": 1, "time": time.time() - 100}}))
    assert not store.claim("b", "me")
    assert Store(store.path, stale_after=50).claim("b", "me")


def test_a_truncated_last_line_is_skipped_with_a_warning(tmp_path, capsys):
    store = Store(tmp_path / "s.jsonl")
    store.append({"key": "a"})
    with open(store.path, "a") as handle:
        handle.write('{"key": "b", "sparse_ppl": 4')
    assert store.keys() == {"a"}
    err = capsys.readouterr().err
    assert "warning" in err and "truncated" in err and len(err.strip().splitlines()) == 1


def test_sweep_leaves_runs_another_process_holds(tmp_path):
    model_dir = save_tiny_model_dir(tmp_path / "tiny")
    path = _write_sweep(
        tmp_path, model_dir, '[{target: activations, patterns: ["2:4"], criteria: [magnitude], mitigations: [none, var]}]'
    )
    data = yaml.safe_load(path.read_text())
    data["settings"]["max_tokens"] = 256
    spec = parse_sweep(data)
    store = Store(tmp_path / "store.jsonl")
    assert store.claim(spec.runs[1].key, "another")  # a live process (this one, under another name) is running it
    summary = run_sweep(spec, store.path, progress=False, log=lambda text: None, worker="me")
    assert summary.elsewhere == [spec.runs[1].key]
    assert set(summary.done) == {spec.runs[0].key, spec.runs[2].key}
    assert store.keys() == {spec.runs[0].key, spec.runs[2].key}
    assert set(store.claims()) == {spec.runs[1].key}


def test_sweep_workers_processes_do_each_run_once(tmp_path, capsys, monkeypatch):
    from actsparse.cli.main import main

    model_dir = save_tiny_model_dir(tmp_path / "tiny")
    grids = '- {target: activations, patterns: ["2:4", "8:16", "4:8"], criteria: [magnitude, amber], mitigations: [none]}\n'
    path = _write_sweep(tmp_path, model_dir, grids)
    data = yaml.safe_load(path.read_text())
    data["settings"]["max_tokens"] = 2048  # short runs: the test is about who runs what
    path.write_text(yaml.safe_dump(data))
    store = tmp_path / "store.jsonl"
    expected = sorted(run.key for run in load_sweep(path).runs)
    Store(store).append({"key": expected[0], "dense_ppl": 1.0, "sparse_ppl": 1.0})  # one run done before
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in (str(REPO / "src"), os.environ.get("PYTHONPATH")) if p))
    assert main(["sweep", str(path), "--out", str(store), "--workers", "2", "--tasks", "none"]) == 0
    out = capsys.readouterr().out
    assert "[w0] started" in out and "[w1] started" in out and "CPU" in out
    records = read_records(store)
    assert sorted(r["key"] for r in records) == expected  # every run stored exactly once across the workers
    assert Store(store).claims() == {}
    workers = {r["worker"] for r in records[1:]}
    # runs were taken by the child processes (how many each took depends on timing: one may take them all)
    assert workers and len(workers) <= 2 and all(not w.endswith(f":{os.getpid()}") for w in workers)
    assert f"{len(expected) - 1} runs done now by 2 workers, 1 were already" in out


def test_dry_run_checks_every_config_against_the_model_and_the_texts(tmp_path, capsys, monkeypatch):
    import actsparse.models.loading as loading
    from actsparse.cli.main import main

    monkeypatch.setattr(loading, "load_model", lambda *a, **k: pytest.fail("no model may load"))
    model = str(save_tiny_model_dir(tmp_path / "tiny"))
    capsys.readouterr()
    cases = [
        ({"grids": [{"target": "activations", "patterns": ["24:48"], "criteria": ["amber"], "mitigations": ["none"]}]}, "multiple of 48"),
        ({"grids": [{"target": "activations", "patterns": ["2:4"], "criteria": ["amber"], "mitigations": ["none"], "layers": [5]}]}, "does not exist"),
        ({"grids": [{"target": "weights", "patterns": ["2:4"], "methods": ["wanda"], "skip": ["@0-1"]}]}, "no linear layer"),
        ({"settings": {"data": str(tmp_path / "missing.txt"), "seqlen": 16}}, "missing.txt"),
        ({"settings": {"data": "brown:news", "calib_data": "brown:news", "seqlen": 16},
          "grids": [{"target": "activations", "patterns": ["2:4"], "criteria": ["clact"], "mitigations": ["none"]}]}, "overlap"),
    ]  # fmt: skip
    for change, message in cases:
        path = tmp_path / "s.yaml"
        path.write_text(yaml.safe_dump(_spec(models=[model], **change)))
        for extra in (["--dry-run"], []):
            assert main(["sweep", str(path), "--out", str(tmp_path / "st.jsonl"), *extra]) == 2
            err = capsys.readouterr().err
            assert message in err and len(err.strip().splitlines()) == 1, err


def test_report_and_table_readers_tolerate_damage(tmp_path, capsys):
    from actsparse.cli.main import main
    from actsparse.eval.results import read_jsonl

    store = tmp_path / "t.jsonl"
    store.write_text('{"a": 1}\n{"a": 2, "b"')
    assert read_jsonl(store) == [{"a": 1}] and "truncated" in capsys.readouterr().err
    bad = tmp_path / "r.json"
    bad.write_text('{"dense_ppl": 4')
    assert main(["report", str(bad), "--out", str(tmp_path / "rep"), "--no-plots"]) == 2
    err = capsys.readouterr().err
    assert "not a JSON record" in err and len(err.strip().splitlines()) == 1
