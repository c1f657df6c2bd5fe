import pytest
import torch

from actsparse import CRITERIA, NM, ActsparseError, InputStats, SparsityConfig
from actsparse.core.masks import keep_mask
from actsparse.core.mitigation import get_mitigation
from actsparse.core.scoring import amber_vector, get_criterion, quantile
from actsparse.core.sparse_linear import SparseLinear


def layer_with(criterion, width=16, out=8, stats=None, seed=0):
    torch.manual_seed(1)
    linear = torch.nn.Linear(width, out)
    return SparseLinear(linear, NM(2, 4), get_criterion(criterion), get_mitigation("none"), stats=stats, seed=seed)


def test_quantile_matches_torch():
    values = torch.randn(1001)
    for q in (0.0, 0.005, 0.3, 0.995, 1.0):
        assert torch.allclose(quantile(values, q), torch.quantile(values, q))


def test_amber_vector_is_the_spec_formula():
    w = torch.randn(32, 24)
    w[0, 0] = 40.0  # an outlier: excluded from mu/sigma, still normalised
    lo, hi = torch.quantile(w.flatten(), 0.005), torch.quantile(w.flatten(), 0.995)
    inside = w[(w >= lo) & (w <= hi)]
    z = (w - inside.mean()) / inside.std(unbiased=False)
    norms = z.norm(dim=0)
    assert torch.allclose(amber_vector(w), norms / norms.min(), rtol=1e-5)
    assert amber_vector(w).min().item() == pytest.approx(1.0)
    clamped = amber_vector(w, clamp=True)
    assert clamped[0] < amber_vector(w)[0]


@pytest.mark.parametrize(
    "name, expected",
    [
        ("magnitude", lambda x, w: x.abs()),
        ("wina", lambda x, w: x.abs() * w.norm(dim=0)),
        ("var-weight", lambda x, w: x.abs() * w.var(dim=0, unbiased=False)),
        ("clact-batch", lambda x, w: x.abs() * x.norm(dim=0)),
    ],
)
def test_scores_follow_the_formulas(name, expected):
    layer = layer_with(name)
    x = torch.randn(5, 16)
    scores = layer.criterion.score(x, layer.feature_vector, None)
    assert torch.allclose(scores, expected(x, layer.weight.detach()), rtol=1e-5)


def test_clact_uses_calibration_norms_and_is_causal():
    calib = torch.randn(100, 16)
    stats = InputStats(16)
    stats.update(calib[:60])
    stats.update(calib[60:])
    layer = layer_with("clact", stats=stats)
    assert torch.allclose(layer.feature_vector, calib.norm(dim=0), rtol=1e-5)
    x = torch.randn(6, 16)
    full_formula = x.abs() * calib.norm(dim=0) / x.norm(dim=1, keepdim=True)
    assert torch.equal(layer.keep(x), keep_mask(full_formula, NM(2, 4)))
    # causal: a token's mask does not depend on the other tokens in the batch
    assert torch.equal(layer.keep(x)[:1], layer.keep(x[:1]))
    assert get_criterion("clact").causal and not get_criterion("clact-batch").causal


def test_clact_without_statistics_is_refused():
    with pytest.raises(ActsparseError, match="calibration"):
        layer_with("clact")


def test_random_is_reproducible_by_seed():
    x = torch.randn(4, 16)
    a, b, c = layer_with("random", seed=3), layer_with("random", seed=3), layer_with("random", seed=4)
    assert torch.equal(a.keep(x), b.keep(x))
    assert not torch.equal(a.keep(x), c.keep(x))


def test_weight_vectors_are_computed_once():
    layer = layer_with("amber")
    before = layer.feature_vector.clone()
    layer(torch.randn(3, 16))
    with torch.no_grad():
        layer.weight.mul_(2.0)
    layer(torch.randn(3, 16))
    assert torch.equal(layer.feature_vector, before)


def test_unknown_criterion_lists_the_known_ones():
    with pytest.raises(ActsparseError, match="magnitude"):
        SparsityConfig(criterion="bogus")
    assert {"magnitude", "wina", "amber", "clact", "clact-batch", "var-weight", "random"} <= set(CRITERIA)
