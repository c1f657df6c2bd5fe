import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers.pytorch_utils import Conv1D

from actsparse import NM, ActsparseError, Dense, Unstructured
from actsparse.core.masks import keep_mask
from actsparse.core.mitigation import get_mitigation
from actsparse.core.scoring import get_criterion
from actsparse.core.sparse_linear import SparseLinear


def wrap(module, pattern, criterion="magnitude", mitigation="none"):
    return SparseLinear(module, pattern, get_criterion(criterion), get_mitigation(mitigation))


@pytest.mark.parametrize("mitigation", ["none", "var", "dpts", "smooth"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dense_pattern_is_the_original_layer_exactly(mitigation, dtype):
    linear = torch.nn.Linear(24, 10).to(dtype)
    x = torch.randn(3, 4, 24, dtype=dtype)
    layer = wrap(linear, Dense(), "amber", mitigation)
    assert torch.equal(layer(x), linear(x))
    assert layer(x).dtype == dtype


@settings(max_examples=30, deadline=None)
@given(st.sampled_from([(2, 4), (4, 8), (8, 16), (16, 32), (1, 4), (3, 8)]), st.integers(1, 6), st.booleans())
def test_nm_product_uses_exactly_the_masked_input(nm, tokens, bias):
    n, m = nm
    linear = torch.nn.Linear(64, 8, bias=bias)
    x = torch.randn(tokens, 64)
    seen = {}
    layer = wrap(linear, NM(n, m))
    original = layer.product
    layer.product = lambda inp: seen.setdefault("input", inp) is None or original(inp)
    layer(x)
    kept = seen["input"] != 0
    assert bool((kept.reshape(tokens, -1, m).sum(-1) == n).all())
    layer.product = original
    assert torch.equal(layer(x), F.linear(x * keep_mask(x.abs(), NM(n, m)), linear.weight, linear.bias))


def test_bias_and_parameters_are_shared_not_copied():
    linear = torch.nn.Linear(16, 4)
    layer = wrap(linear, NM(2, 4))
    assert layer.weight is linear.weight and layer.bias is linear.bias
    assert set(layer.state_dict()) == {"weight", "bias"}
    assert layer.original is linear


def test_conv1d_gives_the_same_result_as_the_equivalent_linear():
    conv = Conv1D(8, 16)  # nf=8 outputs, nx=16 inputs; weight [16, 8]
    torch.nn.init.normal_(conv.weight)
    torch.nn.init.normal_(conv.bias)
    linear = torch.nn.Linear(16, 8)
    with torch.no_grad():
        linear.weight.copy_(conv.weight.t())
        linear.bias.copy_(conv.bias)
    x = torch.randn(5, 16)
    for pattern, crit in [(Dense(), "magnitude"), (NM(2, 4), "amber"), (Unstructured(0.5), "wina")]:
        a, b = wrap(conv, pattern, crit, "dpts"), wrap(linear, pattern, crit, "dpts")
        assert a.in_features == 16 and a.out_features == 8
        assert torch.allclose(a(x), b(x), atol=1e-5)


def test_width_not_divisible_by_m_is_refused():
    with pytest.raises(ActsparseError, match="multiple of 16"):
        wrap(torch.nn.Linear(24, 4), NM(8, 16))


def test_bf16_output_dtype_and_exact_counts():
    linear = torch.nn.Linear(32, 8).to(torch.bfloat16)
    x = torch.randn(4, 32, dtype=torch.bfloat16)
    layer = wrap(linear, NM(2, 4), "amber", "var")
    assert layer(x).dtype == torch.bfloat16
    assert bool((layer.prune(x) != 0).reshape(4, 8, 4).sum(-1).eq(2).all())
