"""Models placed by accelerate (device_map): sparse layers, calibration, weight pruning and sensitivity
on a model whose second decoder layer is offloaded to disk, against the same model in memory."""

import pytest
import torch

import actsparse
from actsparse.calibration.layerwise import CalibrationOptions, calibrate_
from actsparse.models.loading import load_model
from actsparse.models.placement import is_offloaded
from actsparse.sparsify import sparse_layers, sparsify_, unsparsify_
from conftest import save_tiny_model_dir

torch.set_num_threads(1)
IDS = torch.randint(3, 40, (2, 12), generator=torch.Generator().manual_seed(4))
WINDOWS = torch.randint(3, 40, (4, 16), generator=torch.Generator().manual_seed(5))
MAP = {
    "model.embed_tokens": "cpu",
    "model.layers.0": "cpu",
    "model.layers.1": "disk",
    "model.norm": "cpu",
    "model.rotary_emb": "cpu",
    "lm_head": "cpu",
}
# on a GPU machine also: the model on the GPU, its second decoder layer offloaded to CPU memory (computed on the GPU)
GPU_MAP = {
    "model.embed_tokens": 0,
    "model.layers.0": 0,
    "model.layers.1": "cpu",
    "model.norm": 0,
    "model.rotary_emb": 0,
    "lm_head": 0,
}
PLACEMENTS = [("cpu", MAP)] + ([("cuda", GPU_MAP)] if torch.cuda.is_available() else [])


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model_dir(tmp_path_factory.mktemp("placed") / "tiny")


@pytest.fixture(params=PLACEMENTS, ids=[device for device, _ in PLACEMENTS])
def placement(request):
    return request.param


def _pair(model_dir, tmp_path, placement=PLACEMENTS[0]):
    device, device_map = placement
    plain, _ = load_model(str(model_dir), device=device)
    placed, _ = load_model(str(model_dir), device_map=device_map, offload_folder=str(tmp_path / "offload"))
    assert is_offloaded(placed) and placed.model.layers[1].mlp.up_proj.weight.device.type == "meta"
    return plain, placed


def _logits(model):
    with torch.no_grad():
        return model(IDS.to(model.get_input_embeddings().weight.device)).logits.cpu()


@pytest.mark.parametrize("criterion,mitigation", [("amber", "var"), ("wina", "dpts"), ("magnitude", "lowrank:8")])
def test_sparse_layers_of_an_offloaded_model(model_dir, tmp_path, placement, criterion, mitigation):
    plain, placed = _pair(model_dir, tmp_path, placement)
    config = actsparse.SparsityConfig(pattern="2:4", criterion=criterion, mitigation=mitigation)
    sparsify_(plain, config)
    sparsify_(placed, config)
    torch.testing.assert_close(_logits(placed), _logits(plain))
    assert placed.model.layers[1].mlp.up_proj.weight.device.type == "meta"  # still offloaded between calls
    unsparsify_(placed)
    unsparsify_(plain)
    torch.testing.assert_close(_logits(placed), _logits(plain))


@pytest.mark.parametrize("mitigation", ["lpts", "rotation"])
def test_calibration_of_an_offloaded_model(model_dir, tmp_path, placement, mitigation):
    plain, placed = _pair(model_dir, tmp_path, placement)
    config = actsparse.SparsityConfig(pattern="2:4", criterion="amber", mitigation=mitigation)
    options = CalibrationOptions(lr=1e-2, steps=4)
    a = calibrate_(plain, config, WINDOWS, options=options, progress=False)
    b = calibrate_(placed, config, WINDOWS, options=options, progress=False)
    assert a.layers.keys() == b.layers.keys()
    for index in a.layers:
        assert b.layers[index]["mse"] == pytest.approx(a.layers[index]["mse"], rel=1e-4)
    torch.testing.assert_close(_logits(placed), _logits(plain), rtol=1e-4, atol=1e-5)
    assert len(sparse_layers(placed)) == 14


@pytest.mark.parametrize("method", ["magnitude", "sparsegpt"])
def test_weight_pruning_of_an_offloaded_model(model_dir, tmp_path, placement, method):
    plain, placed = _pair(model_dir, tmp_path, placement)
    config = actsparse.WeightPruneConfig(pattern="2:4", method=method)
    actsparse.prune_weights_(plain, config, WINDOWS, progress=False)
    actsparse.prune_weights_(placed, config, WINDOWS, progress=False)
    torch.testing.assert_close(_logits(placed), _logits(plain), rtol=1e-4, atol=1e-5)
    from actsparse.models.placement import onloaded

    with onloaded(placed.model.layers[1]):  # the pruned weights of the offloaded layer are what it loads
        weight = placed.model.layers[1].mlp.up_proj.weight
        assert weight.device.type == placement[0] and (weight.reshape(-1, 4) != 0).sum(-1).max() <= 2
        torch.testing.assert_close(weight, plain.model.layers[1].mlp.up_proj.weight, rtol=1e-4, atol=1e-5)


def test_sensitivity_of_an_offloaded_model(model_dir, tmp_path, placement):
    plain, placed = _pair(model_dir, tmp_path, placement)
    a = actsparse.measure_sensitivity(plain, WINDOWS, pattern="2:4", progress=False)
    b = actsparse.measure_sensitivity(placed, WINDOWS, pattern="2:4", progress=False)
    assert b.scores.keys() == a.scores.keys()
    for name in a.scores:
        assert b.scores[name] == pytest.approx(a.scores[name], rel=1e-6)


def test_actsparse_checkpoint_loads_onto_a_device_map(model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    plain, _ = load_model(str(model_dir))
    sparsify_(plain, actsparse.SparsityConfig(pattern="8:16", criterion="amber", mitigation="var"))
    plain.save_pretrained(tmp_path / "ckpt")
    placed = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt", device_map=MAP, offload_folder=str(tmp_path / "offload"))
    assert is_offloaded(placed) and len(sparse_layers(placed)) == 14
    torch.testing.assert_close(_logits(placed), _logits(plain))
    placed.save_pretrained(tmp_path / "again")  # an offloaded sparse model saves whole
    torch.testing.assert_close(_logits(AutoModelForCausalLM.from_pretrained(tmp_path / "again")), _logits(plain), atol=0, rtol=0)


def test_cli_device_map_with_disk_offload(model_dir, tmp_path, capsys):
    import json

    from actsparse.cli.main import main

    common = ["--model", str(model_dir), "--data", str(model_dir / "text.txt"), "--seqlen", "16", "--max-tokens", "64", "--no-progress",
              "--pattern", "2:4", "--criterion", "amber", "--mitigation", "var", "--json"]  # fmt: skip
    assert main(["eval", *common]) == 0
    plain = json.loads(capsys.readouterr().out)
    offload = tmp_path / "off"
    assert main(["eval", *common, "--device-map", "auto", "--max-memory", "cpu=60KB", "--offload-folder", str(offload)]) == 0
    placed = json.loads(capsys.readouterr().out)
    assert "disk" in placed["device_map"].values() and "device_map" not in plain
    assert placed["sparse_ppl"] == pytest.approx(plain["sparse_ppl"], rel=1e-5) and placed["dense_ppl"] == pytest.approx(
        plain["dense_ppl"], rel=1e-5
    )
    assert main(["eval", *common, "--max-memory", "cpu=1GiB"]) == 2
    assert "--device-map" in capsys.readouterr().err
