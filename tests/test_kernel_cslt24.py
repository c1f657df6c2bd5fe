"""cuSPARSELt 2:4 compressed layout: reference vs captured metadata, Triton kernel vs reference."""

import os

import torch

if not torch.cuda.is_available():  # Triton's interpreter on CPU; must be set before triton is imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

import json
from pathlib import Path

import pytest

from actsparse.kernels import cslt24

DATA = json.loads((Path(__file__).parent / "data" / "cslt24_meta.json").read_text())
PAIRS = [(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)]
CUDA = torch.cuda.is_available()
needs_triton = pytest.mark.skipif(not cslt24.triton_available(), reason="triton not installed")
needs_cslt = pytest.mark.skipif(not (CUDA and hasattr(torch, "_cslt_compress")), reason="needs CUDA cuSPARSELt")


def pattern_values(T, K):
    """Small nonzero integers, as in benchmarks/probe_cslt_layout.py."""
    i, j = torch.arange(T).view(-1, 1), torch.arange(K).view(1, -1)
    v = (i * 7 + j * 13) % 31 - 15
    return torch.where(v == 0, torch.full_like(v, 16), v).to(torch.bfloat16)


def pair_mask(T, K):
    """The captured vectors' mask: group g of row i keeps pair (5i + 3g + i*g) % 6."""
    i, g = torch.arange(T).view(-1, 1), torch.arange(K // 4).view(1, -1)
    pid = (i * 5 + g * 3 + i * g) % 6
    table = torch.zeros(6, 4, dtype=torch.bool)
    for p, (a, b) in enumerate(PAIRS):
        table[p, a] = table[p, b] = True
    return table[pid].reshape(T, K)


def words(hexstr):
    return torch.tensor([int(hexstr[i : i + 4], 16) for i in range(0, len(hexstr), 4)], dtype=torch.int32)


def meta_words(buf, T):
    """Metadata words of a compressed buffer as uint16 values in int32."""
    K = buf.shape[1] * 16 // 9
    return buf.reshape(-1)[T * K // 2 :].view(torch.int16).to(torch.int32) & 0xFFFF


def tricky(T, K, dtype=torch.bfloat16, seed=0):
    """Random values with ties (rounded rows), zeros and all-zero groups."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, K, generator=g)
    x[1::5] = x[1::5].round()
    x[::3, ::5] = 0
    x[2::7, :16] = 0
    x[3::11, 8:24] = 1.0
    return x.to(dtype)


@pytest.mark.parametrize("vec", DATA["vectors"], ids=lambda v: f"{v['T']}x{v['K']}")
def test_reference_matches_captured_cusparselt(vec):
    T, K = vec["T"], vec["K"]
    mask = pair_mask(T, K)
    x = pattern_values(T, K) * mask
    buf = cslt24.compress24_reference(x, mask)
    assert list(buf.shape) == vec["shape"] and buf.dtype == x.dtype
    assert torch.equal(meta_words(buf, T), words(vec["meta"]))
    assert torch.equal(buf.reshape(-1)[: T * K // 2], x[mask])


def test_cusparselt_codes_for_groups_with_zeros():
    """cuSPARSELt keeps the first two nonzeros, then the highest zero positions (documented rule)."""
    T, K = DATA["subsets"]["T"], DATA["subsets"]["K"]
    meta = words(DATA["subsets"]["meta"]).to(torch.int16).view(torch.bfloat16)
    buf = torch.cat([torch.ones(T * K // 2, dtype=torch.bfloat16), meta]).reshape(T, -1)
    kept = cslt24.decompress24_reference(buf, K).reshape(-1, 4) != 0
    for g in range(T * K // 4):
        nz = [b for b in range(4) if (g % 16) >> b & 1]
        want = (nz + [p for p in (3, 2, 1, 0) if p not in nz])[:2]
        assert sorted(want) == kept[g].nonzero().flatten().tolist(), g


def test_mask24_ties_and_vector():
    x = torch.tensor([[1, 1, 1, 1, 0, 0, 0, 0, 1, 2, 2, 1, -3, 3, 1, 0]], dtype=torch.bfloat16)
    got = cslt24.mask24(x).int().tolist()[0]
    assert got == [1, 1, 0, 0, 1, 1, 0, 0, 0, 1, 1, 0, 1, 1, 0, 0]
    v = torch.tensor([1, 1, 1, 4.0] * 4)
    assert cslt24.mask24(x, v).int().tolist()[0][:4] == [1, 0, 0, 1]
    s = (x.float().abs() * v).reshape(-1, 4)
    top = torch.sort(s, dim=-1, descending=True, stable=True).indices[:, :2]
    assert torch.equal(cslt24.mask24(x, v).reshape(-1, 4), torch.zeros_like(s, dtype=torch.bool).scatter_(-1, top, True))


@pytest.mark.parametrize("T,K", [(64, 64), (128, 192), (100, 128)])
def test_reference_roundtrip(T, K):
    x = tricky(T, K)
    mask = cslt24.mask24(x)
    buf = cslt24.compress24_reference(x, mask)
    Tp = cslt24.padded_rows(T)
    assert buf.shape == (Tp, K * 9 // 16)
    dense = cslt24.decompress24_reference(buf, K)
    assert torch.equal(dense[:T], x * mask) and not dense[T:].any()


@needs_triton
@pytest.mark.parametrize("T,K", [(64, 64), (64, 128), (100, 192), (128, 256)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("with_vector", [False, True])
def test_triton_kernel_matches_reference(T, K, dtype, with_vector):
    device = "cuda" if CUDA else "cpu"
    x = tricky(T, K, dtype).to(device)
    vector = torch.rand(K, generator=torch.Generator().manual_seed(1)).to(device) if with_vector else None
    if vector is not None:
        vector[::7] = 1.0
    got = cslt24.sparsify_compress24(x, vector)
    want = cslt24.compress24_reference(x, cslt24.mask24(x, vector))
    assert got.shape == want.shape and got.dtype == want.dtype
    assert torch.equal(got.view(torch.int16), want.view(torch.int16))


@needs_cslt
@needs_triton
@pytest.mark.parametrize("T,K", [(64, 64), (256, 4096), (512, 14336), (1024, 256)])
def test_kernel_matches_cslt_compress(T, K):
    x = torch.randn(T, K, device="cuda", dtype=torch.bfloat16)
    x[x == 0] = 1.0  # cuSPARSELt codes groups with kept zeros differently (same product)
    got = cslt24.sparsify_compress24(x)
    want = torch._cslt_compress(x * cslt24.mask24(x))
    assert got.shape == want.shape and torch.equal(got.view(torch.int16), want.view(torch.int16))
    # with zeros and ties: the same dense matrix
    xt = tricky(T, K).cuda()
    theirs = cslt24.decompress24_reference(torch._cslt_compress(xt * cslt24.mask24(xt)), K)
    assert torch.equal(cslt24.decompress24_reference(cslt24.sparsify_compress24(xt), K), theirs)


@needs_cslt
@needs_triton
@pytest.mark.parametrize("T", [128, 100])
def test_cslt24_linear(T):
    K, O = 256, 384
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(T, K, device="cuda", dtype=torch.bfloat16, generator=g)
    w = torch.randn(O, K, device="cuda", dtype=torch.bfloat16, generator=g) / 16
    b = torch.randn(O, device="cuda", dtype=torch.bfloat16, generator=g)
    lin = cslt24.Cslt24Linear(w, b)
    y = lin(cslt24.sparsify_compress24(x), T)
    ref = torch.nn.functional.linear((x * cslt24.mask24(x)).float(), w.float(), b.float())
    assert y.shape == (T, O)
    assert ((y.float() - ref).norm() / ref.norm()).item() < 1e-2
    assert len(lin.alg_ids) == 1
