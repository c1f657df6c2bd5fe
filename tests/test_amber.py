"""Amber Pruner in full: sensitivity, budgeted skipping, presets, prefill-only, W8A8 + sparsity."""

import json

import pytest
import torch
from torch import nn

from actsparse import SparsityConfig, collect_input_stats, sparsify_, unsparsify_
from actsparse.amber import (
    amber_preset,
    budget_skip,
    fake_quant,
    flop_fraction,
    measure_sensitivity,
    outstanding_scale,
    quantize_activations,
    quantize_rest_,
    quantize_weight,
    random_skip,
    smoothquant_scale,
)
from actsparse.cli.main import main
from actsparse.config import parse_skip
from actsparse.core.mitigation import get_mitigation
from actsparse.core.patterns import Dense, parse_pattern
from actsparse.core.scoring import get_criterion
from actsparse.core.sparse_linear import SparseLinear
from actsparse.models.discovery import LinearSite, find_linear_sites
from actsparse.sparsify import sparse_layers
from conftest import save_tiny_model_dir, tiny_model

torch.set_num_threads(1)


# ---- sensitivity ----------------------------------------------------------------------------


class OneBlock(nn.Module):
    """A hand-built 'decoder' of one layer with one linear layer q."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 8)
        self.layers = nn.ModuleList([nn.ModuleDict({"q_proj": nn.Linear(8, 4, bias=True)})])

    def forward(self, ids, use_cache=False):
        return self.layers[0]["q_proj"](self.embed(ids))


def test_sensitivity_equals_the_formula_on_a_hand_built_case():
    torch.manual_seed(0)
    model = OneBlock().eval()
    windows = torch.randint(0, 10, (3, 5))
    result = measure_sensitivity(model, windows, "2:4", "magnitude", progress=False)
    layer = model.layers[0]["q_proj"]
    x = model.embed(windows).reshape(-1, 8)
    y = layer(x)
    keep = torch.zeros_like(x, dtype=torch.bool)  # 2 largest |x| of each group of 4, by hand
    for t in range(x.shape[0]):
        for g in range(2):
            group = x[t, 4 * g : 4 * g + 4].abs()
            for j in sorted(range(4), key=lambda j: (-group[j].item(), j))[:2]:
                keep[t, 4 * g + j] = True
    y_sparse = layer(torch.where(keep, x, 0.0))
    expected = ((y - y_sparse).double().norm() / (y.double().norm() + 1e-8)).item()
    assert result.scores["layers.0.q_proj"] == pytest.approx(expected, rel=1e-6)
    assert 0 < expected < 1
    assert "q" in result.heatmap_text() and f"{expected:.3f}" in result.heatmap_text()


# ---- budget ---------------------------------------------------------------------------------


def sites(flops_in: list[int], roles=None) -> list[LinearSite]:
    roles = roles or ["q"] * len(flops_in)
    return [LinearSite(f"l{i}", i, roles[i], k, 1) for i, k in enumerate(flops_in)]


def test_budget_met_exactly_least_sensitive_first():
    s = sites([10, 10, 10, 10])
    scores = {"l0": 0.4, "l1": 0.1, "l2": 0.3, "l3": 0.2}
    choice = budget_skip(s, scores, 0.5)
    assert choice.met and choice.fraction == pytest.approx(0.5)
    assert set(choice.sparse) == {"l1", "l3"}
    assert set(choice.dense) == {"l0", "l2"}
    assert choice.skip == ("q@0,2",)
    config = SparsityConfig(skip=choice.skip)  # usable as SparsityConfig.skip
    assert [x.layer for x in s if config.selects(x.role, x.layer)] == [1, 3]
    # a big layer that would overshoot is passed over, a smaller one fills the budget exactly
    s2 = sites([50, 30, 20])
    choice2 = budget_skip(s2, {"l0": 0.1, "l1": 0.2, "l2": 0.3}, 0.7)
    assert choice2.met and set(choice2.sparse) == {"l0", "l2"}
    # per-FLOP order favours the big layer
    choice3 = budget_skip(sites([30, 10]), {"l0": 0.3, "l1": 0.2}, 0.75, order="score-per-flop")
    assert choice3.sparse == ("l0",) and choice3.met


def test_budget_nearest_fraction_when_not_achievable():
    s = sites([10, 10, 10])
    choice = budget_skip(s, {"l0": 0.3, "l1": 0.1, "l2": 0.2}, 0.5)
    assert not choice.met
    assert choice.fraction == pytest.approx(2 / 3)  # 1/3 and 2/3 equally near: the one reaching the target
    assert set(choice.sparse) == {"l1", "l2"}
    choice = budget_skip(s, {"l0": 0.3, "l1": 0.1, "l2": 0.2}, 0.4)
    assert choice.fraction == pytest.approx(1 / 3) and choice.sparse == ("l1",)
    assert budget_skip(s, {"l0": 0.3, "l1": 0.1, "l2": 0.2}, 1.0).skip == ()


def test_amber_preset_skip_set():
    skip = amber_preset("llama3.1-8b")
    assert set(skip) == {"k", "v", "o", "up", "q@19,21,28,30,31", "gate@19,21,28,30,31"}
    config = SparsityConfig(skip=skip)
    for layer in range(32):
        assert config.selects("down", layer)
        for role in ("k", "v", "o", "up"):
            assert not config.selects(role, layer)
        for role in ("q", "gate"):
            assert config.selects(role, layer) == (layer not in {19, 21, 28, 30, 31})
    qwen = dict(parse_skip(e) for e in amber_preset("qwen2-7b") if "@" in e)
    assert qwen["q"] == {0, 6, 23, 26, 27} and qwen["gate"] == {0, 6, 23, 26, 27}
    assert dict(parse_skip(e) for e in amber_preset("llama3.1-8b", num_layers=2) if "@" in e)["q"] == {1}
    # the Amber Pruner paper's >55%: the Llama-3.1-8B shapes with the preset
    shapes = {"q": (4096, 4096), "k": (4096, 1024), "v": (4096, 1024), "o": (4096, 4096), "gate": (4096, 14336),
              "up": (4096, 14336), "down": (14336, 4096)}  # fmt: skip
    llama = [LinearSite(f"{l}.{r}", l, r, *shapes[r]) for l in range(32) for r in shapes]
    fraction = flop_fraction(llama, [s.name for s in llama if config.selects(s.role, s.layer)])
    assert 0.55 < fraction < 0.57


def test_random_control_has_the_requested_fraction():
    s = sites([10] * 20)
    a, b = random_skip(s, 0.55, seed=1), random_skip(s, 0.55, seed=2)
    assert a.fraction == pytest.approx(0.55) and b.fraction == pytest.approx(0.55)
    assert a.sparse != b.sparse and random_skip(s, 0.55, seed=1).sparse == a.sparse
    model_sites = find_linear_sites(tiny_model("llama"))
    choice = random_skip(model_sites, 0.5, seed=0)
    report = sparsify_(model := tiny_model("llama"), SparsityConfig(pattern="2:4", skip=choice.skip))
    assert report.sparse_flop_fraction == pytest.approx(choice.fraction)
    assert abs(choice.fraction - 0.5) < 0.05
    unsparsify_(model)


# ---- quantisation and smoothing -------------------------------------------------------------


def test_quantiser_against_a_reference_round_trip():
    torch.manual_seed(0)
    x = torch.randn(6, 16) * torch.linspace(0.1, 10, 16)
    q = quantize_activations(x)
    for t in range(6):  # per token
        s = x[t].abs().max().item() / 127
        codes = q[t] / s
        assert torch.allclose(codes, codes.round(), atol=1e-4)
        assert codes.abs().max() <= 127 + 1e-4
        assert (q[t] - x[t]).abs().max() <= s / 2 + 1e-6
        ref = torch.tensor([max(-127, min(127, round(v / s))) * s for v in x[t].tolist()])
        assert torch.allclose(q[t], ref, atol=1e-6)
    w = torch.randn(5, 16) * torch.tensor([0.01, 0.1, 1, 10, 100]).unsqueeze(1)
    qw = quantize_weight(w)
    for i in range(5):  # per output channel
        s = w[i].abs().max().item() / 127
        assert (qw[i] - w[i]).abs().max() <= s / 2 * (1 + 1e-5)
        assert torch.allclose(qw[i] / s, (qw[i] / s).round(), atol=1e-3)
    assert torch.equal(fake_quant(torch.zeros(2, 4)), torch.zeros(2, 4))


def test_smoothing_alone_leaves_y_unchanged():
    torch.manual_seed(0)
    x = torch.randn(7, 16) * torch.linspace(0.1, 20, 16)
    w = torch.randn(8, 16)
    y = x @ w.t()
    for s in (smoothquant_scale(x.abs().amax(0), w), outstanding_scale(x.abs().amax(0), w)):
        assert torch.allclose((x / s) @ (w * s).t(), y, atol=1e-5, rtol=1e-5)
    s = smoothquant_scale(x.abs().amax(0), w, alpha=0.5)
    assert torch.allclose(s, (x.abs().amax(0) / w.abs().amax(0)).sqrt(), rtol=1e-5)
    sh = outstanding_scale(x.abs().amax(0), w)
    assert torch.allclose(sh, w.abs().amax(0) ** 0.9 / x.abs().amax(0) ** 0.1, rtol=1e-5)


def test_w8a8_mitigations_through_sparsify():
    model = tiny_model("llama")
    ids = torch.randint(0, 96, (1, 12))
    with torch.no_grad():
        dense = model(ids).logits
    weights = {n: p.clone() for n, p in model.named_parameters()}
    stats = collect_input_stats(model, ids, progress=False)
    for mitigation in ("w8a8", "w8a8-smoothquant", "outstanding-sparse"):
        for pattern in ("dense", "2:4"):
            sparsify_(model, SparsityConfig(pattern=pattern, criterion="amber", mitigation=mitigation), stats=stats)
            with torch.no_grad():
                out = model(ids).logits
            unsparsify_(model)
            error = (out - dense).norm() / dense.norm()
            assert torch.isfinite(out).all()
            if pattern == "dense":  # W8A8 dense: small but real error
                assert 0 < error < 0.05, (mitigation, error)
    for name, p in model.named_parameters():  # the shared weights were never overwritten
        assert torch.equal(p, weights[name])
    with pytest.raises(Exception, match="calibration"):
        sparsify_(model, SparsityConfig(pattern="2:4", mitigation="outstanding-sparse"))
    # the layers left dense by skip entries can run W8A8 too: the whole decoder quantised
    config = SparsityConfig(pattern="2:4", criterion="amber", mitigation="w8a8-smoothquant", skip=("k", "v", "o", "up"))
    report = sparsify_(model, config, stats=stats)
    assert quantize_rest_(model, config, report, stats) == len(report.dense) == 8
    layers = sparse_layers(model)
    assert len(layers) == 14 and sum(isinstance(l.pattern, Dense) for l in layers.values()) == 8
    assert unsparsify_(model) == 14 and not sparse_layers(model)


def test_w8a8_layer_matches_the_definition():
    torch.manual_seed(0)
    linear = nn.Linear(16, 8)
    x = torch.randn(5, 16)
    layer = SparseLinear(linear, parse_pattern("2:4"), get_criterion("magnitude"), get_mitigation("w8a8"))
    pruned = layer.prune(x)
    expected = quantize_activations(pruned) @ quantize_weight(linear.weight).t() + linear.bias
    assert torch.allclose(layer(x), expected, atol=1e-5)


# ---- prefill-only ---------------------------------------------------------------------------


def test_prefill_only_leaves_single_token_steps_dense():
    torch.manual_seed(0)
    linear = nn.Linear(16, 8)
    layer = SparseLinear(linear, parse_pattern("2:4"), get_criterion("magnitude"), get_mitigation("none"), prefill_only=True)
    one, many = torch.randn(2, 1, 16), torch.randn(2, 5, 16)
    assert torch.equal(layer(one), linear(one))
    assert not torch.allclose(layer(many), linear(many))
    model = tiny_model("llama")
    prompt = torch.randint(0, 96, (1, 6))
    with torch.no_grad():
        past = model(prompt, use_cache=True).past_key_values
        dense_step = model(prompt[:, -1:], past_key_values=past, use_cache=True).logits  # reference: dense model all along
    sparsify_(model, SparsityConfig(pattern="2:4", prefill_only=True))
    calls = []
    for layer in sparse_layers(model).values():
        layer.register_forward_hook(lambda m, a, o: calls.append((a[0].shape[-2], torch.equal(o, m.product(a[0])))))
    with torch.no_grad():
        past = model(prompt, use_cache=True).past_key_values
        step = model(prompt[:, -1:], past_key_values=past, use_cache=True).logits
        generated = model.generate(prompt, max_new_tokens=3, do_sample=False)
    assert generated.shape[1] == 9
    assert all(dense for length, dense in calls if length == 1) and not all(dense for length, dense in calls if length > 1)
    assert not torch.allclose(step, dense_step)  # the prompt was sparse, so the cache differs …
    unsparsify_(model)
    assert SparsityConfig(prefill_only=True).to_dict()["prefill_only"] is True


# ---- CLI ------------------------------------------------------------------------------------


def test_cli_sensitivity_writes_json_and_prints_heat_map(tmp_path, capsys):
    directory = save_tiny_model_dir(tmp_path / "tiny")
    out = tmp_path / "sens.json"
    code = main([
        "sensitivity", "--model", str(directory), "--calib-data", str(directory / "text.txt"), "--seqlen", "16",
        "--calib-windows", "2", "--pattern", "2:4", "--target-fraction", "0.55", "--out", str(out), "--no-progress", "--device", "cpu",
    ])  # fmt: skip
    printed = capsys.readouterr().out
    assert code == 0
    record = json.loads(out.read_text())
    assert set(record["grid"]) == {"q", "k", "v", "o", "gate", "up", "down"}
    assert len(record["scores"]) == 14 and all(0 < v < 2 for v in record["scores"].values())
    assert record["config"]["criterion"] == "amber" and "torch" in record["versions"]
    assert record["calibration"]["windows"] == 2
    assert abs(record["budget"]["fraction"] - 0.55) < 0.1
    for role in ("q", "down"):
        assert any(line.startswith(role) for line in printed.splitlines())
    assert f"{record['scores']['model.layers.0.self_attn.q_proj']:.3f}" in printed
    assert "skip" in printed and ("PNG" in printed or "sens.png" in printed)
