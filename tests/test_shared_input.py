"""Layers that read one input (q/k/v, gate/up) select once: same results, fewer launches."""

import pytest
import torch

pytest.importorskip("triton")

import actsparse.kernels.gemv_weight as gemv_weight_kernels  # noqa: E402
import actsparse.kernels.sparsify as sparsify_kernels  # noqa: E402
from actsparse import SparsityConfig, sparsify_, unsparsify_  # noqa: E402
from actsparse.core import dispatch  # noqa: E402
from actsparse.core.dispatch import DecodeChoice  # noqa: E402
from actsparse.core.shared_input import link_shared_input, selection_key  # noqa: E402
from actsparse.core.sparse_linear import SparseLinear  # noqa: E402
from conftest import VOCAB, tiny_model  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _ids(length: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (1, length), generator=torch.Generator().manual_seed(length)).to(DEVICE)


def _logits(model, length: int) -> torch.Tensor:
    with torch.no_grad():
        return model(_ids(length)).logits.float()


def _groups(model):
    groups = {id(m.shared_input): m.shared_input for m in model.modules() if isinstance(m, SparseLinear) and m.shared_input}
    return list(groups.values())


def test_sparsify_links_q_k_v_and_gate_up_of_each_block_and_unsparsify_unlinks():
    model = tiny_model("llama").to(DEVICE)
    sparsify_(model, SparsityConfig(pattern="8:16", backend="triton"))
    groups = _groups(model)
    names = {layer: name for name, layer in model.named_modules() if isinstance(layer, SparseLinear)}
    members = sorted(tuple(names[layer].split(".")[-1] for layer in g.layers) for g in groups)
    assert members == [("gate_proj", "up_proj")] * 2 + [("q_proj", "k_proj", "v_proj")] * 2
    assert all(len({names[layer].rsplit(".", 1)[0] for layer in g.layers}) == 1 for g in groups)  # one block each
    qkv = next(g for g in groups if len(g.layers) == 3)
    assert qkv.out_features == sum(layer.out_features for layer in qkv.layers) == 64 + 32 + 32
    layers = list(names)
    unsparsify_(model)
    assert all(layer.shared_input is None for layer in layers)


@pytest.mark.parametrize(
    "config",
    [
        dict(criterion="amber"),  # a score vector per layer: each keeps its own features
        dict(backend="torch"),  # the reference computes each layer alone
        dict(pattern="dense"),
    ],
)
def test_layers_that_keep_their_own_features_are_not_linked(config):
    model = tiny_model("llama")
    sparsify_(model, SparsityConfig(**{"pattern": "8:16", **config}))
    assert _groups(model) == []


def test_per_layer_patterns_link_only_the_layers_that_share_one():
    model = tiny_model("llama")
    patterns = {"q@0": "4:16", "k@0": "8:16", "v@0": "8:16"}
    sparsify_(model, SparsityConfig(pattern="8:16", allocation=patterns, backend="triton"))
    attention = model.model.layers[0].self_attn
    assert attention.q_proj.shared_input is None
    assert attention.k_proj.shared_input is attention.v_proj.shared_input is not None
    assert selection_key(attention.q_proj) != selection_key(attention.k_proj)


@pytest.mark.parametrize(
    "pattern, mitigation", [("2:4", "none"), ("8:16", "var"), ("4:8", "dpts")]
)  # fmt: skip
@pytest.mark.parametrize("length", [2, 24])  # 2 rows: the GEMV over the side-by-side weights; 24: one sparsify pass
def test_linked_layers_give_each_layers_own_result(pattern, mitigation, length, monkeypatch):
    monkeypatch.setattr(DecodeChoice, "default", staticmethod(lambda k, o, rows, n, m: "gemv" if rows <= 2 else None))
    model = tiny_model("llama").to(DEVICE)
    results = {}
    for backend in ("torch", "triton"):
        sparsify_(model, SparsityConfig(pattern=pattern, mitigation=mitigation, backend=backend))
        results[backend] = _logits(model, length)
        if backend == "triton":
            assert len(_groups(model)) == 4
            for group in _groups(model):  # alone, each member gives what it gives in the group
                x = torch.randn(length, group.in_features, generator=torch.Generator().manual_seed(1)).to(DEVICE)
                together = dispatch.shared_outputs(group, x)
                for layer, out in zip(group.layers, together):
                    alone = layer.mitigation.apply(layer, x)
                    assert out.shape == alone.shape
                    assert torch.allclose(out.float(), alone.float(), atol=1e-5, rtol=1e-5)
        unsparsify_(model)
    assert torch.allclose(results["triton"], results["torch"], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("length", [1, 24])  # 1 row: the decode GEMV; 24 rows: the sparsify pass
def test_one_selection_per_shared_input(length, monkeypatch):
    """Per block: q/k/v one launch, o one, gate/up one, down one (instead of seven)."""
    monkeypatch.setattr(DecodeChoice, "default", staticmethod(lambda k, o, rows, n, m: "gemv" if rows <= 2 else None))
    model = tiny_model("llama").to(DEVICE)
    sparsify_(model, SparsityConfig(pattern="8:16", backend="triton"))
    calls = []
    if length == 1:
        real = gemv_weight_kernels.sparse_gemv_auto
        monkeypatch.setattr(gemv_weight_kernels, "sparse_gemv_auto", lambda *a: calls.append(1) or real(*a))
    else:
        real = sparsify_kernels.nm_sparsify_auto
        monkeypatch.setattr(dispatch._DirectOps, "nm_sparsify", staticmethod(lambda *a: calls.append(1) or real(*a)))
    linked = _logits(model, length)
    assert len(calls) == 4 * len(model.model.layers)
    for layer in model.modules():
        if isinstance(layer, SparseLinear):
            layer.shared_input = None
    calls.clear()
    alone = _logits(model, length)
    assert len(calls) == 7 * len(model.model.layers)
    assert torch.allclose(linked, alone, atol=1e-5, rtol=1e-5)


def _linked_pair():
    torch.manual_seed(0)
    config = SparsityConfig(pattern="2:4", backend="triton")
    layers = [
        SparseLinear(torch.nn.Linear(16, out), config.pattern_obj, config.criterion_obj, config.mitigation_obj, backend="triton")
        for out in (8, 4)
    ]
    layers = [layer.to(DEVICE) for layer in layers]
    (group,) = link_shared_input(layers)
    return layers, group


def test_a_member_called_with_another_input_does_not_take_the_kept_output():
    (a, b), group = _linked_pair()
    x, other = torch.randn(3, 16, device=DEVICE), torch.randn(3, 16, device=DEVICE)
    with torch.no_grad():
        assert torch.allclose(a(x), a.mitigation.apply(a, x), atol=1e-6)
        kept = group._pending[1]
        yb = b(other)  # a different tensor: computed from it, and now the kept outputs are other's
        assert torch.allclose(yb, b.mitigation.apply(b, other), atol=1e-6)
        assert not torch.allclose(yb, kept)
        assert group.take(a, x) is None
        assert torch.allclose(a(other), a.mitigation.apply(a, other), atol=1e-6)


def test_an_input_changed_in_place_is_not_served_from_the_kept_outputs():
    (a, b), group = _linked_pair()
    x = torch.randn(3, 16, device=DEVICE)
    with torch.no_grad():
        a(x)
        x.mul_(-2.0)  # bumps the version counter
        assert group.take(b, x) is None
        assert torch.allclose(b(x), b.mitigation.apply(b, x), atol=1e-6)


def test_kept_outputs_are_taken_once_and_then_released():
    (a, b), group = _linked_pair()
    x = torch.randn(2, 16, device=DEVICE)
    with torch.no_grad():
        a(x)
        assert group.take(b, x) is not None
        assert group.take(b, x) is None and group._source is None  # nothing kept alive


def test_offloaded_layers_are_not_linked():
    """accelerate's hooks load one layer's weight at a time: a group could not read its members'."""
    config = SparsityConfig(pattern="2:4", backend="triton")
    layers = [
        SparseLinear(torch.nn.Linear(16, out, device="meta"), config.pattern_obj, config.criterion_obj,
                     config.mitigation_obj, backend="triton")
        for out in (8, 4)
    ]  # fmt: skip
    assert link_shared_input(layers) == [] and all(layer.shared_input is None for layer in layers)


def test_a_score_vector_set_after_linking_turns_sharing_off():
    (a, b), group = _linked_pair()
    assert group.active()
    b.feature_vector = torch.rand(16, device=DEVICE)
    assert not group.active()


@pytest.mark.parametrize(
    "rows, op, kernel", [(1, "sparse_gemv", "gemv"), (1, "sparse_gemv_one", "gemv_one"), (5, "nm_sparsify", None)]
)
def test_linked_layers_trace_into_one_graph_with_one_selection_per_group(rows, op, kernel, monkeypatch):
    """torch.compile(fullgraph=True) traces the shared path: 4 kernel calls per block, no graph
    break, no recompilation for new inputs of the same shape, the eager result."""
    from torch._dynamo.utils import counters

    monkeypatch.setattr(DecodeChoice, "default", staticmethod(lambda k, o, r, n, m: kernel if r == 1 else None))
    model = tiny_model("llama").to(DEVICE)
    sparsify_(model, SparsityConfig(pattern="8:16", backend="triton"))
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend=backend)
    try:
        with torch.no_grad():
            eager = model(_ids(rows)).logits  # makes the side-by-side weights and workspaces first
            traced = compiled(_ids(rows)).logits
            unique = counters["stats"]["unique_graphs"]
            for seed in range(2):
                fresh = torch.randint(0, VOCAB, (1, rows), generator=torch.Generator().manual_seed(seed + 50)).to(DEVICE)
                torch.testing.assert_close(compiled(fresh).logits, model(fresh).logits, atol=1e-5, rtol=1e-5)
        assert counters["stats"]["unique_graphs"] == unique  # no recompilation
    finally:
        torch._dynamo.reset()  # later tests compile the same code objects: leave them the whole recompile budget
    assert len(graphs) == 1
    targets = (getattr(torch.ops.actsparse, op), getattr(torch.ops.actsparse, op).default)
    assert sum(node.target in targets for node in graphs[0].graph.nodes) == 4 * len(model.model.layers)
    torch.testing.assert_close(traced, eager, atol=1e-5, rtol=1e-5)
