"""Numerical edge cases of the masks and the sparse layer: NaN/Inf activations, all-zero groups, one
token, padding under an attention mask, and low-precision dtypes against the float32 reference."""

import math

import pytest
import torch

from actsparse import SparsityConfig, sparsify_, unsparsify_
from actsparse.core.masks import keep_mask, reference_keep_mask
from actsparse.core.mitigation import get_mitigation
from actsparse.core.patterns import parse_pattern
from actsparse.core.scoring import get_criterion
from actsparse.core.sparse_linear import SparseLinear
from conftest import VOCAB, tiny_model

NAN, INF = float("nan"), float("inf")
PATTERNS = ["2:4", "1:4", "8:16", "3:8", "unstructured:0.5"]


def _kept_per_group(mask: torch.Tensor, pattern) -> torch.Tensor:
    p = parse_pattern(pattern)
    width = mask.shape[-1]
    m = getattr(p, "m", width)
    return mask.reshape(-1, width // m, m).sum(-1)


def _expected(pattern, width):
    p = parse_pattern(pattern)
    return getattr(p, "n", None) or p.kept(width)


def _nan_first_reference(row: list[float], pattern: str) -> list[bool]:
    """The documented order: NaN above every number (+inf included), then largest first, ties to the lower index."""
    p = parse_pattern(pattern)
    width = len(row)
    m, keep = (p.m, p.n) if hasattr(p, "m") else (width, p.kept(width))
    mask = [False] * width
    for start in range(0, width, m):
        order = sorted(range(start, start + m), key=lambda i: (not math.isnan(row[i]), 0.0 if math.isnan(row[i]) else -row[i], i))
        for index in order[:keep]:
            mask[index] = True
    return mask


def _special_rows(width: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    rows = torch.randn(6, width, generator=g)
    rows[0] = 0.0  # all zero
    rows[1, ::3] = NAN  # NaN in most groups
    rows[2, ::2] = INF
    rows[2, 1::4] = -INF
    rows[3, :] = NAN  # every entry NaN
    rows[4, :8] = torch.tensor([NAN, 1.0, INF, -INF, 0.0, NAN, NAN, NAN])
    rows[5] = 1.0  # all tied
    return rows


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_masks_are_exactly_n_of_m_whatever_the_values(pattern, dtype):
    rows = _special_rows(32).to(dtype)
    scores = rows.float().abs()
    mask = keep_mask(scores, parse_pattern(pattern))
    assert (_kept_per_group(mask, pattern) == _expected(pattern, 32)).all()
    for row, got in zip(scores.tolist(), mask.tolist()):
        if not any(math.isnan(v) for v in row):
            assert got == reference_keep_mask(row, parse_pattern(pattern))
        assert got == _nan_first_reference(row, pattern)
    one = keep_mask(scores[:1], parse_pattern(pattern))  # T = 1: a single token row
    assert one.shape == (1, 32) and (_kept_per_group(one, pattern) == _expected(pattern, 32)).all()


def test_nan_ranks_above_every_number_so_it_is_never_dropped_for_a_number():
    scores = torch.tensor([[NAN, 1.0, INF, 2.0, 0.0, 0.0, NAN, 0.0]])
    mask = keep_mask(scores, parse_pattern("2:4"))[0].tolist()
    assert mask[0] and mask[2] and mask[6]  # NaN first, then +inf, then the largest
    assert sum(mask[:4]) == 2 and sum(mask[4:]) == 2


def _layer(criterion="magnitude", mitigation="none", pattern="2:4", dtype=torch.float32):
    torch.manual_seed(0)
    linear = torch.nn.Linear(32, 8).to(dtype)
    return SparseLinear(linear, parse_pattern(pattern), get_criterion(criterion), get_mitigation(mitigation), backend="torch")


@pytest.mark.parametrize(
    "criterion,mitigation", [("magnitude", "none"), ("amber", "var"), ("wina", "dpts"), ("magnitude", "var")]
)
def test_a_nan_input_makes_its_token_nan_and_leaves_the_others_alone(criterion, mitigation):
    layer = _layer(criterion, mitigation)
    x = torch.randn(4, 32, generator=torch.Generator().manual_seed(1))
    clean = layer(x)
    x_nan = x.clone()
    x_nan[1, 5] = NAN
    x_nan[1, 6] = NAN  # two NaNs in one 2:4 group ...
    x_nan[1, 7] = NAN  # ... and a third: one of them is pruned, two are kept
    out = layer(x_nan)
    assert torch.isnan(out[1]).all()  # never silently dropped: the token's outputs are NaN, as dense ones would be
    torch.testing.assert_close(out[[0, 2, 3]], clean[[0, 2, 3]], atol=0, rtol=0)  # causal: other tokens unchanged
    assert torch.isfinite(out[[0, 2, 3]]).all()


def test_all_zero_and_single_token_inputs_are_finite_and_exact():
    layer = _layer("amber", "var")
    zeros = torch.zeros(1, 1, 32)  # T = 1, all-zero groups: VAR's variance ratio stays finite
    out = layer(zeros)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, layer.product(zeros), atol=1e-6, rtol=0)  # zero input: only the bias remains
    x = torch.randn(1, 1, 32, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(layer(x)[0], layer(x[0]), atol=0, rtol=0)  # shape [1, 1, K] and [1, K] agree


@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 2e-2), (torch.float16, 2e-3)])
@pytest.mark.parametrize("criterion,mitigation", [("magnitude", "none"), ("amber", "var"), ("wina", "dpts")])
def test_low_precision_matches_the_float32_reference_within_dtype_tolerance(dtype, tol, criterion, mitigation):
    low = _layer(criterion, mitigation, dtype=dtype)
    ref = _layer(criterion, mitigation, dtype=torch.float32)
    with torch.no_grad():
        ref.weight.copy_(low.weight.float())
        ref.bias.copy_(low.bias.float())
    ref = SparseLinear(ref.original, ref.pattern, ref.criterion, ref.mitigation, backend="torch")
    x = torch.randn(64, 32, generator=torch.Generator().manual_seed(4)).to(dtype)
    assert torch.equal(low.keep(x), ref.keep(x.float()))  # scores are float32 in both: the same mask
    got, want = low(x).float(), ref(x.float())
    torch.testing.assert_close(got, want, atol=tol * want.abs().max().item(), rtol=tol)


@pytest.mark.parametrize("config", [SparsityConfig(pattern="2:4", criterion="amber", mitigation="var"),
                                    SparsityConfig(pattern="8:16", criterion="magnitude", mitigation="dpts")])  # fmt: skip
@pytest.mark.parametrize("side", ["right", "left"])
def test_padding_under_an_attention_mask_leaves_the_real_tokens_unchanged(config, side):
    model = tiny_model("llama")
    sparsify_(model, config)
    g = torch.Generator().manual_seed(5)
    long, short = torch.randint(3, VOCAB, (1, 12), generator=g), torch.randint(3, VOCAB, (1, 7), generator=g)
    pad = torch.zeros(1, 5, dtype=torch.long)
    ones, zeros = torch.ones(1, 7, dtype=torch.long), torch.zeros(1, 5, dtype=torch.long)
    padded = torch.cat([short, pad], 1) if side == "right" else torch.cat([pad, short], 1)
    mask = torch.cat([ones, zeros], 1) if side == "right" else torch.cat([zeros, ones], 1)
    with torch.no_grad():
        batch = model(torch.cat([long, padded]), attention_mask=torch.cat([torch.ones(1, 12, dtype=torch.long), mask])).logits
        alone_long, alone_short = model(long).logits, model(short).logits
    real = batch[1, :7] if side == "right" else batch[1, 5:]
    if side == "left":  # left padding shifts positions: give the same positions to compare
        position_ids = torch.arange(7).unsqueeze(0)
        with torch.no_grad():
            real = model(
                padded, attention_mask=mask, position_ids=torch.cat([torch.zeros(1, 5, dtype=torch.long), position_ids], 1)
            ).logits[0, 5:]
    torch.testing.assert_close(batch[0], alone_long[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(real, alone_short[0], atol=1e-5, rtol=1e-5)
    assert torch.isfinite(batch).all()  # padded positions never turn into NaN
    unsparsify_(model)


@pytest.mark.parametrize("mitigation", ["none", "var"])
def test_the_triton_kernel_treats_nan_and_inf_as_the_reference_does(mitigation):
    from actsparse.core.dispatch import runs_here

    torch.manual_seed(0)
    linear = torch.nn.Linear(32, 8)
    x = _special_rows(32)[[1, 2, 4]]
    x = torch.cat([x, torch.randn(2, 32, generator=torch.Generator().manual_seed(6))])
    triton = SparseLinear(linear, parse_pattern("2:4"), get_criterion("magnitude"), get_mitigation(mitigation), backend="triton")
    if triton.backend != "triton" or not runs_here(x, True):
        pytest.skip("no Triton kernel for this config here")
    reference = SparseLinear(
        linear, parse_pattern("2:4"), get_criterion("magnitude"), get_mitigation(mitigation), backend="torch"
    )
    with torch.no_grad():
        torch.testing.assert_close(triton(x), reference(x), equal_nan=True, atol=1e-5, rtol=1e-5)
