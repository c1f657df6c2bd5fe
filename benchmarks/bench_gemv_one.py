"""Per-layer decode at one token: the GEMV with selection in each step (``kernels.gemv_one``)
against the batched one-launch GEMV (``kernels.sparse_gemv``) and dense cuBLAS, in one run.

Same method as ``bench_gemv.py``: Llama-3-8B shapes (and the side-by-side q/k/v and gate/up
weights of the linked layers), bf16, random weights, fresh random inputs, one CUDA graph per
input, ``do_bench`` medians with the L2 flushed before every call. Every plan is checked
against the PyTorch reference first.

    python benchmarks/bench_gemv_one.py                  # default plans
    python benchmarks/bench_gemv_one.py --sweep          # also chunk / tile / stage / warp choices (8:16)
    python benchmarks/bench_gemv_one.py --narrow         # narrow column tiles with long chunks (few splits)
    python benchmarks/bench_gemv_one.py --predicated     # kept rows in slots against loads under the keep flags
    python benchmarks/bench_gemv_one.py --variants       # the default plan with one choice changed at a time
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
from bench_gemv import make_case, time_us

SHAPES = [(4096, 14336), (14336, 4096), (4096, 4096), (4096, 1024), (4096, 6144), (4096, 28672)]
LINKED = {(14336, 4096), (4096, 4096), (4096, 6144), (4096, 28672)}  # what a linked Llama block runs (swept)
PATTERNS = [(2, 4), (8, 16), (16, 32)]


def one_workspace(k, o, block_o, plan):
    from actsparse.kernels.sparse_gemv import Workspace

    split, tiles = -(-k // plan.chunk), -(-o // block_o)
    f32 = dict(dtype=torch.float32, device="cuda")
    return Workspace(torch.empty(split * 4 * o, **f32), torch.empty(split * tiles * 16, **f32),
                     torch.zeros(tiles, dtype=torch.int32, device="cuda"), torch.empty(1, dtype=torch.int32, device="cuda"),
                     torch.empty(1, **f32))  # fmt: skip


def plans_for(k, o, n, m, sweep):
    from actsparse.kernels.gemv_one import one_block_o, one_plan
    from actsparse.kernels.sparse_gemv import sm_count

    sms = sm_count(torch.device("cuda"))
    block_o = one_block_o(o)
    default = (block_o, one_plan(k, o, n, m, block_o, sms))
    if not sweep:
        return [default]
    plans = {default}
    for bo, mult, stages, warps, sub_mult in itertools.product((256, 512), (2, 4, 8, 16), (3, 4), (4,), (1, 2)):
        if bo > max(256, o):
            continue
        base = one_plan(k, o, n, m, bo, sms)
        sub = base.sub * sub_mult
        chunk = sub * mult
        if chunk > k:
            continue
        plans.add((bo, one_plan(k, o, n, m, bo, sms, sub=sub, chunk=chunk, num_warps=warps, stages=stages)))
    return sorted(plans)


def narrow_plans(k, o, n, m):
    """Column tiles of 64 to 256 with 2 to 16 splits of the input rows (long streams, a short finish)."""
    from actsparse.kernels.gemv_one import one_plan
    from actsparse.kernels.sparse_gemv import sm_count

    sms = sm_count(torch.device("cuda"))
    plans = set()
    for bo, split, stages, sub_mult in itertools.product((64, 128, 256), (2, 4, 8, 16), (3, 5), (1, 2)):
        sub = one_plan(k, o, n, m, bo, sms).sub * sub_mult
        chunk = -(-k // (split * sub)) * sub
        plans.add((bo, one_plan(k, o, n, m, bo, sms, sub=sub, chunk=chunk, stages=stages)))
    return sorted(plans)


def predicated_plans(k, o, n, m):
    """The default tile and chunk rule, with kept rows placed in slots or loaded under their flags."""
    from actsparse.kernels.gemv_one import one_block_o, one_plan
    from actsparse.kernels.sparse_gemv import sm_count

    sms, bo = sm_count(torch.device("cuda")), one_block_o(o)
    plans = set()
    for sub, halve, stages, compact in itertools.product((32, 64, 128), (False, True), (3, 4), (True, False)):
        sub = max(sub, m)
        chunk = one_plan(k, o, n, m, bo, sms, sub=sub).chunk
        if halve and chunk >= 2 * sub:
            chunk = chunk // (2 * sub) * sub
        try:
            plans.add((bo, one_plan(k, o, n, m, bo, sms, sub=sub, chunk=chunk, stages=stages, compact=compact)))
        except ValueError:
            continue
    return sorted(plans)


def variant_plans(k, o, n, m):
    """The default plan, and the same with one choice changed: loads ahead, integer keys, PDL, top-N
    keys, pipeline stages, warps, step size."""
    from actsparse.kernels.gemv_one import one_block_o, one_plan
    from actsparse.kernels.sparse_gemv import sm_count

    bo = one_block_o(o)
    base = one_plan(k, o, n, m, bo, sm_count(torch.device("cuda")))
    plans = [base, base._replace(ahead=not base.ahead), base._replace(keyed=not base.keyed),
             base._replace(pdl=not base.pdl), base._replace(topk=not base.topk), base._replace(stages=5),
             base._replace(num_warps=8)]  # fmt: skip
    if base.chunk % (2 * base.sub) == 0:
        plans.append(base._replace(sub=2 * base.sub))
    return [(bo, p) for p in dict.fromkeys(plans)]


def _compile(job):
    k, o, n, m, block_o, plan = job
    from actsparse.kernels.gemv_one import OnePlan, sparse_gemv_one
    from actsparse.kernels.sparse_gemv import tile_weight

    plan = OnePlan(*plan)
    weight, xs = make_case(k, o, 1, 1, 0)
    sparse_gemv_one(xs[0], tile_weight(weight, block_o), o, n, m, one_workspace(k, o, block_o, plan), plan)
    torch.cuda.synchronize()
    return True


def bench_case(k, o, n, m, plans, inputs=4):
    from actsparse.kernels.gemv_one import sparse_gemv_one
    from actsparse.kernels.gemv_weight import GemvWeight
    from actsparse.kernels.sparse_gemv import sparse_gemv_reference, tile_weight

    weight, xs = make_case(k, o, 1, inputs, seed=k * 7 + o)
    dense = time_us([lambda x=x: F.linear(x, weight) for x in xs])
    batched = GemvWeight(weight)
    outs = [torch.empty(1, o, dtype=torch.bfloat16, device="cuda") for _ in xs]
    old = time_us([lambda x=x: batched(x, n, m) for x in xs])
    results = []
    for block_o, plan in plans:
        wt = tile_weight(weight, block_o)
        ws = one_workspace(k, o, block_o, plan)
        for x in xs:
            y = sparse_gemv_one(x, wt, o, n, m, ws, plan)
            ref = sparse_gemv_reference(x, weight, n, m)
            err = float((y.float() - ref.float()).norm() / ref.float().norm())
            if not err < 1e-2:
                raise SystemExit(f"WRONG: {k}->{o} {n}:{m} {block_o} {plan}: rel err {err:.3g}")
            again = sparse_gemv_one(x, wt, o, n, m, ws, plan)
            if not torch.equal(y, again):
                raise SystemExit(f"NOT DETERMINISTIC: {k}->{o} {n}:{m} {block_o} {plan}")
        us = time_us(
            rep=100, fns=[lambda x=x, out=out: sparse_gemv_one(x, wt, o, n, m, ws, plan, out=out) for x, out in zip(xs, outs)]
        )
        results.append({"block_o": block_o, "plan": list(plan), "sparse_us": us})
    best = min(results, key=lambda r: r["sparse_us"])
    return {"k": k, "o": o, "n": n, "m": m, "dense_us": dense, "batched_us": old, "best": best, "all": results}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sweep", action="store_true")
    parser.add_argument("--narrow", action="store_true")
    parser.add_argument("--predicated", action="store_true", help="slots against predicated loads (2:4, 8:16)")
    parser.add_argument("--variants", action="store_true", help="one choice of the default plan changed at a time")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench_gemv_one.py needs a CUDA GPU")
    cases = [(k, o, n, m) for (k, o) in SHAPES for (n, m) in PATTERNS]
    if args.variants:
        cases = [(k, o, n, m) for (k, o) in SHAPES if (k, o) in LINKED for (n, m) in PATTERNS[:2]]
        plan_lists = {c: variant_plans(*c) for c in cases}
    elif args.narrow or args.predicated:
        cases = [(k, o, n, m) for (k, o) in SHAPES if (k, o) in LINKED for (n, m) in PATTERNS[:2]]
        plan_lists = {c: (narrow_plans if args.narrow else predicated_plans)(*c) for c in cases}
    else:
        plan_lists = {c: plans_for(*c, args.sweep and c[2:] == (8, 16) and c[:2] in LINKED) for c in cases}
    jobs = [(*c, bo, tuple(p)) for c in cases for bo, p in plan_lists[c]]
    start = time.time()
    with mp.get_context("spawn").Pool(12) as pool:
        pool.map(_compile, jobs)
    print(f"precompiled {len(jobs)} kernels in {time.time() - start:.0f} s", flush=True)
    out = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "cases": []}
    print(f"{'K -> O':>14} {'N:M':>6} {'dense us':>9} {'batched':>8} {'one us':>8} {'x dense':>7} {'x batched':>9}  plan")
    for c in cases:
        r = bench_case(*c, plan_lists[c])
        out["cases"].append(r)
        k, o, n, m = c
        best = r["best"]
        print(f"{k:>6} -> {o:<6} {n:>3}:{m:<2} {r['dense_us']:>9.1f} {r['batched_us']:>8.1f} {best['sparse_us']:>8.1f} "
              f"{r['dense_us'] / best['sparse_us']:>7.2f} {r['batched_us'] / best['sparse_us']:>9.2f}  "
              f"{best['block_o']} {tuple(best['plan'])}", flush=True)  # fmt: skip
        if args.variants:  # every variant, in plan order (the first is the default)
            for other in r["all"]:
                print(f"{'':>22} {other['sparse_us']:>8.1f}  {other['block_o']} {tuple(other['plan'])}", flush=True)
        elif args.narrow or args.predicated:  # the five best
            for other in sorted(r["all"], key=lambda x: x["sparse_us"])[:5]:
                print(f"{'':>22} {other['sparse_us']:>8.1f}  {other['block_o']} {tuple(other['plan'])}", flush=True)
        if args.json:
            with open(args.json, "w") as handle:
                json.dump(out, handle, indent=1)


if __name__ == "__main__":
    main()
