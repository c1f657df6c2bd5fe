"""The one-token sparse GEMV (selection inside each step) against its PyTorch definition and the batched kernel."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported anywhere

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed")

from actsparse.kernels.gemv_one import one_plan, one_workspace_sizes, sparse_gemv_one, sparse_gemv_one_auto  # noqa: E402
from actsparse.kernels.gemv_weight import GemvWeight  # noqa: E402
from actsparse.kernels.sparse_gemv import (  # noqa: E402
    Workspace,
    gemv_plan,
    sparse_gemv,
    sparse_gemv_reference,
    tile_weight,
    workspace_for,
)
from actsparse.kernels.sparsify import triton_available  # noqa: E402

if not triton_available():
    pytest.skip("triton cannot run here: no CUDA and TRITON_INTERPRET is off", allow_module_level=True)

DEVICE = "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"


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


def test_one_token_gemv_refuses_more_rows_and_bad_plans():
    k, o = 128, 64
    wt = tile_weight(torch.randn(o, k, device=DEVICE), 64)
    plan = one_plan(k, o, 2, 4, 64, 4)
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


GPU = DEVICE == "cuda"


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
    gw.one_plans[(n, m)] = plan
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
    from actsparse.kernels.gemv_one import one_block_o
    from actsparse.kernels.sparse_gemv import gemv_plan

    for pattern, expected in (("2:4", one_block_o(2048)), ("8:16", gemv_plan(64, 2048, 16, 1, 1).block_o)):
        config = SparsityConfig(pattern=pattern, backend="triton")
        layer = SparseLinear(torch.nn.Linear(64, 2048), config.pattern_obj, config.criterion_obj,
                             config.mitigation_obj, backend="triton")  # fmt: skip
        assert DECODE_CHOICE.block_o(64, 2048, layer.pattern.n, layer.pattern.m) == expected
        assert layer.gemv_weight().block_o == expected
    assert one_block_o(2048) != gemv_plan(64, 2048, 16, 1, 1).block_o  # the two kernels' tiles differ here
