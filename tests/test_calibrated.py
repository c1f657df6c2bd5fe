"""Calibrated and learned mitigations, layer-by-layer calibration, saved states."""

import json

import pytest
import torch
from torch import nn

from actsparse.calibration.layerwise import CalibrationOptions, calibrate_, lr_factor
from actsparse.calibration.mitigations import CovarianceStats, collects, ensure_mitigation
from actsparse.calibration.state import META_FILE, TENSORS_FILE, load_state_, save_state
from actsparse.cli.main import main
from actsparse.config import SparsityConfig
from actsparse.core.mitigation import get_mitigation
from actsparse.core.patterns import parse_pattern
from actsparse.core.scoring import get_criterion
from actsparse.core.sparse_linear import SparseLinear
from actsparse.errors import ActsparseError
from actsparse.sparsify import sparse_layers, sparsify_, unsparsify_
from conftest import VOCAB, tiny_model

torch.set_num_threads(1)
K, OUT = 16, 8


def hand_prune(x: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Magnitude N:M by hand: keep the n largest |x| of every m consecutive features."""
    groups = x.reshape(x.shape[0], -1, m)
    index = groups.abs().topk(n, dim=-1).indices
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, index, True)
    return torch.where(mask, groups, torch.zeros(())).reshape(x.shape)


def make_layer(mitigation: str, calib: torch.Tensor | None = None, *, covariance=False, rows=False, bias=True):
    torch.manual_seed(1)
    linear = nn.Linear(K, OUT, bias=bias)
    stats = None
    if calib is not None:
        stats = CovarianceStats(K, covariance=covariance, keep_rows=rows)
        stats.update(calib[:50])
        stats.update(calib[50:])  # two batches: running sums
    ensure_mitigation(mitigation)
    layer = SparseLinear(linear, parse_pattern("2:4"), get_criterion("magnitude"), get_mitigation(mitigation), stats=stats)
    return layer, linear.weight.detach(), (linear.bias.detach() if bias else torch.zeros(OUT))


@pytest.fixture
def data():
    gen = torch.Generator().manual_seed(0)
    calib = torch.randn(120, K, generator=gen) * 2 + 0.5
    x = torch.randn(10, K, generator=gen) * 2 + 0.5
    return calib, x


@torch.no_grad()
def test_spts_formula(data):
    calib, x = data
    layer, w, b = make_layer("spts", calib)
    eta = calib.median(dim=-1).values.double().mean().float()  # mean per-token lower median
    expected = hand_prune(x - eta, 2, 4) @ w.T + eta * w.sum(1) + b
    assert layer.eta.item() == pytest.approx(eta.item(), abs=1e-6)
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_spts_and_dpts_are_one_formula(data):
    """With every token's median at S-PTS's η, D-PTS gives S-PTS's output bit for bit."""
    calib, x = data
    spts, _, _ = make_layer("spts", calib)
    dpts, _, _ = make_layer("dpts")
    shifted = x - x.median(dim=-1, keepdim=True).values + spts.eta  # each token's lower median is now η
    assert torch.equal(dpts(shifted), spts(shifted))


@pytest.mark.parametrize("mitigation,covariance,rows", [("spts", False, False), ("scap", False, True), ("rotation", True, False)])
def test_the_accumulator_collects_what_the_mitigation_says(data, mitigation, covariance, rows):
    calib, _ = data
    stats = CovarianceStats.collecting(K, collects(mitigation))
    stats.update(calib)
    assert (stats.outer_sum is not None, bool(stats.rows)) == (covariance, rows)
    assert stats.tokens == len(calib) and stats.token_median_sum.item() != 0 and stats.abs_max.max() > 0


@pytest.mark.parametrize("per_feature", [False, True])
@torch.no_grad()
def test_scap_formula(data, per_feature):
    calib, x = data
    layer, w, b = make_layer("scap-feature" if per_feature else "scap", calib, rows=True)
    eta = calib.median(dim=0).values if per_feature else calib.flatten().median()
    expected = hand_prune(x - eta, 2, 4) @ w.T + (w @ eta if per_feature else eta * w.sum(1)) + b
    torch.testing.assert_close(layer.eta, eta)
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_rotation_formula(data):
    calib, x = data
    layer, w, b = make_layer("rotation", calib, covariance=True)
    c = calib.double()
    cov = (c - c.mean(0)).T @ (c - c.mean(0)) / len(c)
    values, vectors = torch.linalg.eigh(cov)
    q = vectors.flip(-1).float()  # descending eigenvalues
    assert torch.all(values.flip(-1)[:-1] >= values.flip(-1)[1:])
    # columns agree up to sign; the formula's output does not depend on the signs
    torch.testing.assert_close(layer.rotation.abs(), q.abs(), atol=1e-4, rtol=1e-4)
    expected = hand_prune(x @ q, 2, 4) @ (w @ q).T + b
    torch.testing.assert_close(layer(x), expected, atol=1e-4, rtol=1e-4)


def test_spread_order_puts_each_rank_in_its_own_group():
    from actsparse.calibration.mitigations import spread_order

    order = spread_order(12, 4)  # 3 groups of 4
    assert sorted(order.tolist()) == list(range(12))
    groups = order.view(3, 4)  # ranks held by each group
    assert groups.tolist() == [[0, 3, 6, 9], [1, 4, 7, 10], [2, 5, 8, 11]]


@torch.no_grad()
def test_rotation_spread_formula(data):
    from actsparse.calibration.mitigations import spread_order

    calib, x = data
    layer, w, b = make_layer("rotation-spread", calib, covariance=True)
    c = calib.double()
    values, vectors = torch.linalg.eigh((c - c.mean(0)).T @ (c - c.mean(0)) / len(c))
    q = vectors.flip(-1).float()[:, spread_order(c.shape[1], 4)]
    torch.testing.assert_close(layer.rotation.abs(), q.abs(), atol=1e-4, rtol=1e-4)
    expected = hand_prune(x @ q, 2, 4) @ (w @ q).T + b
    torch.testing.assert_close(layer(x), expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name,rank", [("lowrank", 16), ("lowrank:4", 4)])
@torch.no_grad()
def test_lowrank_formula(data, name, rank):
    _, x = data
    layer, w, b = make_layer(name)
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    r = min(rank, *w.shape)
    pruned = hand_prune(x, 2, 4)
    expected = pruned @ w.T + (x - pruned) @ vh[:r].T @ torch.diag(s[:r]) @ u[:, :r].T + b
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)
    if rank >= min(w.shape):  # full rank: the dense product back
        torch.testing.assert_close(layer(x), x @ w.T + b, atol=1e-4, rtol=1e-4)


@torch.no_grad()
def test_learned_formulas(data):
    _, x = data
    gen = torch.Generator().manual_seed(3)
    s, beta, gamma = torch.randn(K, generator=gen), torch.randn(OUT, generator=gen), torch.randn(OUT, generator=gen) * 0.1

    def var_pruned(x):
        p = hand_prune(x, 2, 4)
        return p * (x.var(-1, keepdim=True) / p.var(-1, keepdim=True)).sqrt()

    cases = {
        "lpts": lambda w, b: (hand_prune(x - s, 2, 4) + s) @ w.T + b,
        "oshift": lambda w, b: hand_prune(x, 2, 4) @ w.T + b + beta,
        "oscale": lambda w, b: (hand_prune(x, 2, 4) @ w.T) * (1 + gamma) + b,
        "oscale-shift": lambda w, b: (hand_prune(x, 2, 4) @ w.T) * (1 + gamma) + b + beta,
        "var-oscale": lambda w, b: (var_pruned(x) @ w.T) * (1 + gamma) + b,
        "var-oshift": lambda w, b: var_pruned(x) @ w.T + b + beta,
    }
    for name, formula in cases.items():
        layer, w, b = make_layer(name)
        for attr, value in (("input_shift", s), ("output_shift", beta), ("output_scale", gamma)):
            if hasattr(layer, attr):
                getattr(layer, attr).copy_(value)
        assert all(isinstance(getattr(layer, n), nn.Parameter) for n in layer.state_names)
        layer.calibrated = True
        torch.testing.assert_close(layer(x), formula(w, b), atol=1e-5, rtol=1e-5, msg=name)


def test_lpts_gradient_flows_through_kept_values(data):
    _, x = data
    layer, _, _ = make_layer("lpts")
    layer.calibrated = True
    layer(x).square().sum().backward()
    assert layer.input_shift.grad is not None and layer.input_shift.grad.abs().sum() > 0
    assert layer.weight.grad is not None  # frozen by calibrate_, not by the layer


def test_uncalibrated_refuses_to_run():
    from actsparse.models.discovery import find_linear_sites

    model = tiny_model("llama")
    with pytest.raises(ActsparseError, match="calibration"):
        sparsify_(model, SparsityConfig(pattern="2:4", mitigation="lpts"))
    empty = {s.name: CovarianceStats(s.in_features) for s in find_linear_sites(model)}
    sparsify_(model, SparsityConfig(pattern="2:4", mitigation="spts"), stats=empty)
    with pytest.raises(ActsparseError, match="calibrate_"):
        model(torch.randint(0, VOCAB, (1, 8)))


def test_dense_statistics_path_for_statistics_only_mitigations():
    from actsparse.calibration.layerwise import collect_covariance_stats

    model = tiny_model("llama")
    windows = torch.randint(0, VOCAB, (3, 16), generator=torch.Generator().manual_seed(4))
    stats = collect_covariance_stats(model, windows, "rotation", progress=False)
    sparsify_(model, SparsityConfig(pattern="2:4", mitigation="rotation"), stats=stats)
    layer = next(iter(sparse_layers(model).values()))
    assert layer.calibrated and stats[layer.name].tokens == 3 * 16
    assert torch.isfinite(model(windows[:1]).logits).all()


def test_lr_schedule():
    factors = [lr_factor(s, 100, 0.03) for s in range(100)]
    assert factors[0] == pytest.approx(1 / 3) and factors[2] == 1.0 and factors[-1] == pytest.approx(1 / 97)
    assert all(a >= b for a, b in zip(factors[2:], factors[3:]))


def _layer0_mse(model, inputs, calls, targets) -> float:
    from actsparse.models.discovery import find_decoder_layers

    layer = find_decoder_layers(model)[1][0]
    with torch.no_grad():
        return sum(torch.nn.functional.mse_loss(calls[0].run(layer, h), t).item() for h, t in zip(inputs, targets)) / len(inputs)


@pytest.mark.parametrize("mitigation", ["lpts", "oscale-shift"])
def test_training_lowers_held_out_layer_mse(mitigation):
    from actsparse.baselines.prune import capture_layer_inputs
    from actsparse.models.discovery import find_decoder_layers

    model = tiny_model("llama")
    with torch.no_grad():  # activations with a mean offset, as in real models (random weights have none)
        model.get_input_embeddings().weight.add_(torch.randn(64, generator=torch.Generator().manual_seed(7)) * 0.05)
    gen = torch.Generator().manual_seed(5)
    train, held_out = torch.randint(0, VOCAB, (24, 32), generator=gen), torch.randint(0, VOCAB, (6, 32), generator=gen)
    inputs, calls = capture_layer_inputs(model, held_out)
    layer0 = find_decoder_layers(model)[1][0]
    with torch.no_grad():
        targets = [calls[0].run(layer0, h) for h in inputs]
    config = SparsityConfig(pattern="2:4", criterion="magnitude", mitigation=mitigation, layers=(0,))
    report = calibrate_(model, config, train, options=CalibrationOptions(lr=1e-2, steps=64), progress=False)
    assert report.layers[0]["last_loss"] < report.layers[0]["first_loss"]
    trained = _layer0_mse(model, inputs, calls, targets)
    with torch.no_grad():
        for layer in sparse_layers(model).values():
            for name in layer.state_names:  # back to the no-op initialisation
                getattr(layer, name).zero_()
    untrained = _layer0_mse(model, inputs, calls, targets)
    assert trained < 0.5 * untrained


def _calibrated(mitigation, criterion="amber", pattern="2:4", family="llama"):
    model = tiny_model(family)
    windows = torch.randint(0, VOCAB, (6, 16), generator=torch.Generator().manual_seed(2))
    config = SparsityConfig(pattern=pattern, criterion=criterion, mitigation=mitigation)
    calibrate_(model, config, windows, options=CalibrationOptions(lr=1e-2), progress=False)
    return model


@pytest.mark.parametrize("mitigation,criterion", [("lpts", "amber"), ("rotation", "amber"), ("scap", "amber"), ("var-oscale", "amber"),
                                                  ("lpts", "clact"), ("rotation", "clact")])  # fmt: skip
def test_save_load_identical(tmp_path, mitigation, criterion):
    ids = torch.randint(0, VOCAB, (1, 12), generator=torch.Generator().manual_seed(9))
    model = _calibrated(mitigation, criterion)
    with torch.no_grad():
        before = model(ids).logits
    save_state(model, tmp_path / "state", calibration={"data": "test"})
    meta = json.loads((tmp_path / "state" / META_FILE).read_text())
    assert meta["config"]["mitigation"] == mitigation and len(meta["sha256"]) == 64 and meta["versions"]
    assert meta["model"]["architecture"] == "LlamaForCausalLM" and meta["calibration"]["data"] == "test"
    fresh = tiny_model("llama")
    config = load_state_(fresh, tmp_path / "state")
    assert config.mitigation == mitigation
    with torch.no_grad():
        after = fresh(ids).logits
    torch.testing.assert_close(after, before, atol=0, rtol=0)
    assert all(p.requires_grad for p in model.parameters() if p.dim() > 1)  # model weights' flags restored
    unsparsify_(fresh)
    save_state(model, tmp_path / "state")  # overwrite in place (atomic replace)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state"]


def test_refusals(tmp_path):
    model = _calibrated("lpts")
    state = save_state(model, tmp_path / "state")
    with pytest.raises(ActsparseError, match="different model"):
        load_state_(tiny_model("qwen2"), state)
    other = tiny_model("llama")
    with torch.no_grad():
        other.get_input_embeddings().weight.mul_(1.5)
    with pytest.raises(ActsparseError, match="different checkpoint"):
        load_state_(other, state)
    with pytest.raises(ActsparseError, match="pattern"):
        load_state_(tiny_model("llama"), state, expect=SparsityConfig(pattern="8:16", criterion="amber", mitigation="lpts"))
    import transformers as tf

    torch.manual_seed(0)
    wider = tf.LlamaForCausalLM(tf.LlamaConfig(hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
                                               num_key_value_heads=2, vocab_size=VOCAB))  # fmt: skip
    with pytest.raises(ActsparseError, match="different checkpoint"):
        load_state_(wider, state)
    with pytest.raises(ActsparseError, match="shape"):
        load_state_(wider, state, check_model=False)
    assert not sparse_layers(wider)  # left dense
    path = state / TENSORS_FILE
    raw = bytearray(path.read_bytes())
    raw[-5] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(ActsparseError, match="checksum"):
        load_state_(tiny_model("llama"), state)
    path.write_bytes(bytes(raw[:-100]))
    with pytest.raises(ActsparseError, match="checksum"):
        load_state_(tiny_model("llama"), state)
    with pytest.raises(ActsparseError, match="not a calibrated-state"):
        load_state_(tiny_model("llama"), tmp_path)


def _run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_calibrate_eval_state_and_disjoint(tmp_path, capsys, tiny_dir, monkeypatch):
    from transformers import AutoTokenizer

    import actsparse.calibration.layerwise as layerwise

    calib = tmp_path / "calib.txt"
    calib.write_text("the cat sat on the mat . " * 60)
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    calib_ids = set(tokenizer(calib.read_text())["input_ids"])
    seen = []
    real = layerwise.calibrate_
    monkeypatch.setattr(
        layerwise, "calibrate_", lambda model, config, windows, **kw: seen.append(windows) or real(model, config, windows, **kw)
    )
    common = [
        "--model",
        str(tiny_dir),
        "--data",
        str(tiny_dir / "text.txt"),
        "--seqlen",
        "16",
        "--pattern",
        "2:4",
        "--no-progress",
    ]
    code, _, err = _run(
        capsys,
        "calibrate",
        *common,
        "--calib-data",
        str(tiny_dir / "text.txt"),
        "--mitigation",
        "spts",
        "--out",
        str(tmp_path / "x"),
    )
    assert code == 2 and "overlap" in err and not seen and not (tmp_path / "x").exists()
    out_dir = tmp_path / "state"
    code, out, err = _run(capsys, "calibrate", *common, "--calib-data", str(calib), "--mitigation", "oshift", "--calib-windows", "4",
                          "--steps", "3", "--out", str(out_dir))  # fmt: skip
    assert code == 0, err
    assert len(seen) == 1 and seen[0].shape == (4, 16) and set(seen[0].flatten().tolist()) <= calib_ids  # calibration text only
    meta = json.loads((out_dir / META_FILE).read_text())
    assert meta["calibration"]["data_parts"] == [f"file:{calib.resolve()}"] and meta["calibration"]["options"]["steps"] == 3
    code, out, err = _run(capsys, "eval", "--model", str(tiny_dir), "--data", str(tiny_dir / "text.txt"), "--seqlen", "16", "--max-tokens", "64",
                          "--state", str(out_dir), "--json", "--no-progress")  # fmt: skip
    assert code == 0, err
    record = json.loads(out)
    assert (
        record["config"]["mitigation"] == "oshift"
        and record["state"] == str(out_dir)
        and record["sparse_flop_fraction"] == pytest.approx(1.0)
    )
    code, _, err = _run(
        capsys, "eval", "--model", str(tiny_dir), "--data", str(calib), "--seqlen", "16", "--state", str(out_dir), "--no-progress"
    )
    assert code == 2 and "overlap" in err
    code, _, err = _run(capsys, "eval", "--model", str(tiny_dir), "--data", str(tiny_dir / "text.txt"), "--seqlen", "16", "--state", str(out_dir),
                        "--mitigation", "lpts", "--no-progress")  # fmt: skip
    assert code == 2 and "oshift" in err


def test_eval_runs_calibrated_mitigation(tiny_dir, tmp_path):
    from actsparse.eval.run import EvalSettings, Evaluator

    calib = tmp_path / "calib.txt"
    calib.write_text("a bird sang in the tree . " * 40)
    settings = EvalSettings(
        model=str(tiny_dir), data=str(tiny_dir / "text.txt"), calib_data=str(calib), calib_windows=4, seqlen=16, max_tokens=64
    )
    evaluator = Evaluator(settings, progress=False)
    record = evaluator.run(SparsityConfig(pattern="2:4", mitigation="spts"))
    assert record["calibration"]["windows"] == 4 and record["calibration"]["seconds"] >= 0 and record["sparse_ppl"] > 0
    assert not sparse_layers(evaluator.model)
    record = evaluator.run(SparsityConfig(pattern="2:4", mitigation="lowrank:8"))  # no calibration needed
    assert record["sparse_ppl"] > 0


def test_clact_norms_come_from_each_layers_calibration_inputs():
    """Layer-wise clact: layer 0's norms are the dense model's (nothing sparse upstream); later layers see sparse inputs."""
    from actsparse.calibration.collect import collect_input_stats

    windows = torch.randint(0, VOCAB, (6, 16), generator=torch.Generator().manual_seed(2))
    dense = collect_input_stats(tiny_model("llama"), windows, progress=False)
    model = tiny_model("llama")
    calibrate_(model, SparsityConfig(pattern="2:4", criterion="clact", mitigation="spts"), windows, progress=False)
    layers = sparse_layers(model)
    first, later = "model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"
    torch.testing.assert_close(layers[first].feature_vector, dense[first].feature_norm(), rtol=1e-5, atol=1e-6)
    assert "feature_vector" in layers[first].state_names  # saved with the state
    assert not torch.allclose(layers[later].feature_vector, dense[later].feature_norm(), rtol=1e-3)


def test_rotated_statistics_are_the_norms_of_rotated_inputs(data):
    from actsparse.calibration.mitigations import _rotated_stats

    calib, _ = data
    stats = CovarianceStats(K, covariance=True)
    stats.update(calib)
    q = torch.linalg.qr(torch.randn(K, K, generator=torch.Generator().manual_seed(3)))[0]
    expected = (calib.double() @ q.double()).norm(dim=0).float()
    torch.testing.assert_close(_rotated_stats(stats, q).feature_norm(), expected, rtol=1e-5, atol=1e-5)


def _trained_state(mitigation, device, cuda_graph):
    torch.manual_seed(0)
    model = tiny_model("llama").to(device)
    windows = torch.randint(0, VOCAB, (8, 16), generator=torch.Generator().manual_seed(2))
    config = SparsityConfig(pattern="2:4", criterion="amber", mitigation=mitigation)
    report = calibrate_(model, config, windows, options=CalibrationOptions(lr=1e-2), progress=False, cuda_graph=cuda_graph)
    state = {
        f"{name}.{key}": getattr(layer, key).detach().cpu()
        for name, layer in sparse_layers(model).items()
        for key in layer.state_names
    }
    return state, report


def test_cuda_graph_needs_cuda():
    with pytest.raises(ActsparseError, match="CUDA"):
        _trained_state("lpts", "cpu", cuda_graph=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need CUDA")
@pytest.mark.parametrize("mitigation", ["lpts", "var-oscale-shift"])
def test_cuda_graph_step_trains_as_the_eager_step(mitigation):
    eager, eager_report = _trained_state(mitigation, "cuda", cuda_graph=False)
    graphed, graphed_report = _trained_state(mitigation, "cuda", cuda_graph=True)
    assert eager.keys() == graphed.keys() and eager
    assert any(tensor.abs().sum() > 0 for tensor in graphed.values())  # trained away from the no-op start
    for key in eager:
        torch.testing.assert_close(graphed[key], eager[key], rtol=1e-5, atol=1e-6)
    for index, info in eager_report.layers.items():
        assert graphed_report.layers[index]["last_loss"] == pytest.approx(info["last_loss"], rel=1e-5)
