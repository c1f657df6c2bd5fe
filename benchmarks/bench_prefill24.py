"""Prefill cost of a Llama-3-8B MLP (hidden 4096, MLP 14336), dense cuBLAS vs 2:4 activation sparsity.

dense:  F.linear for gate, up (input x [T, 4096]) and down (input h [T, 14336]).
sparse: sparsify_compress24(x) (shared by gate/up) and sparsify_compress24(h), then Cslt24Linear
        (cuSPARSELt) for the three products.
All timed as CUDA graphs with triton.testing.do_bench(graph.replay, return_mode="median").

Run on CUDA:  PYTHONPATH=src python3 benchmarks/bench_prefill24.py [--tokens 512 2048] [--tune]
"""

import argparse

import torch
import torch.nn.functional as F
from triton.testing import do_bench

from actsparse.kernels.cslt24 import Cslt24Linear, mask24, sparsify_compress24

HIDDEN, MLP = 4096, 14336


def graph_time(fn) -> float:
    """Median µs of fn replayed as a CUDA graph."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return do_bench(g.replay, return_mode="median") * 1e3


def copy_bandwidth() -> float:
    """GB/s of y.copy_(x) on 1 GiB (bytes read + written)."""
    x = torch.empty(1 << 29, dtype=torch.bfloat16, device="cuda").normal_()
    y = torch.empty_like(x)
    return 2 * x.numel() * 2 / (graph_time(lambda: y.copy_(x)) * 1e-6) / 1e9


def compress_bytes(T: int, K: int) -> int:
    return T * K * 2 + T * K * 2 * 9 // 16


def rel_err(y, ref):
    return ((y.float() - ref.float()).norm() / ref.float().norm()).item()


def tune(T=8192):
    """Time the compress kernel for a few block sizes / warp counts."""
    for K in (HIDDEN, MLP):
        x = torch.randn(T, K, device="cuda", dtype=torch.bfloat16)
        row = []
        for bk in (64, 128, 256):
            for nw in (2, 4, 8):
                if K % bk == 0:
                    us = graph_time(lambda: sparsify_compress24(x, block_k=bk, num_warps=nw))
                    row.append(f"bk{bk}/w{nw}: {us:6.1f}us {compress_bytes(T, K) / us / 1e3:5.0f}GB/s")
        print(f"tune T={T} K={K}: " + " | ".join(row))


def bench(T: int, copy_gbs: float) -> str:
    g = torch.Generator(device="cuda").manual_seed(T)
    x = torch.randn(T, HIDDEN, device="cuda", dtype=torch.bfloat16, generator=g)
    h = torch.randn(T, MLP, device="cuda", dtype=torch.bfloat16, generator=g)
    w_gate, w_up = (torch.randn(MLP, HIDDEN, device="cuda", dtype=torch.bfloat16, generator=g) / 64 for _ in range(2))
    w_down = torch.randn(HIDDEN, MLP, device="cuda", dtype=torch.bfloat16, generator=g) / 128
    gate, up, down = Cslt24Linear(w_gate), Cslt24Linear(w_up), Cslt24Linear(w_down)

    # correctness (also warms the alg_id cache outside graph capture)
    cx, ch = sparsify_compress24(x), sparsify_compress24(h)
    xm, hm = x * mask24(x), h * mask24(h)
    errs = [
        rel_err(gate(cx, T), F.linear(xm, w_gate)),
        rel_err(up(cx, T), F.linear(xm, w_up)),
        rel_err(down(ch, T), F.linear(hm, w_down)),
    ]
    assert max(errs) <= 1e-2, errs
    t_ref = do_bench(lambda: torch._cslt_compress(xm), return_mode="median") * 1e3 if T <= 8192 else float("nan")
    del xm, hm

    def dense():
        F.linear(x, w_gate), F.linear(x, w_up), F.linear(h, w_down)

    def sparse():
        a, b = sparsify_compress24(x), sparsify_compress24(h)
        gate(a, T), up(a, T), down(b, T)

    def sparse_mm():
        gate(cx, T), up(cx, T), down(ch, T)

    t_dense, t_sparse, t_mm = graph_time(dense), graph_time(sparse), graph_time(sparse_mm)
    t_cx = graph_time(lambda: sparsify_compress24(x))
    t_ch = graph_time(lambda: sparsify_compress24(h))
    gbs = (compress_bytes(T, HIDDEN) + compress_bytes(T, MLP)) / ((t_cx + t_ch) * 1e-6) / 1e9
    return (
        f"{T:6d} | {t_dense:8.1f} | {t_sparse:8.1f} | {t_dense / t_sparse:5.2f} | {t_mm:8.1f} | {t_dense / t_mm:5.2f} | "
        f"{t_cx:6.1f} {t_ch:7.1f} | {gbs:5.0f} ({gbs / copy_gbs:4.0%}) | {t_ref:8.1f} | {max(errs):.1e}"
    )


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, nargs="+", default=[512, 1024, 2048, 4096, 8192, 16384])
    ap.add_argument("--tune", action="store_true")
    args = ap.parse_args()
    print(torch.cuda.get_device_name(), "torch", torch.__version__, "cuSPARSELt", torch.backends.cusparselt.version())
    if args.tune:
        tune()
    copy_gbs = copy_bandwidth()
    print(f"copy bandwidth {copy_gbs:.0f} GB/s (read + write)")
    print(
        "Llama-3-8B MLP, bf16, µs (CUDA graphs, median). compress = sparsify_compress24 on x [T,4096] and h [T,14336];"
        " cslt_compress = torch._cslt_compress(x masked) eager, for reference"
    )
    print("     T | dense    | sparse   | d/s   | sp. mm   | d/mm  | compress x, h  | GB/s (of copy) | cslt_cmp | max rel err")
    for T in args.tokens:
        print(bench(T, copy_gbs), flush=True)
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
