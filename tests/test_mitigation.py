import pytest
import torch
import torch.nn.functional as F

from actsparse import MITIGATIONS, NM, ActsparseError, InputStats, Unstructured
from actsparse.core.masks import keep_mask
from actsparse.core.mitigation import get_mitigation
from actsparse.core.scoring import get_criterion
from actsparse.core.sparse_linear import SparseLinear


def make(mitigation, pattern=NM(2, 4), stats=None):
    torch.manual_seed(2)
    linear = torch.nn.Linear(32, 12)
    return linear, SparseLinear(linear, pattern, get_criterion("magnitude"), get_mitigation(mitigation), stats=stats)


def pruned(x, pattern=NM(2, 4)):
    return x * keep_mask(x.abs(), pattern)


def test_none_is_the_plain_pruned_product():
    linear, layer = make("none")
    x = torch.randn(7, 32)
    assert torch.equal(layer(x), F.linear(pruned(x), linear.weight, linear.bias))


def test_var_rescales_each_token_to_the_dense_variance():
    linear, layer = make("var")
    x = torch.randn(7, 32) + 0.3
    p = pruned(x)
    v = (x.var(dim=1, unbiased=True) / p.var(dim=1, unbiased=True)).sqrt()
    expected = F.linear(p * v[:, None], linear.weight, linear.bias)
    assert torch.allclose(layer(x), expected, atol=1e-5)


def test_dpts_hardware_form_equals_shifted_pruning():
    linear, layer = make("dpts")
    x = torch.randn(5, 32) + 1.0
    eta = x.sort(dim=1).values[:, 15:16]  # lower median of 32 values
    expected = F.linear(pruned(x - eta) + eta, linear.weight, linear.bias)
    assert torch.allclose(layer(x), expected, atol=1e-5)
    assert torch.allclose(layer.weight_row_sum, linear.weight.sum(1))


def test_smooth_selects_on_x_over_s_and_multiplies_w_diag_s():
    linear, layer = make("smooth")
    x = torch.randn(6, 32) * torch.linspace(0.1, 5, 32)
    s = (x.abs().amax(0) / linear.weight.abs().amax(0)).sqrt()
    expected = F.linear(pruned(x / s), linear.weight * s, linear.bias)
    assert torch.allclose(layer(x), expected, atol=1e-5)


def test_static_smooth_uses_calibration_maxima():
    calib = torch.randn(50, 32) * 3
    stats = InputStats(32)
    stats.update(calib)
    linear, layer = make("smooth-static", stats=stats)
    s = (calib.abs().amax(0) / linear.weight.abs().amax(0)).sqrt()
    x = torch.randn(4, 32)
    expected = F.linear(pruned(x / s), linear.weight * s, linear.bias)
    assert torch.allclose(layer(x), expected, atol=1e-5)
    with pytest.raises(ActsparseError, match="calibration"):
        make("smooth-static")


@pytest.mark.parametrize("name", sorted(n for n, m in MITIGATIONS.items() if not m.needs_calibration))
def test_every_mitigation_runs_on_unstructured_and_keeps_shape(name):
    _, layer = make(name, Unstructured(0.7))
    x = torch.randn(2, 3, 32)
    assert layer(x).shape == (2, 3, 12)


def test_unknown_mitigation_lists_the_known_ones():
    with pytest.raises(ActsparseError, match="var"):
        get_mitigation("nope")
