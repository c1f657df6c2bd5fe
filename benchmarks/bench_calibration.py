"""Learned layer-by-layer calibration on the GPU: the eager training step against the CUDA-graph step.

    python benchmarks/bench_calibration.py --model smollm2-135m
    python benchmarks/bench_calibration.py --model gemma3-270m --layers 6 --mitigations lpts,var-oscale-shift

For each mitigation, ``actsparse.calibrate_`` runs on the first ``--layers`` decoder layers
(``--windows`` calibration windows of ``--seqlen`` tokens, one pass: one training step per window
and layer) twice in the same process, ``cuda_graph=False`` then ``True``, ``--repeats`` times each
after one warm-up run of each. Printed: the median calibration seconds of each, training steps
per second, the ratio, and the largest difference between the two modes' trained tensors and
last losses (the graph replays the eager step's kernels, so they should agree to rounding).
Exits cleanly (status 0) without a CUDA device.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch


def calibrate_once(model, config, windows, bos_id, cuda_graph):
    from actsparse.calibration.layerwise import calibrate_
    from actsparse.sparsify import sparse_layers, unsparsify_

    torch.cuda.synchronize()
    start = time.perf_counter()
    report = calibrate_(model, config, windows, bos_id=bos_id, progress=False, cuda_graph=cuda_graph)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    state = {
        f"{n}.{k}": t.detach().float().cpu()
        for n, l in sparse_layers(model).items()
        for k, t in l.mitigation_state.tensors().items()
    }
    losses = [info.get("last_loss", 0.0) for info in report.layers.values()]
    unsparsify_(model)
    return seconds, state, losses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--layers", type=int, default=4, help="calibrate decoder layers 0..L-1")
    parser.add_argument("--windows", type=int, default=64)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--pattern", default="8:16")
    parser.add_argument("--criterion", default="amber")
    parser.add_argument("--mitigations", default="lpts,oscale-shift,var-oscale-shift")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", default="float32")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to measure")
        return

    from actsparse.config import SparsityConfig
    from actsparse.eval.run import EvalSettings, Evaluator

    settings = EvalSettings(model=args.model, seqlen=args.seqlen, dtype=args.dtype, device="cuda", max_tokens=args.seqlen * 4)
    evaluator = Evaluator(settings, progress=False)
    windows, calib = evaluator.calibration_windows(args.windows)
    print(
        f"{args.model}, {torch.cuda.get_device_name()}, torch {torch.__version__}, {args.dtype}: {len(windows)} windows of {args.seqlen} "
        f"tokens from {calib}, decoder layers 0-{args.layers - 1}, {args.pattern} {args.criterion}, {args.repeats} repeats (medians)"
    )
    print()
    print(
        "| mitigation | eager s | graph s | eager steps/s | graph steps/s | graph speed-up | max |Δ state| | max |Δ last loss| (rel) |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    steps = args.layers * len(windows)
    for mitigation in args.mitigations.split(","):
        config = SparsityConfig(
            pattern=args.pattern, criterion=args.criterion, mitigation=mitigation, layers=tuple(range(args.layers))
        )
        times = {False: [], True: []}
        for graph in (False, True):  # warm-up: allocator, kernels' autotuning, cuBLAS handles
            calibrate_once(evaluator.model, config, windows, evaluator.bos_id, graph)
        for _ in range(args.repeats):
            for graph in (False, True):
                seconds, state, losses = calibrate_once(evaluator.model, config, windows, evaluator.bos_id, graph)
                times[graph].append(seconds)
                if graph:
                    graphed, graphed_losses = state, losses
                else:
                    eager, eager_losses = state, losses
        eager_s, graph_s = statistics.median(times[False]), statistics.median(times[True])
        diff = max((eager[k] - graphed[k]).abs().max().item() for k in eager)
        loss_diff = max(abs(a - b) / max(abs(a), 1e-30) for a, b in zip(eager_losses, graphed_losses))
        print(
            f"| {mitigation} | {eager_s:.2f} | {graph_s:.2f} | {steps / eager_s:.0f} | {steps / graph_s:.0f} | {eager_s / graph_s:.2f}x "
            f"| {diff:.1e} | {loss_diff:.1e} |"
        )
        sys.stdout.flush()
    print()
    print(
        "Seconds are whole calibrate_ calls (input capture, dense passes, training, outputs); steps/s = layers x windows / seconds."
    )


if __name__ == "__main__":
    main()
