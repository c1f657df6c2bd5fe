import pytest
from hypothesis import given
from hypothesis import strategies as st

from actsparse import NM, ActsparseError, Dense, Unstructured, parse_pattern
from actsparse.core.patterns import pattern_table


@given(st.integers(1, 64).flatmap(lambda m: st.tuples(st.integers(1, m - 1) if m > 1 else st.nothing(), st.just(m))))
def test_any_valid_nm_parses_and_round_trips(nm):
    n, m = nm
    pattern = parse_pattern(f"{n}:{m}")
    assert pattern == NM(n, m)
    assert parse_pattern(str(pattern)) == pattern
    assert pattern.density == n / m


@given(st.integers(1, 64), st.integers(0, 64))
def test_n_not_below_m_is_refused(m, extra):
    with pytest.raises(ActsparseError, match="1 <= N < M"):
        parse_pattern(f"{m + extra}:{m}")


@pytest.mark.parametrize(
    "text", ["", "2-4", "2:4:8", "0:4", "a:b", "unstructured:1.0", "unstructured:-0.1", "unstructured:x", "sparse", "4:4"]
)
def test_bad_patterns_are_refused_with_the_valid_forms(text):
    with pytest.raises(ActsparseError, match="N:M"):
        parse_pattern(text)


def test_other_forms():
    assert parse_pattern("dense") == Dense()
    assert parse_pattern(" 2 : 4 ") == NM(2, 4)
    assert parse_pattern("unstructured:0.7") == Unstructured(0.7)
    assert str(Unstructured(0.5)) == "unstructured:0.5"
    assert Unstructured(0.7).kept(1536) == round(1536 * 0.3)
    assert NM(2, 4).kept(1536) == 768


@pytest.mark.parametrize(
    "text, index_bits, optimal_bits", [("2:4", 4, 3), ("8:16", 32, 14), ("16:32", 80, 30), ("4:8", 12, 7), ("1:4", 2, 2)]
)
def test_metadata_cost(text, index_bits, optimal_bits):
    pattern = parse_pattern(text)
    assert pattern.index_bits() == index_bits
    assert pattern.optimal_bits() == optimal_bits


def test_width_check_names_the_fix():
    NM(8, 16).check_width(64)
    with pytest.raises(ActsparseError, match="multiple of 16.*584"):
        NM(8, 16).check_width(576 + 8)


def test_pattern_table_rows():
    rows = {row["pattern"]: row for row in pattern_table()}
    assert rows["2:4"]["optimal_bits_per_group"] == 3
    assert rows["unstructured:0.7"]["density"] == pytest.approx(0.3)
    assert "index_bits_per_group" not in rows["unstructured:0.5"]


# ---- what each pattern answers for itself ---------------------------------------------------------


PATTERNS = [Dense(), NM(2, 4), NM(8, 16), Unstructured(0.5), Unstructured(0.0)]


@pytest.mark.parametrize("pattern", PATTERNS, ids=str)
def test_the_mask_keeps_what_the_pattern_says(pattern):
    import torch

    scores = torch.randn(3, 32, generator=torch.Generator().manual_seed(0))
    mask = pattern.mask(scores)
    assert mask.shape == scores.shape and mask.dtype == torch.bool
    assert mask.sum(-1).tolist() == [pattern.kept(32)] * 3
    groups = mask.reshape(3, -1, pattern.group_width(32)).sum(-1)
    assert (groups == pattern.kept_per_group(32)).all()
    assert pattern.is_dense == (pattern == Dense())


def test_width_checks_name_the_fix():
    assert NM(8, 16).fits(64) and not NM(8, 16).fits(72) and Unstructured(0.5).fits(7) and Dense().fits(7)
    with pytest.raises(ActsparseError, match=r"multiple of 16, but model.layers.0.mlp.down_proj \(role down\) has 72"):
        NM(8, 16).check_width(72, layer="model.layers.0.mlp.down_proj", role="down", widths=[72])
    Unstructured(0.5).check_width(7)
    Dense().check_width(7, layer="x", role="q")


def test_kernel_form_order_and_metadata():
    assert NM(8, 16).nm == (8, 16) and Dense().nm is None and Unstructured(0.5).nm is None
    assert NM(8, 16).group == 16 and Dense().group is None and Unstructured(0.5).group is None
    names = ["unstructured:0.5", "8:16", "dense", "2:4", "unstructured:0.25", "1:4"]
    assert [str(p) for p in sorted(map(parse_pattern, names), key=lambda p: p.sort_key)] == [
        "dense", "unstructured:0.25", "2:4", "8:16", "unstructured:0.5", "1:4",
    ]  # fmt: skip
    assert NM(2, 4).metadata_bits() == {"index_bits_per_group": 4, "optimal_bits_per_group": 3, "optimal_bits_per_kept": 1.5}
    assert Dense().metadata_bits() == {} == Unstructured(0.5).metadata_bits()


def test_check_pruned():
    import torch

    weight = torch.tensor([[1.0, 0.0, 2.0, 0.0], [0.0, 3.0, 4.0, 0.0]])
    NM(2, 4).check_pruned(weight, "w")
    Unstructured(0.5).check_pruned(weight, "w")
    Dense().check_pruned(torch.ones(2, 4), "w")
    with pytest.raises(ActsparseError, match="w is not 1:4: row 0, columns 0-3 keep 2"):
        NM(1, 4).check_pruned(weight, "w")
    with pytest.raises(ActsparseError, match="at most 2 allowed"):
        Unstructured(0.75).check_pruned(weight, "w")
