"""The one-launch decode GEMV against its PyTorch definition (CPU: the Triton interpreter).

On a GPU machine, ``TRITON_INTERPRET=0 pytest tests/test_kernel_sparse_gemv.py`` runs the
compiled kernel on CUDA instead, with larger shapes and the determinism stress test.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported anywhere

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed")

from actsparse.core.masks import keep_mask  # noqa: E402
from actsparse.core.patterns import NM  # noqa: E402
from actsparse.kernels.gemv_weight import GemvWeight  # noqa: E402
from actsparse.kernels.sparse_gemv import (  # noqa: E402
    GemvPlan,
    gemv_plan,
    sm_count,
    sparse_gemv,
    sparse_gemv_reference,
    tile_weight,
    untile_weight,
    workspace_for,
)
from actsparse.kernels.sparsify import triton_available  # noqa: E402

if not triton_available():
    pytest.skip("triton cannot run here: no CUDA and TRITON_INTERPRET is off", allow_module_level=True)

GPU = os.environ.get("TRITON_INTERPRET") != "1"
DEVICE = "cuda" if GPU else "cpu"
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}


def case(rows, k, o, dtype, seed=0, ties=False):
    g = torch.Generator().manual_seed(seed)
    if ties:  # few distinct magnitudes: many exact ties inside groups
        x = torch.randint(-3, 4, (rows, k), generator=g).float()
    else:
        x = torch.randn(rows, k, generator=g)
    weight = torch.randn(o, k, generator=g) / k**0.5
    bias = torch.randn(o, generator=g)
    vector = torch.rand(k, generator=g) + 0.5
    return [t.to(DEVICE) for t in (x.to(dtype), weight.to(dtype), bias.to(dtype), vector)]


def run(x, weight, n, m, plan, **options):
    o, k = weight.shape
    wt = tile_weight(weight, plan.block_o)
    assert torch.equal(untile_weight(wt, o), weight)
    ws = workspace_for(k, o, [plan], x.device)
    out = torch.full((x.shape[0], o), float("nan"), dtype=x.dtype, device=x.device)  # poisoned
    y = sparse_gemv(x, wt, o, n, m, ws, plan, out=out, **options)
    assert int(ws.counters.abs().sum()) == 0, "arrival counters must be back at zero"
    return y, sparse_gemv_reference(x, weight, n, m, **options)


def rel_err(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12))


PLANS = [GemvPlan(32, 16, 16, 4, 1), GemvPlan(64, 32, 32, 4, 2), GemvPlan(16, 64, 16, 2, 1)]


@pytest.mark.parametrize("n, m", [(2, 4), (8, 16), (16, 32), (3, 8), (5, 12)])
@pytest.mark.parametrize("rows", [1, 2, 3, 4])
def test_matches_the_reference_on_every_pattern_and_row_count(n, m, rows):
    k = m * 8
    x, weight, bias, _ = case(rows, k, 80, torch.float32, seed=rows * 100 + m)
    plan = GemvPlan(32, m * 2, 16, 4, 1)  # several chunks, a ragged last column tile
    y, ref = run(x, weight, n, m, plan, bias=bias)
    assert rel_err(y, ref) < 1e-5
    assert torch.isfinite(y).all()  # every output element written


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("option", ["plain", "vector", "var", "shift", "no-bias"])
@pytest.mark.parametrize("plan", PLANS, ids=lambda p: f"o{p.block_o}c{p.chunk}k{p.block_k}")
def test_options_and_dtypes(dtype, option, plan):
    x, weight, bias, vector = case(2, 128, 96, dtype, seed=7)
    options = {"bias": None if option == "no-bias" else bias}
    if option == "vector":
        options["vector"] = vector
    if option == "var":
        options["var"] = True
    if option == "shift":
        options["shift"] = x.float().median(dim=1).values
        options["row_sum"] = weight.float().sum(dim=1)
    y, ref = run(x, weight, 8, 16, plan, **options)
    assert rel_err(y, ref) < TOL[dtype]


def test_ties_go_to_the_lower_index_as_in_the_mask_code():
    """With many equal magnitudes the kept set is exactly keep_mask's (fp32: any other choice shows)."""
    x, weight, _, _ = case(3, 64, 40, torch.float32, seed=3, ties=True)
    plan = GemvPlan(64, 16, 16, 4, 1)
    y, _ = run(x, weight, 2, 4, plan)
    mask = keep_mask(x.abs().float(), NM(2, 4))
    expected = torch.where(mask, x, torch.zeros((), device=x.device)) @ weight.t()
    assert torch.allclose(y, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n, m", [(2, 4), (8, 16), (3, 8)])
@pytest.mark.parametrize("rows", [1, 3, 4])
def test_integer_keys_keep_exactly_what_the_reference_keeps(dtype, n, m, rows):
    """16-bit inputs full of ties, zeros and the largest finite values through an identity weight
    (each output is its own input, kept or not): the keyed ranking keeps exactly the reference's
    inputs, for every token row, with and without the shift."""
    k = m * 16
    g = torch.Generator().manual_seed(rows * 7 + m)
    x = (torch.randint(-3, 4, (rows, k), generator=g) * 0.5).to(dtype)
    x[0, 3], x[-1, 9], x[0, 12] = 0.0, torch.finfo(dtype).max, -torch.finfo(dtype).max
    x = x.to(DEVICE)
    weight = torch.eye(k, dtype=dtype, device=DEVICE)
    for options in ({}, {"shift": torch.full((rows,), 0.5, device=DEVICE), "row_sum": weight.float().sum(1)}):
        for keyed in (False, True):
            y, ref = run(x, weight, n, m, GemvPlan(32, m * 4, 16, 4, 1, keyed), **options)
            assert torch.equal(y, ref), (keyed, options.keys())


@pytest.mark.parametrize("dtype, keyed", [(torch.float32, False), (torch.bfloat16, True)])
def test_nan_is_kept_not_dropped(dtype, keyed):
    """A NaN input counts as the largest score: it is kept, and its outputs are NaN (also by keys)."""
    x, weight, _, _ = case(1, 32, 24, dtype, seed=5)
    x[0, 4:8] = torch.tensor([100.0, 200.0, 300.0, 400.0]).to(dtype)
    y, _ = run(x, weight, 2, 4, GemvPlan(32, 8, 16, 4, 1, keyed))
    assert torch.isfinite(y).all()
    x[0, 4] = float("nan")  # the smallest of its group: kept only because NaN ranks first
    y, _ = run(x, weight, 2, 4, GemvPlan(32, 8, 16, 4, 1, keyed))
    assert torch.isnan(y).all()


def test_all_zero_groups_and_zero_rows():
    x, weight, bias, _ = case(2, 64, 32, torch.float32, seed=9)
    x[0, :16] = 0
    x[1] = 0
    y, ref = run(x, weight, 2, 4, GemvPlan(32, 16, 16, 4, 1), bias=bias)
    assert rel_err(y, ref) < 1e-5
    assert torch.equal(y[1], bias)  # nothing kept but zeros: the bias alone


def test_same_inputs_give_bit_identical_outputs():
    x, weight, bias, vector = case(2, 256, 64, torch.bfloat16, seed=11)
    plan = GemvPlan(32, 32, 16, 4, 1)
    wt = tile_weight(weight, plan.block_o)
    ws = workspace_for(256, 64, [plan], x.device)
    first = sparse_gemv(x, wt, 64, 8, 16, ws, plan, vector=vector, var=True, bias=bias)
    for _ in range(3 if not GPU else 2000):
        again = sparse_gemv(x, wt, 64, 8, 16, ws, plan, vector=vector, var=True, bias=bias)
        assert torch.equal(again, first)


def test_default_plans_and_the_weight_holder_through_the_op():
    x, weight, bias, vector = case(4, 192, 72, torch.float32, seed=13)
    gw = GemvWeight(weight, bias)
    for rows in (1, 2, 4):
        y = gw(x[:rows], 8, 16, vector=vector)
        ref = sparse_gemv_reference(x[:rows], weight, 8, 16, vector=vector, bias=bias)
        assert rel_err(y, ref) < 1e-5
        plan = gw.plan(rows, 16)
        assert plan.chunk % 16 == 0 and plan == gemv_plan(192, 72, 16, rows, sm_count(gw.device))


def test_bad_arguments_are_refused():
    x, weight, _, _ = case(5, 64, 32, torch.float32)
    plan = GemvPlan(32, 16, 16, 4, 1)
    ws = workspace_for(64, 32, [plan], x.device)
    with pytest.raises(ValueError, match="rows"):
        sparse_gemv(x, tile_weight(weight, 32), 32, 2, 4, ws, plan)
    with pytest.raises(ValueError, match="does not divide"):
        sparse_gemv(x[:1, :60], tile_weight(weight[:, :60], 32), 32, 2, 8, ws, plan)
    with pytest.raises(ValueError, match="tile_weight"):
        sparse_gemv(x[:1], tile_weight(weight, 16), 32, 2, 4, ws, plan)
    with pytest.raises(ValueError, match="power of two"):
        gemv_plan(64, 32, 4, 1, 4, chunk=12)


@pytest.mark.skipif(not GPU, reason="large shapes only compiled on the GPU")
@pytest.mark.parametrize("k, o", [(4096, 14336), (14336, 4096), (4096, 4096), (4096, 1024)])
@pytest.mark.parametrize("rows", [1, 2, 4])
def test_llama_shapes_on_the_gpu(k, o, rows):
    x, weight, bias, vector = case(rows, k, o, torch.bfloat16, seed=k + o + rows)
    gw = GemvWeight(weight, bias)
    y = gw(x, 8, 16, vector=vector, var=True)
    ref = sparse_gemv_reference(x, weight, 8, 16, vector=vector, var=True, bias=bias)
    assert rel_err(y, ref) < 1e-2


@pytest.mark.parametrize("groups, chunk_groups", [(24, 32), (40, 32), (48, 16)])
def test_whole_rows_selected_in_sub_chunks(groups, chunk_groups):
    """Chunks of more than 16 groups are selected 16 groups at a time, with one running row count."""
    n, m = 2, 4
    x, weight, bias, vector = case(2, groups * m, 48, torch.float32, seed=groups)
    y, ref = run(x, weight, n, m, GemvPlan(16, chunk_groups * m, 16, 4, 1), bias=bias, vector=vector, var=True)
    assert rel_err(y, ref) < 1e-5


def test_layers_share_one_workspace_that_only_grows():
    from actsparse.kernels import sparse_gemv as sg

    small, big = GemvWeight(torch.randn(32, 64, device=DEVICE)), GemvWeight(torch.randn(96, 256, device=DEVICE))
    x_small, x_big = torch.randn(1, 64, device=DEVICE), torch.randn(1, 256, device=DEVICE)
    first = small(x_small, 2, 4)
    big(x_big, 2, 4)
    shared = sg.shared_workspace(64, 32, [small.plan(1, 4)], torch.device(DEVICE))
    assert shared.partials.numel() >= sg.workspace_sizes(256, 96, big.plan(1, 4))[0]
    assert torch.equal(small(x_small, 2, 4), first)
    assert int(shared.counters.abs().sum()) == 0


def test_the_keyed_decode_kernel_runs_the_keyed_plan():
    """dispatch's gemv_keyed entry (what tune_ may choose) launches the batched kernel with its
    integer-key ranking, and gives the plain entry's bits."""
    from actsparse.core.dispatch import DECODE_KERNELS

    x, weight, bias, _ = case(3, 128, 64, torch.bfloat16, seed=21)
    gw = GemvWeight(weight, bias)
    y = DECODE_KERNELS["gemv_keyed"].launch(gw, x, 8, 16)
    assert gw.plans[(3, 16, True)].keyed
    assert torch.equal(y, DECODE_KERNELS["gemv"].launch(gw, x, 8, 16))
    assert not gw.plans[(3, 16, False)].keyed
