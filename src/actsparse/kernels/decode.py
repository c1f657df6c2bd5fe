"""Decode-time N:M sparse-input linear layer: read only the weight rows of kept inputs.

At decode (a handful of tokens) ``y = x Wᵀ + b`` is memory bound: its cost is reading ``W``.
When ``x`` is pruned to an N:M pattern (at most N of every M consecutive features nonzero per
token), only the weight columns of the kept features are needed. The weight is stored
transposed, ``Wt = W.t()`` ``[K, O]``, so each kept feature ``j`` is one contiguous row
``Wt[j, :]``; at 50% density half the weight bytes are read.

One fused Triton kernel, no compaction step, no host syncs (CUDA-graph capturable): a GEMV over
``Wt`` shaped like a dense one, whose weight loads are predicated per row on "some token's input
is nonzero here". A predicated-off load moves no bytes, so the traffic is the union of the kept
rows over the tokens (for B = 1 exactly the kept rows). The grid is (column tiles of
``BLOCK_O``) x (chunks of input rows); each program loads its slice of ``x`` (a few bytes),
streams ``BLOCK_K`` weight rows per step with the next step's rows in flight, and keeps the sum
over rows inside each thread (warps sit side by side along the columns). With a K split each
program stores its fp32 partial sums in its own slice of a workspace, and a second small kernel
adds the slices in a fixed order, adds the bias and writes ``y``: no atomics, no counters, so
no ordering between programs to get wrong (an earlier one-launch version, where the last
program of a tile summed atomically added partials, gave wrong results on about 2% of calls
under stress on the H100), and the result is deterministic.

Exactness: an input that is not N:M (an unpruned ``x``, or a mask with too many features in a
group) is detected per chunk after the fast pass, and that chunk is redone with the exact N:M
ranking of :func:`compact_nm` (largest ``|x|`` first, ties to the lower index). The result is
then the same as compaction + GEMV.

:func:`compact_nm` (kept indices and values) remains for callers that want the compacted form;
:func:`nm_gemv` takes that form (compatibility; it scatters back to dense rows).
See ``benchmarks/NOTES-decode.md`` for the measurements behind the tuning in :func:`gemv_config`.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import torch
import torch.nn.functional as F

from actsparse.kernels.ranking import nm_mask

try:
    import triton
    import triton.language as tl
except ImportError:  # the module must import without Triton
    triton = None
    tl = None

MAX_TOKENS = 16


def triton_available() -> bool:
    """Triton is importable and there is a GPU to run it on (or the interpreter is on)."""
    if triton is None:
        return False
    return torch.cuda.is_available() or _interpreting()


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


class DecodeWeight:
    """A linear layer's weight stored transposed, ``Wt`` ``[K, O]`` contiguous, plus its bias."""

    def __init__(self, wt: torch.Tensor, bias: torch.Tensor | None = None):
        if wt.dim() != 2:
            raise ValueError(f"Wt must be 2-D [in_features, out_features], got shape {tuple(wt.shape)}")
        if bias is not None and bias.shape != (wt.shape[1],):
            raise ValueError(f"bias must have shape ({wt.shape[1]},), got {tuple(bias.shape)}")
        self.wt = wt.contiguous()
        self.bias = None if bias is None else bias.contiguous()
        self._scratch: dict = {}

    @classmethod
    def from_linear(cls, weight, bias: torch.Tensor | None = None) -> DecodeWeight:
        """From an ``[O, K]`` weight (and optional ``[O]`` bias), or from an ``nn.Linear``."""
        if isinstance(weight, torch.nn.Linear):
            weight, bias = weight.weight, weight.bias
        if weight.dim() != 2:
            raise ValueError(f"weight must be 2-D [out_features, in_features], got shape {tuple(weight.shape)}")
        return cls(weight.detach().t().contiguous(), None if bias is None else bias.detach())

    @property
    def in_features(self) -> int:
        return self.wt.shape[0]

    @property
    def out_features(self) -> int:
        return self.wt.shape[1]

    def scratch(self, split: int, tokens: int) -> torch.Tensor:
        """K-split workspace ``[split, tokens, O]`` fp32 (every element is written before it is read).

        Kept across calls; warm up once before CUDA-graph capture so it is not made inside it.
        One stream at a time per weight: concurrent calls would share it.
        """
        key = (split, tokens)
        if key not in self._scratch:
            self._scratch[key] = torch.empty(split, tokens, self.out_features, dtype=torch.float32, device=self.wt.device)
        return self._scratch[key]

    def __repr__(self) -> str:
        return (
            f"DecodeWeight(in={self.in_features}, out={self.out_features}, dtype={self.wt.dtype}, bias={self.bias is not None})"
        )


def nm_decode_linear_reference(x_pruned: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Plain PyTorch: ``F.linear(x_pruned, weight, bias)``."""
    return F.linear(x_pruned, weight, bias)


# ----------------------------------------------------------------------------- checks


def _check_pattern(n: int, m: int, k: int) -> None:
    if not (isinstance(n, int) and isinstance(m, int) and 1 <= n < m):
        raise ValueError(f"bad N:M pattern {n}:{m}; need integers with 1 <= N < M (e.g. 2:4, 8:16)")
    if k % m:
        raise ValueError(f"M={m} does not divide the input width K={k}; pick an M that divides {k}")


def _check_input(x: torch.Tensor, n: int, m: int, mask: torch.Tensor | None) -> None:
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D [tokens, in_features], got shape {tuple(x.shape)}")
    if not 1 <= x.shape[0] <= MAX_TOKENS:
        raise ValueError(f"decode kernel takes 1 to {MAX_TOKENS} tokens, got B={x.shape[0]}; use a dense GEMM for larger batches")
    if not x.is_floating_point():
        raise ValueError(f"x must be floating point, got {x.dtype}")
    _check_pattern(n, m, x.shape[1])
    if mask is not None:
        if mask.shape != x.shape:
            raise ValueError(f"mask shape {tuple(mask.shape)} does not match x shape {tuple(x.shape)}")
        if mask.dtype != torch.bool:
            raise ValueError(f"mask must be torch.bool, got {mask.dtype}")
        if mask.device != x.device:
            raise ValueError(f"mask is on {mask.device} but x is on {x.device}")


def _require_triton() -> None:
    if not triton_available():
        raise RuntimeError("the N:M decode kernel needs Triton and a CUDA GPU (or TRITON_INTERPRET=1 to run it on CPU)")


# ----------------------------------------------------------------------------- compaction


def compact_nm(x_pruned: torch.Tensor, n: int, m: int, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Kept indices ``idx`` ``[B, K*N/M]`` (int32, ascending) and values ``val`` (x's dtype).

    Without ``mask`` the kept set is the N largest ``|x|`` of each group of M, ties to the lower
    index (the rule of :func:`actsparse.core.masks.keep_mask`), so an unpruned ``x`` is pruned by
    magnitude on the fly. With ``mask`` the kept set is the mask (which must hold exactly N per
    group; a bad mask still yields exactly N per group: masked features first, then the lowest
    indices, whose values are taken as 0). Kept values that are exactly zero stay kept.
    Runs the Triton kernel when Triton can run on ``x``'s device, else plain PyTorch.
    """
    _check_input(x_pruned, n, m, mask)
    if triton_available() and (x_pruned.is_cuda or _interpreting()):
        return _compact_triton(x_pruned.contiguous(), n, m, mask)
    return _compact_torch(x_pruned, n, m, mask)


def _compact_torch(x: torch.Tensor, n: int, m: int, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """PyTorch version of the compaction (same result as the kernel; no host sync)."""
    scores = x.abs().float() if mask is None else mask.float()
    kept = nm_mask(scores, n, m)
    count = x.shape[1] // m * n
    # A stable descending sort of the 0/1 mask lists kept positions first, in ascending order.
    idx = torch.sort(kept.to(torch.uint8), dim=1, descending=True, stable=True).indices[:, :count]
    val = x.gather(1, idx)
    if mask is not None:
        val = torch.where(mask.gather(1, idx), val, torch.zeros((), dtype=x.dtype, device=x.device))
    return idx.to(torch.int32), val


def _compact_triton(x: torch.Tensor, n: int, m: int, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    tokens, k = x.shape
    groups, count = k // m, k // m * n
    idx = torch.empty(tokens, count, dtype=torch.int32, device=x.device)
    val = torch.empty(tokens, count, dtype=x.dtype, device=x.device)
    m_p2 = triton.next_power_of_2(m)
    block_g = max(1, min(triton.next_power_of_2(groups), 8192 // (m_p2 * m_p2)))
    mask_arg = x if mask is None else mask.contiguous().view(torch.uint8)
    grid = (tokens, triton.cdiv(groups, block_g))
    _compact_kernel[grid](
        x,
        mask_arg,
        idx,
        val,
        k,
        groups,
        count,
        N=n,
        M=m,
        M_P2=m_p2,
        BLOCK_G=block_g,
        HAS_MASK=mask is not None,
    )
    return idx, val


if triton is not None:

    @triton.jit
    def _compact_kernel(
        x_ptr,
        mask_ptr,
        idx_ptr,
        val_ptr,
        K,
        G,
        KEPT,
        N: tl.constexpr,
        M: tl.constexpr,
        M_P2: tl.constexpr,
        BLOCK_G: tl.constexpr,
        HAS_MASK: tl.constexpr,
    ):
        b = tl.program_id(0)
        groups = tl.program_id(1) * BLOCK_G + tl.arange(0, BLOCK_G)
        lanes = tl.arange(0, M_P2)
        real = (groups < G)[:, None] & (lanes < M)[None, :]
        cols = groups[:, None] * M + lanes[None, :]
        x = tl.load(x_ptr + b * K + cols, mask=real, other=0.0)
        if HAS_MASK:
            flag = tl.load(mask_ptr + b * K + cols, mask=real, other=0)
            score = flag.to(tl.float32)
            x = tl.where(flag != 0, x, 0.0)
        else:
            score = tl.abs(x.to(tl.float32))
            score = tl.where(score != score, float("inf"), score)  # NaN counts as largest, like torch.sort
        score = tl.where(real, score, -1.0)
        # rank[g, j] = how many j2 beat j: larger score, or equal score and lower index.
        mine = score[:, :, None]
        other = score[:, None, :]
        lower = lanes[None, None, :] < lanes[None, :, None]
        beats = (other > mine) | ((other == mine) & lower)
        rank = tl.sum(beats.to(tl.int32), axis=2)
        kept = (rank < N) & real
        slot = groups[:, None] * N + tl.cumsum(kept.to(tl.int32), axis=1) - 1
        tl.store(idx_ptr + b * KEPT + slot, cols, mask=kept)
        tl.store(val_ptr + b * KEPT + slot, x.to(val_ptr.dtype.element_ty), mask=kept)


# ----------------------------------------------------------------------------- GEMV

_SM_COUNT: dict = {}


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # interpreter: a few programs are enough
    if device not in _SM_COUNT:
        _SM_COUNT[device] = torch.cuda.get_device_properties(device).multi_processor_count
    return _SM_COUNT[device]


class GemvConfig(NamedTuple):
    """Launch choices of the fused kernel (see :func:`gemv_config`)."""

    block_b: int  # tokens, padded to a power of 2
    block_k: int  # input rows per step
    block_o: int  # output columns per program
    chunk: int  # input rows per program (a multiple of M)
    split: int  # programs per column tile (the K split); > 1 adds into an fp32 workspace
    num_warps: int
    stages: int  # 0: rows prefetched into registers one step ahead; >= 1: tl.range software pipelining
    check: bool  # verify at most N kept per group (else redo the chunk with exact N:M ranking)


def gemv_config(
    dw: DecodeWeight,
    tokens: int,
    m: int = 16,
    *,
    block_o: int | None = None,
    block_k: int | None = None,
    split: int | None = None,
    num_warps: int | None = None,
    stages: int | None = None,
    check: bool = True,
) -> GemvConfig:
    """Tile choices for ``tokens`` rows through ``dw`` (any argument given overrides the choice).

    Chosen from the H100 sweeps in ``benchmarks/NOTES-decode.md``. Columns: tiles of up to 1024
    (each kept row gives 2 KB contiguous in bf16; warps side by side along the columns, so the sum
    over a step's rows stays inside each thread). Rows: 8 per step (4 for 8 tokens, 2 for 16:
    registers). Latency: register prefetch one step ahead (``stages=0``; ``tl.range`` pipelining
    with ``stages`` >= 2 measured the same within ~1%). K split: the input rows are cut into chunks
    (multiples of M, at least ``MIN_CHUNK`` rows) for about 8 programs per SM (4 for B = 2, 2 beyond): many
    small programs keep the most bytes in flight (~4 resident per SM at ~112 registers).
    """
    width, k = dw.out_features, dw.in_features
    block_b = triton.next_power_of_2(tokens)
    if block_o is None:
        block_o = min(1024, max(16, triton.next_power_of_2(width)))
    if num_warps is None:
        num_warps = max(1, min(8, block_o // 256))
    if block_k is None:
        block_k = {8: 4}.get(block_b, 8 if block_b <= 4 else 2)  # registers: B accumulators, B x rows
    if stages is None:
        stages = 0
    auto = split is None
    if auto:
        target = {1: 8, 2: 4}.get(block_b, 2) * _sm_count(dw.wt.device)  # programs per SM: measured
        split = max(1, round(target / triton.cdiv(width, block_o)))
    chunk = triton.cdiv(triton.cdiv(k, max(1, split)), m) * m  # whole groups per program
    if auto:
        chunk = max(chunk, triton.cdiv(min(MIN_CHUNK, k), m) * m)
    split = triton.cdiv(k, chunk)  # no empty chunks
    return GemvConfig(block_b, block_k, block_o, chunk, split, num_warps, stages, check)


SUM_BLOCK = 1024  # outputs per program of the split-sum kernel
MIN_CHUNK = 32  # rows per program at least (4 steps of 8): below that the ramp-up dominates


def _launch(x, mask, dw: DecodeWeight, n: int, m: int, cfg: GemvConfig, out: torch.Tensor | None) -> torch.Tensor:
    tokens, k = x.shape
    width = dw.out_features
    if out is None:
        out = torch.empty(tokens, width, dtype=x.dtype, device=x.device)
    elif out.shape != (tokens, width) or out.dtype != x.dtype or out.device != x.device or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous {x.dtype} tensor of shape ({tokens}, {width}) on {x.device}")
    if cfg.chunk % m or cfg.split != triton.cdiv(k, cfg.chunk):
        raise ValueError(f"bad config {cfg}: chunk must be a multiple of M={m} and split = ceil(K / chunk)")
    ws = dw.scratch(cfg.split, tokens) if cfg.split > 1 else out
    bias = out if dw.bias is None else dw.bias
    m_p2 = triton.next_power_of_2(m)
    grid = (triton.cdiv(width, cfg.block_o), cfg.split)
    _nm_decode_kernel[grid](
        x,
        x if mask is None else mask.contiguous().view(torch.uint8),
        dw.wt,
        bias,
        out,
        ws,
        tokens,
        k,
        width,
        CHUNK=cfg.chunk,
        N_SPLIT=cfg.split,
        N=n,
        M=m,
        M_P2=m_p2,
        CHECK_G=max(1, 1024 // m_p2),
        HAS_BIAS=dw.bias is not None,
        HAS_MASK=mask is not None,
        CHECK=cfg.check,
        BLOCK_B=cfg.block_b,
        BLOCK_K=cfg.block_k,
        BLOCK_O=cfg.block_o,
        STAGES=cfg.stages,
        num_warps=cfg.num_warps,
    )
    if cfg.split > 1:
        size = tokens * width
        _split_sum_kernel[(triton.cdiv(size, SUM_BLOCK),)](
            ws, bias, out, size, width, N_SPLIT=cfg.split, HAS_BIAS=dw.bias is not None, BLOCK=SUM_BLOCK, num_warps=4
        )
    return out


def nm_decode_linear(
    x_pruned: torch.Tensor,
    dw: DecodeWeight,
    n: int,
    m: int,
    mask: torch.Tensor | None = None,
    *,
    out: torch.Tensor | None = None,
    config: GemvConfig | None = None,
) -> torch.Tensor:
    """``F.linear(x_pruned, W, b)`` reading only the weight rows of the kept inputs: ``[B, O]``.

    ``x_pruned`` ``[B, K]`` (1 <= B <= 16) pruned to N:M; one fused kernel (no compaction step):
    each program loads its slice of ``x`` and reads the weight rows whose input is nonzero for
    some token. The kept set is the one :func:`compact_nm` defines: a group holding more than N
    nonzeros (an unpruned ``x``) or more than N masked features is pruned exactly by ranking.
    ``out``: optional result buffer; ``config``: a :func:`gemv_config` result to override the tuning.
    Zero inputs are skipped rather than multiplied, so an inf/NaN weight row of a zero input does
    not propagate as it would through ``F.linear``.
    """
    _require_triton()
    _check_input(x_pruned, n, m, mask)
    if x_pruned.shape[1] != dw.in_features:
        raise ValueError(f"x has {x_pruned.shape[1]} features but the weight expects {dw.in_features}")
    if x_pruned.dtype != dw.wt.dtype or x_pruned.device != dw.wt.device:
        raise ValueError(f"x is {x_pruned.dtype} on {x_pruned.device} but the weight is {dw.wt.dtype} on {dw.wt.device}")
    if config is None:
        config = gemv_config(dw, x_pruned.shape[0], m)
    return _launch(x_pruned.contiguous(), mask, dw, n, m, config, out)


def nm_gemv(
    idx: torch.Tensor,
    val: torch.Tensor,
    dw: DecodeWeight,
    *,
    out: torch.Tensor | None = None,
    config: GemvConfig | None = None,
) -> torch.Tensor:
    """``y[b] = sum_i val[b, i] * Wt[idx[b, i]] (+ bias)`` from a compacted input: ``[B, O]`` in val's dtype.

    Compatibility path for compacted inputs (as from :func:`compact_nm`): scatters ``val`` into a
    dense ``[B, K]`` row (rows of one token must be distinct) and runs the fused kernel without the
    N:M check. New code should call :func:`nm_decode_linear` on the pruned rows directly.
    """
    _require_triton()
    if idx.dim() != 2 or idx.shape != val.shape:
        raise ValueError(f"idx and val must both be [tokens, kept]; got {tuple(idx.shape)} and {tuple(val.shape)}")
    if idx.dtype != torch.int32:
        raise ValueError(f"idx must be int32, got {idx.dtype}")
    tokens = idx.shape[0]
    if not 1 <= tokens <= MAX_TOKENS:
        raise ValueError(f"decode kernel takes 1 to {MAX_TOKENS} tokens, got B={tokens}")
    if val.dtype != dw.wt.dtype:
        raise ValueError(f"x dtype {val.dtype} does not match the weight dtype {dw.wt.dtype}")
    if val.device != dw.wt.device or idx.device != dw.wt.device:
        raise ValueError(f"inputs are on {val.device} but the weight is on {dw.wt.device}")
    if not (val.is_cuda or _interpreting()):
        raise ValueError(f"the Triton kernel needs CUDA tensors (or TRITON_INTERPRET=1), got {val.device}")
    x = torch.zeros(tokens, dw.in_features, dtype=val.dtype, device=val.device).scatter_(1, idx.long(), val)
    cfg = config if config is not None else gemv_config(dw, tokens, 1, check=False)
    return _launch(x, None, dw, 1, 1, cfg._replace(check=False), out)


if triton is not None:

    @triton.jit
    def _slow_keep(
        x_ptr, mask_ptr, b, ks, kin, B, K, N: tl.constexpr, M: tl.constexpr, M_P2: tl.constexpr, HAS_MASK: tl.constexpr
    ):
        """Exact N:M keep flags of token ``b`` at rows ``ks`` (the rule of :func:`compact_nm`), by ranking."""
        lanes = tl.arange(0, M_P2)
        mates = (ks // M * M)[:, None] + lanes[None, :]
        ok = kin & (b < B)
        mates_ok = ok[:, None] & (lanes < M)[None, :]
        if HAS_MASK:
            mine = tl.load(mask_ptr + b * K + ks, mask=ok, other=0).to(tl.float32)
            other = tl.load(mask_ptr + b * K + mates, mask=mates_ok, other=0).to(tl.float32)
        else:
            mine = tl.abs(tl.load(x_ptr + b * K + ks, mask=ok, other=0.0).to(tl.float32))
            other = tl.abs(tl.load(x_ptr + b * K + mates, mask=mates_ok, other=0.0).to(tl.float32))
            mine = tl.where(mine != mine, float("inf"), mine)  # NaN counts as largest, like torch.sort
            other = tl.where(other != other, float("inf"), other)
        other = tl.where(mates_ok, other, -1.0)
        beats = (other > mine[:, None]) | ((other == mine[:, None]) & (mates < ks[:, None]))
        keep = (tl.sum(beats.to(tl.int32), axis=1) < N) & ok
        if HAS_MASK:
            keep = keep & (mine != 0)  # rows filled in for a short group carry the value 0
        return keep

    @triton.jit
    def _rows(
        x_ptr,
        mask_ptr,
        ks,
        kin,
        B,
        K,
        N: tl.constexpr,
        M: tl.constexpr,
        M_P2: tl.constexpr,
        HAS_MASK: tl.constexpr,
        SLOW: tl.constexpr,
        BLOCK_B: tl.constexpr,
    ):
        """Which of the rows ``ks`` some token needs (a nonzero kept input)."""
        row = ks < 0
        for b in tl.static_range(BLOCK_B):
            if SLOW:
                keep = _slow_keep(x_ptr, mask_ptr, b, ks, kin, B, K, N, M, M_P2, HAS_MASK)
                keep = keep & (tl.load(x_ptr + b * K + ks, mask=kin & (b < B), other=0.0) != 0)
            else:
                keep = tl.load(x_ptr + b * K + ks, mask=kin & (b < B), other=0.0) != 0
                if HAS_MASK:
                    keep = keep & (tl.load(mask_ptr + b * K + ks, mask=kin & (b < B), other=0) != 0)
            row = row | keep
        return row

    @triton.jit
    def _accumulate(
        acc,
        w,
        x_ptr,
        mask_ptr,
        ks,
        kin,
        toks,
        B,
        K,
        N: tl.constexpr,
        M: tl.constexpr,
        M_P2: tl.constexpr,
        HAS_MASK: tl.constexpr,
        SLOW: tl.constexpr,
        BLOCK_B: tl.constexpr,
    ):
        """``acc[b] += x[b, ks] @ w`` for every token (the sum over rows stays inside each thread)."""
        wf = w.to(tl.float32)
        toks_2d = toks[:, None]
        for b in tl.static_range(BLOCK_B):
            xb = tl.load(x_ptr + b * K + ks, mask=kin & (b < B), other=0.0)
            if SLOW:
                xb = tl.where(_slow_keep(x_ptr, mask_ptr, b, ks, kin, B, K, N, M, M_P2, HAS_MASK), xb, 0.0)
            elif HAS_MASK:
                xb = tl.where(tl.load(mask_ptr + b * K + ks, mask=kin & (b < B), other=0) != 0, xb, 0.0)
            part = tl.sum(xb.to(tl.float32)[:, None] * wf, axis=0)
            if BLOCK_B == 1:
                acc += part[None, :]
            else:
                acc += tl.where(toks_2d == b, part[None, :], 0.0)
        return acc

    @triton.jit
    def _chunk(
        acc,
        x_ptr,
        mask_ptr,
        wt_ptr,
        lo,
        hi,
        CHUNK: tl.constexpr,
        cols,
        col_ok,
        toks,
        B,
        K,
        O,
        N: tl.constexpr,
        M: tl.constexpr,
        M_P2: tl.constexpr,
        HAS_MASK: tl.constexpr,
        SLOW: tl.constexpr,
        BLOCK_B: tl.constexpr,
        BLOCK_K: tl.constexpr,
        STAGES: tl.constexpr,
    ):
        """Accumulate the rows ``lo <= k < hi`` into ``acc``; weight rows of unneeded inputs are never read."""
        if STAGES == 0 and not SLOW:
            # Registers, one step ahead: this step's weight rows are in flight while the previous
            # step's are summed, and each step's row flags come from x loaded a step earlier still.
            ks = lo + tl.arange(0, BLOCK_K)
            w_ptrs = wt_ptr + ks.to(tl.int64)[:, None] * O + cols[None, :]
            row = _rows(x_ptr, mask_ptr, ks, ks < hi, B, K, N, M, M_P2, HAS_MASK, False, BLOCK_B)
            w = tl.load(w_ptrs, mask=row[:, None] & col_ok[None, :], other=0.0)
            ks1 = ks + BLOCK_K
            row1 = _rows(x_ptr, mask_ptr, ks1, ks1 < hi, B, K, N, M, M_P2, HAS_MASK, False, BLOCK_B)
            for _ in range(0, CHUNK, BLOCK_K):
                ks2 = ks1 + BLOCK_K
                row2 = _rows(x_ptr, mask_ptr, ks2, ks2 < hi, B, K, N, M, M_P2, HAS_MASK, False, BLOCK_B)
                w_ptrs += BLOCK_K * O
                w1 = tl.load(w_ptrs, mask=row1[:, None] & col_ok[None, :], other=0.0)
                acc = _accumulate(acc, w, x_ptr, mask_ptr, ks, ks < hi, toks, B, K, N, M, M_P2, HAS_MASK, False, BLOCK_B)
                ks, ks1, row1, w = ks1, ks2, row2, w1
        else:
            for k0 in tl.range(0, CHUNK, BLOCK_K, num_stages=1 if SLOW else STAGES):
                ks = lo + k0 + tl.arange(0, BLOCK_K)
                kin = ks < hi
                row = _rows(x_ptr, mask_ptr, ks, kin, B, K, N, M, M_P2, HAS_MASK, SLOW, BLOCK_B)
                w = tl.load(wt_ptr + ks.to(tl.int64)[:, None] * O + cols[None, :], mask=row[:, None] & col_ok[None, :], other=0.0)
                acc = _accumulate(acc, w, x_ptr, mask_ptr, ks, kin, toks, B, K, N, M, M_P2, HAS_MASK, SLOW, BLOCK_B)
        return acc

    @triton.jit
    def _over_n(
        x_ptr,
        mask_ptr,
        lo,
        hi,
        CHUNK: tl.constexpr,
        B,
        K,
        N: tl.constexpr,
        M: tl.constexpr,
        M_P2: tl.constexpr,
        CHECK_G: tl.constexpr,
        HAS_MASK: tl.constexpr,
        BLOCK_B: tl.constexpr,
    ):
        """Whether some group of M in ``lo <= k < hi`` has more than N nonzeros (or masked features) for some token."""
        groups = tl.arange(0, CHECK_G)
        lanes = tl.arange(0, M_P2)
        worst = tl.zeros((CHECK_G,), dtype=tl.int32)
        for g0 in range(0, CHUNK, CHECK_G * M):
            at = lo + g0 + groups[:, None] * M + lanes[None, :]
            ok = (at < hi) & (lanes < M)[None, :]
            for b in tl.static_range(BLOCK_B):
                if HAS_MASK:
                    flag = tl.load(mask_ptr + b * K + at, mask=ok & (b < B), other=0) != 0
                else:
                    flag = tl.load(x_ptr + b * K + at, mask=ok & (b < B), other=0.0) != 0
                worst = tl.maximum(worst, tl.sum(flag.to(tl.int32), axis=1))
        return tl.max(worst, axis=0) > N

    @triton.jit
    def _nm_decode_kernel(
        x_ptr,
        mask_ptr,
        wt_ptr,
        bias_ptr,
        y_ptr,
        ws_ptr,
        B,
        K,
        O,
        CHUNK: tl.constexpr,
        N_SPLIT: tl.constexpr,
        N: tl.constexpr,
        M: tl.constexpr,
        M_P2: tl.constexpr,
        CHECK_G: tl.constexpr,
        HAS_BIAS: tl.constexpr,
        HAS_MASK: tl.constexpr,
        CHECK: tl.constexpr,
        BLOCK_B: tl.constexpr,
        BLOCK_K: tl.constexpr,
        BLOCK_O: tl.constexpr,
        STAGES: tl.constexpr,
    ):
        pid_o = tl.program_id(0)
        pid_s = tl.program_id(1)
        toks = tl.arange(0, BLOCK_B)
        cols = pid_o * BLOCK_O + tl.arange(0, BLOCK_O)
        col_ok = cols < O
        lo = pid_s * CHUNK
        hi = tl.minimum(lo + CHUNK, K)
        acc = tl.zeros((BLOCK_B, BLOCK_O), dtype=tl.float32)
        acc = _chunk(
            acc,
            x_ptr,
            mask_ptr,
            wt_ptr,
            lo,
            hi,
            CHUNK,
            cols,
            col_ok,
            toks,
            B,
            K,
            O,
            N,
            M,
            M_P2,
            HAS_MASK,
            False,
            BLOCK_B,
            BLOCK_K,
            STAGES,
        )
        if CHECK:
            # x was not N:M here (unpruned input, or a mask with too many features): redo exactly.
            if _over_n(x_ptr, mask_ptr, lo, hi, CHUNK, B, K, N, M, M_P2, CHECK_G, HAS_MASK, BLOCK_B):
                acc = tl.zeros((BLOCK_B, BLOCK_O), dtype=tl.float32)
                acc = _chunk(
                    acc,
                    x_ptr,
                    mask_ptr,
                    wt_ptr,
                    lo,
                    hi,
                    CHUNK,
                    cols,
                    col_ok,
                    toks,
                    B,
                    K,
                    O,
                    N,
                    M,
                    M_P2,
                    HAS_MASK,
                    True,
                    BLOCK_B,
                    2,
                    STAGES,
                )  # few rows a step: few registers
        out_at = toks[:, None] * O + cols[None, :]
        out_ok = (toks < B)[:, None] & col_ok[None, :]
        if N_SPLIT == 1:
            if HAS_BIAS:
                acc += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
            tl.store(y_ptr + out_at, acc.to(y_ptr.dtype.element_ty), mask=out_ok)
        else:
            # K split: this program's partial sums go to its own workspace slice; _split_sum_kernel adds them.
            tl.store(ws_ptr + pid_s * B * O + out_at, acc, mask=out_ok)

    @triton.jit
    def _split_sum_kernel(ws_ptr, bias_ptr, y_ptr, SIZE, O, N_SPLIT: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr):
        """``y = sum over splits of ws[s] (+ bias)``, the splits added in order (deterministic)."""
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        ok = offs < SIZE
        total = tl.zeros((BLOCK,), dtype=tl.float32)
        for split in tl.static_range(N_SPLIT):
            total += tl.load(ws_ptr + split * SIZE + offs, mask=ok, other=0.0)
        if HAS_BIAS:
            total += tl.load(bias_ptr + offs % O, mask=ok, other=0.0).to(tl.float32)
        tl.store(y_ptr + offs, total.to(y_ptr.dtype.element_ty), mask=ok)
