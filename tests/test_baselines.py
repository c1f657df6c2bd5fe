"""Weight pruning baselines: structure, quality, SparseGPT's algebra, save/load, CLI."""

import json

import pytest
import torch
import transformers as tf

from actsparse import ActsparseError, WeightPruneConfig, load_pruned_, prune_weights_, save_pruned, verify_pattern
from actsparse.baselines import PRUNERS, LayerInputs, Pruner, prune_matrix, register_pruner, restore_weights_, snapshot_weights
from actsparse.baselines.methods import magnitude
from actsparse.cli.main import main
from actsparse.core.patterns import parse_pattern
from actsparse.core.stats import InputStats
from actsparse.models.discovery import find_linear_sites
from conftest import TEXT, VOCAB, tiny_model

CALIB = torch.randint(0, VOCAB, (3, 16), generator=torch.Generator().manual_seed(1))
IDS = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(2))
METHODS = ["magnitude", "wanda", "sparsegpt"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny matrices: one thread is far faster than two on a shared CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids, use_cache=False).logits


def weight_of(model, name):
    module = model.get_submodule(name)
    return module.weight.t() if type(module).__name__ == "Conv1D" else module.weight


def outlier_inputs(width, tokens=256, seed=0):
    """Random inputs with a few large-magnitude feature columns (as in real LLM activations)."""
    x = torch.randn(tokens, width, generator=torch.Generator().manual_seed(seed))
    x[:, [3, 17, width // 2 + 5, width - 7]] *= 20.0
    return x


# ---- structure ------------------------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("pattern", ["2:4", "4:8", "1:4", "unstructured:0.5", "unstructured:0.3"])
def test_pruned_weights_have_exact_structure(method, pattern):
    model = tiny_model("llama")
    report = prune_weights_(model, WeightPruneConfig(pattern=pattern, method=method), CALIB, progress=False)
    parsed = parse_pattern(pattern)
    assert len(report.pruned) == 14 and not report.dense and report.pruned_flop_fraction == pytest.approx(1.0)
    for site in report.pruned:
        weight = weight_of(model, site.name)
        rows, width = weight.shape
        nonzero = weight != 0
        if pattern.startswith("unstructured"):
            kept = parsed.kept(width)
            if method == "sparsegpt":  # per-block masks: the layer's total is exact, rows vary
                assert nonzero.sum().item() == rows * kept
            else:
                assert (nonzero.sum(1) == kept).all()
        else:
            assert (nonzero.reshape(rows, -1, parsed.m).sum(-1) == parsed.n).all()
        assert report.density[site.name] == pytest.approx(nonzero.float().mean().item())
    assert report.removed_flop_fraction == pytest.approx(1 - parsed.kept(64) / 64, abs=0.02)
    assert verify_pattern(model) == 14 and verify_pattern(model, pattern) == 14


@pytest.mark.parametrize("family", ["gpt2", "gemma3", "opt"])
def test_other_families_sparsegpt_24(family):
    model = tiny_model(family)
    report = prune_weights_(model, WeightPruneConfig(pattern="2:4", method="sparsegpt"), CALIB, progress=False)
    assert report.pruned and report.pruned_flop_fraction == pytest.approx(1.0)
    verify_pattern(model, "2:4")
    assert torch.isfinite(logits(model)).all()


def test_verifier_names_the_first_corrupted_layer():
    model = tiny_model("llama")
    prune_weights_(model, WeightPruneConfig(pattern="2:4", method="wanda"), CALIB, progress=False)
    name = "model.layers.1.mlp.up_proj"
    with torch.no_grad():
        weight = model.get_submodule(name).weight
        column = int((weight[5, :4] == 0).nonzero()[0])
        weight[5, column] = 1.0
    with pytest.raises(ActsparseError, match=rf"{name} is not 2:4: row 5, columns 0-3"):
        verify_pattern(model)
    with pytest.raises(ActsparseError, match="is not 1:4"):
        verify_pattern(model, "1:4")
    dense = tiny_model("llama")
    with pytest.raises(ActsparseError, match="unstructured:0.5"):
        verify_pattern(dense, "unstructured:0.5")


def test_selection_follows_roles_layers_and_skip():
    model = tiny_model("llama")
    before = {s.name: weight_of(model, s.name).clone() for s in find_linear_sites(model)}
    config = WeightPruneConfig(pattern="2:4", method="sparsegpt", skip=("k", "@1"), roles=("q", "k", "down"))
    report = prune_weights_(model, config, CALIB, progress=False)
    assert sorted(s.name for s in report.pruned) == ["model.layers.0.mlp.down_proj", "model.layers.0.self_attn.q_proj"]
    assert report.to_dict()["dense_layers"] == 12 and 0 < report.pruned_flop_fraction < 1
    for name, weight in before.items():
        assert torch.equal(weight_of(model, name), weight) == (name not in {s.name for s in report.pruned})


def test_bad_input_is_clear():
    with pytest.raises(ActsparseError, match="unknown weight pruning method 'obs'"):
        WeightPruneConfig(method="obs")
    with pytest.raises(ActsparseError, match="cannot parse pattern"):
        WeightPruneConfig(pattern="half")
    model = tiny_model("llama")
    with pytest.raises(ActsparseError, match="needs calibration windows"):
        prune_weights_(model, WeightPruneConfig(method="wanda"), None, progress=False)
    with pytest.raises(ActsparseError, match="multiple of 48"):
        prune_weights_(model, WeightPruneConfig(pattern="24:48"), progress=False)
    report = prune_weights_(model, WeightPruneConfig(pattern="2:4"), progress=False)  # magnitude: no calibration
    assert report.calib_windows == 0 and len(report.pruned) == 14


# ---- quality and algebra --------------------------------------------------------------------


@pytest.mark.parametrize("name", ["model.layers.0.mlp.up_proj", "model.layers.1.mlp.down_proj"])
@pytest.mark.parametrize("pattern", ["2:4", "unstructured:0.5"])
def test_wanda_and_sparsegpt_reconstruct_better_than_magnitude(name, pattern):
    weight = tiny_model("llama").get_submodule(name).weight.detach()
    x = outlier_inputs(weight.shape[1])
    error = {m: (x @ weight.T - x @ prune_matrix(weight, pattern, m, x).T).norm().item() for m in METHODS}
    assert error["wanda"] < 0.5 * error["magnitude"]
    assert error["sparsegpt"] < 0.5 * error["magnitude"]


def reference_sparsegpt(weight, x, pattern, percdamp=0.01):
    """Slow OBS in float64 without the Cholesky trick: after each column, the inverse Hessian of
    the remaining columns. Masks as in actsparse (N:M every M columns; unstructured per block of 128 >= K)."""
    W = weight.double().clone()
    rows, width = W.shape
    H = 2 * x.double().T @ x.double() / x.shape[0]
    H += percdamp * H.diag().mean() * torch.eye(width, dtype=torch.float64)
    inv_diag = torch.stack([torch.linalg.inv(H[j:, j:])[0, 0] for j in range(width)])  # = U_jj², U = chol(H⁻¹) upper
    pruned = torch.zeros_like(W, dtype=torch.bool)
    if not hasattr(pattern, "m"):
        scores = W.square() / inv_diag  # w² / U_jj²
        order = torch.sort(scores.flatten(), descending=True, stable=True).indices
        pruned.view(-1)[order[rows * pattern.kept(width) :]] = True
    for j in range(width):
        if hasattr(pattern, "m") and j % pattern.m == 0:
            scores = W[:, j : j + pattern.m].square() / inv_diag[j : j + pattern.m]
            order = torch.sort(scores, dim=1, descending=True, stable=True).indices
            pruned[:, j : j + pattern.m].scatter_(1, order[:, pattern.n :], True)
        inverse = torch.linalg.inv(H[j:, j:])
        q = W[:, j].masked_fill(pruned[:, j], 0.0)
        W[:, j:] -= ((W[:, j] - q) / inverse[0, 0]).unsqueeze(1) * inverse[0].unsqueeze(0)
        W[:, j] = q
    return W


@pytest.mark.parametrize("pattern", ["2:4", "unstructured:0.6"])
def test_sparsegpt_matches_plain_obs_reference(pattern):
    weight = torch.randn(12, 32, generator=torch.Generator().manual_seed(3))
    x = outlier_inputs(32, tokens=200, seed=4)
    parsed = parse_pattern(pattern)
    ours = PRUNERS["sparsegpt"].prune(weight.clone(), LayerInputs.from_tensor(x), parsed)
    reference = reference_sparsegpt(weight, x, parsed)
    assert ((ours == 0) == (reference == 0)).all()
    torch.testing.assert_close(ours.double(), reference, rtol=1e-3, atol=1e-4)


def test_sparsegpt_lazy_block_updates_equal_one_block():
    from actsparse.baselines.methods import sparsegpt

    weight = torch.randn(8, 64, generator=torch.Generator().manual_seed(5))
    inputs = LayerInputs.from_tensor(outlier_inputs(64, seed=6))
    pattern = parse_pattern("2:4")
    torch.testing.assert_close(
        sparsegpt(weight, inputs, pattern, blocksize=8), sparsegpt(weight, inputs, pattern), rtol=1e-4, atol=1e-5
    )


def test_sparsegpt_at_zero_sparsity_changes_nothing():
    model = tiny_model("llama")
    weight = model.get_submodule("model.layers.0.mlp.up_proj").weight.detach()
    x = outlier_inputs(weight.shape[1])
    for pattern in ("unstructured:0", "dense"):
        torch.testing.assert_close(x @ prune_matrix(weight, pattern, "sparsegpt", x).T, x @ weight.T, rtol=0, atol=1e-5)
    reference = logits(model)
    prune_weights_(model, WeightPruneConfig(pattern="unstructured:0", method="sparsegpt"), CALIB, progress=False)
    torch.testing.assert_close(logits(model), reference, rtol=0, atol=1e-5)


def test_pruning_is_sequential_each_layer_calibrated_on_the_pruned_model():
    """Every layer's calibration inputs equal its inputs in the final pruned model."""
    seen = {}

    def recording(weight, inputs, pattern):
        seen[weight.shape, len(seen)] = inputs.square_sum.clone()
        return magnitude(weight, None, pattern)

    register_pruner(Pruner("recording", recording, "norms"))
    try:
        model = tiny_model("gemma3")
        report = prune_weights_(model, WeightPruneConfig(pattern="2:4", method="recording"), CALIB, progress=False)
    finally:
        PRUNERS.pop("recording")
    final = {site.name: LayerInputs(site.in_features, "norms") for site in report.pruned}
    hooks = [model.get_submodule(n).register_forward_pre_hook(lambda m, a, n=n: final[n].add(a[0])) for n in final]
    for window in CALIB:
        logits(model, window[None])
    for hook in hooks:
        hook.remove()
    assert len(seen) == len(final)
    for recorded, site in zip(seen.values(), report.pruned):  # pruned in forward order
        torch.testing.assert_close(recorded, final[site.name].square_sum, rtol=1e-4, atol=1e-4)


def test_layer_inputs_are_input_stats_in_float32():
    """The pruners' accumulator is core.stats.InputStats (float32 sums on its device) plus XᵀX."""
    x = torch.randn(3, 5, 16, generator=torch.Generator().manual_seed(4)).to(torch.bfloat16)
    inputs = LayerInputs(16, "hessian")
    inputs.add(x[:2])
    inputs.update(x[2:])
    rows = x.reshape(-1, 16).float()
    assert isinstance(inputs, InputStats) and inputs.tokens == 15 and inputs.square_sum.dtype == torch.float32
    assert torch.equal(inputs.square_sum, rows[:10].square().sum(0) + rows[10:].square().sum(0))
    assert torch.equal(inputs.abs_max, rows.abs().amax(0)) and torch.equal(inputs.feature_norm(), inputs.square_sum.sqrt())
    torch.testing.assert_close(inputs.hessian(), 2 * rows.T @ rows / 15)
    assert inputs != LayerInputs.from_tensor(x) and len({inputs, inputs}) == 1  # by identity, hashable
    with pytest.raises(ValueError, match="need must be"):
        LayerInputs(16, "none")


def test_restore_brings_back_the_dense_model():
    model = tiny_model("llama")
    reference = logits(model)
    snapshot = snapshot_weights(model)
    prune_weights_(model, WeightPruneConfig(pattern="2:4", method="wanda"), CALIB, progress=False)
    assert not torch.allclose(logits(model), reference)
    restore_weights_(model, snapshot)
    assert torch.equal(logits(model), reference)


# ---- save / load ----------------------------------------------------------------------------


def test_save_load_round_trip_and_refusals(tmp_path):
    model = tiny_model("llama")
    config = WeightPruneConfig(pattern="4:8", method="sparsegpt", skip=("@1",))
    prune_weights_(model, config, CALIB, progress=False)
    save_pruned(model, tmp_path / "pruned")
    meta = json.loads((tmp_path / "pruned" / "actsparse_pruned.json").read_text())
    assert meta["config"]["method"] == "sparsegpt" and len(meta["layers"]) == 7 and "torch" in meta["versions"]

    fresh = tiny_model("llama")
    assert load_pruned_(fresh, tmp_path / "pruned") == config
    assert torch.equal(logits(fresh), logits(model))
    assert verify_pattern(fresh) == 7

    with pytest.raises(ActsparseError, match="different model"):
        load_pruned_(tiny_model("gpt2"), tmp_path / "pruned")
    torch.manual_seed(1)
    other = tf.LlamaForCausalLM(tiny_model("llama").config).eval()
    with pytest.raises(ActsparseError, match="different checkpoint"):
        load_pruned_(other, tmp_path / "pruned")
    wide = tf.LlamaForCausalLM(tf.LlamaConfig(**{**tiny_model("llama").config.to_dict(), "intermediate_size": 96})).eval()
    before = logits(wide)
    with pytest.raises(ActsparseError, match=r"layers.0.mlp.down_proj has weight shape \(64, 96\) in this model but \(64, 128\)"):
        load_pruned_(wide, tmp_path / "pruned", check_model=False)
    assert torch.equal(logits(wide), before)  # nothing applied
    with pytest.raises(ActsparseError, match="not a pruned-weights directory"):
        load_pruned_(fresh, tmp_path)
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "pruned_weights.safetensors").write_bytes(
        (tmp_path / "pruned" / "pruned_weights.safetensors").read_bytes()
    )
    (tmp_path / "foreign" / "actsparse_pruned.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(ActsparseError, match="not an actsparse pruned-weights description"):
        load_pruned_(fresh, tmp_path / "foreign")
    with pytest.raises(ActsparseError, match="no pruned weights to save"):
        save_pruned(tiny_model("llama"), tmp_path / "nothing")


# ---- command line ---------------------------------------------------------------------------


def test_cli_eval_prune_weights_json(capsys, tiny_dir):
    calib = tiny_dir / "calib.txt"
    calib.write_text(" ".join(reversed(TEXT.split())))
    common = ["eval", "--model", str(tiny_dir), "--data", str(tiny_dir / "text.txt"), "--calib-data", str(calib), "--seqlen", "16",
              "--max-tokens", "64", "--pattern", "2:4", "--json", "--no-progress"]  # fmt: skip
    assert main([*common, "--criterion", "amber"]) == 0
    activations = json.loads(capsys.readouterr().out)
    assert main([*common, "--prune", "weights", "--method", "wanda", "--calib-windows", "4"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert set(activations) - {"calibration"} <= set(record)
    assert record["target"] == "weights" and record["method"] == "wanda" and activations["target"] == "activations"
    assert record["dense_ppl"] == activations["dense_ppl"] and record["sparse_ppl"] != record["dense_ppl"]
    assert record["calibration"]["windows"] == 4 and record["config"]["calib_windows"] == 4
    assert record["sparse_flop_fraction"] == pytest.approx(1.0) and record["removed_flop_fraction"] == pytest.approx(0.5)


@pytest.mark.parametrize(
    "argv, message",
    [
        (
            ["--prune", "weights", "--method", "bogus"],
            "unknown weight pruning method 'bogus'; choose one of: magnitude, wanda, sparsegpt",
        ),
        (["--method", "wanda"], "needs --prune weights"),
        (["--prune", "weights", "--mitigation", "var"], "with --prune weights use --method"),
    ],
)
def test_cli_bad_weight_options_exit_2(capsys, argv, message):
    assert main(["eval", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("actsparse: error:") and message in err and "Traceback" not in err


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma3", "gpt2", "opt"])
def test_batched_layer_replay_equals_one_window_at_a_time(family):
    """Decoder layers replayed several windows per call give each window's own output."""
    from actsparse.baselines.prune import capture_layer_inputs
    from actsparse.models.discovery import find_decoder_layers

    model = tiny_model(family)
    windows = torch.randint(0, VOCAB, (5, 12), generator=torch.Generator().manual_seed(3))
    inputs, calls = capture_layer_inputs(model, windows)
    _, layers = find_decoder_layers(model)
    with torch.no_grad():
        one_by_one = [calls[0].run(layers[0], h) for h in inputs]
        batched = calls[0].run_all(layers[0], inputs, "cpu", "cpu", batch=2)
    assert len(batched) == len(one_by_one) == 5
    for a, b in zip(batched, one_by_one):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(batched[0], batched[1])  # windows differ, so would a mix-up
