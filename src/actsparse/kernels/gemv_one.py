"""One decode token: the sparse GEMV with the N:M selection inside each step of the weight stream.

The same function as :func:`actsparse.kernels.sparse_gemv.sparse_gemv` (see its module for the
definition, the tiled weight layout, the workspace and the split finish), for one token row.
With one token every group of ``M`` inputs keeps exactly ``N``, so where the kept rows land is
known without a prefix sum over the chunk: the ``n``-th kept input of group ``g`` goes to slot
``g * N + n``. Each step of the stream therefore loads ``SUB`` inputs, ranks their groups,
places the kept inputs' indices and values in ``SUB * N / M`` slots, all in registers, and reads
those weight rows: no scratch, no barrier, and a trip count fixed at compile time, so the
software pipeline can run the loads of later steps while earlier ones compute. The split over
the input rows finishes as in the batched kernel (partials in chunk order, the last program of
a column tile to arrive adds them: bit-identical results from call to call).

How a step ranks and places is a plan choice (:class:`OnePlan`): integer keys for 16-bit inputs,
the next step's inputs loaded one step early, and, for N and M powers of two, the kept inputs
taken from a top-N of keys that carry each input's lane and sign (:func:`_top_slots`).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from actsparse.kernels.launch import Launcher
from actsparse.kernels.sparse_gemv import (
    MAX_ROWS,
    Workspace,
    _interpreting,
    _pow2,
    check_args,
    keys_apply,
    sparse_gemv_reference,
    untile_weight,
)

try:
    import triton
    import triton.language as tl

    from actsparse.kernels.sparse_gemv import _choose, _finish, _score_bits, _shifted
except ImportError:  # the module imports without Triton; the kernel then cannot run
    triton = None
    tl = None

SLOTS = 64  # kept rows per step (the product's inner size; at least 16 for a tensor-core step)
BLOCK_O = 256  # output columns per program (H200: 256 with few splits beat 512 on every Llama shape at 2:4)
PROGRAMS_PER_SM = 2
AHEAD = True  # load each step's inputs one step early
# Pipeline depths whose code with the loads ahead was compiled and checked on the H200 (Triton 3.6):
# at 4 stages the 2:4 plans of 4096 -> 14336 and 4096 -> 28672 came out wrong (relative error
# ~0.8; tests/test_kernel_gemv_one.py, the compiled-plans test), so other depths load in the step.
AHEAD_STAGES = (3, 5)
KEYED = True  # rank 16-bit inputs without a score vector by integer keys
PDL = False  # programmatic dependent launch where the GPU has it
TOPK = False  # kept inputs from a top-N of integer keys (checked; not yet timed on a GPU)


class OnePlan(NamedTuple):
    """Launch choices: input rows per step, input rows per program, warps, pipeline stages, and
    whether the kept rows are placed in slots (``compact``) or every row of the step is loaded
    under its keep flag (a load predicated off moves no bytes; no placement, twice the product).

    ``ahead``: each step's inputs are loaded one step before they are ranked, so the ranking
    never waits on that load. ``keyed``: rank 16-bit inputs without a score vector by integer
    keys (see ``sparse_gemv._choose``; the same choice, fewer instructions). ``topk``: with such
    inputs and N and M powers of two, take each group's kept inputs from a top-N of keys that also
    carry the lane and the sign (``_top_slots``), instead of ranking all pairs and placing by
    comparison. ``pdl``: launch as a programmatic dependent launch (Hopper and later): the programs
    start while the previous kernel in the stream finishes and wait for it before their first
    memory access.
    """

    sub: int
    chunk: int
    num_warps: int
    stages: int
    compact: bool = True
    ahead: bool = True
    keyed: bool = True
    pdl: bool = False
    topk: bool = False


def one_block_o(o: int) -> int:
    """The column tile width the one-token kernel wants for ``o`` outputs."""
    return min(BLOCK_O, max(16, _pow2(o)))


def one_plan(
    k: int,
    o: int,
    n: int,
    m: int,
    block_o: int,
    sm_count: int,
    *,
    sub: int | None = None,
    chunk: int | None = None,
    num_warps: int | None = None,
    stages: int | None = None,
    compact: bool = True,
    ahead: bool | None = None,
    keyed: bool | None = None,
    pdl: bool | None = None,
    topk: bool | None = None,
) -> OnePlan:
    """The default plan (any argument given overrides it): ``SLOTS`` kept rows a step, and the input
    rows split as few times as gives about ``PROGRAMS_PER_SM`` programs per multiprocessor (a long
    stream per program and a short finish: H200, BENCHMARKS.md §5)."""
    slots_per_group = _pow2(n)
    if sub is None:  # groups per step: a power of two with about SLOTS slots, at least 16
        groups = max(1, _pow2(-(-SLOTS // slots_per_group)))
        while groups * slots_per_group < 16:
            groups *= 2
        sub = groups * m
    groups = sub // m
    if sub % m or groups & (groups - 1) or groups * slots_per_group < 16:
        raise ValueError(f"sub {sub} must be M={m} times a power of two with at least 16 slots")
    tiles = -(-o // block_o)
    if chunk is None:
        split = max(1, PROGRAMS_PER_SM * sm_count // tiles)
        chunk = -(-k // (split * sub)) * sub
    if chunk % sub:
        raise ValueError(f"chunk {chunk} must be a multiple of sub {sub}")
    stages = 3 if stages is None else stages
    if ahead:
        _check_ahead(stages)
    if ahead is None:
        ahead = AHEAD and stages in AHEAD_STAGES
    return OnePlan(sub, chunk, 4 if num_warps is None else num_warps, stages, bool(compact), bool(ahead),
                   KEYED if keyed is None else bool(keyed), PDL if pdl is None else bool(pdl),
                   TOPK if topk is None else bool(topk))  # fmt: skip


def _check_ahead(stages: int) -> None:
    if stages not in AHEAD_STAGES:
        raise ValueError(f"loads ahead run only at {AHEAD_STAGES} pipeline stages (AHEAD_STAGES), got {stages}: "
                         "pass ahead=False or one of those depths")  # fmt: skip


def one_workspace_sizes(k: int, o: int, block_o: int, plan: OnePlan) -> tuple[int, int, int, int, int]:
    """Elements each :class:`~actsparse.kernels.sparse_gemv.Workspace` tensor needs for one plan (the
    batched kernel's layout: partials and statistics per split; no compacted rows or values)."""
    split, tiles = -(-k // plan.chunk), -(-o // block_o)
    return split * MAX_ROWS * o, split * tiles * 4 * MAX_ROWS, tiles, 0, 0


def sparse_gemv_one(
    x, wt, o, n, m, ws: Workspace, plan: OnePlan, *, vector=None, shift=None, var=False, bias=None, row_sum=None, out=None
) -> torch.Tensor:
    """The kernel on one token row ``x`` ``[1, K]`` and ``wt = tile_weight(W, block_o)``; ``ws`` holds
    ``ceil(K / chunk) * O`` partials (and 4 statistics per program with VAR) and one counter per tile."""
    check_args(x, wt, n, m)
    rows, k = x.shape
    tiles, _, block_o = wt.shape
    if rows != 1:
        raise ValueError(f"sparse_gemv_one takes one token row, got {rows}")
    if shift is not None and row_sum is None:
        raise ValueError("a shift needs the weight's row sums (W 1) for its rank-1 term")
    if plan.ahead:
        _check_ahead(plan.stages)
    if any(t.numel() < need for t, need in zip(ws, one_workspace_sizes(k, o, block_o, plan))):
        raise ValueError("the workspace is too small for this plan (one_workspace_sizes)")
    split = -(-k // plan.chunk)
    x = x.contiguous()
    if out is None:
        out = torch.empty(1, o, dtype=x.dtype, device=x.device)
    dummy = ws.partials
    keyed = plan.keyed and keys_apply(x, vector)
    topk = plan.topk and keyed and plan.compact and _pow2(n) == n and _pow2(m) == m
    pdl = plan.pdl and x.is_cuda and torch.cuda.get_device_capability(x.device)[0] >= 9
    options = {"launch_pdl": True} if pdl else {}
    _ONE_LAUNCH(
        (tiles, split), x, dummy if vector is None else vector, dummy if shift is None else shift, wt,
        dummy if bias is None else bias, dummy if row_sum is None else row_sum, out, ws.partials, ws.stats,
        ws.counters, k, o,
        N=n, M=m, M_P2=_pow2(m), N_P2=_pow2(n), SUB=plan.sub, STEPS=plan.chunk // plan.sub, SPLIT=split,
        BLOCK_O=block_o, STAGES=plan.stages, COMPACT=plan.compact, AHEAD=plan.ahead, KEYED=keyed, TOPK=topk, PDL=pdl,
        HAS_VECTOR=vector is not None, HAS_SHIFT=shift is not None, HAS_BIAS=bias is not None, VAR=bool(var),
        PRECISION="ieee" if x.dtype == torch.float32 or not x.is_cuda else "native", num_warps=plan.num_warps, **options,
    )  # fmt: skip
    return out


# One op, ``torch.ops.actsparse.sparse_gemv_one``, as for the batched kernel: the Triton kernel on
# CUDA (and under the interpreter), the PyTorch reference elsewhere; the workspace is scratch whose
# counters the kernel leaves at zero.
def sparse_gemv_one_auto(
    x: torch.Tensor, wt: torch.Tensor, bias: torch.Tensor | None, row_sum: torch.Tensor | None,
    vector: torch.Tensor | None, shift: torch.Tensor | None, partials: torch.Tensor, stats: torch.Tensor,
    counters: torch.Tensor, out_features: int, n: int, m: int, var: bool, sub: int, chunk: int, num_warps: int,
    stages: int, compact: bool, ahead: bool, keyed: bool, pdl: bool, topk: bool,
) -> torch.Tensor:  # fmt: skip
    if triton is not None and (x.is_cuda or _interpreting()):
        # the kernel reads no compacted rows or values: those workspace fields need no elements
        return sparse_gemv_one(x, wt, out_features, n, m, Workspace(partials, stats, counters, counters, partials),
                               OnePlan(sub, chunk, num_warps, stages, compact, ahead, keyed, pdl, topk), vector=vector, shift=shift, var=var, bias=bias,
                               row_sum=row_sum)  # fmt: skip
    return sparse_gemv_reference(x, untile_weight(wt, out_features), n, m, vector=vector, shift=shift, var=var,
                                 bias=bias, row_sum=row_sum)  # fmt: skip


_sparse_gemv_one_op = torch.library.custom_op("actsparse::sparse_gemv_one", sparse_gemv_one_auto, mutates_args=())


@_sparse_gemv_one_op.register_fake
def _(x, wt, bias, row_sum, vector, shift, partials, stats, counters, out_features, n, m, var, sub, chunk, num_warps,
      stages, compact, ahead, keyed, pdl, topk):  # fmt: skip
    return x.new_empty(x.shape[0], out_features)


if triton is not None:

    @triton.jit
    def _gemv_one_kernel(
        x_ptr, v_ptr, shift_ptr, wt_ptr, bias_ptr, rowsum_ptr, y_ptr, part_ptr, stats_ptr, count_ptr, K, O,
        N: tl.constexpr, M: tl.constexpr, M_P2: tl.constexpr, N_P2: tl.constexpr, SUB: tl.constexpr,
        STEPS: tl.constexpr, SPLIT: tl.constexpr, BLOCK_O: tl.constexpr, STAGES: tl.constexpr, COMPACT: tl.constexpr,
        AHEAD: tl.constexpr, KEYED: tl.constexpr, TOPK: tl.constexpr, PDL: tl.constexpr, HAS_VECTOR: tl.constexpr, HAS_SHIFT: tl.constexpr,
        HAS_BIAS: tl.constexpr, VAR: tl.constexpr, PRECISION: tl.constexpr,
    ):  # fmt: skip
        G: tl.constexpr = SUB // M  # groups per step
        S: tl.constexpr = G * N_P2  # slots per step
        MAXB: tl.constexpr = 4  # the workspace's token rows (the batched kernel's layout)
        TOKP: tl.constexpr = 16
        pid_o = tl.program_id(0)
        pid_s = tl.program_id(1)
        tiles = tl.num_programs(0)
        lo = pid_s * (STEPS * SUB)
        gs = tl.arange(0, G)
        lanes = tl.arange(0, M_P2)
        ns = tl.arange(0, N_P2)
        local = tl.arange(0, BLOCK_O)
        cols = pid_o * BLOCK_O + local
        col_ok = cols < O
        tile_ptr = wt_ptr + pid_o.to(tl.int64) * K * BLOCK_O
        rows16 = tl.arange(0, TOKP)
        toks = tl.arange(0, 1)
        acc = tl.zeros((TOKP, BLOCK_O), dtype=tl.float32)
        sums_x = tl.zeros((1,), dtype=tl.float32)
        sums_xx = tl.zeros((1,), dtype=tl.float32)
        sums_p = tl.zeros((1,), dtype=tl.float32)
        sums_pp = tl.zeros((1,), dtype=tl.float32)
        if PDL:  # nothing is read or written before the previous kernel in the stream has finished
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
        group_ok = lo + gs * M < K
        ok = (lanes < M)[None, :] & group_ok[:, None]
        cols_k = lo + gs[:, None] * M + lanes[None, :]  # [G, M_P2]
        raw_next = tl.zeros((G, M_P2), dtype=x_ptr.dtype.element_ty)
        v_next = tl.zeros((G, M_P2), dtype=v_ptr.dtype.element_ty)
        if AHEAD:  # the first step's inputs; each step then loads the next one's
            raw_next = tl.load(x_ptr + cols_k, mask=ok, other=0.0)
            if HAS_VECTOR:
                v_next = tl.load(v_ptr + cols_k, mask=ok, other=0.0)
        for step in tl.range(0, STEPS, num_stages=STAGES):
            first = lo + step * SUB
            cols_k = first + gs[:, None] * M + lanes[None, :]  # [G, M_P2]
            group_ok = first + gs * M < K
            ok = (lanes < M)[None, :] & group_ok[:, None]
            if AHEAD:
                raw = raw_next
                v = v_next
                ok_next = (lanes < M)[None, :] & ((first + SUB + gs * M < K) & (step + 1 < STEPS))[:, None]
                raw_next = tl.load(x_ptr + cols_k + SUB, mask=ok_next, other=0.0)
                if HAS_VECTOR:
                    v_next = tl.load(v_ptr + cols_k + SUB, mask=ok_next, other=0.0)
            else:
                raw = tl.load(x_ptr + cols_k, mask=ok, other=0.0)
                v = v_next
                if HAS_VECTOR:
                    v = tl.load(v_ptr + cols_k, mask=ok, other=0.0)
            if TOPK:
                dense, index, value, slot_ok = _top_slots(raw, shift_ptr, first, gs, lanes, ok, M, N, M_P2,
                                                          HAS_SHIFT)  # fmt: skip
                pruned = value
                index = tl.reshape(index, (S,))
                value = tl.reshape(value, (S,))
                slot_ok = tl.reshape(slot_ok, (S,))
            elif COMPACT:
                dense, pruned, keep = _choose(raw, v, shift_ptr, 0, ok, ok, 1, N, M_P2, HAS_VECTOR, HAS_SHIFT, KEYED)
                flags = keep.to(tl.int32)
                before = tl.cumsum(flags, axis=1) - flags  # kept inputs before this one in its group
                hit = keep[:, None, :] & (before[:, None, :] == ns[None, :, None])  # [G, N_P2, M_P2]: slot n <- lane
                index = tl.sum(tl.where(hit, cols_k[:, None, :], 0), axis=2)  # [G, N_P2]
                value = tl.sum(tl.where(hit, pruned[:, None, :], 0.0), axis=2)
                slot_ok = (ns < N)[None, :] & group_ok[:, None]
                index = tl.reshape(index, (S,))
                value = tl.reshape(value, (S,))
                slot_ok = tl.reshape(slot_ok, (S,))
            else:  # every row of the step, loaded under its keep flag
                dense, pruned, keep = _choose(raw, v, shift_ptr, 0, ok, ok, 1, N, M_P2, HAS_VECTOR, HAS_SHIFT, KEYED)
                index = tl.reshape(cols_k, (G * M_P2,))
                value = tl.reshape(pruned, (G * M_P2,))
                slot_ok = tl.reshape(keep, (G * M_P2,))
            w = tl.load(tile_ptr + index.to(tl.int64)[:, None] * BLOCK_O + local[None, :], mask=slot_ok[:, None], other=0.0)
            xv = tl.where(rows16[:, None] == 0, value[None, :], 0.0)
            if PRECISION == "ieee":
                acc = tl.dot(xv, w.to(tl.float32), acc, input_precision="ieee")
            else:
                acc = tl.dot(xv.to(w.dtype), w, acc)
            if VAR:
                sums_x += tl.sum(tl.sum(dense, axis=1), axis=0)
                sums_xx += tl.sum(tl.sum(dense * dense, axis=1), axis=0)
                sums_p += tl.sum(tl.sum(pruned, axis=1), axis=0)
                sums_pp += tl.sum(tl.sum(pruned * pruned, axis=1), axis=0)

        _finish(acc, sums_x, sums_xx, sums_p, sums_pp, toks, cols, col_ok, pid_o, pid_s, tiles, part_ptr, stats_ptr,
                count_ptr, shift_ptr, rowsum_ptr, bias_ptr, y_ptr, 1, K, O, SPLIT, 1, BLOCK_O, MAXB, TOKP, HAS_SHIFT,
                HAS_BIAS, VAR)  # fmt: skip

    @triton.jit
    def _top_slots(raw, shift_ptr, first, gs, lanes, ok, M: tl.constexpr, N: tl.constexpr,
                   M_P2: tl.constexpr, HAS_SHIFT: tl.constexpr):  # fmt: skip
        """The kept inputs of each group straight from a top-N of integer keys (``topk`` plans: 16-bit
        inputs without a score vector, N and M powers of two): dense values ``[G, M]``, and per slot
        ``[G, N]`` the input's index, its pruned value and whether it is in range.

        Each key holds the score's bits (whose low 13 bits are zero), the lane's reversed index
        above bit 0 and the value's sign in bit 0: unique in its group and ordered as the ranking
        rule orders the inputs, so the N largest keys are the kept inputs, and each gives back its
        lane and its exact value. Slots come in key order, not index order.
        """
        dense, xs = _shifted(raw, shift_ptr, 0, 1, HAS_SHIFT)
        key = _score_bits(tl.abs(xs)) | ((M_P2 - 1 - lanes) << 1)[None, :] | (xs < 0).to(tl.int32)
        top = tl.topk(tl.where(ok, key, -1), N)  # [G, N], largest first
        lane = M_P2 - 1 - ((top >> 1) & (M_P2 - 1))
        magnitude = (top & -64).to(tl.float32, bitcast=True)
        slot_ok = top >= 0  # an input in range (those out of range have the key -1)
        value = tl.where(slot_ok, tl.where((top & 1) != 0, -magnitude, magnitude), 0.0)
        return dense, first + gs[:, None] * M + lane, value, slot_ok


_ONE_LAUNCH = Launcher(_gemv_one_kernel) if triton is not None else None
