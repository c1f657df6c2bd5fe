"""Measure once, per sparse layer shape, which fast path wins; the dispatch tables keep the answer.

``tune_(model)`` times, on the model's own sparse layers (one per distinct shape and config),
and on each distinct group of linked layers that read one input (``core.shared_input``):

- **decode** (rows 1 .. ``MAX_ROWS``): each sparse GEMV of ``DECODE_KERNELS`` that takes the rows
  against sparsify + dense product, inside CUDA graphs (the mode decoding runs in); the fastest
  goes into ``DECODE_CHOICE``. Each kernel's output is first checked against the fallback's on
  the same input: one that disagrees (``CHECK_TOLERANCE``) is not timed, so never chosen;
- **prefill** (the given row counts, 2:4 layers without mitigation): the cuSPARSELt product
  against sparsify + dense product, in eager mode and inside CUDA graphs, into ``PREFILL_CHOICE``.

Each figure is the median over replays of ``calls`` back-to-back calls (so eager timings include
the host cost a call cannot hide), with a 64 MiB write between calls so that the weights come
from memory as in a whole model, minus the same writes timed alone. ``forward`` never times
anything: without ``tune_`` the layers follow the defaults documented in ``core.dispatch``.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import asdict, dataclass
from dataclasses import fields as dataclass_fields
from functools import partial
from pathlib import Path

import torch
from tqdm.auto import tqdm

from actsparse._version import __version__
from actsparse.artifacts import write_json_atomic
from actsparse.core.dispatch import (
    DECODE_CHOICE,
    DECODE_KERNELS,
    EAGER,
    GRAPH,
    PREFILL_CHOICE,
    cslt_applies,
    gemv_forward,
    runs_here,
    shared_gemv,
    shared_sparsify,
    sparsify_forward,
)
from actsparse.core.shared_input import SharedInput
from actsparse.core.sparse_linear import SparseLinear
from actsparse.errors import ActsparseError
from actsparse.kernels.sparse_gemv import MAX_ROWS
from actsparse.timing import Timer, capture_graph

FLUSH_BYTES = 64 << 20  # more than the H100/H200 L2 (50 / 60 MiB)
CHECK_TOLERANCE = 2e-2  # a decode kernel's output against sparsify + dense product (relative; bf16 differs ~4e-3)
TABLE_FORMAT = 1
PREFILL_KERNEL = "cslt24"  # the prefill fast path tune_ times


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
    layers: int = 1  # linked layers timed side by side (core.shared_input); 1: a layer alone
    kernel: str = "gemv"  # the fast path timed: a DECODE_KERNELS name (decode), "cslt24" (prefill)

    @property
    def sparse_wins(self) -> bool:
        return self.sparse_ms < self.dense_ms

    @property
    def key(self) -> tuple:
        """What was measured (everything but the times)."""
        return (self.phase, self.mode, self.rows, self.in_features, self.out_features, self.pattern, self.dtype,
                self.layers, self.kernel)  # fmt: skip

    def to_dict(self) -> dict:
        return {**asdict(self), "sparse_wins": self.sparse_wins}


def distinct_groups(model) -> list[SharedInput]:
    """One group of linked layers (``core.shared_input``) per (K, sum of O, pattern, dtype, mitigation kernel), on CUDA."""
    seen, groups = set(), []
    for module in model.modules():
        group = getattr(module, "shared_input", None) if isinstance(module, SparseLinear) else None
        if group is None or not group.lead.weight.is_cuda:
            continue
        lead = group.lead
        key = (group.in_features, group.out_features, str(lead.pattern), lead.weight.dtype, lead.mitigation.kernel)
        if key not in seen:
            seen.add(key)
            groups.append(group)
    return groups


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
    model,
    *,
    decode_rows=tuple(range(1, MAX_ROWS + 1)),
    prefill_rows=(),
    modes=(EAGER, GRAPH),
    repeats: int = 7,
    seed: int = 0,
    table: str | Path | None = None,
    progress: bool = True,
) -> list[Tuned]:
    """Time the fast paths of ``model``'s sparse layers once and record the winners (see the module
    docstring); returns every measurement. Layers that do not run the Triton path on CUDA are skipped.

    ``table``: a JSON file keeping the measurements across processes, one section per GPU and
    software versions. Choices found there for this GPU and these versions are used without
    timing; the others are measured and added (the file is rewritten atomically). ``progress``:
    a progress bar over the layer shapes and groups."""
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
    layers = distinct_layers(model)
    if not layers:
        return []
    groups = distinct_groups(model)
    section = table_section(layers[0].weight.device)
    stored = read_table(table).get(section, []) if table is not None else []
    known = {row.key for row in stored}
    generator = torch.Generator().manual_seed(seed)
    results: list[Tuned] = []
    bar = tqdm(total=len(layers) + len(groups), desc="tune fast paths", unit="shape", disable=not progress)
    for layer in layers:
        clock = _Clock(layer.weight.device, repeats)
        results += _tune_layer(layer, decode_rows, prefill_rows, modes, clock, generator, known)
        bar.update()
    for group in groups:
        clock = _Clock(group.lead.weight.device, repeats)
        results += _tune_group(group, decode_rows, clock, generator, known)
        bar.update()
    bar.close()
    record(stored + results)
    if table is not None and results:
        write_table(table, section, stored + results)
    return stored + results


def fastest(rows) -> dict[tuple, Tuned]:
    """Per measured shape (a row's key without its kernel), the row of the fastest fast path timed there."""
    best: dict[tuple, Tuned] = {}
    for row in rows:
        shape = row.key[:-1]
        if shape not in best or row.sparse_ms < best[shape].sparse_ms:
            best[shape] = row
    return best


def record(rows: list[Tuned]) -> None:
    """Put measurements into the dispatch tables: per decode shape the fastest kernel timed there
    when it beats the fallback (else None), per prefill shape and mode whether cuSPARSELt wins."""
    for row in fastest(r for r in rows if r.phase != "decode" or r.kernel in DECODE_KERNELS).values():
        if row.phase == "decode":
            n, m = (int(part) for part in row.pattern.split(":"))
            key = (row.in_features, row.out_features, row.rows, n, m, getattr(torch, row.dtype), row.layers)
            DECODE_CHOICE.measured[key] = row.kernel if row.sparse_wins else None
        else:
            PREFILL_CHOICE.measured[(row.mode, row.rows, row.in_features, row.out_features)] = row.sparse_wins


def table_section(device: torch.device) -> str:
    """The key of a table's section: the GPU and the versions of the code that was timed."""
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    return f"{gpu} | actsparse {__version__} | torch {torch.__version__} | triton {_triton_version()}"


def _triton_version() -> str:
    try:
        import triton
    except ImportError:
        return "none"
    return triton.__version__


def read_table(path: str | Path) -> dict[str, list[Tuned]]:
    """The sections of a measurement table (empty when the file does not exist yet)."""
    path = Path(path)
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text())
        if data.get("format") != TABLE_FORMAT:
            raise ValueError(f"format {data.get('format')!r}, expected {TABLE_FORMAT}")
        return {section: [tuned_from_dict(row) for row in rows] for section, rows in data["sections"].items()}
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise ActsparseError(
            f"{path} is not a fast-path table actsparse can read ({error}); fix: delete it or pass another file"
        ) from None


def tuned_from_dict(data: dict) -> Tuned:
    """A stored row (rows written before ``kernel`` was recorded timed the batched GEMV or cuSPARSELt)."""
    fields = {f.name for f in dataclass_fields(Tuned)}
    row = {k: v for k, v in data.items() if k in fields}
    row.setdefault("kernel", "gemv" if row.get("phase") == "decode" else PREFILL_KERNEL)
    return Tuned(**row)


def write_table(path: str | Path, section: str, rows: list[Tuned]) -> None:
    sections = read_table(path)
    sections[section] = rows
    write_json_atomic(
        path,
        {"format": TABLE_FORMAT, "sections": {name: [r.to_dict() for r in entries] for name, entries in sections.items()}},
    )


def _decode_rows(clock: _Clock, rows: int, fallback, kernel_call, done) -> list[tuple[str, float, float]]:
    """``(kernel, its ms, fallback ms)`` per call, in graphs, for each decode kernel that takes
    ``rows`` and was not measured yet (``done(name)``); one call of each kernel first makes the
    weight copy and workspace outside the capture, and its result is checked against the
    fallback's (a kernel that disagrees is left out, with a warning)."""
    kernels = [kernel for kernel in DECODE_KERNELS.values() if rows <= kernel.max_rows and not done(kernel.name)]
    if not kernels:
        return []
    outputs = {kernel.name: kernel_call(kernel)() for kernel in kernels}
    expected = fallback()
    agreeing = []
    for kernel in kernels:  # a kernel whose result is wrong here is never timed, so never chosen
        error = _relative_error(outputs[kernel.name], expected)
        if error <= CHECK_TOLERANCE:
            agreeing.append(kernel)
        else:
            warnings.warn(f"tune_: the {kernel.name} GEMV differs from sparsify + dense product by {error:.3g} "
                          f"(relative) at {rows} row(s), {_flat(expected).numel()} outputs: not used for this shape; "
                          "please report it with the GPU and versions", RuntimeWarning, stacklevel=3)  # fmt: skip
    fallback_ms = clock(fallback, 20, GRAPH)
    return [(kernel.name, clock(kernel_call(kernel), 20, GRAPH), fallback_ms) for kernel in agreeing]


def _flat(y) -> torch.Tensor:
    """One float tensor of a layer's output or of a linked group's outputs (a list)."""
    return torch.cat([t.float().flatten() for t in y]) if isinstance(y, (list, tuple)) else y.float().flatten()


def _relative_error(y, expected) -> float:
    y, expected = _flat(y), _flat(expected)
    return float((y - expected).norm() / expected.norm().clamp_min(1e-30))


def _tune_layer(layer: SparseLinear, decode_rows, prefill_rows, modes, clock: _Clock, generator, known) -> list[Tuned]:
    """One layer's measurements (not yet in the dispatch tables: the candidates are called directly)."""
    k, o, dtype = layer.in_features, layer.out_features, layer.weight.dtype
    results = []

    dtype_name = str(dtype).removeprefix("torch.")

    def measured(phase, mode, rows, kernel, sparse_ms, dense_ms):
        results.append(Tuned(phase, mode, rows, k, o, str(layer.pattern), dtype_name, sparse_ms, dense_ms, 1, kernel))

    def done(phase, mode, rows, kernel):
        return (phase, mode, rows, k, o, str(layer.pattern), dtype_name, 1, kernel) in known

    for rows in decode_rows:
        x = torch.randn(rows, k, generator=generator).to(device=layer.weight.device, dtype=dtype)
        if not runs_here(x, layer.forced_backend):
            continue
        times = _decode_rows(clock, rows, partial(sparsify_forward, layer, x),
                             partial(partial, gemv_forward, layer, x),
                             partial(done, "decode", GRAPH, rows))  # fmt: skip
        for kernel, sparse_ms, dense_ms in times:
            measured("decode", GRAPH, rows, kernel, sparse_ms, dense_ms)
    for rows in prefill_rows:
        x = torch.randn(rows, k, generator=generator).to(device=layer.weight.device, dtype=dtype)
        if not cslt_applies(layer, x):
            continue
        sparsify_forward(layer, x, cslt=True)  # the cuSPARSELt algorithm search, outside the capture
        for mode in modes:
            if done("prefill", mode, rows, PREFILL_KERNEL):
                continue
            sparse = clock(partial(sparsify_forward, layer, x, cslt=True), 2, mode)
            dense = clock(partial(sparsify_forward, layer, x), 2, mode)
            measured("prefill", mode, rows, PREFILL_KERNEL, sparse, dense)
    return results


def _tune_group(group: SharedInput, decode_rows, clock: _Clock, generator, known) -> list[Tuned]:
    """Decode rows of linked layers: one GEMV over their weights side by side against one sparsify
    pass and each layer's dense product, kept under ``(K, sum of O, ..., layers)`` in ``DECODE_CHOICE``."""
    lead = group.lead
    k, o, dtype = group.in_features, group.out_features, lead.weight.dtype
    dtype_name = str(dtype).removeprefix("torch.")
    results = []
    parts = len(group.layers)
    for rows in decode_rows:
        x = torch.randn(rows, k, generator=generator).to(device=lead.weight.device, dtype=dtype)
        if not runs_here(x, lead.forced_backend):
            continue

        def done(kernel, rows=rows):
            return ("decode", GRAPH, rows, k, o, str(lead.pattern), dtype_name, parts, kernel) in known

        times = _decode_rows(clock, rows, partial(shared_sparsify, group, x),
                             partial(partial, shared_gemv, group, x), done)  # fmt: skip
        for kernel, sparse_ms, dense_ms in times:
            results.append(Tuned("decode", GRAPH, rows, k, o, str(lead.pattern), dtype_name, sparse_ms, dense_ms, parts,
                                 kernel))  # fmt: skip
    return results
