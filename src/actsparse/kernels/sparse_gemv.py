"""Decode in one launch: pick N of every M inputs and read only the weight rows they need.

For a few tokens (``B <= MAX_ROWS``) a linear layer is a GEMV and its cost is reading the
weight. With the input pruned to N:M only the kept features' weight rows matter. The weight is
kept transposed and cut into column tiles (:func:`tile_weight`: ``[O / BLOCK_O, K, BLOCK_O]``),
so each kept feature is one contiguous piece of ``BLOCK_O`` outputs in its tile.

What one launch computes, for each token ``b`` (all sums in float32)::

    xs   = x[b] - shift[b]                       (shift: D-PTS's median, optional)
    keep = the N largest |xs| * vector of every M consecutive features (ties to the lower index,
           NaN counts as the largest, as in a stable descending sort)
    p    = where(keep, xs, 0)
    s    = sqrt(Var(x[b]) / max(Var(p), 1e-8))   (VAR, optional; else 1; unbiased variances)
    y[b] = s * (p @ Wt) + shift[b] * row_sum + bias

so VAR's per-token scale and D-PTS's rank-1 term are applied to the product's output.

Design. The grid is (column tiles) x (chunks of ``CHUNK`` input rows). A program first selects
the kept features of its chunk, ``SELECT_ROWS`` rows at a time (the N:M ranking of
``[rows / M, M]`` in registers), and writes the union over tokens of the nonzero kept rows,
compacted in order, and the pruned values to its own slice of a scratch. Then it streams
exactly those weight rows, ``BLOCK_K`` a step through the software pipeline, each step one
tensor-core product with the token rows padded to 16. With more than one chunk, each program
stores its float32 partials in its own workspace slice and bumps its tile's arrival counter
(after a barrier, with release/acquire ordering at GPU scope); the program that arrives last
adds the slices in chunk order, applies the epilogue, writes ``y`` and resets the counter. The
sum order is fixed, so the result is bit-identical from call to call (no float atomics), and
there is no second launch: one kernel per layer, registered as ``torch.ops.actsparse.sparse_gemv``
for ``torch.compile`` and CUDA-graph capture. BENCHMARKS.md has the H200 measurements behind
:func:`gemv_plan`'s choices and what still costs time (selection and the split finish are
latency-bound: about 6 us of a 31 us call).

:func:`sparse_gemv_reference` is the plain PyTorch definition.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import torch

from actsparse.kernels.launch import Launcher

try:
    import triton
    import triton.language as tl
except ImportError:  # the module imports without Triton; the kernel then cannot run
    triton = None
    tl = None

MAX_ROWS = 4
MAX_M = 32
VAR_EPS = 1e-8
PROGRAMS_PER_SM = 2
SELECT_ROWS = 256  # rows selected at a time (a power of two; every M <= 32 divides it or is not a power of two)


class GemvPlan(NamedTuple):
    """Launch choices: output columns per program, input rows per program, rows per step, warps, pipeline
    stages, and ``keyed``: rank 16-bit inputs without a score vector by integer keys (``_choose``; the
    same choice, fewer instructions)."""

    block_o: int
    chunk: int
    block_k: int
    num_warps: int
    stages: int
    keyed: bool = False


def _pow2(value: int) -> int:
    return 1 << max(0, (int(value) - 1).bit_length())


def gemv_plan(k: int, o: int, m: int, rows: int, sm_count: int, *, block_o: int | None = None,
              chunk: int | None = None, block_k: int | None = None, num_warps: int | None = None,
              stages: int | None = None, keyed: bool = False) -> GemvPlan:
    """The default plan for a ``[rows, k] x [k, o]`` product (any argument given overrides it).

    From the H200 sweeps (BENCHMARKS.md): column tiles of 512 (256 below 2048 outputs), about
    ``PROGRAMS_PER_SM`` programs per multiprocessor with chunks of ``M`` times a power of two rows
    (at least 128), 16 rows per step, 4 warps, 3 pipeline stages. Selection is latency-bound, so
    whole-row chunks (no split) measured far slower.
    """
    if block_o is None:
        block_o = min(512 if o >= 2048 else 256, max(16, _pow2(o)))
    tiles = -(-o // block_o)
    if chunk is None:  # rows per program for about PROGRAMS_PER_SM programs per SM, rounded down to M * 2^j
        groups = max(1, k * tiles // (PROGRAMS_PER_SM * sm_count * m))
        chunk = max(m * (1 << (groups.bit_length() - 1)), min(128, m * _pow2(-(-k // m))))
    groups = chunk // m
    if chunk % m or (groups & (groups - 1) and chunk % SELECT_ROWS):
        raise ValueError(f"chunk {chunk} must be M={m} times a power of two, or a multiple of {SELECT_ROWS} rows")
    if block_k is None:
        block_k = 16
    if block_k < 16 or block_k & (block_k - 1):
        raise ValueError(f"block_k {block_k} must be a power of two >= 16 (one tensor-core step)")
    if num_warps is None:
        num_warps = 4
    if stages is None:
        stages = 3
    return GemvPlan(block_o, chunk, block_k, num_warps, stages, bool(keyed))


def tile_weight(weight: torch.Tensor, block_o: int) -> torch.Tensor:
    """``W`` ``[O, K]`` as column tiles of ``Wt``: ``[ceil(O / block_o), K, block_o]``, zero-padded.

    Tile ``j`` holds ``Wt[:, j*block_o:(j+1)*block_o]`` contiguously, so the rows one program
    reads lie in one contiguous region (``block_o * 2`` bytes each in 16-bit types) instead of a
    row stride of ``O`` apart: the skipped rows cost far less DRAM efficiency.
    """
    o, k = weight.shape
    tiles = -(-o // block_o)
    padded = torch.zeros(tiles * block_o, k, dtype=weight.dtype, device=weight.device)
    padded[:o] = weight.detach()
    return padded.reshape(tiles, block_o, k).transpose(1, 2).contiguous()


def untile_weight(tiled: torch.Tensor, o: int) -> torch.Tensor:
    """The ``[O, K]`` weight back from :func:`tile_weight`'s layout."""
    tiles, k, block_o = tiled.shape
    return tiled.transpose(1, 2).reshape(tiles * block_o, k)[:o]


def check_args(x: torch.Tensor, wt: torch.Tensor, n: int, m: int) -> None:
    if x.dim() != 2 or not 1 <= x.shape[0] <= MAX_ROWS:
        raise ValueError(f"x must be [rows, K] with 1 <= rows <= {MAX_ROWS}, got shape {tuple(x.shape)}")
    if wt.dim() != 3 or wt.shape[1] != x.shape[1]:
        raise ValueError(f"the tiled weight must be [tiles, K={x.shape[1]}, block_o], got shape {tuple(wt.shape)}")
    if x.dtype != wt.dtype:
        raise ValueError(f"x is {x.dtype} but the weight is {wt.dtype}")
    if not (isinstance(n, int) and isinstance(m, int) and 1 <= n < m <= MAX_M):
        raise ValueError(f"bad N:M pattern {n}:{m}; need 1 <= N < M <= {MAX_M}")
    if x.shape[1] % m:
        raise ValueError(f"M={m} does not divide the input width K={x.shape[1]}")


def sparse_gemv_reference(x, weight, n, m, *, vector=None, shift=None, var=False, bias=None, row_sum=None):
    """Plain PyTorch: the function the kernel computes (float32 sums), in x's dtype; ``weight`` ``[O, K]``."""
    xf = x.float()
    xs = x if shift is None else (xf - shift.float()[:, None]).to(x.dtype)
    scores = xs.float().abs()
    if vector is not None:
        scores = scores * vector.float()
    groups = scores.reshape(-1, m)
    order = torch.sort(groups, dim=-1, descending=True, stable=True).indices
    keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, order[:, :n], True).reshape(x.shape)
    p = torch.where(keep, xs.float(), torch.zeros((), device=x.device))
    y = p @ weight.float().t()
    if var:
        scale = (xf.var(dim=-1, keepdim=True) / p.var(dim=-1, keepdim=True).clamp_min(VAR_EPS)).sqrt()
        y = y * scale
    if shift is not None:
        y = y + shift.float()[:, None] * row_sum.float()[None, :]
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


class Workspace(NamedTuple):
    """Scratch of the kernel, flat: partial sums, VAR's partial statistics, arrival counters, compacted rows.

    Layers that run one after another on one stream can share one workspace (the counters are
    back at zero after every call): see :func:`shared_workspace`.
    """

    partials: torch.Tensor  # split * MAX_ROWS * O float32
    stats: torch.Tensor  # programs * 4 * MAX_ROWS float32
    counters: torch.Tensor  # tiles int32, zero between calls
    rows: torch.Tensor  # programs * chunk int32
    values: torch.Tensor  # programs * MAX_ROWS * chunk float32


def workspace_sizes(k: int, o: int, plan: GemvPlan) -> tuple[int, int, int, int, int]:
    """Elements each workspace tensor needs for one plan."""
    split, tiles = -(-k // plan.chunk), -(-o // plan.block_o)
    programs = split * tiles
    return split * MAX_ROWS * o, programs * 4 * MAX_ROWS, tiles, programs * plan.chunk, programs * MAX_ROWS * plan.chunk


def _allocate(sizes, device) -> Workspace:
    f32 = dict(dtype=torch.float32, device=device)
    partials, stats, tiles, rows, values = sizes
    return Workspace(torch.empty(partials, **f32), torch.empty(stats, **f32), torch.zeros(tiles, dtype=torch.int32, device=device),
                     torch.empty(rows, dtype=torch.int32, device=device), torch.empty(values, **f32))


def workspace_need(k: int, o: int, plans) -> tuple[int, ...]:
    """Elements of each workspace tensor that every plan in ``plans`` fits in."""
    return tuple(max(column) for column in zip(*[workspace_sizes(k, o, p) for p in plans]))


def workspace_for(k: int, o: int, plans, device) -> Workspace:
    """A workspace large enough for every plan in ``plans`` (counters zeroed)."""
    return _allocate(workspace_need(k, o, plans), device)


_SHARED: dict[str, Workspace] = {}
_RETIRED: list[Workspace] = []  # outgrown workspaces stay allocated: a captured CUDA graph may still use them
_GROWN = [0]  # how many times a shared workspace was replaced (a weight's cached one is current while unchanged)


def shared_workspace(k: int, o: int, plans, device) -> Workspace:
    """The device's one workspace, grown to fit ``plans`` if needed (warm up before graph capture)."""
    return shared_workspace_of(workspace_need(k, o, plans), device)


def workspace_generation() -> int:
    """How many times a shared workspace was replaced: one fetched earlier is current while this is unchanged."""
    return _GROWN[0]


def shared_workspace_of(need: tuple[int, ...], device) -> Workspace:
    """The device's one workspace, grown to at least ``need`` elements per tensor."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())  # "cuda" and "cuda:0" are one device
    key = str(device)
    have = _SHARED.get(key)
    if have is None or any(t.numel() < n for t, n in zip(have, need)):
        if have is not None:
            _RETIRED.append(have)
            need = tuple(max(n, t.numel()) for t, n in zip(have, need))
        _SHARED[key] = _allocate(need, device)
        _GROWN[0] += 1
    return _SHARED[key]


LAST_LAUNCH: dict = {}  # the last compiled kernel launched (benchmarks read its registers and spills)


def sparse_gemv(x, wt, o, n, m, ws: Workspace, plan: GemvPlan, *, vector=None, shift=None, var=False, bias=None,
                row_sum=None, out=None, phases: int = 3) -> torch.Tensor:
    """Launch the kernel (see the module docstring) on ``wt = tile_weight(W, plan.block_o)`` with ``o`` outputs.

    ``ws`` must fit ``plan`` (:func:`workspace_for`).

    ``phases`` is for benchmarks only: 1 = select and finish but read no weight rows (wrong
    results), 3 = the real kernel.
    """
    check_args(x, wt, n, m)
    rows, k = x.shape
    if wt.shape != (-(-o // plan.block_o), k, plan.block_o):
        raise ValueError(f"the tiled weight {tuple(wt.shape)} does not match O={o} and block_o={plan.block_o}; use tile_weight")
    if shift is not None and row_sum is None:
        raise ValueError("a shift needs the weight's row sums (W 1) for its rank-1 term")
    tiles, split = -(-o // plan.block_o), -(-k // plan.chunk)
    if any(t.numel() < n for t, n in zip(ws, workspace_sizes(k, o, plan))):
        raise ValueError("the workspace is too small for this plan; make it with workspace_for")
    x = x.contiguous()
    if out is None:
        out = torch.empty(rows, o, dtype=x.dtype, device=x.device)
    dummy = ws.partials
    keyed = plan.keyed and keys_apply(x, vector)
    LAST_LAUNCH["kernel"] = _GEMV_LAUNCH(
        (tiles, split), x, dummy if vector is None else vector, dummy if shift is None else shift, wt,
        dummy if bias is None else bias, dummy if row_sum is None else row_sum, out,
        ws.partials, ws.stats, ws.counters, ws.rows, ws.values,
        rows, k, o, plan.chunk,
        N=n, M=m, M_P2=_pow2(m), CHUNK=plan.chunk, SPLIT=split, BLOCK_B=_pow2(rows), BLOCK_K=plan.block_k,
        BLOCK_O=plan.block_o, STAGES=plan.stages, HAS_VECTOR=vector is not None, HAS_SHIFT=shift is not None,
        HAS_BIAS=bias is not None, VAR=bool(var), KEYED=keyed, INTERPRET=not x.is_cuda,
        PRECISION="ieee" if x.dtype == torch.float32 or not x.is_cuda else "native", PHASES=phases,
        num_warps=plan.num_warps,
    )
    return out


# ----------------------------------------------------------------------------- the PyTorch op
# One op, ``torch.ops.actsparse.sparse_gemv``, so that torch.compile(fullgraph=True) and CUDA-graph
# capture see a single opaque call: the Triton kernel on CUDA (and under the interpreter), the
# PyTorch reference elsewhere. The workspace is scratch whose counters the kernel leaves at zero,
# so the op has no observable side effect on its arguments.


def sparse_gemv_auto(
    x: torch.Tensor, wt: torch.Tensor, bias: torch.Tensor | None, row_sum: torch.Tensor | None,
    vector: torch.Tensor | None, shift: torch.Tensor | None, partials: torch.Tensor, stats: torch.Tensor,
    counters: torch.Tensor, rows: torch.Tensor, values: torch.Tensor, out_features: int, n: int, m: int, var: bool,
    block_o: int, chunk: int, block_k: int, num_warps: int, stages: int, keyed: bool,
) -> torch.Tensor:
    if triton is not None and (x.is_cuda or _interpreting()):
        return sparse_gemv(x, wt, out_features, n, m, Workspace(partials, stats, counters, rows, values),
                           GemvPlan(block_o, chunk, block_k, num_warps, stages, keyed), vector=vector, shift=shift,
                           var=var, bias=bias, row_sum=row_sum)
    return sparse_gemv_reference(x, untile_weight(wt, out_features), n, m, vector=vector, shift=shift, var=var,
                                 bias=bias, row_sum=row_sum)


_sparse_gemv_op = torch.library.custom_op("actsparse::sparse_gemv", sparse_gemv_auto, mutates_args=())


@_sparse_gemv_op.register_fake
def _(x, wt, bias, row_sum, vector, shift, partials, stats, counters, rows, values, out_features, n, m, var, block_o,
      chunk, block_k, num_warps, stages, keyed):
    return x.new_empty(x.shape[0], out_features)


def keys_apply(x: torch.Tensor, vector: torch.Tensor | None) -> bool:
    """Whether inputs ``x`` can be ranked by integer keys (``_choose``): 16-bit, without a score vector."""
    return vector is None and x.dtype in (torch.bfloat16, torch.float16)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


if triton is not None:

    @triton.jit
    def _select(x_ptr, v, shift_ptr, b, cols, ok, B, K, N: tl.constexpr, M_P2: tl.constexpr,
                HAS_VECTOR: tl.constexpr, HAS_SHIFT: tl.constexpr, KEYED: tl.constexpr):
        """Token ``b``'s dense values, pruned values and keep flags on the tile ``cols`` ``[G, M_P2]``."""
        live = ok & (b < B)
        raw = tl.load(x_ptr + b * K + cols, mask=live, other=0.0)
        return _choose(raw, v, shift_ptr, b, ok, live, B, N, M_P2, HAS_VECTOR, HAS_SHIFT, KEYED)

    @triton.jit
    def _choose(raw, v, shift_ptr, b, ok, live, B, N: tl.constexpr, M_P2: tl.constexpr, HAS_VECTOR: tl.constexpr,
                HAS_SHIFT: tl.constexpr, KEYED: tl.constexpr):
        """Rank the loaded inputs ``raw`` ``[G, M_P2]`` of token ``b`` in their groups (``kernels.ranking``'s rule:
        largest score first, NaN above all, ties to the lower index) and keep ``N`` of each.

        ``KEYED`` (only for 16-bit inputs without a score vector, whose float32 scores end in at least
        13 zero bits): each score's bits with the lane's reversed index in its low bits make one
        integer key per input, unique in its group and ordered as the rule orders the inputs, so the
        rank is one integer comparison per pair instead of the rule's NaN and tie tests.
        """
        dense, xs = _shifted(raw, shift_ptr, b, B, HAS_SHIFT)
        score = tl.abs(xs)
        if HAS_VECTOR:
            score = score * v
        nan = score != score
        lanes = tl.arange(0, M_P2)
        if KEYED:
            key = tl.where(ok, _score_bits(score) | (M_P2 - 1 - lanes)[None, :], -1)
            rank = tl.sum((key[:, None, :] > key[:, :, None]).to(tl.int32), axis=2)
        else:
            score = tl.where(nan | ~ok, -1.0, score)
            mine = score[:, :, None]
            other = score[:, None, :]
            mine_nan = nan[:, :, None]
            other_nan = nan[:, None, :]
            lower = lanes[None, None, :] < lanes[None, :, None]
            beats = (other_nan & ~mine_nan) | ((other_nan == mine_nan) & ((other > mine) | ((other == mine) & lower)))
            rank = tl.sum(beats.to(tl.int32), axis=2)
        keep = (rank < N) & live
        return dense, tl.where(keep, xs, 0.0), keep

    @triton.jit
    def _shifted(raw, shift_ptr, b, B, HAS_SHIFT: tl.constexpr):
        """Token ``b``'s inputs in float32, and the same minus its shift rounded to x's dtype, as the layer does."""
        dense = raw.to(tl.float32)
        xs = dense
        if HAS_SHIFT:
            eta = tl.load(shift_ptr + b, mask=b < B, other=0.0)
            xs = (dense - eta).to(raw.dtype).to(tl.float32)
        return dense, xs

    @triton.jit
    def _score_bits(score):
        """A nonnegative float32 score's bits as an integer ordered like the score, every NaN above all."""
        return tl.where(score != score, 0x7FC00000, score.to(tl.int32, bitcast=True))

    @triton.jit
    def _stream(acc, wt_ptr, rows_ptr, vals_ptr, prog, lo, steps_to, count, cols, col_ok, B, K, CHUNK_CAP,
                MAXB: tl.constexpr, TOKP: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_O: tl.constexpr,
                STAGES: tl.constexpr, PRECISION: tl.constexpr):
        """``acc += vals[:, rows] @ Wt[rows]`` over the ``count`` compacted rows, ``BLOCK_K`` rows a step.

        The token rows are padded to ``TOKP`` so the step is one tensor-core product; the weight rows
        stream through the software pipeline (``STAGES`` steps in flight).
        """
        toks = tl.arange(0, TOKP)
        tok_ok = toks < B
        for r0 in tl.range(0, steps_to, BLOCK_K, num_stages=STAGES):
            rs = r0 + tl.arange(0, BLOCK_K)
            rok = rs < count
            ks = tl.load(rows_ptr + prog * CHUNK_CAP + rs, mask=rok, other=0)
            xv = tl.load(vals_ptr + (prog * MAXB + toks[:, None]) * CHUNK_CAP + (ks - lo)[None, :],
                         mask=tok_ok[:, None] & rok[None, :], other=0.0)
            w = tl.load(wt_ptr + ks.to(tl.int64)[:, None] * BLOCK_O + cols[None, :], mask=rok[:, None], other=0.0)
            if PRECISION == "ieee":  # float32 inputs (and the interpreter, whose 16-bit dot is unreliable)
                acc = tl.dot(xv, w.to(tl.float32), acc, input_precision="ieee")
            else:
                acc = tl.dot(xv.to(w.dtype), w, acc)
        return acc

    @triton.jit
    def _sparse_gemv_kernel(
        x_ptr, v_ptr, shift_ptr, wt_ptr, bias_ptr, rowsum_ptr, y_ptr,
        part_ptr, stats_ptr, count_ptr, rows_ptr, vals_ptr,
        B, K, O, CHUNK_CAP,
        N: tl.constexpr, M: tl.constexpr, M_P2: tl.constexpr, CHUNK: tl.constexpr, SPLIT: tl.constexpr,
        BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_O: tl.constexpr, STAGES: tl.constexpr,
        HAS_VECTOR: tl.constexpr, HAS_SHIFT: tl.constexpr, HAS_BIAS: tl.constexpr, VAR: tl.constexpr,
        KEYED: tl.constexpr, INTERPRET: tl.constexpr, PRECISION: tl.constexpr, PHASES: tl.constexpr = 3,
        SELECT_ROWS: tl.constexpr = 256,
    ):
        SUB_G: tl.constexpr = SELECT_ROWS // M if CHUNK >= SELECT_ROWS else CHUNK // M  # groups selected at a time
        SUB: tl.constexpr = SUB_G * M
        MAXB: tl.constexpr = 4
        TOKP: tl.constexpr = 16  # token rows of the tensor-core product (rows >= B are zero)
        pid_o = tl.program_id(0)
        pid_s = tl.program_id(1)
        tiles = tl.num_programs(0)
        prog = pid_s * tiles + pid_o
        lo = pid_s * CHUNK
        groups = tl.arange(0, SUB_G)
        lanes = tl.arange(0, M_P2)
        toks = tl.arange(0, BLOCK_B)

        # 1. Select, SUB rows at a time: pruned values by position, the union over tokens of the
        #    nonzero kept rows (compacted, in order), and VAR's partial sums.
        sums_x = tl.zeros((BLOCK_B,), dtype=tl.float32)
        sums_xx = tl.zeros((BLOCK_B,), dtype=tl.float32)
        sums_p = tl.zeros((BLOCK_B,), dtype=tl.float32)
        sums_pp = tl.zeros((BLOCK_B,), dtype=tl.float32)
        count = tl.sum(toks * 0, axis=0)
        for c0 in range(0, CHUNK, SUB):
            cols_k = lo + c0 + groups[:, None] * M + lanes[None, :]
            ok = (lanes < M)[None, :] & (cols_k < K) & (c0 + groups[:, None] * M < CHUNK)
            v = 0.0
            if HAS_VECTOR:
                v = tl.load(v_ptr + cols_k, mask=ok, other=0.0)
            union = ok & False
            for b in tl.static_range(BLOCK_B):
                dense, pruned, keep = _select(x_ptr, v, shift_ptr, b, cols_k, ok, B, K, N, M_P2, HAS_VECTOR, HAS_SHIFT,
                                              KEYED)  # fmt: skip
                union = union | (keep & (pruned != 0))
                tl.store(vals_ptr + (prog * MAXB + b) * CHUNK_CAP + (cols_k - lo), pruned, mask=ok)
                if VAR:
                    at = toks == b
                    sums_x += tl.where(at, tl.sum(tl.sum(dense, axis=1), axis=0), 0.0)
                    sums_xx += tl.where(at, tl.sum(tl.sum(dense * dense, axis=1), axis=0), 0.0)
                    sums_p += tl.where(at, tl.sum(tl.sum(pruned, axis=1), axis=0), 0.0)
                    sums_pp += tl.where(at, tl.sum(tl.sum(pruned * pruned, axis=1), axis=0), 0.0)
            flags = union.to(tl.int32)
            per_group = tl.sum(flags, axis=1)
            slot = count + (tl.cumsum(per_group, axis=0) - per_group)[:, None] + tl.cumsum(flags, axis=1) - 1
            tl.store(rows_ptr + prog * CHUNK_CAP + slot, cols_k, mask=union)
            count += tl.sum(per_group, axis=0)
        if PHASES == 1:  # benchmark: select and finish, read no weight rows
            count = count * 0
        tl.debug_barrier()  # the compacted rows and values are read back by other threads of this program

        # 2. Stream the needed weight rows.
        local = tl.arange(0, BLOCK_O)
        cols = pid_o * BLOCK_O + local
        col_ok = cols < O
        tile_ptr = wt_ptr + pid_o.to(tl.int64) * K * BLOCK_O  # this column tile's rows, contiguous
        acc = tl.zeros((TOKP, BLOCK_O), dtype=tl.float32)
        if INTERPRET:  # the interpreter's loop bounds must be Python ints; the tail is masked anyway
            acc = _stream(acc, tile_ptr, rows_ptr, vals_ptr, prog, lo, CHUNK, count, local, col_ok, B, K, CHUNK_CAP,
                          MAXB, TOKP, BLOCK_K, BLOCK_O, STAGES, PRECISION)
        else:
            acc = _stream(acc, tile_ptr, rows_ptr, vals_ptr, prog, lo, count, count, local, col_ok, B, K, CHUNK_CAP,
                          MAXB, TOKP, BLOCK_K, BLOCK_O, STAGES, PRECISION)

        # 3. Finish: this program alone, or the last of its tile to arrive.
        _finish(acc, sums_x, sums_xx, sums_p, sums_pp, toks, cols, col_ok, pid_o, pid_s, tiles, part_ptr, stats_ptr,
                count_ptr, shift_ptr, rowsum_ptr, bias_ptr, y_ptr, B, K, O, SPLIT, BLOCK_B, BLOCK_O, MAXB, TOKP,
                HAS_SHIFT, HAS_BIAS, VAR)

    @triton.jit
    def _finish(acc, sums_x, sums_xx, sums_p, sums_pp, toks, cols, col_ok, pid_o, pid_s, tiles, part_ptr, stats_ptr,
                count_ptr, shift_ptr, rowsum_ptr, bias_ptr, y_ptr, B, K, O, SPLIT: tl.constexpr, BLOCK_B: tl.constexpr,
                BLOCK_O: tl.constexpr, MAXB: tl.constexpr, TOKP: tl.constexpr, HAS_SHIFT: tl.constexpr,
                HAS_BIAS: tl.constexpr, VAR: tl.constexpr):
        """The split finish (both GEMV kernels): with one split, the epilogue; else store this program's
        partials and VAR statistics, and the last program of the column tile to arrive adds every
        split's in chunk order, resets the tile's counter and applies the epilogue."""
        rows16 = tl.arange(0, TOKP)
        if SPLIT == 1:
            _epilogue(acc, rows16, toks, cols, col_ok, sums_x, sums_xx, sums_p, sums_pp, shift_ptr, rowsum_ptr,
                      bias_ptr, y_ptr, B, K, O, HAS_SHIFT, HAS_BIAS, VAR)
        else:
            tl.store(part_ptr + pid_s * MAXB * O + rows16[:, None] * O + cols[None, :], acc,
                     mask=(rows16 < B)[:, None] & col_ok[None, :])
            if VAR:
                base = stats_ptr + (pid_s * tiles + pid_o) * 4 * MAXB + toks
                tl.store(base, sums_x)
                tl.store(base + MAXB, sums_xx)
                tl.store(base + 2 * MAXB, sums_p)
                tl.store(base + 3 * MAXB, sums_pp)
            tl.debug_barrier()  # every thread's partials are stored before the release below
            arrived = tl.atomic_add(count_ptr + pid_o, 1, sem="acq_rel", scope="gpu")
            if arrived == SPLIT - 1:
                # Chunk order (the same sum on every call), 8 splits in flight. (Loading only the real
                # token rows, [BLOCK_B, BLOCK_O], 16 in flight, measured slower on the H200.)
                at = rows16[:, None] * O + cols[None, :]
                live = (rows16 < B)[:, None] & col_ok[None, :]
                acc = tl.zeros((TOKP, BLOCK_O), dtype=tl.float32)
                sums_x = tl.zeros((BLOCK_B,), dtype=tl.float32)
                sums_xx = tl.zeros((BLOCK_B,), dtype=tl.float32)
                sums_p = tl.zeros((BLOCK_B,), dtype=tl.float32)
                sums_pp = tl.zeros((BLOCK_B,), dtype=tl.float32)
                for s0 in range(0, SPLIT, 8):
                    for j in tl.static_range(8):
                        s = s0 + j
                        acc += tl.load(part_ptr + s * MAXB * O + at, mask=live & (s < SPLIT), other=0.0,
                                       cache_modifier=".cg")
                        if VAR:
                            base = stats_ptr + (s * tiles + pid_o) * 4 * MAXB + toks
                            there = (toks < BLOCK_B) & (s < SPLIT)
                            sums_x += tl.load(base, mask=there, other=0.0, cache_modifier=".cg")
                            sums_xx += tl.load(base + MAXB, mask=there, other=0.0, cache_modifier=".cg")
                            sums_p += tl.load(base + 2 * MAXB, mask=there, other=0.0, cache_modifier=".cg")
                            sums_pp += tl.load(base + 3 * MAXB, mask=there, other=0.0, cache_modifier=".cg")
                tl.atomic_xchg(count_ptr + pid_o, 0)  # ready for the next call
                _epilogue(acc, rows16, toks, cols, col_ok, sums_x, sums_xx, sums_p, sums_pp, shift_ptr, rowsum_ptr,
                          bias_ptr, y_ptr, B, K, O, HAS_SHIFT, HAS_BIAS, VAR)

    @triton.jit
    def _epilogue(acc, r, toks, cols, col_ok, sums_x, sums_xx, sums_p, sums_pp, shift_ptr, rowsum_ptr, bias_ptr, y_ptr,
                  B, K, O, HAS_SHIFT: tl.constexpr, HAS_BIAS: tl.constexpr, VAR: tl.constexpr):
        """``y[r] = s * acc[r] + shift[r] * row_sum + bias`` for the rows ``r < B`` of ``acc``."""
        if VAR:
            var_x = (sums_xx - sums_x * sums_x / K) / (K - 1)
            var_p = (sums_pp - sums_p * sums_p / K) / (K - 1)
            scale = tl.sqrt(var_x / tl.maximum(var_p, 1e-8))
            scale_r = tl.sum(tl.where(r[:, None] == toks[None, :], scale[None, :], 0.0), axis=1)
            acc = acc * scale_r[:, None]
        if HAS_SHIFT:
            eta = tl.load(shift_ptr + r, mask=r < B, other=0.0)
            acc += eta[:, None] * tl.load(rowsum_ptr + cols, mask=col_ok, other=0.0)[None, :]
        if HAS_BIAS:
            acc += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        tl.store(y_ptr + r[:, None] * O + cols[None, :], acc.to(y_ptr.dtype.element_ty), mask=(r < B)[:, None] & col_ok[None, :])


_GEMV_LAUNCH = Launcher(_sparse_gemv_kernel) if triton is not None else None


def sm_count(device: torch.device) -> int:
    """Multiprocessors of a CUDA device (4 for the CPU interpreter: a few programs are enough)."""
    if device.type != "cuda":
        return 4
    return torch.cuda.get_device_properties(device).multi_processor_count
