"""Per-layer decode: the one-launch sparse GEMV (``kernels.sparse_gemv``) against dense cuBLAS.

Llama-3-8B shapes, bf16, random weights and fresh random inputs (never zeros), each call
captured in a CUDA graph (one graph per input, replays rotate) and timed by
``triton.testing.do_bench`` (median; the L2 is flushed before every call, so the weight is read
from HBM). Before timing, every case is checked against the PyTorch reference. Ratios are dense
time / sparse time, both measured in this run.

    python benchmarks/bench_gemv.py                      # default plans, table + JSON
    python benchmarks/bench_gemv.py --sweep              # also try tile / chunk / warp choices
    python benchmarks/bench_gemv.py --ceilings           # copy bandwidth and bf16 GEMM rate first
    python benchmarks/bench_gemv.py --json out.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import multiprocessing as mp
import sys
import time

import torch
import torch.nn.functional as F

from actsparse.eval.speed import capture_graph

SHAPES = [(4096, 14336), (14336, 4096), (4096, 4096), (4096, 1024)]  # gate/up, down, q/o, k/v
PATTERNS = [(2, 4), (8, 16), (16, 32)]


def time_us(fns, rep=200) -> float:
    from triton.testing import do_bench

    graphs = itertools.cycle([capture_graph(fn) for fn in fns])
    return do_bench(lambda: next(graphs).replay(), warmup=25, rep=rep, return_mode="median") * 1e3


def ceilings():
    from triton.testing import do_bench

    src = torch.empty(1 << 29, dtype=torch.bfloat16, device="cuda").normal_()
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), warmup=50, rep=300, return_mode="median")
    copy = 2 * src.numel() * 2 / ms / 1e6
    a = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    b = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    ms = do_bench(lambda: a @ b, warmup=50, rep=300, return_mode="median")
    flops = 2 * 8192**3 / ms / 1e9
    print(f"ceilings: copy {copy:.0f} GB/s (read + write), bf16 GEMM {flops:.0f} TFLOP/s", flush=True)
    del src, dst
    return {"copy_GBps": copy, "gemm_TFLOPs": flops}


def make_case(k, o, rows, count, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    weight = (torch.randn(o, k, device="cuda", generator=g) / k**0.5).to(torch.bfloat16)
    xs = [torch.randn(rows, k, device="cuda", generator=g).to(torch.bfloat16) for _ in range(count)]
    return weight, xs


def plans_for(k, o, rows, m, sweep):
    from actsparse.kernels.sparse_gemv import gemv_plan, sm_count

    sms = sm_count(torch.device("cuda"))
    default = gemv_plan(k, o, m, rows, sms)
    if not sweep:
        return [default]
    plans = {default}
    for block_o, per_sm, block_k, warps, stages in itertools.product((256, 512, 1024), (1, 2, 4), (16, 32, 64), (4, 8), (3,)):
        if block_o > o or (block_o == 256 and o > 4096):
            continue
        tiles = -(-o // block_o)
        split = max(1, round(per_sm * sms / tiles))
        groups = max(1, -(-k // (split * m)))
        chunk = m * (1 << (groups - 1).bit_length())
        plans.add(gemv_plan(k, o, m, rows, sms, block_o=block_o, chunk=chunk, block_k=block_k, num_warps=warps, stages=stages))
    return sorted(plans)


def _compile(job):
    k, o, rows, n, m, plan = job
    from actsparse.kernels.sparse_gemv import GemvPlan, sparse_gemv, tile_weight, workspace_for

    plan = GemvPlan(*plan)
    weight, xs = make_case(k, o, rows, 1, 0)
    sparse_gemv(xs[0], tile_weight(weight, plan.block_o), o, n, m, workspace_for(k, o, [plan], "cuda"), plan)
    torch.cuda.synchronize()
    return True


def precompile(jobs, workers=12):
    """Compile every (shape, plan) in parallel processes; the main process then loads them from Triton's cache."""
    start = time.time()
    with mp.get_context("spawn").Pool(workers) as pool:
        pool.map(_compile, [(k, o, r, n, m, tuple(p)) for k, o, r, n, m, p in jobs])
    print(f"precompiled {len(jobs)} kernels in {time.time() - start:.0f} s", flush=True)


def bench_case(k, o, rows, n, m, plans, inputs=4):
    from actsparse.kernels.sparse_gemv import sparse_gemv, sparse_gemv_reference, tile_weight, workspace_for

    weight, xs = make_case(k, o, rows, inputs, seed=k * 7 + o + rows)
    dense = time_us([lambda x=x: F.linear(x, weight) for x in xs])
    results = []
    for plan in plans:
        ws = workspace_for(k, o, [plan], "cuda")
        wt = tile_weight(weight, plan.block_o)
        for x in xs:  # check before timing
            y = sparse_gemv(x, wt, o, n, m, ws, plan)
            ref = sparse_gemv_reference(x, weight, n, m)
            err = float((y.float() - ref.float()).norm() / ref.float().norm())
            if not err < 1e-2:
                raise SystemExit(f"WRONG: {k}->{o} rows={rows} {n}:{m} {plan}: rel err {err:.3g}")
        outs = [torch.empty(rows, o, dtype=torch.bfloat16, device="cuda") for _ in xs]
        sparse = time_us([lambda x=x, out=out: sparse_gemv(x, wt, o, n, m, ws, plan, out=out) for x, out in zip(xs, outs)])
        results.append({"plan": list(plan), "sparse_us": sparse})
    best = min(results, key=lambda r: r["sparse_us"])
    kept = 1 - (1 - n / m) ** rows if rows > 1 else n / m  # expected share of rows read (independent tokens)
    return {
        "k": k,
        "o": o,
        "rows": rows,
        "n": n,
        "m": m,
        "dense_us": dense,
        "best": best,
        "all": results,
        "ratio": dense / best["sparse_us"],
        "dense_GBps": k * o * 2 / dense / 1e3,
        "sparse_GBps": k * o * 2 * kept / best["sparse_us"] / 1e3,
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sweep", action="store_true", help="try tile/chunk/warp choices (batch 1, 8:16) and report the best")
    parser.add_argument("--ceilings", action="store_true", help="measure copy bandwidth and bf16 GEMM rate first")
    parser.add_argument("--rows", default="1,2,4")
    parser.add_argument("--json", default=None, help="write all results here")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench_gemv.py needs a CUDA GPU")
    rows_list = [int(r) for r in args.rows.split(",")]
    out = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "cases": []}
    import triton

    out["triton"] = triton.__version__
    if args.ceilings:
        out["ceilings"] = ceilings()
    cases = [(k, o, r, n, m) for (k, o) in SHAPES for r in rows_list for (n, m) in PATTERNS]
    jobs = []
    plan_lists = {}
    for k, o, r, n, m in cases:
        plan_lists[(k, o, r, n, m)] = plans_for(k, o, r, m, args.sweep and r == 1 and (n, m) == (8, 16))
        jobs += [(k, o, r, n, m, p) for p in plan_lists[(k, o, r, n, m)]]
    precompile(jobs)
    print(f"device: {out['device']}; CUDA graphs + do_bench median, L2 flushed per call; bf16", flush=True)
    print(
        f"{'K -> O':>14} {'rows':>4} {'N:M':>6} {'dense us':>9} {'sparse us':>9} {'ratio':>6} {'dense GB/s':>10} {'sparse GB/s':>11}  plan"
    )
    for key in cases:
        result = bench_case(*key, plan_lists[key])
        out["cases"].append(result)
        k, o, r, n, m = key
        print(
            f"{k:>6} -> {o:<6} {r:>4} {n:>3}:{m:<2} {result['dense_us']:>9.1f} {result['best']['sparse_us']:>9.1f} "
            f"{result['ratio']:>6.2f} {result['dense_GBps']:>10.0f} {result['sparse_GBps']:>11.0f}  {tuple(result['best']['plan'])}",
            flush=True,
        )
        if args.json:
            with open(args.json, "w") as handle:
                json.dump(out, handle, indent=1)


if __name__ == "__main__":
    main()
