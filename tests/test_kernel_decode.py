"""The N:M decode kernel against F.linear (CPU under the Triton interpreter by default).

On a GPU machine, ``TRITON_INTERPRET=0 pytest tests/test_kernel_decode.py`` runs the compiled
kernels on CUDA instead.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported anywhere

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton", reason="triton is not installed; the N:M decode kernel needs it")

from actsparse.core.masks import keep_mask  # noqa: E402
from actsparse.core.patterns import NM  # noqa: E402
from actsparse.kernels import decode  # noqa: E402
from actsparse.kernels.decode import (  # noqa: E402
    DecodeWeight,
    compact_nm,
    gemv_config,
    nm_decode_linear,
    nm_decode_linear_reference,
    nm_gemv,
    triton_available,
)

if not triton_available():
    pytest.skip("triton cannot run here: no CUDA and TRITON_INTERPRET is off", allow_module_level=True)

DEVICE = "cpu" if decode._interpreting() else "cuda"
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}
PATTERNS = [(2, 4), (8, 16), (16, 32), (1, 4)]
# K: multiples of M whose kept counts are not multiples of the kernel's row block.
WIDTHS = {(2, 4): 36, (8, 16): 48, (16, 32): 160, (1, 4): 100}


def make_case(tokens, k, o, n, m, dtype, bias=True, seed=0):
    """Random weight, bias and an input magnitude-pruned to n:m (never zero before pruning)."""
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(o, k, generator=g).to(dtype)
    b = torch.randn(o, generator=g).to(dtype) if bias else None
    x = (torch.rand(tokens, k, generator=g) + 0.1) * torch.randint(0, 2, (tokens, k), generator=g).mul(2).sub(1)
    x = x.to(dtype)
    mask = keep_mask(x.abs().float(), NM(n, m))
    x_pruned = torch.where(mask, x, torch.zeros((), dtype=dtype))
    to = lambda t: None if t is None else t.to(DEVICE)  # noqa: E731
    return to(x_pruned), to(weight), to(b), to(mask)


def rel_err(out, x, weight, bias):
    ref = F.linear(x.double(), weight.double(), None if bias is None else bias.double())
    return ((out.double() - ref).norm() / ref.norm()).item()


def poisoned(tokens, o, dtype):
    return torch.full((tokens, o), float("nan"), dtype=dtype, device=DEVICE)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("tokens", [1, 2, 4])
@pytest.mark.parametrize("n,m", PATTERNS, ids=lambda v: str(v))
def test_matches_f_linear(n, m, tokens, bias, dtype):
    k = WIDTHS[(n, m)]
    o = [40, 72, 160][(tokens + n) % 3]
    x, weight, b, _ = make_case(tokens, k, o, n, m, dtype, bias)
    dw = DecodeWeight.from_linear(weight, b)
    out = nm_decode_linear(x, dw, n, m, out=poisoned(tokens, o, dtype))
    assert out.shape == (tokens, o) and out.dtype == dtype
    assert torch.isfinite(out).all(), "some outputs were never written"
    assert rel_err(out, x, weight, b) < TOL[dtype]


@pytest.mark.parametrize(
    "split,block_o,block_k,stages", [(1, 16, 16, 0), (2, 32, 8, 0), (3, 64, 8, 2), (7, 32, 16, 3), (None, 256, None, None)]
)
def test_split_and_tiles(split, block_o, block_k, stages):
    n, m, tokens, k, o = 8, 16, 3, 224, 72
    x, weight, b, _ = make_case(tokens, k, o, n, m, torch.float32)
    dw = DecodeWeight.from_linear(weight, b)
    cfg = gemv_config(dw, tokens, m, split=split, block_o=block_o, block_k=block_k, num_warps=1, stages=stages)
    assert cfg.chunk % m == 0 and cfg.split == -(-k // cfg.chunk)
    first = None
    for _ in range(2):  # the second call reuses a workspace full of the first call's partials
        if cfg.split > 1:
            dw.scratch(cfg.split, tokens).fill_(float("nan"))
        out = nm_decode_linear(x, dw, n, m, out=poisoned(tokens, o, torch.float32), config=cfg)
        assert torch.isfinite(out).all()
        assert rel_err(out, x, weight, b) < 1e-5
        if first is not None:
            assert torch.equal(out, first)  # the split sum is added in a fixed order: deterministic
        first = out


@pytest.mark.parametrize("split", [1, 4])
@pytest.mark.parametrize("tokens", [1, 3])
def test_unpruned_chunks_are_redone_exactly(tokens, split):
    """Only the chunks holding a group with more than N nonzeros take the exact (ranking) path; all match."""
    n, m, k, o = 2, 4, 64, 40
    g = torch.Generator().manual_seed(5)
    x = torch.randn(tokens, k, generator=g)
    pruned = torch.where(keep_mask(x.abs(), NM(n, m)), x, torch.zeros(()))
    x = pruned.clone()
    x[0, 20:24] = torch.tensor([1.0, -1.0, 1.0, 0.5])  # one group with 4 nonzeros and a tie
    expect = torch.where(keep_mask(x.abs(), NM(n, m)), x, torch.zeros(()))
    weight = torch.randn(o, k, generator=g)
    dw = DecodeWeight.from_linear(weight.to(DEVICE))
    cfg = gemv_config(dw, tokens, m, split=split)
    out = nm_decode_linear(x.to(DEVICE), dw, n, m, config=cfg)
    assert rel_err(out, expect.to(DEVICE), weight.to(DEVICE), None) < 1e-5


def test_mask_with_too_many_features():
    """A mask with more than N features in a group keeps its first N (the compaction rule)."""
    n, m, tokens, k, o = 2, 4, 2, 32, 40
    x, weight, _, mask = make_case(tokens, k, o, n, m, torch.float32, bias=False)
    g = torch.Generator().manual_seed(6)
    x = torch.randn(tokens, k, generator=g).to(DEVICE)
    mask = mask.clone()
    mask[1, 4:8] = True  # 4 masked features: the first two are kept
    kept = keep_mask(mask.float(), NM(n, m))
    out = nm_decode_linear(x, DecodeWeight.from_linear(weight), n, m, mask)
    assert rel_err(out, torch.where(kept & mask, x, torch.zeros((), device=DEVICE)), weight, None) < 1e-5


def test_sixteen_tokens_and_nm_gemv():
    n, m, tokens, k, o = 8, 16, 16, 32, 24
    x, weight, b, mask = make_case(tokens, k, o, n, m, torch.bfloat16)
    dw = DecodeWeight.from_linear(weight, b)
    assert rel_err(nm_decode_linear(x, dw, n, m), x, weight, b) < 1e-2
    idx, val = compact_nm(x, n, m, mask)
    out = nm_gemv(idx, val, dw, out=poisoned(tokens, o, torch.bfloat16))
    assert torch.isfinite(out).all() and rel_err(out, x, weight, b) < 1e-2


def test_unpruned_input_is_pruned_by_magnitude():
    n, m, tokens, k, o = 2, 4, 2, 64, 40
    g = torch.Generator().manual_seed(1)
    x = torch.randn(tokens, k, generator=g).to(DEVICE)
    weight = torch.randn(o, k, generator=g).to(DEVICE)
    out = nm_decode_linear(x, DecodeWeight.from_linear(weight), n, m)
    pruned = torch.where(keep_mask(x.abs(), NM(n, m)), x, torch.zeros(()).to(DEVICE))
    assert rel_err(out, pruned, weight, None) < 1e-5


def test_kept_zero_values_with_mask():
    """A masked-in feature whose value is 0 is still kept (the mask decides, not x != 0)."""
    n, m, tokens, k, o = 2, 4, 2, 32, 40
    x, weight, b, mask = make_case(tokens, k, o, n, m, torch.float32)
    x[0, 0:8] = 0.0  # kept and pruned values alike become 0 in the first two groups
    x = torch.where(mask, x, torch.zeros((), device=DEVICE))
    idx, val = compact_nm(x, n, m, mask)
    expect = mask.nonzero()[:, 1].view(tokens, -1).to(torch.int32)
    assert torch.equal(idx, expect)
    assert torch.equal(val, x.gather(1, idx.long()))
    out = nm_decode_linear(x, DecodeWeight.from_linear(weight, b), n, m, mask)
    assert rel_err(out, x, weight, b) < 1e-5


def test_mask_overrides_magnitude():
    """With a mask, unmasked features are dropped even when larger (and values outside it ignored)."""
    n, m, tokens, k, o = 2, 4, 2, 32, 40
    g = torch.Generator().manual_seed(2)
    x = torch.randn(tokens, k, generator=g).to(DEVICE)
    weight = torch.randn(o, k, generator=g).to(DEVICE)
    mask = keep_mask(torch.rand(tokens, k, generator=g), NM(n, m)).to(DEVICE)
    out = nm_decode_linear(x, DecodeWeight.from_linear(weight), n, m, mask)
    assert rel_err(out, torch.where(mask, x, torch.zeros((), device=DEVICE)), weight, None) < 1e-5


def test_all_zero_groups_without_mask():
    """Groups with fewer than N nonzeros still give exactly N (ties to the lower index)."""
    n, m, tokens, k, o = 8, 16, 1, 48, 40
    x, weight, _, _ = make_case(tokens, k, o, n, m, torch.float32)
    x[0, :16] = 0.0
    x[0, 16:32] = torch.where(torch.arange(16, device=DEVICE) == 5, 3.0, 0.0)
    idx, val = compact_nm(x, n, m)
    assert idx[0, :8].tolist() == list(range(8))
    assert idx[0, 8:16].tolist() == list(range(16, 24))  # 21 holds the one nonzero
    out = nm_decode_linear(x, DecodeWeight.from_linear(weight), n, m)
    assert rel_err(out, x, weight, None) < 1e-5


@pytest.mark.parametrize("n,m", PATTERNS + [(3, 6)], ids=lambda v: str(v))
@pytest.mark.parametrize("with_mask", [False, True], ids=["magnitude", "mask"])
def test_compact_exact(n, m, with_mask):
    tokens, k = 4, m * 7
    x, _, _, mask = make_case(tokens, k, 8, n, m, torch.bfloat16, seed=3)
    x[1, : 2 * m] = 0.0  # exact zeros and ties
    x[2, m : 2 * m] = 1.0
    scores = mask.float() if with_mask else x.abs().float()
    kept = keep_mask(scores, NM(n, m))
    idx, val = compact_nm(x, n, m, mask if with_mask else None)
    assert idx.dtype == torch.int32 and idx.shape == (tokens, k // m * n)
    assert (idx[:, 1:] > idx[:, :-1]).all(), "indices must be strictly ascending"
    assert torch.equal(idx, kept.nonzero()[:, 1].view(tokens, -1).to(torch.int32))
    assert torch.equal(val, x.gather(1, idx.long()))
    ref_idx, ref_val = decode._compact_torch(x, n, m, mask if with_mask else None)
    assert torch.equal(idx, ref_idx) and torch.equal(val, ref_val)


def test_reference_and_from_linear():
    layer = torch.nn.Linear(24, 40).to(DEVICE)
    x = torch.randn(2, 24, device=DEVICE)
    assert torch.equal(nm_decode_linear_reference(x, layer.weight, layer.bias), F.linear(x, layer.weight, layer.bias))
    dw = DecodeWeight.from_linear(layer)
    assert dw.wt.shape == (24, 40) and dw.wt.is_contiguous() and torch.equal(dw.wt, layer.weight.t())
    assert torch.equal(dw.bias, layer.bias.detach())


def test_bad_input():
    dw = DecodeWeight.from_linear(torch.randn(40, 32, device=DEVICE))
    x = torch.randn(1, 32, device=DEVICE)
    with pytest.raises(ValueError, match="2-D"):
        nm_decode_linear(x[0], dw, 2, 4)
    with pytest.raises(ValueError, match="does not divide"):
        nm_decode_linear(x, dw, 2, 5)
    with pytest.raises(ValueError, match="1 <= N < M"):
        nm_decode_linear(x, dw, 4, 4)
    with pytest.raises(ValueError, match="1 to 16 tokens"):
        nm_decode_linear(torch.randn(17, 32, device=DEVICE), dw, 2, 4)
    with pytest.raises(ValueError, match="expects 32"):
        nm_decode_linear(torch.randn(1, 64, device=DEVICE), dw, 2, 4)
    with pytest.raises(ValueError, match="weight is"):
        nm_decode_linear(x.double(), dw, 2, 4)
    with pytest.raises(ValueError, match="mask shape"):
        nm_decode_linear(x, dw, 2, 4, mask=torch.ones(1, 16, dtype=torch.bool, device=DEVICE))
    with pytest.raises(ValueError, match="torch.bool"):
        nm_decode_linear(x, dw, 2, 4, mask=torch.ones(1, 32, device=DEVICE))
    with pytest.raises(ValueError, match="bias"):
        DecodeWeight.from_linear(torch.randn(40, 32), torch.randn(32))


@pytest.mark.skipif(DEVICE != "cuda", reason="full-size shapes only with compiled kernels on CUDA (TRITON_INTERPRET=0)")
@pytest.mark.parametrize("k,o", [(4096, 14336), (14336, 4096), (4096, 4096)])
@pytest.mark.parametrize("tokens", [1, 2, 4])
def test_llama_shapes_cuda(k, o, tokens):
    x, weight, b, _ = make_case(tokens, k, o, 8, 16, torch.bfloat16, bias=False)
    dw = DecodeWeight.from_linear(weight)
    for _ in range(3):  # repeated calls reuse the split workspace
        out = nm_decode_linear(x, dw, 8, 16, out=poisoned(tokens, o, torch.bfloat16))
        assert torch.isfinite(out).all()
        assert rel_err(out, x, weight, None) < 1e-2
