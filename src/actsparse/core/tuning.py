"""Measure once, per sparse layer shape, which fast path wins; the dispatch tables keep the answer.

``tune_(model)`` times, on the model's own sparse layers (one per distinct shape and config):

- **decode** (rows 1 .. ``MAX_ROWS``): the one-launch sparse GEMV against sparsify + dense product,
  inside CUDA graphs (the mode decoding runs in), into ``DECODE_CHOICE``;
- **prefill** (the given row counts, 2:4 layers without mitigation): the cuSPARSELt product
  against sparsify + dense product, in eager mode and inside CUDA graphs, into ``PREFILL_CHOICE``.

Each figure is the median over replays of ``calls`` back-to-back calls (so eager timings include
the host cost a call cannot hide), with a 64 MiB write between calls so that the weights come
from memory as in a whole model, minus the same writes timed alone. ``forward`` never times
anything: without ``tune_`` the layers follow the defaults documented in ``core.dispatch``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from functools import partial

import torch

from actsparse.core.dispatch import (
    DECODE_CHOICE,
    EAGER,
    GRAPH,
    PREFILL_CHOICE,
    cslt_applies,
    gemv_forward,
    runs_here,
    sparsify_forward,
)
from actsparse.core.sparse_linear import SparseLinear
from actsparse.errors import ActsparseError
from actsparse.kernels.sparse_gemv import MAX_ROWS
from actsparse.timing import Timer, capture_graph

FLUSH_BYTES = 64 << 20  # more than the H100/H200 L2 (50 / 60 MiB)


@dataclass(frozen=True)
class Tuned:
    """One measured choice: ``sparse_ms`` (the fast path) against ``dense_ms`` (sparsify + dense product)."""

    phase: str  # "decode" or "prefill"
    mode: str  # "eager" or "graph"
    rows: int
    in_features: int
    out_features: int
    pattern: str
    dtype: str
    sparse_ms: float
    dense_ms: float

    @property
    def sparse_wins(self) -> bool:
        return self.sparse_ms < self.dense_ms

    def to_dict(self) -> dict:
        return {**asdict(self), "sparse_wins": self.sparse_wins}


def distinct_layers(model) -> list[SparseLinear]:
    """One CUDA sparse layer on the Triton path per (K, O, pattern, dtype, mitigation kernel, vector or not)."""
    seen, layers = set(), []
    for module in model.modules():
        if not isinstance(module, SparseLinear) or module.backend != "triton" or not module.weight.is_cuda:
            continue
        key = (module.in_features, module.out_features, str(module.pattern), module.weight.dtype,
               module.mitigation.kernel, module.feature_vector is not None)  # fmt: skip
        if key not in seen:
            seen.add(key)
            layers.append(module)
    return layers


class _Clock:
    """Per-call milliseconds of ``fn`` over ``calls`` back-to-back calls with an L2 flush between them."""

    def __init__(self, device: torch.device, repeats: int):
        self.timer = Timer(device, warmup=2, repeats=repeats)
        self.flush = torch.empty(FLUSH_BYTES, dtype=torch.uint8, device=device)

    def _run(self, fn, calls: int, mode: str, with_fn: bool) -> float:
        def body():
            for _ in range(calls):
                self.flush.zero_()
                if with_fn:
                    fn()

        if mode == GRAPH:
            graph = capture_graph(body)
            return self.timer(graph.replay)
        return self.timer(body)

    def __call__(self, fn, calls: int, mode: str) -> float:
        return max(0.0, self._run(fn, calls, mode, True) - self._run(fn, calls, mode, False)) / calls


@torch.no_grad()
def tune_(
    model, *, decode_rows=tuple(range(1, MAX_ROWS + 1)), prefill_rows=(), modes=(EAGER, GRAPH), repeats: int = 7, seed: int = 0
) -> list[Tuned]:
    """Time the fast paths of ``model``'s sparse layers once and record the winners (see the module
    docstring); returns every measurement. Layers that do not run the Triton path on CUDA are skipped."""
    for rows in (*decode_rows, *prefill_rows):
        if not isinstance(rows, int) or isinstance(rows, bool) or rows < 1:
            raise ActsparseError(f"rows to tune must be positive integers, got {rows!r}")
    bad = [rows for rows in decode_rows if rows > MAX_ROWS]
    if bad:
        raise ActsparseError(
            f"decode rows go up to {MAX_ROWS} (the sparse GEMV's limit), got {bad}; larger counts are prefill rows"
        )
    for mode in modes:
        if mode not in (EAGER, GRAPH):
            raise ActsparseError(f"unknown mode {mode!r}; choose {EAGER} or {GRAPH}")
    generator = torch.Generator().manual_seed(seed)
    results: list[Tuned] = []
    for layer in distinct_layers(model):
        results += _tune_layer(layer, decode_rows, prefill_rows, modes, _Clock(layer.weight.device, repeats), generator)
    return results


def _tune_layer(layer: SparseLinear, decode_rows, prefill_rows, modes, clock: _Clock, generator) -> list[Tuned]:
    n, m = layer.pattern.n, layer.pattern.m
    k, o, dtype = layer.in_features, layer.out_features, layer.weight.dtype
    results = []

    def record(phase, mode, rows, sparse_ms, dense_ms):
        dtype_name = str(dtype).removeprefix("torch.")
        results.append(Tuned(phase, mode, rows, k, o, str(layer.pattern), dtype_name, sparse_ms, dense_ms))
        return results[-1].sparse_wins

    for rows in decode_rows:
        x = torch.randn(rows, k, generator=generator).to(device=layer.weight.device, dtype=dtype)
        if not runs_here(x, layer.forced_backend):
            continue
        gemv_forward(layer, x)  # the transposed weight copy and the workspace, made outside the capture
        sparse = clock(partial(gemv_forward, layer, x), 20, GRAPH)
        dense = clock(partial(sparsify_forward, layer, x), 20, GRAPH)
        DECODE_CHOICE.measured[(k, o, rows, n, m, dtype)] = record("decode", GRAPH, rows, sparse, dense)
    for rows in prefill_rows:
        x = torch.randn(rows, k, generator=generator).to(device=layer.weight.device, dtype=dtype)
        if not cslt_applies(layer, x):
            continue
        sparsify_forward(layer, x, cslt=True)  # the cuSPARSELt algorithm search, outside the capture
        for mode in modes:
            sparse = clock(partial(sparsify_forward, layer, x, cslt=True), 2, mode)
            dense = clock(partial(sparsify_forward, layer, x), 2, mode)
            PREFILL_CHOICE.measured[(mode, rows, k, o)] = record("prefill", mode, rows, sparse, dense)
    return results
