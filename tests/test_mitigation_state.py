"""The mitigation state: a child module of each sparse layer holding exactly what its mitigation
fits or learns; saving, loading and training go through it."""

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import actsparse
from actsparse.calibration.layerwise import CalibrationOptions, calibrate_, trainable_parameters
from actsparse.calibration.state import TENSORS_FILE, load_state_, save_state
from actsparse.config import SparsityConfig
from actsparse.core.masks import keep_mask
from actsparse.core.mitigation_state import MitigationState
from actsparse.core.scoring import get_criterion
from actsparse.errors import ActsparseError
from actsparse.sparsify import sparse_layers, sparsify_, unsparsify_
from conftest import VOCAB, tiny_model

torch.set_num_threads(1)
DATA = Path(__file__).parent / "data"
IDS = torch.randint(0, VOCAB, (1, 12), generator=torch.Generator().manual_seed(9))

# (mitigation, criterion) -> (the state's buffers, the state's parameters)
HELD = {
    ("spts", "magnitude"): ({"eta", "weight_row_sum"}, set()),
    ("scap", "magnitude"): ({"eta", "eta_bias"}, set()),
    ("scap-feature", "wina"): ({"eta", "eta_bias"}, set()),
    ("rotation", "magnitude"): ({"rotation", "rotated_weight"}, set()),
    ("rotation", "amber"): ({"rotation", "rotated_weight", "feature_vector"}, set()),
    ("rotation-spread", "clact"): ({"rotation", "rotated_weight", "feature_vector"}, set()),
    ("lowrank:8", "magnitude"): ({"lowrank_u", "lowrank_v"}, set()),
    ("lpts", "magnitude"): (set(), {"input_shift"}),
    ("oshift", "amber"): (set(), {"output_shift"}),
    ("oscale", "amber"): (set(), {"output_scale"}),
    ("var-oscale-shift", "clact"): ({"feature_vector"}, {"output_scale", "output_shift"}),
    ("var", "clact"): ({"feature_vector"}, set()),
    ("dpts", "amber"): (set(), set()),
    ("none", "magnitude"): (set(), set()),
}


def _calibrated(mitigation, criterion, steps=2):
    model = tiny_model("llama")
    windows = torch.randint(0, VOCAB, (6, 16), generator=torch.Generator().manual_seed(2))
    config = SparsityConfig(pattern="2:4", criterion=criterion, mitigation=mitigation)
    calibrate_(model, config, windows, options=CalibrationOptions(lr=1e-2, steps=steps), progress=False)
    return model


def _logits(model):
    with torch.no_grad():
        return model(IDS).logits


@pytest.mark.parametrize("mitigation,criterion", sorted(HELD))
def test_the_state_holds_exactly_the_mitigations_tensors(mitigation, criterion, tmp_path):
    buffers, parameters = HELD[(mitigation, criterion)]
    model = _calibrated(mitigation, criterion)
    layers = sparse_layers(model)
    assert len(layers) == 14
    for name, layer in layers.items():
        state = layer.mitigation_state
        assert isinstance(state, MitigationState) and state.calibrated and layer.calibrated
        assert set(dict(state.named_buffers())) == buffers, name
        assert set(dict(state.named_parameters())) == parameters, name
        assert set(state.state_dict()) == parameters  # its buffers are non-persistent, as the layer's were
        assert set(state.tensors()) == buffers | parameters
        assert all(isinstance(p, torch.nn.Parameter) for p in state.parameters())
        assert not set(dict(layer.named_buffers(recurse=False))) & (buffers | parameters)  # not on the layer itself
    # the model's state dict holds its weights and the learned parameters only, no buffer of a state
    state_keys = {key for key in model.state_dict() if ".mitigation_state." in key}
    assert state_keys == {f"{name}.mitigation_state.{p}" for name in layers for p in parameters}
    # a saved state is the states' tensors, under the layer's own name (no mitigation_state in the key)
    save_state(model, tmp_path / "state")
    saved = load_file(str(tmp_path / "state" / TENSORS_FILE))
    assert set(saved) == {f"{name}.{key}" for name in layers for key in buffers | parameters}
    for name, layer in layers.items():
        for key, tensor in layer.mitigation_state.tensors().items():
            assert torch.equal(saved[f"{name}.{key}"], tensor.detach().cpu())


def test_training_optimises_exactly_the_states_parameters(monkeypatch):
    optimised = []
    adamw = torch.optim.AdamW

    def recording(params, **kwargs):
        params = list(params)
        optimised.append(params)
        return adamw(params, **kwargs)

    monkeypatch.setattr(torch.optim, "AdamW", recording)
    dense = dict(tiny_model("llama").named_parameters())
    model = _calibrated("var-oscale-shift", "amber", steps=4)
    decoder_layers = list(model.model.layers)
    assert len(optimised) == len(decoder_layers)
    for params, decoder_layer in zip(optimised, decoder_layers):
        expected = [p for module in decoder_layer.modules() if isinstance(module, MitigationState) for p in module.parameters()]
        assert [id(p) for p in params] == [id(p) for p in expected] == [id(p) for p in trainable_parameters(decoder_layer)]
        assert len(params) == 2 * 7  # output scale and shift of the 7 sparse layers
        assert all(p.abs().sum() > 0 for p in params)  # trained away from the no-op start
    for name, p in model.named_parameters():
        if ".mitigation_state." not in name:
            assert torch.equal(p, dense[name]), name  # everything else stayed frozen


def test_the_layer_reads_its_states_tensors_and_flag():
    model = _calibrated("lpts", "clact")
    layer = model.model.layers[0].mlp.down_proj
    state = layer.mitigation_state
    assert layer.input_shift is state.input_shift and layer.feature_vector is state.feature_vector
    assert layer.state_names == ("input_shift", "feature_vector")
    layer.calibrated = False
    assert state.calibrated is False
    with pytest.raises(ActsparseError, match="calibrate_"):
        layer(torch.randn(3, layer.in_features))
    layer.calibrated = True
    assert not hasattr(layer, "no_such_tensor")
    with pytest.raises(AttributeError, match="no_such_tensor"):
        layer.no_such_tensor  # noqa: B018


def test_rotation_scores_with_the_states_vector():
    model = _calibrated("rotation", "amber")
    layer = model.model.layers[1].self_attn.q_proj
    state = layer.mitigation_state
    amber = get_criterion("amber")
    rotated = layer.dense_weight().detach().float() @ state.rotation
    assert layer.feature_vector is state.feature_vector
    torch.testing.assert_close(state.feature_vector, amber.feature_vector(rotated, None))
    assert not torch.allclose(layer.criterion_vector, state.feature_vector)  # the unrotated weight's vector is not used
    x = torch.randn(5, layer.in_features)
    assert torch.equal(layer.keep(x), keep_mask(amber.score(x, state.feature_vector, None), layer.pattern))


def test_derived_buffers_are_the_layers_own_not_state():
    model = tiny_model("llama")
    windows = torch.randint(0, VOCAB, (4, 16), generator=torch.Generator().manual_seed(3))
    stats = actsparse.collect_input_stats(model, windows, progress=False)
    sparsify_(model, SparsityConfig(pattern="8:16", criterion="amber", mitigation="w8a8-smoothquant"), stats=stats)
    for name, layer in sparse_layers(model).items():
        assert not layer.mitigation_state.tensors()  # nothing saved: made again from the statistics
        assert {"w8a8_weight", "w8a8_smooth", "criterion_vector"} <= set(dict(layer.named_buffers(recurse=False)))
        folded = layer.dense_weight().detach().float() * layer.w8a8_smooth  # W diag(s)
        assert layer.feature_vector is layer.criterion_vector
        torch.testing.assert_close(layer.feature_vector, get_criterion("amber").feature_vector(folded, stats[name]))
    unsparsify_(model)
    sparsify_(model, SparsityConfig(pattern="4:8", mitigation="dpts"))
    layer = model.model.layers[0].mlp.up_proj
    assert "weight_row_sum" in dict(layer.named_buffers(recurse=False)) and not layer.mitigation_state.tensors()


@pytest.mark.parametrize("mitigation,criterion", [("lpts", "clact"), ("rotation", "amber"), ("spts", "magnitude")])
def test_save_load_round_trip_restores_every_state(mitigation, criterion, tmp_path):
    model = _calibrated(mitigation, criterion)
    before = _logits(model)
    save_state(model, tmp_path / "state")
    fresh = tiny_model("llama")
    load_state_(fresh, tmp_path / "state")
    torch.testing.assert_close(_logits(fresh), before, atol=0, rtol=0)
    loaded = sparse_layers(fresh)
    for name, layer in sparse_layers(model).items():
        there = loaded[name].mitigation_state
        assert there.calibrated and list(there.tensors()) == list(layer.mitigation_state.tensors())
        for key, tensor in layer.mitigation_state.tensors().items():
            assert torch.equal(there.tensors()[key], tensor) and type(there.tensors()[key]) is type(tensor), key
    # an HF checkpoint keeps the state under actsparse.state.<layer>.<name>, and nothing of it elsewhere
    model.save_pretrained(tmp_path / "ckpt")
    keys = set(load_file(str(tmp_path / "ckpt" / "model.safetensors")))
    assert not any("mitigation_state" in key for key in keys)
    assert {key for key in keys if key.startswith("actsparse.state.")} == {
        f"actsparse.state.{name}.{key}"
        for name, layer in sparse_layers(model).items()
        for key in layer.mitigation_state.tensors()
    }
    torch.testing.assert_close(_logits(AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt")), before, atol=0, rtol=0)


def test_a_state_saved_before_the_state_module_loads_into_it():
    """tests/data/state-lpts-clact: an L-PTS + clact state of layer 1 written when the tensors were attributes of the layer."""
    directory = DATA / "state-lpts-clact"
    saved = load_file(str(directory / TENSORS_FILE))
    model = tiny_model("llama")
    load_state_(model, directory, check_model=False)  # the tiny model's random init may move with transformers
    layers = sparse_layers(model)
    assert set(saved) == {f"{name}.{key}" for name, layer in layers.items() for key in layer.mitigation_state.tensors()}
    for name, layer in layers.items():
        state = layer.mitigation_state
        assert state.calibrated and set(dict(state.named_parameters())) == {"input_shift"}
        assert set(dict(state.named_buffers())) == {"feature_vector"}
        for key, tensor in state.tensors().items():
            assert torch.equal(tensor, saved[f"{name}.{key}"]), (name, key)
        assert layer.feature_vector is state.feature_vector
    assert torch.isfinite(_logits(model)).all()


def test_setting_the_feature_vector_replaces_the_one_the_layer_scores_with():
    model = _calibrated("rotation", "amber")
    layer = model.model.layers[0].mlp.up_proj
    vector = torch.rand(layer.in_features)
    layer.feature_vector = vector  # the state holds one: it is replaced, and still saved with the state
    assert layer.mitigation_state.feature_vector is vector and layer.feature_vector is vector
    dense = tiny_model("llama")
    sparsify_(dense, SparsityConfig(pattern="2:4", criterion="amber"))
    layer = dense.model.layers[0].mlp.up_proj
    layer.feature_vector = vector  # no state vector: the criterion's is replaced, nothing joins the state
    assert layer.criterion_vector is vector and layer.feature_vector is vector and not layer.mitigation_state.tensors()
