"""Host microseconds per call of the two decode GEMVs and F.linear on a tiny layer (the GPU work is
negligible there, so the loop measures what eager decoding pays on the host per launch).

    PYTHONPATH=src python3 benchmarks/probe_one_host.py   # results/probe-one-host-h200.txt
"""

import time

import torch
import torch.nn.functional as F

from actsparse.kernels.gemv_weight import GemvWeight


def host_us(fn, calls: int = 300) -> float:
    """Median over 5 runs of the host time per call of ``calls`` back-to-back calls."""
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    runs = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        runs.append((time.perf_counter() - start) / calls * 1e6)
        torch.cuda.synchronize()
    return sorted(runs)[2]


def main() -> None:
    torch.manual_seed(0)
    weight = torch.randn(256, 256, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(1, 256, device="cuda", dtype=torch.bfloat16)
    gemv = GemvWeight(weight, block_o=256)
    print(f"F.linear {host_us(lambda: F.linear(x, weight)):.1f} us")
    print(f"batched GEMV {host_us(lambda: gemv(x, 2, 4)):.1f} us")
    print(f"one-token GEMV {host_us(lambda: gemv.one(x, 2, 4)):.1f} us")


if __name__ == "__main__":
    main()
