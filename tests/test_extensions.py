"""A new method is one definition plus one registry line; what it needs is read from its fields.

Each test here adds a method the library has never heard of, the way a user would, and
checks that the whole path (config, surgery, backend choice, the Triton kernels where its
fields say they express it) takes it without any other change.
"""

import pytest
import torch

from actsparse import CRITERIA, MITIGATIONS, ActsparseError, Criterion, Mitigation, SparsityConfig, sparsify_, unsparsify_
from actsparse.core.dispatch import choose_backend, unsupported_reason
from actsparse.core.mitigation import MEDIAN_SHIFT, plain
from actsparse.core.patterns import NM
from actsparse.core.scoring import ABS_TIMES_VECTOR, scaled_magnitude
from actsparse.core.sparse_linear import SparseLinear
from conftest import VOCAB, tiny_model


@pytest.fixture
def registries():
    """Leave the registries as they were: drop whatever a test added."""
    before = {id(r): (set(r), set(r.factories)) for r in (CRITERIA, MITIGATIONS)}
    yield
    for registry in (CRITERIA, MITIGATIONS):
        names, factories = before[id(registry)]
        for name in set(registry) - names:
            del registry[name]
        for prefix in set(registry.factories) - factories:
            del registry.factories[prefix]


def logits(model, length=6):
    ids = torch.randint(0, VOCAB, (1, length), generator=torch.Generator().manual_seed(length))
    with torch.no_grad():
        return model(ids).logits.float()


def run_both_backends(config_fields):
    """Logits of the tiny model sparsified with the reference and with forced Triton kernels."""
    model = tiny_model("llama")
    out = {}
    for backend in ("torch", "triton"):
        sparsify_(model, SparsityConfig(backend=backend, **config_fields))
        layers = [m for m in model.modules() if isinstance(m, SparseLinear)]
        assert layers and {layer.backend for layer in layers} == {backend}
        out[backend] = logits(model)
        unsparsify_(model)
    return out["torch"], out["triton"]


# ---- a criterion with a kernel path ---------------------------------------------------------


def column_square_sum(weight, stats=None):
    """A new per-feature factor: ``sum_i W_ij^2``."""
    return weight.float().square().sum(dim=0)


def test_a_new_criterion_with_a_kernel_path(registries):
    CRITERIA.add(Criterion("col-energy", scaled_magnitude, column_square_sum, kernel_score=ABS_TIMES_VECTOR))

    assert unsupported_reason(NM(8, 16), "col-energy", "var") in {None, "triton is not installed"}
    pytest.importorskip("triton")
    assert unsupported_reason(NM(8, 16), "col-energy", "var") is None
    reference, fast = run_both_backends({"pattern": "8:16", "criterion": "col-energy", "mitigation": "var"})
    assert torch.allclose(fast, reference, atol=1e-4, rtol=1e-4), (fast - reference).abs().max()


def test_the_backend_reads_the_fields_not_the_names(registries):
    # the same score under a new name but without kernel_score: no kernel, whatever it is called
    CRITERIA.add(Criterion("magnitude-again", scaled_magnitude))
    MITIGATIONS.add(Mitigation("none-again", plain))
    assert choose_backend("auto", NM(2, 4), "magnitude-again", "none") == "torch"
    assert choose_backend("auto", NM(2, 4), "magnitude", "none-again") == "torch"
    assert "criterion 'magnitude-again'" in unsupported_reason(NM(2, 4), "magnitude-again", "none")
    with pytest.raises(ActsparseError, match="backend 'triton' has no kernel for mitigation 'none-again'"):
        SparsityConfig(pattern="2:4", mitigation="none-again", backend="triton")


# ---- a dynamic mitigation with a kernel path ------------------------------------------------


def prepare_weight_sums(layer):
    layer.register_buffer("weight_row_sum", layer.dense_weight().float().sum(dim=1), persistent=False)


def recentre_on_median(layer, x):
    """A median shift written afresh: ``P(x − η) Wᵀ + η (W 1)ᵀ + b`` with η the lower median of x_t."""
    eta = x.float().sort(dim=-1).values[:, (x.shape[-1] - 1) // 2 : (x.shape[-1] - 1) // 2 + 1].to(x.dtype)
    out = layer.product(layer.prune(x - eta))
    return (out.float() + eta.float() * layer.weight_row_sum).to(out.dtype)


def test_a_new_dynamic_mitigation_with_a_kernel_path(registries):
    MITIGATIONS.add(Mitigation("median-recentre", recentre_on_median, prepare_weight_sums, kernel=MEDIAN_SHIFT))

    config = SparsityConfig(pattern="4:8", criterion="wina", mitigation="median-recentre")
    model = tiny_model("llama")
    dense = logits(model)
    sparsify_(model, config)
    sparse = logits(model)
    unsparsify_(model)
    assert not torch.allclose(sparse, dense)  # it did prune
    pytest.importorskip("triton")
    assert unsupported_reason(NM(4, 8), "wina", "median-recentre") is None
    reference, fast = run_both_backends({"pattern": "4:8", "criterion": "wina", "mitigation": "median-recentre"})
    assert torch.allclose(fast, reference, atol=1e-4, rtol=1e-4), (fast - reference).abs().max()
    assert torch.allclose(reference, sparse)


# ---- a parametrised mitigation ---------------------------------------------------------------


def output_gain(option: str):
    """``gain:G``: the plain sparse product times G percent (None: not a name this factory makes)."""
    if not option.isdigit():
        return None
    factor = int(option) / 100
    return Mitigation(f"gain:{option}", lambda layer, x: plain(layer, x) * factor, description=f"output times {factor}")


def test_a_new_parametrised_mitigation_from_a_factory(registries):
    MITIGATIONS.add_factory("gain", output_gain)

    assert "gain:150" not in MITIGATIONS
    config = SparsityConfig(pattern="2:4", mitigation="gain:150")  # no registration step first
    assert MITIGATIONS["gain:150"].name == "gain:150"
    layer_in = torch.nn.Linear(16, 4)
    x = torch.randn(3, 16)
    gained = SparseLinear(layer_in, NM(2, 4), CRITERIA["magnitude"], MITIGATIONS.find(config.mitigation))
    base = SparseLinear(layer_in, NM(2, 4), CRITERIA["magnitude"], MITIGATIONS.find("none"))
    with torch.no_grad():
        assert torch.allclose(gained(x), 1.5 * base(x))
    with pytest.raises(ActsparseError, match="unknown mitigation 'gain:half'"):
        SparsityConfig(mitigation="gain:half")
    with pytest.raises(ActsparseError, match="already registered"):
        MITIGATIONS.add_factory("gain", output_gain)


def test_lowrank_with_any_rank_just_works():
    config = SparsityConfig(pattern="2:4", mitigation="lowrank:24")
    model = tiny_model("llama")
    sparsify_(model, config)
    try:
        layer = model.model.layers[0].mlp.down_proj
        assert layer.mitigation.name == "lowrank:24" and layer.lowrank_u.shape[1] == 24 and layer.lowrank_v.shape[0] == 24
    finally:
        unsparsify_(model)
    with pytest.raises(ActsparseError, match="rank must be >= 1"):
        SparsityConfig(mitigation="lowrank:0")


def test_a_taken_name_is_refused(registries):
    with pytest.raises(ActsparseError, match="criterion 'amber' is already registered"):
        CRITERIA.add(Criterion("amber", scaled_magnitude))
    with pytest.raises(ActsparseError, match="mitigation 'var' is already registered"):
        MITIGATIONS.add(Mitigation("var", plain))
    assert CRITERIA["amber"].kernel_score == ABS_TIMES_VECTOR and MITIGATIONS["var"].apply is not plain
