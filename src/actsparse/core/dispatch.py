"""Pick the fast path of a sparse linear layer, or say why there is none.

Backends (``SparsityConfig.backend``):

- ``torch``: the plain PyTorch reference everywhere.
- ``triton``: the Triton kernels; refused at sparsify time when the pattern, criterion or
  mitigation has no kernel. Runs on CUDA, and on the CPU under ``TRITON_INTERPRET=1``.
- ``auto`` (default): Triton on CUDA tensors when the layer is supported, else the reference.

The Triton path, per call with rows ``x [T, K]``:

- ``T <= MAX_ROWS`` (decode) where :data:`DECODE_CHOICE` names a sparse GEMV for this shape and
  row count: one launch that selects N of every M inputs and reads only their weight rows, with
  VAR's scale and D-PTS's rank-1 term in its epilogue (keeps a tiled weight copy,
  ``kernels.gemv_weight``). The kernels (:data:`DECODE_KERNELS`): the batched one
  (``kernels.sparse_gemv``, 1 to ``MAX_ROWS`` rows; also with its integer-key ranking) and the
  one-token one (``kernels.gemv_one``; also with its top-N-keys selection). The variants serve a
  shape only where ``tune_`` measured them fastest.
  Where the union of kept rows over the tokens makes both lose, the rows take the fused
  sparsify + dense product instead.
- 2:4 without mitigation, on CUDA, where :data:`PREFILL_CHOICE` says it wins for this mode
  (eager, or graph: captured or compiled), row count and shape: one pass emits the cuSPARSELt
  compressed input, then ``torch._cslt_sparse_mm`` (``kernels.cslt24``).
- otherwise: fused N:M sparsify (``kernels.sparsify``), then the dense product (VAR's scale
  applied to the pruned input; :data:`VAR_AT_OUTPUT_ROWS` can move it to the output).

Both tables are filled by :func:`actsparse.tune_` (``core.tuning``), which times the paths once
per layer shape; ``forward`` only looks them up. Without tuning, decode follows
:meth:`DecodeChoice.default` and prefill takes the dense product. Kernels are called through
their ``torch.ops.actsparse`` ops, so that torch.compile and CUDA graphs see single calls.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from actsparse.core.mitigation import MEDIAN_SHIFT, MITIGATIONS, PLAIN, VARIANCE_SCALE, Mitigation, add_shift_term, get_mitigation
from actsparse.core.scoring import ABS_TIMES_VECTOR, CRITERIA, Criterion, get_criterion
from actsparse.errors import ActsparseError
from actsparse.kernels import cslt24  # also registers torch.ops.actsparse.sparsify_compress24
from actsparse.kernels import sparsify as sparsify_kernels  # also registers torch.ops.actsparse.nm_sparsify*
from actsparse.kernels.gemv_one import one_block_o
from actsparse.kernels.sparse_gemv import MAX_ROWS, gemv_plan

if TYPE_CHECKING:
    from actsparse.core.shared_input import SharedInput
    from actsparse.core.sparse_linear import SparseLinear
    from actsparse.kernels.gemv_weight import GemvWeight

BACKENDS = ("auto", "torch", "triton")
KERNEL_SCORES = (ABS_TIMES_VECTOR,)  # the criterion kernel_score values the kernels compute
KERNEL_EPILOGUES = (PLAIN, VARIANCE_SCALE, MEDIAN_SHIFT)  # the mitigation kernel values they compute
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
CSLT_DTYPES = (torch.float16, torch.bfloat16)


def _with_kernel(registry, field: str, values) -> str:
    return ", ".join(sorted(name for name, item in registry.items() if getattr(item, field) in values))


def unsupported_reason(pattern, criterion: Criterion | str, mitigation: Mitigation | str) -> str | None:
    """Why the Triton kernels cannot run this layer config, or None when they can.

    Decided from the methods' own fields (``Criterion.kernel_score``, ``Mitigation.kernel``);
    names are looked up in the registries."""
    criterion = get_criterion(criterion) if isinstance(criterion, str) else criterion
    mitigation = get_mitigation(mitigation) if isinstance(mitigation, str) else mitigation
    if pattern.nm is None or pattern.nm[1] > 32:
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


EAGER, GRAPH = "eager", "graph"  # the run modes a measured choice is kept for


def run_mode() -> str:
    """``graph`` while a CUDA graph is being captured or torch.compile is tracing, else ``eager``."""
    if torch.compiler.is_compiling() or torch.cuda.is_current_stream_capturing():
        return GRAPH
    return EAGER


class PrefillChoice:
    """Whether the 2:4 cuSPARSELt product beats sparsify + dense product, per (mode, rows, K, O).

    Filled by :func:`actsparse.tune_` (``core.tuning``), which times both paths once per layer
    shape, in eager mode and inside a CUDA graph; ``forward`` only looks the answer up and never
    times anything. Rows between measured ones take the entry of the nearest measured rows below
    (the sparse product's advantage grows with the rows); unmeasured shapes take the dense
    product, which is never slower than the reference path it replaces.
    """

    def __init__(self):
        self.measured: dict[tuple[str, int, int, int], bool] = {}

    def sparse_wins(self, mode: str, rows: int, k: int, o: int) -> bool:
        answer = self.measured.get((mode, rows, k, o))
        if answer is not None:
            return answer
        below = [r for (md, r, kk, oo) in self.measured if (md, kk, oo) == (mode, k, o) and r <= rows]
        return self.measured[(mode, max(below), k, o)] if below else False


PREFILL_CHOICE = PrefillChoice()


@dataclass(frozen=True)
class DecodeKernel:
    """One sparse GEMV that can serve decode rows: its name (in the tables), the most token rows it
    takes, and how it runs on a :class:`~actsparse.kernels.gemv_weight.GemvWeight`
    (``launch(gemv_weight, x, n, m, vector=, shift=, var=)``)."""

    name: str
    max_rows: int
    launch: Callable[..., torch.Tensor]
    block_o: Callable[[int, int], int]  # (K, O) -> the column tile width of the weight copy it reads best


def _batched(gemv_weight: GemvWeight, x: torch.Tensor, n: int, m: int, **options) -> torch.Tensor:
    return gemv_weight(x, n, m, **options)


def _batched_keyed(gemv_weight: GemvWeight, x: torch.Tensor, n: int, m: int, **options) -> torch.Tensor:
    return gemv_weight(x, n, m, keyed=True, **options)


def _one_token(gemv_weight: GemvWeight, x: torch.Tensor, n: int, m: int, **options) -> torch.Tensor:
    return gemv_weight.one(x, n, m, **options)


def _one_token_top_keys(gemv_weight: GemvWeight, x: torch.Tensor, n: int, m: int, **options) -> torch.Tensor:
    return gemv_weight.one(x, n, m, topk=True, **options)


def _batched_block_o(k: int, o: int) -> int:
    return gemv_plan(k, o, 1, 1, 1).block_o


BATCHED = DecodeKernel("gemv", MAX_ROWS, _batched, _batched_block_o)  # kernels.sparse_gemv: 1 to MAX_ROWS rows
# the same with its integer-key ranking (kernels.sparse_gemv.GemvPlan.keyed): only where tune_ measures it faster
BATCHED_KEYED = DecodeKernel("gemv_keyed", MAX_ROWS, _batched_keyed, _batched_block_o)
ONE_TOKEN = DecodeKernel("gemv_one", 1, _one_token, lambda k, o: one_block_o(o))  # kernels.gemv_one: one row
# the same with its top-N-keys selection (kernels.gemv_one.OnePlan.topk): only where tune_ measures it faster
ONE_TOKEN_TOP_KEYS = DecodeKernel("gemv_one_topk", 1, _one_token_top_keys, lambda k, o: one_block_o(o))
DECODE_KERNELS = {kernel.name: kernel for kernel in (BATCHED, BATCHED_KEYED, ONE_TOKEN, ONE_TOKEN_TOP_KEYS)}


class DecodeChoice:
    """Which sparse GEMV (or none: sparsify + dense product) serves decode rows, per
    (K, O, rows, N, M, dtype, layers).

    ``layers``: how many linked layers the product covers side by side (``core.shared_input``;
    1 for a layer alone), so that a group and a single layer of the same total shape are told
    apart. Entries of ``measured`` (a :data:`DECODE_KERNELS` name, or None for the fallback;
    filled by :func:`actsparse.tune_`, timed inside CUDA graphs, the mode decoding runs in)
    override the rule; other shapes follow :meth:`default`, the rule the H200 measurements
    support (BENCHMARKS.md §5).
    """

    def __init__(self):
        self.measured: dict[tuple, str | None] = {}

    @staticmethod
    def default(k: int, o: int, rows: int, n: int, m: int) -> str | None:
        """One token, at density <= 1/2, on layers of at least 2048 outputs (H200: 1.1-1.5x there;
        two or more tokens and the narrow k/v projections lose); of those, the one-token kernel
        where M <= 4 (its ranking in each step is cheap there: at 2:4 it beat the batched kernel on
        every Llama shape, at 8:16 on none by more than 2%)."""
        if not (rows == 1 and 2 * n <= m and o >= 2048):
            return None
        return ONE_TOKEN.name if m <= 4 else BATCHED.name

    def block_o(self, k: int, o: int, n: int, m: int) -> int:
        """The column tile width of a weight copy for the decode GEMVs: the one the kernel that the
        rule names for one token reads best (the batched kernel's where none is named). Fixed when
        the copy is made; ``tune_`` then times both kernels on it."""
        name = self.default(k, o, 1, n, m)
        return DECODE_KERNELS[name or BATCHED.name].block_o(k, o)

    def kernel(self, k: int, o: int, rows: int, n: int, m: int, dtype: torch.dtype, layers: int = 1) -> DecodeKernel | None:
        """The GEMV to run, or None for sparsify + dense product."""
        if rows > MAX_ROWS:
            return None
        key = (k, o, rows, n, m, dtype, layers)
        name = self.measured[key] if key in self.measured else self.default(k, o, rows, n, m)
        kernel = DECODE_KERNELS.get(name)
        return kernel if kernel is not None and rows <= kernel.max_rows else None

    def sparse_wins(self, k: int, o: int, rows: int, n: int, m: int, dtype: torch.dtype, layers: int = 1) -> bool:
        """Whether some sparse GEMV beats sparsify + dense product here."""
        return self.kernel(k, o, rows, n, m, dtype, layers) is not None


DECODE_CHOICE = DecodeChoice()
# From this many rows VAR's scale would be applied to the product's output (one tiled pass over x,
# ``nm_sparsify_var_scale``); None: never. Off, as measured on the H200 (BENCHMARKS.md §5): the
# extra pass over the product's output costs more than the second pass over x saves, since
# neither cuBLAS nor (here) cuSPARSELt takes a per-row scale in its epilogue.
VAR_AT_OUTPUT_ROWS: int | None = None


def triton_forward(layer: SparseLinear, x: torch.Tensor, source: torch.Tensor | None = None) -> torch.Tensor:
    """The Triton path for rows ``x [T, K]`` of a layer whose config is supported: the measured
    (or default) choice between the decode GEMV, the cuSPARSELt product and sparsify + product.

    ``source``: the tensor the layer was called with (``x`` is its rows); a layer linked to others
    that read the same input (``core.shared_input``) takes its output from their one selection
    (also while torch.compile traces: the shared computation is then part of the graph)."""
    x = x.contiguous()
    group = layer.shared_input
    if group is not None and source is not None:
        out = group.take(layer, source)
        if out is not None:
            return out
        outputs = shared_outputs(group, x) if group.active() else None
        if outputs is not None:
            return group.keep(source, layer, outputs)
    n, m = layer.pattern.n, layer.pattern.m
    kernel = DECODE_CHOICE.kernel(layer.in_features, layer.out_features, x.shape[0], n, m, x.dtype)
    if kernel is not None:
        return gemv_forward(layer, x, kernel)
    return sparsify_forward(layer, x, cslt=uses_cslt(layer, x))


def shared_outputs(group: SharedInput, x: torch.Tensor) -> list[torch.Tensor] | None:
    """Every member's output from one selection of ``x``: the decode GEMV over their weights side
    by side where :data:`DECODE_CHOICE` says it wins for that shape, else one sparsify pass and
    each member's product; None where the members must compute alone (VAR's scale at the output)."""
    lead, rows = group.lead, x.shape[0]
    n, m = lead.pattern.n, lead.pattern.m
    kernel = DECODE_CHOICE.kernel(group.in_features, group.out_features, rows, n, m, x.dtype, len(group.layers))
    if kernel is not None:
        return shared_gemv(group, x, kernel)
    if _var_at_output(lead, rows):
        return None
    return _products(group.layers, x, [uses_cslt(member, x) for member in group.layers])


def shared_gemv(group: SharedInput, x: torch.Tensor, kernel: DecodeKernel = BATCHED) -> list[torch.Tensor]:
    """One launch for all members: select once, read the kept rows of every member's weight."""
    lead = group.lead
    var = lead.mitigation.kernel == VARIANCE_SCALE
    y = kernel.launch(group.gemv_weight(), x, lead.pattern.n, lead.pattern.m, shift=_shift(lead, x), var=var)
    return group.split(y)


def shared_sparsify(group: SharedInput, x: torch.Tensor) -> list[torch.Tensor]:
    """One sparsify pass, then each member's dense product (the alternative ``tune_`` times)."""
    return _products(group.layers, x, [False] * len(group.layers))


class _DirectOps:
    """The ops' bodies, called directly: the registered ops' dispatch costs host time that eager
    decoding cannot hide, and is needed only while torch.compile traces."""

    nm_sparsify = staticmethod(sparsify_kernels.nm_sparsify_auto)
    nm_sparsify_var_scale = staticmethod(sparsify_kernels.nm_sparsify_var_scale_auto)
    sparsify_compress24 = staticmethod(cslt24.sparsify_compress24_auto)


DIRECT_OPS = _DirectOps()


def _ops():
    return torch.ops.actsparse if torch.compiler.is_compiling() else DIRECT_OPS


def _shift(layer: SparseLinear, x: torch.Tensor) -> torch.Tensor | None:
    return x.median(dim=-1).values.float() if layer.mitigation.kernel == MEDIAN_SHIFT else None


def gemv_forward(layer: SparseLinear, x: torch.Tensor, kernel: DecodeKernel = BATCHED) -> torch.Tensor:
    """One launch: select, read the kept weight rows, VAR scale / D-PTS rank-1 term in the epilogue."""
    var = layer.mitigation.kernel == VARIANCE_SCALE
    n, m = layer.pattern.n, layer.pattern.m
    return kernel.launch(layer.gemv_weight(), x, n, m, vector=layer.feature_vector, shift=_shift(layer, x), var=var)


def sparsify_forward(layer: SparseLinear, x: torch.Tensor, cslt: bool = False) -> torch.Tensor:
    """Sparsify, then the product: cuSPARSELt on the compressed input (``cslt``), else the dense one.

    VAR's per-token scale goes to the product's output from :data:`VAR_AT_OUTPUT_ROWS` rows on
    (the sparsify pass then runs at plain pruning's bandwidth); D-PTS's rank-1 term always does."""
    if _var_at_output(layer, x.shape[0]) and not cslt:
        pruned, scale = _ops().nm_sparsify_var_scale(x, layer.pattern.n, layer.pattern.m, layer.feature_vector)
        return layer.product(pruned, row_scale=scale)
    return _products([layer], x, [cslt])[0]


def _var_at_output(layer: SparseLinear, rows: int) -> bool:
    return layer.mitigation.kernel == VARIANCE_SCALE and VAR_AT_OUTPUT_ROWS is not None and rows >= VAR_AT_OUTPUT_ROWS


def _products(layers, x: torch.Tensor, cslt: list[bool]) -> list[torch.Tensor]:
    """The layers' outputs on ``x`` sparsified once (the layers keep the same features of it):
    the compressed input for those that take cuSPARSELt, the pruned input for the others."""
    lead, rows = layers[0], x.shape[0]
    n, m = lead.pattern.n, lead.pattern.m
    vector = lead.feature_vector
    eta = _shift(lead, x)
    ops = _ops()
    compressed = ops.sparsify_compress24(x, vector) if any(cslt) else None
    pruned = None
    if not all(cslt):
        pruned = ops.nm_sparsify(x, n, m, vector, eta, lead.mitigation.kernel == VARIANCE_SCALE)
    outputs = []
    for layer, sparse_product in zip(layers, cslt):
        y = layer.cslt_linear()(compressed, rows) if sparse_product else layer.product(pruned)
        if eta is not None:
            y = add_shift_term(y, eta[:, None], layer.weight_row_sum)
        outputs.append(y)
    return outputs


def cslt_applies(layer: SparseLinear, x: torch.Tensor) -> bool:
    """Whether the 2:4 cuSPARSELt product can run this layer on ``x`` (whether it wins is measured)."""
    n, m = layer.pattern.n, layer.pattern.m
    return (n, m) == (2, 4) and layer.mitigation.kernel == PLAIN and x.is_cuda and x.dtype in CSLT_DTYPES


def uses_cslt(layer: SparseLinear, x: torch.Tensor) -> bool:
    if not cslt_applies(layer, x):
        return False
    return PREFILL_CHOICE.sparse_wins(run_mode(), x.shape[0], layer.in_features, layer.out_features)
