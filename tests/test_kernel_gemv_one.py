"""The one-token sparse GEMV (selection inside each step) against its PyTorch definition and the batched kernel."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported anywhere

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed")

from actsparse.kernels.gemv_one import (  # noqa: E402
    AHEAD_STAGES,
    one_block_o,
    one_plan,
    one_workspace_sizes,
    sparse_gemv_one,
    sparse_gemv_one_auto,
)
from actsparse.kernels.gemv_weight import GemvWeight  # noqa: E402
from actsparse.kernels.sparse_gemv import (  # noqa: E402
    Workspace,
    gemv_plan,
    sm_count,
    sparse_gemv,
    sparse_gemv_reference,
    tile_weight,
    workspace_for,
)
from actsparse.kernels.sparsify import triton_available  # noqa: E402

if not triton_available():
    pytest.skip("triton cannot run here: no CUDA and TRITON_INTERPRET is off", allow_module_level=True)

DEVICE = "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"
GPU = DEVICE == "cuda"


def _workspace(k, o, block_o, plan):
    partials, stats, tiles, _, _ = one_workspace_sizes(k, o, block_o, plan)
    return Workspace(torch.empty(partials, device=DEVICE), torch.empty(stats, device=DEVICE),
                     torch.zeros(tiles, dtype=torch.int32, device=DEVICE), torch.empty(0, dtype=torch.int32, device=DEVICE),
                     torch.empty(0, device=DEVICE))  # fmt: skip


@pytest.mark.parametrize("n, m", [(2, 4), (8, 16), (16, 32), (3, 8), (5, 6)])
@pytest.mark.parametrize("options", ["plain", "vector_bias", "var", "shift_var"])
@pytest.mark.parametrize("whole", [False, True])
@pytest.mark.parametrize("compact", [True, False])
def test_one_token_gemv_equals_the_reference_and_the_batched_kernel(n, m, options, whole, compact):
    k, o, block_o = 384, 200, 64
    g = torch.Generator().manual_seed(n * 100 + m)
    x = torch.randn(1, k, generator=g).to(DEVICE)
    weight = (torch.randn(o, k, generator=g) / k**0.5).to(DEVICE)
    kw = {}
    if options == "vector_bias":
        kw = dict(vector=(torch.rand(k, generator=g) + 0.5).to(DEVICE), bias=torch.randn(o, generator=g).to(DEVICE))
    if "var" in options:
        kw["var"] = True
    if options == "shift_var":
        kw.update(shift=torch.randn(1, generator=g).to(DEVICE), row_sum=weight.sum(1))
    wt = tile_weight(weight, block_o)
    plan = one_plan(k, o, n, m, block_o, 4, compact=compact)
    if whole:  # one program over all rows: no split finish
        plan = plan._replace(chunk=-(-k // plan.sub) * plan.sub)
    ws = _workspace(k, o, block_o, plan)
    y = sparse_gemv_one(x, wt, o, n, m, ws, plan, **kw)
    assert int(ws.counters.abs().sum()) == 0, "arrival counters must be back at zero"
    ref = sparse_gemv_reference(x, weight, n, m, **kw)
    torch.testing.assert_close(y, ref, atol=1e-4, rtol=1e-4)
    batched_plan = gemv_plan(k, o, m, 1, 4, block_o=block_o)
    batched = sparse_gemv(x, wt, o, n, m, workspace_for(k, o, [batched_plan], DEVICE), batched_plan, **kw)
    torch.testing.assert_close(y, batched, atol=1e-5, rtol=1e-5)
    assert torch.equal(sparse_gemv_one(x, wt, o, n, m, ws, plan, **kw), y)  # the same inputs, the same bits


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n, m", [(2, 4), (8, 16), (3, 8)])
@pytest.mark.parametrize("shift", [False, True])
def test_integer_keys_and_loads_ahead_choose_exactly_what_the_rule_chooses(dtype, n, m, shift):
    """16-bit inputs full of ties, zeros and the largest finite values, through an identity weight
    (so each output is its own input, kept or not): ranking by integer keys, taking the top N keys
    (N and M powers of two; others fall back to the ranking) and loading each step's inputs one
    step early keep exactly the inputs the reference keeps, with their exact values."""
    k, block_o = 256, 64
    g = torch.Generator().manual_seed(n * 31 + m)
    x = torch.randint(-3, 4, (1, k), generator=g).to(dtype) * 0.5  # few distinct magnitudes: ties everywhere
    x[0, 9], x[0, 17], x[0, 40] = 0.0, torch.finfo(dtype).max, -torch.finfo(dtype).max
    weight = torch.eye(k, dtype=dtype)
    kw = dict(shift=torch.tensor([0.5]), row_sum=weight.float().sum(1)) if shift else {}
    kw = {key: value.to(DEVICE) for key, value in kw.items()}
    wt = tile_weight(weight.to(DEVICE), block_o)
    ref = sparse_gemv_reference(x.to(DEVICE), weight.to(DEVICE), n, m, **kw)
    base = one_plan(k, k, n, m, block_o, 4)
    for keyed, topk in ((False, False), (True, False), (True, True)):
        for ahead in (False, True):
            plan = base._replace(keyed=keyed, ahead=ahead, topk=topk)
            y = sparse_gemv_one(x.to(DEVICE), wt, k, n, m, _workspace(k, k, block_o, plan), plan, **kw)
            assert torch.equal(y, ref), (keyed, ahead, topk)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_integer_keys_rank_nan_first(dtype):
    """A NaN input outranks every other input of its group (and then spreads to every output, as
    in the reference); with it out of the input every output is finite."""
    k, o, block_o, n, m = 128, 32, 32, 2, 4
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1, k, generator=g).to(dtype)
    x[0, 4:8] = torch.tensor([100.0, 200.0, 300.0, 400.0]).to(dtype)
    weight = (torch.randn(o, k, generator=g) / k**0.5).to(dtype)
    wt = tile_weight(weight.to(DEVICE), block_o)
    for topk in (False, True):
        plan = one_plan(k, o, n, m, block_o, 4, topk=topk)
        assert plan.keyed
        run = lambda x, plan=plan: sparse_gemv_one(x.to(DEVICE), wt, o, n, m, _workspace(k, o, block_o, plan), plan)  # noqa: E731
        x[0, 4] = 100.0
        assert bool(run(x).isfinite().all())
        x[0, 4] = float("nan")  # the smallest of its group: kept only because NaN ranks first
        assert bool(sparse_gemv_reference(x.to(DEVICE), weight.to(DEVICE), n, m).isnan().all())
        assert bool(run(x).isnan().all())


@pytest.mark.parametrize("n, m", [(2, 4), (8, 16), (4, 16)])
@pytest.mark.parametrize("options", ["plain", "bias", "var", "shift_var"])
def test_top_keys_equal_the_reference_on_16_bit_inputs(n, m, options):
    """topk plans on bf16 inputs (the slots in key order) against the reference and the ranked plan,
    with the split finish, VAR and the shift; the same inputs give the same bits."""
    k, o, block_o = 512, 96, 32
    # the interpreter rounds float32 to bf16 toward zero (the GPU: to nearest), so the shifted
    # input, rounded to x's dtype, matches the reference there only in fp16
    dtype = torch.float16 if options == "shift_var" and not GPU else torch.bfloat16
    g = torch.Generator().manual_seed(n + m * 7)
    x = torch.randn(1, k, generator=g).to(DEVICE, dtype)
    weight = (torch.randn(o, k, generator=g) / k**0.5).to(DEVICE, dtype)
    kw = {}
    if options == "bias":
        kw["bias"] = torch.randn(o, generator=g).to(DEVICE, dtype)
    if "var" in options:
        kw["var"] = True
    if options == "shift_var":
        kw.update(shift=torch.randn(1, generator=g).to(DEVICE), row_sum=weight.float().sum(1))
    wt = tile_weight(weight, block_o)
    plan = one_plan(k, o, n, m, block_o, 4, topk=True)
    assert -(-k // plan.chunk) > 1  # split over the input rows
    ws = _workspace(k, o, block_o, plan)
    y = sparse_gemv_one(x, wt, o, n, m, ws, plan, **kw)
    ranked = sparse_gemv_one(x, wt, o, n, m, _workspace(k, o, block_o, plan), plan._replace(topk=False), **kw)
    ref = sparse_gemv_reference(x, weight, n, m, **kw)
    torch.testing.assert_close(y.float(), ref.float(), atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(y.float(), ranked.float(), atol=1e-2, rtol=1e-2)
    assert torch.equal(sparse_gemv_one(x, wt, o, n, m, ws, plan, **kw), y)


def test_integer_keys_keep_the_lower_index_among_equal_inputs():
    """Every input equal: the first N of each group are kept, so only their weight rows count."""
    k, o, block_o, n, m = 64, 16, 16, 2, 4
    x = torch.ones(1, k, dtype=torch.bfloat16, device=DEVICE)
    weight = torch.zeros(o, k, dtype=torch.bfloat16)
    weight[:, 0::4] = 1.0  # lane 0 of each group: kept under ties to the lower index
    weight[:, 3::4] = 100.0  # lane 3: dropped
    plan = one_plan(k, o, n, m, block_o, 4)
    assert plan.keyed
    y = sparse_gemv_one(x, tile_weight(weight.to(DEVICE), block_o), o, n, m, _workspace(k, o, block_o, plan), plan)
    assert torch.equal(y.float().cpu(), torch.full((1, o), k / m))


def test_one_token_gemv_refuses_more_rows_and_bad_plans():
    k, o = 128, 64
    wt = tile_weight(torch.randn(o, k, device=DEVICE), 64)
    plan = one_plan(k, o, 2, 4, 64, 4)
    assert plan.ahead and not one_plan(k, o, 2, 4, 64, 4, stages=4).ahead  # the default follows the depth
    with pytest.raises(ValueError, match="AHEAD_STAGES"):
        one_plan(k, o, 2, 4, 64, 4, stages=4, ahead=True)
    with pytest.raises(ValueError, match="AHEAD_STAGES"):  # a plan made by hand is refused at launch
        sparse_gemv_one(torch.randn(1, k, device=DEVICE), wt, o, 2, 4, _workspace(k, o, 64, plan), plan._replace(stages=4))
    with pytest.raises(ValueError, match="one token row"):
        sparse_gemv_one(torch.randn(2, k, device=DEVICE), wt, o, 2, 4, _workspace(k, o, 64, plan), plan)
    with pytest.raises(ValueError, match="power of two"):
        one_plan(k, o, 2, 4, 64, 4, sub=12)
    with pytest.raises(ValueError, match="multiple of sub"):
        one_plan(k, o, 2, 4, 64, 4, chunk=100)
    partials, stats, tiles, _, _ = one_workspace_sizes(k, o, 64, plan)
    short = Workspace(torch.empty(partials - 1, device=DEVICE), torch.empty(stats, device=DEVICE),
                      torch.zeros(tiles, dtype=torch.int32, device=DEVICE), torch.empty(0, dtype=torch.int32, device=DEVICE),
                      torch.empty(0, device=DEVICE))  # fmt: skip
    with pytest.raises(ValueError, match="workspace is too small"):
        sparse_gemv_one(torch.randn(1, k, device=DEVICE), wt, o, 2, 4, short, plan)


@pytest.mark.parametrize("n, m", [(2, 4), (8, 16)])
def test_the_weight_holder_runs_both_kernels_on_one_workspace(n, m):
    """GemvWeight.one: the one-token kernel through its op, on the workspace the batched kernel shares."""
    k, o = 512, 96
    g = torch.Generator().manual_seed(m)
    weight, bias = (torch.randn(o, k, generator=g) / k**0.5).to(DEVICE), torch.randn(o, generator=g).to(DEVICE)
    x = torch.randn(1, k, generator=g).to(DEVICE)
    vector = (torch.rand(k, generator=g) + 0.5).to(DEVICE)
    gw = GemvWeight(weight, bias)
    one = gw.one(x, n, m, vector=vector, var=True)
    batched = gw(x, n, m, vector=vector, var=True)
    ref = sparse_gemv_reference(x, weight, n, m, vector=vector, var=True, bias=bias)
    torch.testing.assert_close(one, ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(one, batched, atol=1e-5, rtol=1e-5)
    ws = gw.workspace(n, m)
    assert all(t.numel() >= need for t, need in zip(ws, one_workspace_sizes(k, o, gw.block_o, gw.one_plan(n, m))))
    assert int(ws.counters.abs().sum()) == 0
    assert torch.equal(gw.one(x, n, m, vector=vector, var=True), one)


def test_the_op_takes_the_reference_where_triton_cannot_run(monkeypatch):
    """Without the interpreter on a CPU tensor the op computes the PyTorch definition."""
    from actsparse.kernels import gemv_one

    monkeypatch.setattr(gemv_one, "_interpreting", lambda: False)
    monkeypatch.setattr(gemv_one, "sparse_gemv_one", lambda *a, **k: pytest.fail("the kernel ran"))
    k, o = 128, 40
    weight = torch.randn(o, k)
    x = torch.randn(1, k)
    gw = GemvWeight(weight)
    ws, plan = gw.workspace(2, 4), gw.one_plan(2, 4)
    y = sparse_gemv_one_auto(x, gw.tiled, None, None, None, None, ws.partials, ws.stats, ws.counters, o, 2, 4, False,
                             *plan)  # fmt: skip
    torch.testing.assert_close(y, sparse_gemv_reference(x, weight, 2, 4), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("n, m", [(2, 4), (8, 16)])
def test_the_split_finish_gives_bit_identical_outputs_under_stress(n, m):
    """Many splits (so many programs race to finish each column tile): every call equals the first
    (3 calls under the interpreter, 2000 back to back on the GPU)."""
    k, o = (4096, 1024) if GPU else (512, 64)
    g = torch.Generator().manual_seed(17)
    dtype = torch.bfloat16
    weight = (torch.randn(o, k, generator=g) / k**0.5).to(DEVICE, dtype)
    x = torch.randn(1, k, generator=g).to(DEVICE, dtype)
    vector = (torch.rand(k, generator=g) + 0.5).to(DEVICE)
    gw = GemvWeight(weight, torch.randn(o, generator=g).to(DEVICE, dtype), block_o=64)
    plan = gw.one_plan(n, m)._replace(chunk=gw.one_plan(n, m).sub)  # one step per program: the most splits
    gw.one_plans[(n, m, None)] = plan
    assert -(-k // plan.chunk) >= 4
    first = gw.one(x, n, m, vector=vector, var=True)
    ref = sparse_gemv_reference(x, weight, n, m, vector=vector, var=True, bias=gw.bias)
    torch.testing.assert_close(first.float(), ref.float(), atol=2e-2, rtol=2e-2)
    for _ in range(3 if not GPU else 2000):
        assert torch.equal(gw.one(x, n, m, vector=vector, var=True), first)


def test_a_layer_copy_takes_the_tile_width_of_the_kernel_the_rule_names():
    from actsparse import SparsityConfig
    from actsparse.core.dispatch import DECODE_CHOICE
    from actsparse.core.sparse_linear import SparseLinear

    for pattern, expected in (("2:4", one_block_o(2048)), ("8:16", gemv_plan(64, 2048, 16, 1, 1).block_o)):
        config = SparsityConfig(pattern=pattern, backend="triton")
        layer = SparseLinear(torch.nn.Linear(64, 2048), config.pattern_obj, config.criterion_obj,
                             config.mitigation_obj, backend="triton")  # fmt: skip
        assert DECODE_CHOICE.block_o(64, 2048, layer.pattern.n, layer.pattern.m) == expected
        assert layer.gemv_weight().block_o == expected
    assert one_block_o(2048) != gemv_plan(64, 2048, 16, 1, 1).block_o  # the two kernels' tiles differ here


LLAMA_SHAPES = [(4096, 28672), (14336, 4096), (4096, 4096), (4096, 6144), (4096, 14336)]


def _check_compiled_plan(k, o, n, m, seed, **choices):
    """One compiled plan on a real shape: within bf16 error of the reference, and bit-identical when run again."""
    g = torch.Generator().manual_seed(seed)
    weight = (torch.randn(o, k, generator=g) / k**0.5).to(DEVICE, torch.bfloat16)
    x = torch.randn(1, k, generator=g).to(DEVICE, torch.bfloat16)
    block_o = one_block_o(o)
    plan = one_plan(k, o, n, m, block_o, sm_count(torch.device(DEVICE)), **choices)
    wt, ws = tile_weight(weight, block_o), _workspace(k, o, block_o, plan)
    y = sparse_gemv_one(x, wt, o, n, m, ws, plan)
    ref = sparse_gemv_reference(x, weight, n, m)
    err = float((y.float() - ref.float()).norm() / ref.float().norm())
    assert err < 1e-2, f"{plan}: relative error {err:.3g}"
    assert torch.equal(sparse_gemv_one(x, wt, o, n, m, ws, plan), y)


@pytest.mark.skipif(not GPU, reason="compiled plans (the interpreter does not pipeline)")
@pytest.mark.parametrize("k, o", LLAMA_SHAPES)
@pytest.mark.parametrize("n, m", [(2, 4), (8, 16)])
@pytest.mark.parametrize("stages", [2, 3, 4, 5])
@pytest.mark.parametrize("ahead", [False, True])
def test_compiled_plans_on_the_llama_shapes_equal_the_reference(k, o, n, m, stages, ahead):
    """The software pipeline at every depth, with and without the loads ahead, on the real shapes."""
    if ahead and stages not in AHEAD_STAGES:  # miscompiled at some of these depths: refused
        with pytest.raises(ValueError, match="AHEAD_STAGES"):
            one_plan(k, o, n, m, one_block_o(o), sm_count(torch.device(DEVICE)), stages=stages, ahead=ahead)
        return
    _check_compiled_plan(k, o, n, m, k + o + m, stages=stages, ahead=ahead)


@pytest.mark.skipif(not GPU, reason="compiled plans (the interpreter does not pipeline)")
@pytest.mark.parametrize("k, o", LLAMA_SHAPES)
@pytest.mark.parametrize("n, m", [(2, 4), (8, 16)])
def test_compiled_top_key_plans_on_the_llama_shapes_equal_the_reference(k, o, n, m):
    _check_compiled_plan(k, o, n, m, k * 3 + o + m, topk=True)


def test_the_top_keys_decode_kernel_runs_the_top_keys_plan():
    """dispatch's gemv_one_topk entry (what tune_ may choose) launches the one-token kernel with
    its top-N-keys selection, and gives the reference's result."""
    from actsparse.core.dispatch import DECODE_KERNELS

    k, o = 256, 64
    g = torch.Generator().manual_seed(11)
    weight = (torch.randn(o, k, generator=g) / k**0.5).to(DEVICE, torch.bfloat16)
    x = torch.randn(1, k, generator=g).to(DEVICE, torch.bfloat16)
    gw = GemvWeight(weight)
    y = DECODE_KERNELS["gemv_one_topk"].launch(gw, x, 2, 4)
    assert gw.one_plans[(2, 4, True)].topk
    torch.testing.assert_close(y.float(), sparse_gemv_reference(x, weight, 2, 4).float(), atol=2e-2, rtol=2e-2)
    DECODE_KERNELS["gemv_one"].launch(gw, x, 2, 4)
    assert not gw.one_plans[(2, 4, None)].topk  # the plain entry keeps the module's default
