"""Sparse models as Hugging Face checkpoints: save_pretrained / from_pretrained round trips."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import actsparse
from actsparse.calibration.layerwise import CalibrationOptions, calibrate_
from actsparse.config import SparsityConfig
from actsparse.errors import ActsparseError
from actsparse.hf.quantizer import ActsparseConfig
from actsparse.sparsify import sparse_layers, sparsify_, unsparsify_
from conftest import FAMILIES, VOCAB, tiny_model

torch.set_num_threads(1)
IDS = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(9))


def _logits(model):
    with torch.no_grad():
        return model(IDS).logits


def _round_trip(model, path):
    before = _logits(model)
    model.save_pretrained(path)
    loaded = AutoModelForCausalLM.from_pretrained(path)
    assert type(loaded) is type(model)
    torch.testing.assert_close(_logits(loaded), before, atol=0, rtol=0)
    return loaded, json.loads((path / "config.json").read_text())["quantization_config"]


@pytest.mark.parametrize("family", FAMILIES)
def test_dynamic_round_trip_every_family(family, tmp_path):
    model = tiny_model(family)
    config = SparsityConfig(pattern="2:4", criterion="amber", mitigation="var", skip=("@1",))
    sparsify_(model, config)
    dense = tiny_model(family)
    assert not torch.equal(_logits(model), _logits(dense))  # the sparsity is really there
    loaded, saved = _round_trip(model, tmp_path / "ckpt")
    assert saved["quant_method"] == "actsparse" and saved["sparsity"]["pattern"] == "2:4" and saved["sparsity"]["skip"] == ["@1"]
    assert saved["calibration"] is None and saved["versions"]["actsparse"] == actsparse.__version__
    assert 0 < saved["sparse_flop_fraction"] < 1
    assert set(sparse_layers(loaded)) == set(sparse_layers(model))
    # the checkpoint's own weights are the dense model's, under the dense names: it loads densely without actsparse's help
    unsparsify_(loaded)
    torch.testing.assert_close(_logits(loaded), _logits(dense), atol=0, rtol=0)


@pytest.mark.parametrize("mitigation,criterion,family", [("lpts", "amber", "llama"), ("rotation", "clact", "llama"), ("var-oshift", "wina", "qwen2"),
                                                         ("lowrank:8", "magnitude", "opt"), ("rotation", "amber", "gpt2"), ("oscale-shift", "amber", "gemma3")])  # fmt: skip
def test_calibrated_round_trip(mitigation, criterion, family, tmp_path):
    model = tiny_model(family)
    windows = torch.randint(0, VOCAB, (6, 16), generator=torch.Generator().manual_seed(2))
    config = SparsityConfig(pattern="2:4", criterion=criterion, mitigation=mitigation)
    calibrate_(model, config, windows, options=CalibrationOptions(lr=1e-2), progress=False)
    loaded, saved = _round_trip(model, tmp_path / "ckpt")
    assert saved["sparsity"]["mitigation"] == mitigation and saved["calibration"]["windows"] == 6
    assert saved["tensors"] and all(key.startswith("actsparse.state.") for key in saved["tensors"])
    from safetensors import safe_open

    with safe_open(str(tmp_path / "ckpt" / "model.safetensors"), "pt") as handle:
        keys = set(handle.keys())
    assert set(saved["tensors"]) <= keys
    assert not any(key.endswith((".input_shift", ".output_shift")) and not key.startswith("actsparse.") for key in keys)
    # a second save of the loaded model writes the same checkpoint
    _round_trip(loaded, tmp_path / "again")


@pytest.mark.parametrize("criterion,mitigation", [("clact", "none"), ("magnitude", "smooth-static")])
def test_statistics_of_dynamic_methods_travel(criterion, mitigation, tmp_path):
    model = tiny_model("qwen2")
    windows = torch.randint(0, VOCAB, (4, 16), generator=torch.Generator().manual_seed(3))
    stats = actsparse.collect_input_stats(model, windows, progress=False)
    sparsify_(model, SparsityConfig(pattern="8:16", criterion=criterion, mitigation=mitigation), stats=stats)
    _, saved = _round_trip(model, tmp_path / "ckpt")
    assert any(key.endswith(".square_sum") for key in saved["tensors"])


def test_state_directory_and_checkpoint_agree(tmp_path):
    model = tiny_model("llama")
    windows = torch.randint(0, VOCAB, (6, 16), generator=torch.Generator().manual_seed(2))
    calibrate_(model, SparsityConfig(pattern="2:4", mitigation="spts"), windows, progress=False)
    actsparse.save_state(model, tmp_path / "state")
    model.save_pretrained(tmp_path / "ckpt")
    fresh = tiny_model("llama")
    actsparse.load_state_(fresh, tmp_path / "state")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt")
    torch.testing.assert_close(_logits(loaded), _logits(fresh), atol=0, rtol=0)


def test_sparsify_on_load_and_dense_save(tmp_path):
    model = tiny_model("opt")
    model.save_pretrained(tmp_path / "dense")
    qc = ActsparseConfig(pattern="8:16", criterion="wina", mitigation="dpts")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "dense", quantization_config=qc)
    sparsify_(model, qc.sparsity_config())
    torch.testing.assert_close(_logits(loaded), _logits(model), atol=0, rtol=0)
    unsparsify_(model)  # dense again: saves as a plain checkpoint
    assert getattr(model, "hf_quantizer", None) is None
    model.save_pretrained(tmp_path / "plain")
    assert "quantization_config" not in json.loads((tmp_path / "plain" / "config.json").read_text())


def test_refusals(tmp_path):
    model = tiny_model("llama")
    calibrate_(model, SparsityConfig(pattern="2:4", mitigation="lpts"), torch.randint(0, VOCAB, (2, 8)), progress=False)
    model.save_pretrained(tmp_path / "ckpt")
    with pytest.raises(ActsparseError, match="unknown sparsity field"):
        ActsparseConfig(pattern="2:4", patern="2:4")
    with pytest.raises(ActsparseError, match="format version 9"):
        ActsparseConfig(format_version=9)
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    config["quantization_config"]["tensors"]["actsparse.state.model.layers.0.mlp.up_proj.extra"] = {
        "shape": [1],
        "dtype": "float32",
    }
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ActsparseError, match="damaged"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt")
    from actsparse.calibration.mitigations import CovarianceStats

    waiting = tiny_model("llama")
    empty = {site.name: CovarianceStats(site.in_features) for site in actsparse.find_linear_sites(waiting)}
    sparsify_(waiting, SparsityConfig(pattern="2:4", mitigation="lpts"), stats=empty)  # learned, never trained
    with pytest.raises(ActsparseError, match="not calibrated"):
        waiting.save_pretrained(tmp_path / "waiting")


def _cli(capsys, *argv):
    from actsparse.cli.main import main

    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_export_dynamic_state_and_weights(tmp_path, capsys, tiny_dir):
    from transformers import AutoTokenizer

    common = [
        "--model",
        str(tiny_dir),
        "--data",
        str(tiny_dir / "text.txt"),
        "--seqlen",
        "16",
        "--max-tokens",
        "64",
        "--no-progress",
    ]
    ids = AutoTokenizer.from_pretrained(tiny_dir)("the cat sat on the mat .", return_tensors="pt")["input_ids"]

    code, out, err = _cli(
        capsys,
        "export",
        *common,
        "--pattern",
        "2:4",
        "--criterion",
        "amber",
        "--mitigation",
        "var",
        "--out",
        str(tmp_path / "dyn"),
    )
    assert code == 0, err
    record = json.loads((tmp_path / "dyn" / "actsparse_export.json").read_text())
    card = (tmp_path / "dyn" / "README.md").read_text()
    assert (
        f"| sparse | {record['sparse_ppl']:.3f} |" in card
        and f"| dense | {record['dense_ppl']:.3f} |" in card
        and "import actsparse" in card
    )
    assert f"{record['sparse_ppl']:.3f}" in out
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "dyn")
    AutoTokenizer.from_pretrained(tmp_path / "dyn")  # the tokenizer travels too
    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    sparsify_(model, SparsityConfig(pattern="2:4", criterion="amber", mitigation="var"))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, atol=0, rtol=0)

    calib = tmp_path / "calib.txt"
    calib.write_text("the cat sat on the mat . " * 60)
    calibrate = [
        arg for arg in common if arg not in ("--max-tokens", "64")
    ]  # calibrate has no --max-tokens: it evaluates nothing
    code, _, err = _cli(capsys, "calibrate", *calibrate, "--pattern", "2:4", "--calib-data", str(calib), "--mitigation", "oshift",
                        "--calib-windows", "4", "--steps", "3", "--out", str(tmp_path / "state"))  # fmt: skip
    assert code == 0, err
    code, _, err = _cli(capsys, "export", *common, "--state", str(tmp_path / "state"), "--out", str(tmp_path / "cal"))
    assert code == 0, err
    fresh = AutoModelForCausalLM.from_pretrained(tiny_dir)
    actsparse.load_state_(fresh, tmp_path / "state")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "cal")
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, fresh(ids).logits, atol=0, rtol=0)
    assert "calibration text" in (tmp_path / "cal" / "README.md").read_text()

    code, _, err = _cli(
        capsys, "export", *common, "--prune", "weights", "--method", "magnitude", "--pattern", "2:4", "--out", str(tmp_path / "w")
    )
    assert code == 0, err
    config = json.loads((tmp_path / "w" / "config.json").read_text())
    assert "quantization_config" not in config and config["actsparse_weight_pruning"]["config"]["method"] == "magnitude"
    pruned = AutoModelForCausalLM.from_pretrained(tmp_path / "w")
    assert not sparse_layers(pruned)
    actsparse.verify_pattern(pruned, "2:4", list(config["actsparse_weight_pruning"]["layers"]))
    code, _, err = _cli(
        capsys, "export", *common, "--state", str(tmp_path / "state"), "--prune", "weights", "--out", str(tmp_path / "x")
    )
    assert code == 2 and "--state" in err and not (tmp_path / "x").exists()


def test_lm_eval_command_line_scores_the_sparse_checkpoint(tmp_path):
    """`python -m actsparse.harness run --model hf --model_args pretrained=CKPT` scores what evaluate_tasks scores in memory."""
    pytest.importorskip("lm_eval")
    import os
    import subprocess
    import sys
    from pathlib import Path

    from transformers import AutoTokenizer

    from actsparse.data.sources import TextSource
    from actsparse.eval.lmeval import TaskSettings, evaluate_tasks, prepare_tasks
    from conftest import save_tiny_model_dir, vocab_text

    model_dir = save_tiny_model_dir(tmp_path / "tiny")
    source = TextSource("file:eval.txt", vocab_text(documents=8, sentences=20, seed=5), frozenset({"file:eval.txt"}))
    prepared = prepare_tasks(
        TaskSettings(tasks=("actsparse_lastword",), task_dir=str(tmp_path / "tasks"), batch_size=4, limit=8), source
    )
    model, tokenizer = AutoModelForCausalLM.from_pretrained(model_dir), AutoTokenizer.from_pretrained(model_dir)
    sparsify_(model, SparsityConfig(pattern="2:4", criterion="amber", mitigation="var"))
    model.save_pretrained(tmp_path / "ckpt")
    tokenizer.save_pretrained(tmp_path / "ckpt")
    (name,) = prepared.names
    expected = evaluate_tasks(model, tokenizer, prepared)["tasks"][name]["perplexity"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(Path(__file__).parents[1] / "src"), os.environ.get("PYTHONPATH")) if p),
           "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}  # fmt: skip
    command = [sys.executable, "-m", "actsparse.harness", "run", "--model", "hf", "--model_args", f"pretrained={tmp_path / 'ckpt'},dtype=float32",
               "--tasks", name, "--include_path", str(tmp_path / "tasks"), "--limit", "8", "--batch_size", "4", "--device", "cpu",
               "--output_path", str(tmp_path / "out")]  # fmt: skip
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    (path,) = list((tmp_path / "out").rglob("results_*.json"))
    scores = json.loads(path.read_text())["results"][name]
    assert scores["perplexity,none"] == pytest.approx(expected, rel=1e-4)
