import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from actsparse import NM, Dense, Unstructured
from actsparse.core.masks import keep_mask, reference_keep_mask

# Scores from a small set of values so that ties are frequent.
tied_scores = st.lists(st.sampled_from([0.0, 0.5, 1.0, 1.5, -1.0]), min_size=1, max_size=8)


@st.composite
def nm_case(draw):
    m = draw(st.integers(2, 40))
    n = draw(st.integers(1, m - 1))
    groups = draw(st.integers(1, 4))
    rows = draw(st.integers(1, 3))
    values = draw(st.lists(st.sampled_from([0.0, 0.25, 1.0, 2.0, 3.5]), min_size=rows * groups * m, max_size=rows * groups * m))
    return NM(n, m), torch.tensor(values).reshape(rows, groups * m)


@settings(max_examples=200, deadline=None)
@given(nm_case())
def test_nm_mask_keeps_exactly_n_per_group_and_matches_reference(case):
    pattern, scores = case
    mask = keep_mask(scores, pattern)
    per_group = mask.reshape(scores.shape[0], -1, pattern.m).sum(-1)
    assert bool((per_group == pattern.n).all())
    for row in range(scores.shape[0]):
        assert mask[row].tolist() == reference_keep_mask(scores[row].tolist(), pattern)


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 70), st.sampled_from([0.0, 0.3, 0.5, 0.7, 0.9]), st.data())
def test_unstructured_keeps_round_k_times_density_and_matches_reference(width, sparsity, data):
    values = data.draw(st.lists(st.sampled_from([0.0, 1.0, 2.0, -3.0]), min_size=2 * width, max_size=2 * width))
    scores = torch.tensor(values).reshape(2, width)
    pattern = Unstructured(sparsity)
    mask = keep_mask(scores, pattern)
    assert mask.sum(-1).tolist() == [round(width * (1 - sparsity))] * 2
    for row in range(2):
        assert mask[row].tolist() == reference_keep_mask(scores[row].tolist(), pattern)


def test_ties_go_to_the_lower_index():
    scores = torch.ones(1, 8)
    assert keep_mask(scores, NM(2, 4)).int().tolist() == [[1, 1, 0, 0, 1, 1, 0, 0]]
    scores = torch.tensor([[1.0, 2.0, 2.0, 2.0]])
    assert keep_mask(scores, NM(2, 4)).int().tolist() == [[0, 1, 1, 0]]


def test_largest_scores_win_in_each_group_for_any_leading_shape():
    scores = torch.tensor([[[0.1, 0.9, 0.5, 0.7], [4.0, 3.0, 2.0, 1.0]]])
    mask = keep_mask(scores, NM(2, 4))
    assert mask.shape == scores.shape
    assert mask.int().tolist() == [[[0, 1, 0, 1], [1, 1, 0, 0]]]


def test_dense_keeps_everything():
    assert bool(keep_mask(torch.randn(3, 5), Dense()).all())
