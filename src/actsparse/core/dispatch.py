"""Pick the fast path of a sparse linear layer, or say why there is none.

Backends (``SparsityConfig.backend``):

- ``torch``: the plain PyTorch reference everywhere.
- ``triton``: the Triton kernels; refused at sparsify time when the pattern, criterion or
  mitigation has no kernel. Runs on CUDA, and on the CPU under ``TRITON_INTERPRET=1``.
- ``auto`` (default): Triton on CUDA tensors when the layer is supported, else the reference.

The Triton path, per call with rows ``x [T, K]``:

- ``T <= MAX_ROWS`` (decode) where :data:`DECODE_CHOICE` says the sparse GEMV wins for this
  shape and row count: one launch that selects N of every M inputs and reads only their weight
  rows, with VAR's scale and D-PTS's rank-1 term in its epilogue (``kernels.sparse_gemv``; keeps
  a transposed weight copy). Where the union of kept rows over the tokens makes it lose, the
  rows take the fused sparsify + dense product instead.
- 2:4 without mitigation, on CUDA, where measured faster for this shape: one pass emits
  the cuSPARSELt compressed input, then ``torch._cslt_sparse_mm`` (``kernels.cslt24``).
- otherwise: fused N:M sparsify (``kernels.sparsify``), then the dense product.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import torch

from actsparse.core.mitigation import MEDIAN_SHIFT, MITIGATIONS, PLAIN, VARIANCE_SCALE, Mitigation, get_mitigation
from actsparse.core.patterns import NM
from actsparse.core.scoring import ABS_TIMES_VECTOR, CRITERIA, Criterion, get_criterion
from actsparse.errors import ActsparseError
from actsparse.kernels.cslt24 import sparsify_compress24
from actsparse.kernels.sparse_gemv import MAX_ROWS
from actsparse.kernels.sparsify import nm_sparsify

if TYPE_CHECKING:
    from actsparse.core.sparse_linear import SparseLinear

BACKENDS = ("auto", "torch", "triton")
KERNEL_SCORES = (ABS_TIMES_VECTOR,)  # the criterion kernel_score values the kernels compute
KERNEL_EPILOGUES = (PLAIN, VARIANCE_SCALE, MEDIAN_SHIFT)  # the mitigation kernel values they compute
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _with_kernel(registry, field: str, values) -> str:
    return ", ".join(sorted(name for name, item in registry.items() if getattr(item, field) in values))


def unsupported_reason(pattern, criterion: Criterion | str, mitigation: Mitigation | str) -> str | None:
    """Why the Triton kernels cannot run this layer config, or None when they can.

    Decided from the methods' own fields (``Criterion.kernel_score``, ``Mitigation.kernel``);
    names are looked up in the registries."""
    criterion = get_criterion(criterion) if isinstance(criterion, str) else criterion
    mitigation = get_mitigation(mitigation) if isinstance(mitigation, str) else mitigation
    if not isinstance(pattern, NM) or pattern.m > 32:
        return f"pattern {pattern} (kernels take N:M with M <= 32)"
    if criterion.kernel_score not in KERNEL_SCORES:
        return f"criterion '{criterion.name}' (kernels take {_with_kernel(CRITERIA, 'kernel_score', KERNEL_SCORES)})"
    if mitigation.kernel not in KERNEL_EPILOGUES:
        return f"mitigation '{mitigation.name}' (kernels take {_with_kernel(MITIGATIONS, 'kernel', KERNEL_EPILOGUES)})"
    try:
        import triton  # noqa: F401
    except ImportError:
        return "triton is not installed"
    return None


def choose_backend(backend: str, pattern, criterion: Criterion | str, mitigation: Mitigation | str) -> str:
    """Resolve ``auto``/``torch``/``triton`` for one layer config (refusing a forced impossible one)."""
    if backend not in BACKENDS:
        raise ActsparseError(f"unknown backend '{backend}'; choose one of: {', '.join(BACKENDS)}")
    if backend == "torch":
        return "torch"
    reason = unsupported_reason(pattern, criterion, mitigation)
    if reason is None:
        return "triton"
    if backend == "triton":
        raise ActsparseError(f"backend 'triton' has no kernel for {reason}; use --backend auto or torch")
    return "torch"


def runs_here(x: torch.Tensor, forced: bool) -> bool:
    """Whether the Triton path runs on this tensor: on CUDA, or on the CPU interpreter when forced."""
    if x.dtype not in KERNEL_DTYPES:
        return False
    return x.is_cuda or (forced and os.environ.get("TRITON_INTERPRET") == "1")


class PrefillChoice:
    """Per (rows, K, O) shape: is the 2:4 cuSPARSELt product faster than dense? Measured once."""

    def __init__(self):
        self.faster: dict[tuple[int, int, int], bool] = {}

    def sparse_is_faster(self, key, run_sparse, run_dense, repeats: int = 5) -> bool:
        if key not in self.faster:
            if torch.cuda.is_current_stream_capturing():
                return False  # cannot measure inside a graph capture; dense until measured
            self.faster[key] = _median_ms(run_sparse, repeats) < _median_ms(run_dense, repeats)
        return self.faster[key]


def _median_ms(fn, repeats: int) -> float:
    fn()  # warm-up (compilation, algorithm search)
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


PREFILL_CHOICE = PrefillChoice()


class DecodeChoice:
    """Whether the sparse GEMV beats sparsify + dense product, per (K, O, rows, N, M, dtype).

    Entries of ``measured`` override the rule (set them from a measurement made once, outside
    ``forward``: no warm-up measurer exists yet); other shapes follow :meth:`default`, the rule
    the H200 measurements support (BENCHMARKS.md §5).
    """

    def __init__(self):
        self.measured: dict[tuple, bool] = {}

    @staticmethod
    def default(k: int, o: int, rows: int, n: int, m: int) -> bool:
        """One token, at density <= 1/2, on layers of at least 2048 outputs (H200: 1.1-1.4x there;
        two or more tokens and the narrow k/v projections lose)."""
        return rows == 1 and 2 * n <= m and o >= 2048

    def sparse_wins(self, k: int, o: int, rows: int, n: int, m: int, dtype: torch.dtype) -> bool:
        if rows > MAX_ROWS:
            return False
        return self.measured.get((k, o, rows, n, m, dtype), self.default(k, o, rows, n, m))


DECODE_CHOICE = DecodeChoice()


def triton_forward(layer: SparseLinear, x: torch.Tensor) -> torch.Tensor:
    """The Triton path for rows ``x [T, K]`` of a layer whose config is supported."""
    n, m = layer.pattern.n, layer.pattern.m
    vector = layer.feature_vector
    epilogue = layer.mitigation.kernel
    x = x.contiguous()
    eta = x.median(dim=-1).values.float() if epilogue == MEDIAN_SHIFT else None
    var = epilogue == VARIANCE_SCALE
    rows = x.shape[0]
    if DECODE_CHOICE.sparse_wins(layer.in_features, layer.out_features, rows, n, m, x.dtype):
        return layer.gemv_weight()(x, n, m, vector=vector, shift=eta, var=var)  # shift term in the epilogue
    if (n, m) == (2, 4) and epilogue == PLAIN and x.is_cuda and x.dtype != torch.float32:
        y = _prefill24(layer, x, vector)
    else:
        y = layer.product(nm_sparsify(x, n, m, vector=vector, var=var, shift=eta))
    if eta is not None:
        y = (y.float() + eta[:, None] * layer.weight_row_sum).to(y.dtype)
    return y


def _prefill24(layer: SparseLinear, x: torch.Tensor, vector) -> torch.Tensor:
    rows = x.shape[0]
    sparse_matmul = layer.cslt_linear()

    def run_sparse():
        return sparse_matmul(sparsify_compress24(x, vector), rows)

    def run_dense():
        return layer.product(nm_sparsify(x, 2, 4, vector=vector))

    key = (rows, layer.in_features, layer.out_features)
    return run_sparse() if PREFILL_CHOICE.sparse_is_faster(key, run_sparse, run_dense) else run_dense()
