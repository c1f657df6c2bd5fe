"""Probe 2: per-call overhead of cuSPARSELt (graphs), compressed layout, CUTLASS path."""

import torch
import torch.nn.functional as F
from torch.sparse._semi_structured_conversions import sparse_semi_structured_from_dense_cutlass
from triton.testing import do_bench


def mask24(x):
    g = x.abs().reshape(-1, 4)
    idx = g.topk(2, dim=-1).indices
    m = torch.zeros_like(g, dtype=torch.bool).scatter_(-1, idx, True)
    return x * m.reshape(x.shape), m.reshape(x.shape)


def graph_time(fn):
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return do_bench(g.replay, return_mode="median")


torch.manual_seed(0)
x, m = mask24(torch.randn(256, 256, device="cuda", dtype=torch.bfloat16))
c = torch._cslt_compress(x)
flat = c.view(-1)
vals = x[m].reshape(-1)
n = vals.numel()
print("values part equals row-major kept values:", torch.equal(flat[:n], vals))
meta = flat[n:].view(torch.int16)
print("meta elems", meta.numel(), "first", meta[:8].tolist())
# CUTLASS layout reference
sp, me = sparse_semi_structured_from_dense_cutlass(x)
print("cutlass values eq:", torch.equal(sp.reshape(-1), vals), "meta", me.shape, me.dtype)
print(
    "cslt meta == cutlass meta (as int16)?",
    meta.numel() == me.numel() and torch.equal(meta.reshape(-1), me.view(torch.int16).reshape(-1)),
)

for T in (512, 2048, 8192):
    for K, O in ((4096, 14336), (14336, 4096)):
        x, m = mask24(torch.randn(T, K, device="cuda", dtype=torch.bfloat16))
        w = torch.randn(O, K, device="cuda", dtype=torch.bfloat16) / 64
        c = torch._cslt_compress(x)
        alg = torch._cslt_sparse_mm_search(c, w.t())
        dense = do_bench(lambda: F.linear(x, w), return_mode="median")
        dense_g = graph_time(lambda: F.linear(x, w))
        try:
            sp_g = graph_time(lambda: torch._cslt_sparse_mm(c, w.t(), alg_id=alg))
        except Exception as e:
            sp_g = float("nan")
            print("graph cslt failed", repr(e)[:200])
        try:
            sp_t, me = sparse_semi_structured_from_dense_cutlass(x)
            cut = do_bench(lambda: torch._sparse_semi_structured_linear(w, sp_t, me), return_mode="median")
            y = torch._sparse_semi_structured_linear(w, sp_t, me)
            ref = F.linear(x, w)
            err = ((y.t().float() - ref.float()).norm() / ref.float().norm()).item()
        except Exception as e:
            cut, err = float("nan"), repr(e)[:200]
        try:
            tile = do_bench(lambda: torch._sparse_semi_structured_tile(x, algorithm="", use_cutlass=True), return_mode="median")
        except Exception:
            tile = float("nan")
        print(
            f"T={T:6} K={K:6} O={O:6} dense {dense * 1e3:7.1f} dense(graph) {dense_g * 1e3:7.1f} cslt(graph) {sp_g * 1e3:7.1f} cutlass(W·Xᵀ) {cut * 1e3:7.1f} err {err} tile-compress {tile * 1e3:7.1f}"
        )
