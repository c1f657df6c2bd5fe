"""One model fingerprint and one checked directory format for calibrated states and pruned weights."""

import json

import pytest
import torch

from actsparse import ActsparseError, CalibrationOptions, SparsityConfig, WeightPruneConfig, calibrate_
from actsparse.artifacts import SavedDirectory, checkpoint_differs, model_fingerprint, model_kind
from actsparse.baselines import io as pruned_io
from actsparse.baselines import load_pruned_, prune_weights_, save_pruned
from actsparse.calibration import state as state_io
from actsparse.calibration.state import load_state_, save_state
from conftest import VOCAB, tiny_model

WINDOWS = torch.randint(0, VOCAB, (4, 16), generator=torch.Generator().manual_seed(2))


def _pruned(tmp_path):
    model = tiny_model("llama")
    prune_weights_(model, WeightPruneConfig(pattern="2:4", method="magnitude"), WINDOWS, progress=False)
    return model, save_pruned(model, tmp_path / "pruned")


def _read(directory, name):
    return json.loads((directory / name).read_text())


def _write(directory, name, meta):
    (directory / name).write_text(json.dumps(meta))


def test_both_formats_record_the_one_fingerprint(tmp_path):
    dense = model_fingerprint(tiny_model("llama"))
    _, pruned = _pruned(tmp_path)
    calibrated = tiny_model("llama")
    calibrate_(calibrated, SparsityConfig(pattern="2:4", criterion="amber", mitigation="lpts"), WINDOWS,
               options=CalibrationOptions(lr=1e-2, steps=2), progress=False)  # fmt: skip
    assert any(isinstance(p, torch.nn.Parameter) for p in state_io._owned(calibrated).values())  # learned: parameters added
    state = save_state(calibrated, tmp_path / "state")
    assert _read(pruned, pruned_io.META_FILE)["model"] == dense  # pruning leaves the embeddings and the count alone
    assert _read(state, state_io.META_FILE)["model"] == dense  # the mitigation's parameters are not counted
    assert isinstance(state_io.DIRECTORY, SavedDirectory) and isinstance(pruned_io.DIRECTORY, SavedDirectory)


def test_the_fingerprint_tells_checkpoints_apart():
    model = tiny_model("llama")
    saved = json.loads(json.dumps(model_fingerprint(model)))
    assert not checkpoint_differs(saved, model_fingerprint(model))
    with torch.no_grad():
        model.get_input_embeddings().weight[0].mul_(3.0)
    assert checkpoint_differs(saved, model_fingerprint(model))
    wider = tiny_model("llama")
    extra = torch.nn.Parameter(torch.zeros(5))
    wider.register_parameter("extra", extra)
    assert checkpoint_differs(saved, model_fingerprint(wider))
    assert not checkpoint_differs(saved, model_fingerprint(wider, exclude=[extra]))
    old = {k: saved[k] for k in ("architecture", "model_type", "num_params", "embedding_mean", "embedding_abs_mean")}
    assert not checkpoint_differs(old, model_fingerprint(tiny_model("llama")))  # a version-1 pruned record
    assert checkpoint_differs({"architecture": "LlamaForCausalLM"}, saved)  # no checkpoint key recorded: not the same
    assert model_kind(tiny_model("gpt2")) == {"architecture": "GPT2LMHeadModel", "model_type": "gpt2"}


def test_a_version_1_pruned_directory_still_loads(tmp_path):
    model, pruned = _pruned(tmp_path)
    meta = _read(pruned, pruned_io.META_FILE)
    assert meta["format_version"] == 2 and len(meta["sha256"]) == 64 and meta["meta_sha256"]
    for key in ("sha256", "bytes", "meta_sha256"):
        del meta[key]
    for key in ("embedding_shape", "embedding_sq_mean"):
        del meta["model"][key]
    meta["format_version"] = 1
    _write(pruned, pruned_io.META_FILE, meta)
    fresh = tiny_model("llama")
    assert load_pruned_(fresh, pruned).method == "magnitude"
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), model.state_dict().values(), strict=True))
    other = tiny_model("llama")
    with torch.no_grad():
        other.get_input_embeddings().weight.mul_(1.5)
    with pytest.raises(ActsparseError, match="pruned weights in .* come from a different checkpoint"):
        load_pruned_(other, pruned)


def test_an_edited_or_damaged_pruned_directory_is_refused(tmp_path):
    _, pruned = _pruned(tmp_path)
    meta = _read(pruned, pruned_io.META_FILE)
    name = next(iter(meta["layers"]))
    _write(pruned, pruned_io.META_FILE, {**meta, "layers": {**meta["layers"], name: {**meta["layers"][name], "pattern": "4:8"}}})
    fresh = tiny_model("llama")
    before = [t.clone() for t in fresh.state_dict().values()]
    with pytest.raises(ActsparseError, match="meta_sha256"):
        load_pruned_(fresh, pruned)
    _write(pruned, pruned_io.META_FILE, {**meta, "format_version": 3})
    with pytest.raises(ActsparseError, match="has format version 3; this actsparse reads version 1 or 2"):
        load_pruned_(fresh, pruned)
    _write(pruned, pruned_io.META_FILE, meta)
    weights = pruned / pruned_io.WEIGHTS_FILE
    raw = bytearray(weights.read_bytes())
    raw[-3] ^= 0xFF
    weights.write_bytes(bytes(raw))
    with pytest.raises(ActsparseError, match="does not match the checksum"):
        load_pruned_(fresh, pruned)
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), before, strict=True))  # nothing applied


def test_save_pruned_writes_beside_other_files(tmp_path):
    (tmp_path / "pruned").mkdir()
    (tmp_path / "pruned" / "README.md").write_text("mine")
    _, pruned = _pruned(tmp_path)
    assert (pruned / "README.md").read_text() == "mine"
    assert sorted(p.name for p in pruned.iterdir()) == ["README.md", pruned_io.META_FILE, pruned_io.WEIGHTS_FILE]


def test_a_state_of_version_1_is_refused_as_before(tmp_path):
    model = tiny_model("llama")
    calibrate_(model, SparsityConfig(pattern="2:4", criterion="amber", mitigation="spts"), WINDOWS, progress=False)
    state = save_state(model, tmp_path / "state")
    meta = _read(state, state_io.META_FILE)
    del meta["meta_sha256"]
    _write(state, state_io.META_FILE, {**meta, "format_version": 1})
    expected = (
        "has format version 1; this actsparse reads version 2 (whose description is checksummed too); calibrate the state again"
    )
    with pytest.raises(ActsparseError, match=expected.replace("(", r"\(").replace(")", r"\)")):
        load_state_(tiny_model("llama"), state)
    _write(state, state_io.META_FILE, {**meta, "format_version": 2, "layers": meta["layers"][:1]})
    with pytest.raises(ActsparseError, match="meta_sha256"):
        state_io.read_state_meta(state, verify=False)
