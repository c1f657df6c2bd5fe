"""Timing helpers shared by the fast-path tuner, the bench command and the benchmark scripts."""

from __future__ import annotations

import statistics
import time

import torch


class Timer:
    """Milliseconds of ``fn()``: CUDA events on CUDA, the host clock elsewhere; median of ``repeats``."""

    def __init__(self, device: torch.device, warmup: int, repeats: int):
        self.cuda = device.type == "cuda"
        self.warmup, self.repeats = warmup, repeats

    def __call__(self, fn, before=None) -> float:
        for _ in range(self.warmup):
            before and before()
            fn()
        times = []
        for _ in range(self.repeats):
            before and before()
            if self.cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                torch.cuda.synchronize()
                start.record()
                fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)


def capture_graph(fn, warmup: int = 2):
    """``fn`` captured as a CUDA graph after ``warmup`` calls on a side stream (workspaces made outside)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph
