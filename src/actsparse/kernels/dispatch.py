"""Pick the fast path of a sparse linear layer, or say why there is none.

Backends (``SparsityConfig.backend``):

- ``torch``: the plain PyTorch reference everywhere.
- ``triton``: the Triton kernels; refused at sparsify time when the pattern, criterion or
  mitigation has no kernel. Runs on CUDA, and on the CPU under ``TRITON_INTERPRET=1``.
- ``auto`` (default): Triton on CUDA tensors when the layer is supported, else the reference.

The Triton path, per call with rows ``x [T, K]``:

- ``T <= DECODE_MAX_ROWS`` (decode) and ``ACTSPARSE_DECODE_GEMV=1``: fused N:M sparsify, then
  a GEMV that reads only the weight rows of kept inputs (``kernels.decode``; keeps a transposed
  weight copy). Opt-in for now: its race-free split finish has passed the interpreter tests
  and compiles for sm_90 but has not yet run on an H100 (see BENCHMARKS.md).
- 2:4 without mitigation, on CUDA, where measured faster for this shape: one pass emits
  the cuSPARSELt compressed input, then ``torch._cslt_sparse_mm`` (``kernels.cslt24``).
- otherwise: fused N:M sparsify (``kernels.sparsify``), then the dense product.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import torch

from actsparse.core.patterns import NM
from actsparse.errors import ActsparseError

if TYPE_CHECKING:
    from actsparse.core.sparse_linear import SparseLinear

BACKENDS = ("auto", "torch", "triton")
# Criteria whose N:M mask is that of |x| * v (clact's 1/||x_t|| is constant in a row).
VECTOR_CRITERIA = {"magnitude", "wina", "amber", "amber-clamp", "var-weight", "clact"}
KERNEL_MITIGATIONS = {"none", "var", "dpts"}
DECODE_MAX_ROWS = 16


def decode_gemv_enabled() -> bool:
    """The decode GEMV path is opt-in: ``ACTSPARSE_DECODE_GEMV=1``."""
    return os.environ.get("ACTSPARSE_DECODE_GEMV") == "1"
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def unsupported_reason(pattern, criterion_name: str, mitigation_name: str) -> str | None:
    """Why the Triton kernels cannot run this layer config, or None when they can."""
    if not isinstance(pattern, NM) or pattern.m > 32:
        return f"pattern {pattern} (kernels take N:M with M <= 32)"
    if criterion_name not in VECTOR_CRITERIA:
        return f"criterion '{criterion_name}' (kernels take {', '.join(sorted(VECTOR_CRITERIA))})"
    if mitigation_name not in KERNEL_MITIGATIONS:
        return f"mitigation '{mitigation_name}' (kernels take {', '.join(sorted(KERNEL_MITIGATIONS))})"
    try:
        import triton  # noqa: F401
    except ImportError:
        return "triton is not installed"
    return None


def choose_backend(backend: str, pattern, criterion_name: str, mitigation_name: str) -> str:
    """Resolve ``auto``/``torch``/``triton`` for one layer config (refusing a forced impossible one)."""
    if backend not in BACKENDS:
        raise ActsparseError(f"unknown backend '{backend}'; choose one of: {', '.join(BACKENDS)}")
    if backend == "torch":
        return "torch"
    reason = unsupported_reason(pattern, criterion_name, mitigation_name)
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


def triton_forward(layer: "SparseLinear", x: torch.Tensor) -> torch.Tensor:
    """The Triton path for rows ``x [T, K]`` of a layer whose config is supported."""
    from actsparse.kernels.decode import nm_decode_linear
    from actsparse.kernels.sparsify import nm_sparsify

    n, m = layer.pattern.n, layer.pattern.m
    vector = layer.feature_vector
    mitigation = layer.mitigation.name
    x = x.contiguous()
    eta = x.median(dim=-1).values.float() if mitigation == "dpts" else None
    var = mitigation == "var"
    rows = x.shape[0]
    if rows <= DECODE_MAX_ROWS and decode_gemv_enabled():
        pruned = nm_sparsify(x, n, m, vector=vector, var=var, shift=eta)
        y = nm_decode_linear(pruned, layer.decode_weight(), n, m)
    elif (n, m) == (2, 4) and mitigation == "none" and x.is_cuda and x.dtype != torch.float32:
        y = _prefill24(layer, x, vector)
    else:
        y = layer.product(nm_sparsify(x, n, m, vector=vector, var=var, shift=eta))
    if eta is not None:
        y = (y.float() + eta[:, None] * layer.weight_row_sum).to(y.dtype)
    return y


def _prefill24(layer: "SparseLinear", x: torch.Tensor, vector) -> torch.Tensor:
    from actsparse.kernels.cslt24 import sparsify_compress24
    from actsparse.kernels.sparsify import nm_sparsify

    rows = x.shape[0]
    sparse_matmul = layer.cslt_linear()

    def run_sparse():
        return sparse_matmul(sparsify_compress24(x, vector), rows)

    def run_dense():
        return layer.product(nm_sparsify(x, 2, 4, vector=vector))

    key = (rows, layer.in_features, layer.out_features)
    return run_sparse() if PREFILL_CHOICE.sparse_is_faster(key, run_sparse, run_dense) else run_dense()
