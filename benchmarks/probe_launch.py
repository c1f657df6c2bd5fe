"""Host time per call of a sparse layer on decode rows, eager, level by level.

Each figure is the host time of 300 back-to-back calls (no synchronisation inside, so the GPU
never holds the loop back while it is shorter than the host's), per call, median of 5; with
Triton's own launch (``kernel[grid]`` every call) and with the direct relaunch
(``kernels.launch``). Then a whole-model eager decode with each::

    PYTHONPATH=src python3 benchmarks/probe_launch.py
"""

from __future__ import annotations

import statistics
import time

import torch
import torch.nn.functional as F

import actsparse.kernels.launch as launch
from actsparse.config import SparsityConfig
from actsparse.core.dispatch import gemv_forward, sparsify_forward
from actsparse.core.sparse_linear import SparseLinear
from actsparse.eval.speed import BenchOptions, decode_tokens_per_s, preset_model
from actsparse.sparsify import sparsify_, unsparsify_
from actsparse.timing import Timer


def host_us(fn, calls: int = 300, repeats: int = 5) -> float:
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        times.append((time.perf_counter() - start) / calls * 1e6)
        torch.cuda.synchronize()
    return statistics.median(times)


def main() -> None:
    torch.manual_seed(0)
    config = SparsityConfig(pattern="8:16", backend="triton")
    linear = torch.nn.Linear(4096, 14336, bias=False, dtype=torch.bfloat16, device="cuda")
    layer = SparseLinear(linear, config.pattern_obj, config.criterion_obj, config.mitigation_obj, backend="triton")
    x = torch.randn(1, 1, 4096, dtype=torch.bfloat16, device="cuda")
    rows = x.reshape(1, 4096)
    cases = {
        "dense F.linear": lambda: F.linear(x, linear.weight),
        "SparseLinear forward (GEMV)": lambda: layer(x),
        "dispatch.gemv_forward": lambda: gemv_forward(layer, rows),
        "sparsify + F.linear": lambda: sparsify_forward(layer, rows),
        "empty tensor": lambda: torch.empty(1, 14336, dtype=torch.bfloat16, device="cuda"),
    }
    from triton import knobs

    import actsparse.kernels.sparse_gemv as sparse_gemv

    print(f"triton launch_enter_hook: {knobs.runtime.launch_enter_hook!r}")
    compiled = sparse_gemv._sparse_gemv_kernel  # the JIT function; its last compiled kernel is inspected below
    layer(x)
    kept = sparse_gemv.LAST_LAUNCH["kernel"]
    print(
        f"compiled kernel: {type(kept).__name__}, fields: "
        f"{[(f, hasattr(kept, f)) for f in ('run', 'function', 'packed_metadata', '_init_handles')]}, jit: {type(compiled).__name__}"
    )
    print(f"{'host us per call':<30} {'triton launch':>14} {'direct':>10}")
    for name, fn in cases.items():
        launch.ENABLED = False
        slow = host_us(fn)
        launch.ENABLED = True
        fast = host_us(fn)
        print(f"{name:<30} {slow:>14.1f} {fast:>10.1f}")
    print(f"GEMV kernels kept for direct relaunch: {len(sparse_gemv._GEMV_LAUNCH.compiled)}")
    model = preset_model("llama3-8b", torch.bfloat16, torch.device("cuda"))
    options = BenchOptions(steps=32, repeats=3)
    timer = Timer(torch.device("cuda"), options.warmup, options.repeats)
    dense = decode_tokens_per_s(model, 1, options, "eager", timer, torch.Generator().manual_seed(0))
    sparsify_(model, SparsityConfig(pattern="8:16"))
    rates = {}
    for enabled in (False, True):
        launch.ENABLED = enabled
        rates[enabled] = decode_tokens_per_s(model, 1, options, "eager", timer, torch.Generator().manual_seed(0))
    unsparsify_(model)
    print(
        f"llama3-8b eager decode batch 1: dense {dense:.1f} tok/s; 8:16 with triton launch {rates[False]:.1f}, "
        f"direct {rates[True]:.1f} tok/s ({rates[True] / dense:.2f}x dense)"
    )


if __name__ == "__main__":
    main()
