"""Where the sparse GEMV's time goes: each phase alone, registers and spills (CUDA only).

    python benchmarks/probe_gemv.py

Phases (``sparse_gemv(..., phases=)``): 1 = select + finish (no weight rows read), 3 = the real
kernel. Same timing as bench_gemv.py.
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from bench_gemv import make_case, time_us  # noqa: E402

from actsparse.kernels import sparse_gemv as sg  # noqa: E402

CASES = [  # (K, O, rows, N, M, plan, also time phase 1)
    (4096, 14336, 1, 8, 16, (512, 256, 16, 4, 3), True),
    (4096, 14336, 1, 8, 16, (64, 4096, 64, 4, 3), True),
    (4096, 14336, 1, 8, 16, (64, 4096, 128, 4, 3), False),
    (4096, 14336, 1, 8, 16, (128, 4096, 64, 4, 3), False),
    (4096, 14336, 1, 8, 16, (32, 4096, 128, 2, 4), False),
    (4096, 14336, 1, 8, 16, (64, 4096, 64, 4, 4), False),
    (4096, 14336, 1, 8, 16, (128, 4096, 128, 8, 3), False),
    (4096, 14336, 1, 8, 16, (256, 1024, 32, 4, 3), False),
    (4096, 14336, 2, 8, 16, (64, 4096, 64, 4, 3), False),
    (14336, 4096, 1, 8, 16, (512, 512, 16, 4, 3), False),
    (14336, 4096, 1, 8, 16, (32, 14336, 128, 2, 4), True),
    (14336, 4096, 1, 8, 16, (32, 14336, 64, 4, 3), False),
    (14336, 4096, 1, 8, 16, (64, 7168, 64, 4, 3), False),
    (14336, 4096, 1, 8, 16, (128, 3584, 64, 4, 3), False),
    (4096, 4096, 1, 8, 16, (512, 128, 16, 4, 3), False),
    (4096, 4096, 1, 8, 16, (32, 4096, 64, 4, 3), True),
    (4096, 4096, 1, 8, 16, (32, 4096, 128, 2, 4), False),
    (4096, 4096, 1, 8, 16, (64, 2048, 64, 4, 3), False),
    (4096, 4096, 1, 8, 16, (128, 1024, 64, 4, 3), False),
    (4096, 1024, 1, 8, 16, (16, 4096, 64, 2, 3), False),
    (4096, 1024, 1, 8, 16, (32, 2048, 64, 4, 3), False),
    (4096, 1024, 1, 8, 16, (64, 512, 64, 4, 3), False),
    (4096, 1024, 1, 8, 16, (256, 128, 32, 4, 3), False),
]


def main():
    print(f"device: {torch.cuda.get_device_name()}")
    print(
        f"{'K -> O':>14} {'rows':>4} {'N:M':>5} {'plan':>26} {'dense':>6} {'select':>7} {'full':>6} {'regs':>5} {'spill':>5} {'smem':>6}"
    )
    from bench_gemv import precompile

    precompile([(k, o, rows, n, m, plan) for k, o, rows, n, m, plan, _ in CASES])
    for k, o, rows, n, m, plan, phase1 in CASES:
        plan = sg.GemvPlan(*plan)
        weight, xs = make_case(k, o, rows, 4, seed=1)
        wt = sg.tile_weight(weight, plan.block_o)
        ws = sg.workspace_for(k, o, [plan], "cuda")
        dense = time_us([lambda x=x: F.linear(x, weight) for x in xs])
        times = {}
        for phases in (1, 3) if phase1 else (3,):
            outs = [torch.empty(rows, o, dtype=x.dtype, device="cuda") for x in xs]
            times[phases] = time_us(
                [
                    lambda x=x, out=out: sg.sparse_gemv(x, wt, o, n, m, ws, plan, out=out, phases=phases)
                    for x, out in zip(xs, outs)
                ]
            )
        kern = sg.LAST_LAUNCH["kernel"]
        print(
            f"{k:>6} -> {o:<6} {rows:>4} {n:>2}:{m:<2} {str(tuple(plan)):>26} {dense:>6.1f} {times.get(1, float('nan')):>7.1f} "
            f"{times[3]:>6.1f} {getattr(kern, 'n_regs', -1):>5} {getattr(kern, 'n_spills', -1):>5} {getattr(kern.metadata, 'shared', -1):>6}",
            flush=True,
        )
    # the launch-and-event floor: a graph of one tiny kernel
    tiny = torch.zeros(1, device="cuda")
    print(f"floor: one-element add in a graph {time_us([lambda: tiny.add_(1)]):.1f} us")


if __name__ == "__main__":
    main()
