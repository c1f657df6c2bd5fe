import pytest
import torch
from torch import nn

from actsparse import ActsparseError, SparseLinear, SparsityConfig, collect_input_stats, find_linear_sites, sparsify_, unsparsify_
from conftest import VOCAB, tiny_model

IDS = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))


def logits(model):
    with torch.no_grad():
        return model(IDS).logits


def test_dense_is_identity_sparse_differs_and_unsparsify_restores(family_model):
    family, model = family_model
    reference = logits(model)
    originals = {s.name: model.get_submodule(s.name) for s in find_linear_sites(model)}
    report = sparsify_(model, SparsityConfig(pattern="dense", criterion="amber", mitigation="var"))
    assert torch.equal(logits(model), reference)
    assert report.sparse_flop_fraction == 0.0
    assert unsparsify_(model) == len([s for s in originals if s])
    report = sparsify_(model, SparsityConfig(pattern="2:4", criterion="amber", mitigation="var"))
    assert report.sparse_flop_fraction == pytest.approx(1.0)
    assert not torch.allclose(logits(model), reference)
    unsparsify_(model)
    assert torch.equal(logits(model), reference)
    for name, module in originals.items():
        assert model.get_submodule(name) is module


def test_lm_head_and_embeddings_are_never_touched(family_model):
    _, model = family_model
    sparsify_(model, SparsityConfig(pattern="2:4"))
    names = [name for name, m in model.named_modules() if isinstance(m, SparseLinear)]
    assert names and not any("lm_head" in n or "embed" in n or "wte" in n for n in names)
    assert not isinstance(model.get_output_embeddings(), SparseLinear)


def test_state_dict_is_unchanged_by_sparsify(family_model):
    _, model = family_model
    before = model.state_dict()
    sparsify_(model, SparsityConfig(pattern="4:8", criterion="wina"))
    after = model.state_dict()
    assert list(before) == list(after)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_qwen2_keeps_the_qkv_bias():
    model = tiny_model("qwen2")
    q = model.model.layers[0].self_attn.q_proj
    assert q.bias is not None
    sparsify_(model, SparsityConfig(pattern="dense"))
    assert model.model.layers[0].self_attn.q_proj.bias is q.bias
    x = torch.randn(3, q.in_features)
    assert torch.equal(model.model.layers[0].self_attn.q_proj(x), q(x))


def test_roles_layers_and_skip_lists_and_flop_fraction(llama):
    sites = find_linear_sites(llama)
    cfg = SparsityConfig(pattern="2:4", skip=("k", "v", "o", "up", "q@1", "gate@1"))
    report = sparsify_(llama, cfg)
    chosen = {(s.role, s.layer) for s in report.sparse}
    assert chosen == {("q", 0), ("gate", 0), ("down", 0), ("down", 1)}
    flops = {s.name: s.in_features * s.out_features for s in sites}
    expected = sum(flops[s.name] for s in report.sparse) / sum(flops.values())
    assert report.sparse_flop_fraction == pytest.approx(expected)
    assert {n for n, m in llama.named_modules() if isinstance(m, SparseLinear)} == {s.name for s in report.sparse}
    unsparsify_(llama)
    report = sparsify_(llama, SparsityConfig(pattern="2:4", roles=("down",), layers=(1,)))
    assert [(s.role, s.layer) for s in report.sparse] == [("down", 1)]


def test_whole_layer_skip_and_bad_skip_entries(llama):
    report = sparsify_(llama, SparsityConfig(pattern="2:4", skip=("@0",)))
    assert {s.layer for s in report.sparse} == {1}
    for bad in ("qq", "q@x", "@"):
        with pytest.raises(ActsparseError):
            SparsityConfig(skip=(bad,))


def test_sparsifying_twice_is_refused(llama):
    sparsify_(llama, SparsityConfig())
    with pytest.raises(ActsparseError, match="unsparsify_"):
        sparsify_(llama, SparsityConfig())


def test_m_not_dividing_a_width_changes_nothing(llama):
    with pytest.raises(ActsparseError, match="multiple of 48"):
        sparsify_(llama, SparsityConfig(pattern="24:48"))
    assert not any(isinstance(m, SparseLinear) for m in llama.modules())


def test_model_without_roles_is_refused():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.mixer = nn.Linear(8, 8)

    class Weird(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList([Block(), Block()])

    with pytest.raises(ActsparseError, match="recognisable role.*mixer"):
        sparsify_(Weird(), SparsityConfig())
    with pytest.raises(ActsparseError, match="decoder layers"):
        sparsify_(nn.Sequential(nn.Linear(4, 4)), SparsityConfig())


def test_clact_and_static_smooth_need_and_use_calibration_stats(family_model):
    _, model = family_model
    with pytest.raises(ActsparseError, match="calibration"):
        sparsify_(model, SparsityConfig(pattern="2:4", criterion="clact"))
    calib = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(5))
    stats = collect_input_stats(model, calib, progress=False)
    assert all(s.tokens == 32 for s in stats.values())
    sparsify_(model, SparsityConfig(pattern="2:4", criterion="clact", mitigation="smooth-static"), stats=stats)
    out = logits(model)
    assert torch.isfinite(out).all()


def test_same_config_same_logits(family_model):
    family, model = family_model
    cfg = SparsityConfig(pattern="unstructured:0.5", criterion="random", mitigation="dpts", seed=7)
    sparsify_(model, cfg)
    first = logits(model)
    unsparsify_(model)
    sparsify_(model, cfg)
    assert torch.equal(logits(model), first)


def test_config_resolves_its_names_once_and_serialises_only_them():
    import pickle

    from actsparse.baselines import WeightPruneConfig
    from actsparse.core.mitigation import get_mitigation
    from actsparse.core.patterns import NM
    from actsparse.core.scoring import get_criterion

    config = SparsityConfig(pattern="8:16", criterion="amber", mitigation="var")
    assert config.pattern_obj == NM(8, 16) and config.pattern_obj is config.pattern_obj
    assert config.criterion_obj is get_criterion("amber") and config.mitigation_obj is get_mitigation("var")
    assert config.to_dict() == SparsityConfig(pattern="8:16", criterion="amber", mitigation="var").to_dict()
    assert config.to_dict()["pattern"] == "8:16" and "pattern_obj" not in config.to_dict()
    again = pickle.loads(pickle.dumps(config))
    assert again == config and "pattern_obj" not in vars(again) and again.pattern_obj == NM(8, 16)
    assert WeightPruneConfig(pattern="2:4").pattern_obj == NM(2, 4)
