"""The Triton N:M kernel against the PyTorch reference: on the CPU Triton interpreter here,
compiled on a GPU (run with ``TRITON_INTERPRET=0`` there)."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import importlib
import importlib.util
import sys

import pytest
import torch

pytest.importorskip("triton", reason="the kernel tests need triton (they run on its CPU interpreter)")

from actsparse.core.masks import keep_mask  # noqa: E402
from actsparse.core.patterns import NM  # noqa: E402
from actsparse.kernels import sparsify  # noqa: E402

if not torch.cuda.is_available() and not sparsify._INTERPRETED:
    sparsify = importlib.reload(sparsify)  # imported earlier without TRITON_INTERPRET: decorate again

DEVICE = "cpu" if sparsify._INTERPRETED else "cuda"


def kernel(x, n, m, **kw):
    """``nm_sparsify`` on the kernel's device (inputs moved there), result back on the CPU."""
    on = {k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for k, v in kw.items()}
    return sparsify.nm_sparsify(x.to(DEVICE), n, m, **on).cpu()


DTYPES = [torch.float32, torch.bfloat16, torch.float16]
PATTERNS = [(2, 4), (4, 8), (8, 16), (16, 32), (1, 4), (3, 8), (5, 32), (1, 2), (3, 6), (5, 12)]
ATOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}


def bits(t):
    """Bit patterns, so that -0 != +0 and NaN == NaN."""
    return t.view({4: torch.int32, 2: torch.int16}[t.element_size()])


def expected(x, n, m, vector=None):
    scores = x.float().abs() if vector is None else x.float().abs() * vector
    return torch.where(keep_mask(scores, NM(n, m)), x, torch.zeros((), dtype=x.dtype))


def shape_for(m, T=17):
    """A width with a ragged last tile when the group count has few factors of two."""
    return T, m * (50 if m <= 4 else 96 // m * 2 if m <= 16 else 3)


@pytest.mark.parametrize("n,m", PATTERNS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_matches_reference_exactly(n, m, dtype):
    torch.manual_seed(m * 100 + n)
    T, K = shape_for(m)
    x = torch.randn(T, K).to(dtype)
    vector = torch.rand(K) * 2
    for v in (None, vector):
        want = expected(x, n, m, v)
        assert torch.equal(bits(sparsify.nm_sparsify_reference(x, n, m, vector=v)), bits(want))
        assert torch.equal(bits(kernel(x, n, m, vector=v)), bits(want))


@pytest.mark.parametrize("T,K,n,m", [(1, 96, 3, 8), (3, 200, 2, 4), (33, 256, 8, 16), (5, 64, 16, 32), (2, 24, 5, 12)])
def test_shapes(T, K, n, m):
    torch.manual_seed(T * K)
    x = torch.randn(T, K, dtype=torch.bfloat16)
    assert torch.equal(bits(kernel(x, n, m)), bits(expected(x, n, m)))


@pytest.mark.parametrize("n,m", [(2, 4), (3, 8), (8, 16), (16, 32), (5, 32), (5, 12)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_ties_and_zeros(n, m, dtype):
    """Values from {-0, 0, +-1, +-2}: most scores tie; kept -0 stays -0, so the mask shows on zeros too."""
    torch.manual_seed(n + m)
    T, K = 9, m * 8
    x = torch.tensor([-0.0, 0.0, 1.0, -1.0, 2.0, -2.0])[torch.randint(0, 6, (T, K))].to(dtype)
    vector = torch.tensor([0.5, 1.0, 2.0, 4.0])[torch.randint(0, 4, (K,))]
    for v in (None, vector):
        assert torch.equal(bits(kernel(x, n, m, vector=v)), bits(expected(x, n, m, v)))


@pytest.mark.filterwarnings("ignore:invalid value encountered")  # inf * 0 in the interpreter's numpy
@pytest.mark.parametrize("dtype", DTYPES)
def test_special_values(dtype):
    """NaN ranks above +inf, -0 ties with +0, subnormals order; vectors with negatives, zeros and inf."""
    torch.manual_seed(1)
    values = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0, 0.0, 1e-40, -1e-40, 1e-7, 1.0, -1.0, 2.0, 6e4])
    x = values[torch.randint(0, len(values), (9, 64))].to(dtype)
    vector = torch.tensor([-1.0, -0.0, 0.0, 1.0, 0.5, float("inf"), 1e-30, 3.0])[torch.randint(0, 8, (64,))]
    for n, m in [(2, 4), (3, 8), (9, 32)]:
        for v in (None, vector, vector.abs()):
            assert torch.equal(bits(kernel(x, n, m, vector=v)), bits(expected(x, n, m, v)))


@pytest.mark.parametrize("rescale_y", [True, False])
@pytest.mark.parametrize("dtype", DTYPES)
def test_var(dtype, rescale_y, monkeypatch):
    monkeypatch.setattr(sparsify, "VAR_RESCALE_Y", rescale_y)
    torch.manual_seed(2)
    for T, K, n, m in [(17, 256, 2, 4), (3, 200, 2, 4), (5, 96, 16, 32), (4, 96, 5, 12)]:
        x = (torch.randn(T, K) + 0.5).to(dtype)
        for kw in (dict(), dict(vector=torch.rand(K) + 0.5), dict(shift=torch.randn(T))):
            got = kernel(x, n, m, var=True, **kw).float()
            want = sparsify.nm_sparsify_reference(x, n, m, var=True, **kw).float()
            assert torch.equal(got == 0, want == 0)
            torch.testing.assert_close(got, want, rtol=ATOL[dtype], atol=ATOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
def test_shift(dtype):
    torch.manual_seed(3)
    T, K = 17, 192
    x = torch.randn(T, K).to(dtype)
    eta = x.float().median(dim=-1, keepdim=True).values + 0.01  # [T, 1], between representable values
    shifted = (x.float() - eta).to(dtype)
    for n, m in [(2, 4), (8, 16), (5, 32)]:
        want = expected(shifted, n, m)
        assert torch.equal(bits(sparsify.nm_sparsify_reference(x, n, m, shift=eta)), bits(want))
        assert torch.equal(bits(kernel(x, n, m, shift=eta)), bits(want))
        assert torch.equal(bits(kernel(x, n, m, shift=eta.reshape(T))), bits(want))


def test_writes_every_element(monkeypatch):
    """The output buffer starts as NaN; any element the kernel skips would stay NaN."""
    empty_like = torch.empty_like
    monkeypatch.setattr(torch, "empty_like", lambda t: empty_like(t).fill_(float("nan")))
    x = torch.randn(7, 200, dtype=torch.bfloat16)
    for kw in (dict(), dict(var=True), dict(vector=torch.rand(200))):
        for n, m in [(2, 4), (3, 8)]:
            assert not kernel(x, n, m, **kw).isnan().any()


@pytest.mark.parametrize(
    "bad",
    [
        dict(x=torch.randn(2, 3, 8)),
        dict(x=torch.randn(8, 16).t()),
        dict(x=torch.ones(4, 16, dtype=torch.int32)),
        dict(m=64, n=2, x=torch.randn(2, 128)),
        dict(m=8, x=torch.randn(2, 12)),
        dict(n=0),
        dict(n=5),
        dict(vector=torch.ones(15)),
        dict(shift=torch.ones(3)),
    ],
)
def test_rejects_bad_arguments(bad):
    args = dict(x=torch.randn(4, 16), n=2, m=4) | bad
    with pytest.raises(ValueError):
        kernel(**args)


def test_imports_without_triton(monkeypatch):
    monkeypatch.setitem(sys.modules, "triton", None)
    monkeypatch.setitem(sys.modules, "triton.language", None)
    spec = importlib.util.spec_from_file_location("sparsify_without_triton", sparsify.__file__)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert not module.triton_available()
    x = torch.randn(3, 8)
    assert torch.equal(module.nm_sparsify_reference(x, 2, 4), expected(x, 2, 4))
    assert sparsify.triton_available()


@pytest.mark.parametrize("dtype", DTYPES)
def test_var_scale_left_for_the_output_matches_the_reference(dtype):
    """One tiled pass returns the unscaled pruned rows and VAR's per-row scale; scaling the rows by it
    gives what VAR itself gives (the scale from tile partial sums, the reference from torch.var)."""
    torch.manual_seed(3)
    for T, K, n, m in [(17, 256, 2, 4), (3, 200, 2, 4), (70, 96, 16, 32), (4, 96, 5, 12), (1, 4096, 8, 16)]:
        x = (torch.randn(T, K) + 0.5).to(dtype)
        for vector in (None, torch.rand(K) + 0.5):
            on = None if vector is None else vector.to(DEVICE)
            pruned, scale = (t.cpu() for t in sparsify.nm_sparsify_var_scale(x.to(DEVICE), n, m, vector=on))
            want_pruned, want_scale = sparsify.nm_sparsify_var_scale_reference(x, n, m, vector=vector)
            assert torch.equal(bits(pruned), bits(want_pruned))  # unscaled: exactly plain pruning
            assert scale.dtype == torch.float32 and scale.shape == (T,)
            torch.testing.assert_close(scale, want_scale, rtol=1e-4, atol=1e-6)
            var = sparsify.nm_sparsify_reference(x, n, m, vector=vector, var=True).float()
            torch.testing.assert_close(pruned.float() * scale[:, None], var, rtol=ATOL[dtype], atol=ATOL[dtype])


def test_the_registered_ops_give_the_reference_results():
    x = torch.randn(6, 64, generator=torch.Generator().manual_seed(0))
    v = torch.rand(64) + 0.5
    got = torch.ops.actsparse.nm_sparsify(x.to(DEVICE), 2, 4, v.to(DEVICE), None, True).cpu()
    torch.testing.assert_close(got, sparsify.nm_sparsify_reference(x, 2, 4, vector=v, var=True), rtol=1e-5, atol=1e-5)
    pruned, scale = torch.ops.actsparse.nm_sparsify_var_scale(x.to(DEVICE), 8, 16, None)
    want_pruned, want_scale = sparsify.nm_sparsify_var_scale_reference(x, 8, 16)
    assert torch.equal(pruned.cpu(), want_pruned)
    torch.testing.assert_close(scale.cpu(), want_scale, rtol=1e-4, atol=1e-6)
