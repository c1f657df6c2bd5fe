"""Decode-time N:M sparse-input linear layer: read only the weight rows of kept inputs.

At decode (a handful of tokens) ``y = x Wᵀ + b`` is memory bound: its cost is reading ``W``.
When ``x`` is pruned to an N:M pattern (exactly N of every M consecutive features kept per
token), only the weight columns of the kept features are needed. The weight is stored
transposed, ``Wt = W.t()`` ``[K, O]``, so each kept feature ``j`` reads one contiguous row
``Wt[j, :]``; at 50% density half the weight bytes are read.

Two steps, both Triton kernels, both free of host syncs (CUDA-graph capturable):

1. :func:`compact_nm` turns ``x`` ``[B, K]`` (plus an optional bool mask) into the kept indices
   ``idx`` ``[B, K*N/M]`` (int32, ascending) and their values ``val``. One program per token and
   block of groups; inside a group an element's rank is the number of elements that beat it
   (larger score, or equal score and lower index), so exactly N are kept without sorting.
2. :func:`nm_gemv` loops over the kept rows: the grid is (output tiles of ``BLOCK_O`` columns) x
   (split of the kept list). Each program accumulates ``val * Wt[idx, tile]`` in fp32; with a
   split, partial sums go to an fp32 workspace and the last program of each tile (found with
   an atomic counter) adds them in a fixed order, adds the bias and writes ``y``: one launch,
   deterministic. Defaults (:func:`gemv_config`): 256-column tiles (a warp reads one 512-byte
   bf16 row with 16-byte loads), 32 rows in flight per step shared among the tokens, 4 warps,
   and a split giving about 4 programs per SM (e.g. 4096->14336: 56 tiles x 9 chunks of ~228
   rows; 14336->4096 and 4096->4096: 16 tiles x 32-33 chunks). Not yet tuned on hardware:
   ``benchmarks/bench_decode.py --sweep`` times the alternatives.

For ``B > 1`` each token walks its own list (a program handles all tokens of its tile), so up
to ``B`` times the rows are read; rows shared by several tokens are usually served by cache.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

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
    def from_linear(cls, weight, bias: torch.Tensor | None = None) -> "DecodeWeight":
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

    def scratch(self, split: int, tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Split-K workspace ``[split, tokens, O]`` fp32 and per-tile counters (zero; the kernel resets them).

        Kept across calls; warm up once before CUDA-graph capture so they are not made inside it.
        One stream at a time per weight: concurrent calls would share the counters.
        """
        key = (split, tokens)
        if key not in self._scratch:
            tiles = self.out_features  # enough counters for any BLOCK_O >= 1
            self._scratch[key] = (
                torch.empty(split, tokens, self.out_features, dtype=torch.float32, device=self.wt.device),
                torch.zeros(tiles, dtype=torch.int32, device=self.wt.device),
            )
        return self._scratch[key]

    def __repr__(self) -> str:
        return f"DecodeWeight(in={self.in_features}, out={self.out_features}, dtype={self.wt.dtype}, bias={self.bias is not None})"


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


def compact_nm(
    x_pruned: torch.Tensor, n: int, m: int, mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
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
    from actsparse.core.masks import keep_mask
    from actsparse.core.patterns import NM

    scores = x.abs().float() if mask is None else mask.float()
    kept = keep_mask(scores, NM(n, m))
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
        x, mask_arg, idx, val, k, groups, count,
        N=n, M=m, M_P2=m_p2, BLOCK_G=block_g, HAS_MASK=mask is not None,
    )
    return idx, val


if triton is not None:

    @triton.jit
    def _compact_kernel(
        x_ptr, mask_ptr, idx_ptr, val_ptr, K, G, KEPT,
        N: tl.constexpr, M: tl.constexpr, M_P2: tl.constexpr, BLOCK_G: tl.constexpr, HAS_MASK: tl.constexpr,
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


def gemv_config(
    dw: DecodeWeight, tokens: int, kept: int, block_o: int | None = None, split: int | None = None, rows: int = 32
) -> tuple[int, int, int, int, int]:
    """``(block_b, block_k, block_o, chunk, split)`` for a call.

    Tiles of up to 256 output columns (16-byte loads, one warp per 512-byte row); ``rows`` kept
    rows in flight per step, shared among the tokens (``block_k = rows / block_b``); the kept list
    split into chunks of at least 64 rows so that there are at most (and about) 4 programs per SM. Narrower
    tiles when even the finest split leaves fewer than 2 programs per SM (e.g. 4096 -> 1024).
    """
    width = dw.out_features
    block_b = triton.next_power_of_2(tokens)
    block_k = max(2, rows // block_b)
    target = 4 * _sm_count(dw.wt.device)
    max_split = max(1, kept // 64)
    if block_o is None:
        block_o = min(256, max(16, triton.next_power_of_2(width)))
        while block_o > 64 and triton.cdiv(width, block_o) * max_split < target // 2:
            block_o //= 2
    if split is None:  # all programs resident at once: no second wave
        split = min(max(1, target // triton.cdiv(width, block_o)), max_split)
    split = max(1, min(split, kept))
    chunk = triton.cdiv(kept, split)  # balanced chunks, not rounded to block_k
    split = triton.cdiv(kept, chunk)  # no empty chunks
    return block_b, block_k, block_o, chunk, split


def nm_gemv(
    idx: torch.Tensor, val: torch.Tensor, dw: DecodeWeight, *, block_o: int | None = None,
    split: int | None = None, rows: int = 32, num_warps: int = 4, out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``y[b] = sum_i val[b, i] * Wt[idx[b, i]] (+ bias)`` from a compacted input: ``[B, O]`` in val's dtype.

    ``idx`` int32 ``[B, kept]`` must hold valid row numbers of ``Wt`` (as from :func:`compact_nm`).
    ``block_o``, ``split``, ``rows`` and ``num_warps`` override the tuning (see :func:`gemv_config`);
    ``out`` is an optional contiguous ``[B, O]`` result buffer.
    """
    _require_triton()
    if idx.dim() != 2 or idx.shape != val.shape:
        raise ValueError(f"idx and val must both be [tokens, kept]; got {tuple(idx.shape)} and {tuple(val.shape)}")
    if idx.dtype != torch.int32:
        raise ValueError(f"idx must be int32, got {idx.dtype}")
    tokens, kept = idx.shape
    if not 1 <= tokens <= MAX_TOKENS:
        raise ValueError(f"decode kernel takes 1 to {MAX_TOKENS} tokens, got B={tokens}")
    if val.dtype != dw.wt.dtype:
        raise ValueError(f"x dtype {val.dtype} does not match the weight dtype {dw.wt.dtype}")
    if val.device != dw.wt.device or idx.device != dw.wt.device:
        raise ValueError(f"inputs are on {val.device} but the weight is on {dw.wt.device}")
    if not (val.is_cuda or _interpreting()):
        raise ValueError(f"the Triton kernel needs CUDA tensors (or TRITON_INTERPRET=1), got {val.device}")
    block_b, block_k, block_o, chunk, split = gemv_config(dw, tokens, kept, block_o, split, rows)
    # The last program of a tile sums the partials in rounds of RED splits (one load each).
    red = min(triton.next_power_of_2(split), max(1, 4096 // (block_b * block_o)))
    width = dw.out_features
    if out is None:
        out = torch.empty(tokens, width, dtype=val.dtype, device=val.device)
    elif out.shape != (tokens, width) or out.dtype != val.dtype or out.device != val.device or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous {val.dtype} tensor of shape ({tokens}, {width}) on {val.device}")
    partial, counter = dw.scratch(split, tokens) if split > 1 else (out, out)
    bias = dw.bias if dw.bias is not None else out
    grid = (triton.cdiv(width, block_o), split)
    _nm_gemv_kernel[grid](
        idx.contiguous(), val.contiguous(), dw.wt, bias, out, partial, counter,
        tokens, kept, width,
        CHUNK=chunk, N_SPLIT=split, RED=red, HAS_BIAS=dw.bias is not None,
        BLOCK_B=block_b, BLOCK_K=block_k, BLOCK_O=block_o, num_warps=num_warps,
    )
    return out


def nm_decode_linear(
    x_pruned: torch.Tensor, dw: DecodeWeight, n: int, m: int, mask: torch.Tensor | None = None,
    *, out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``F.linear(x_pruned, W, b)`` reading only the weight rows of the kept inputs: ``[B, O]``.

    ``x_pruned`` ``[B, K]`` (1 <= B <= 16) is pruned to N:M (or ``mask`` says which features are
    kept; see :func:`compact_nm` for how the kept set is chosen). ``out``: optional result buffer.
    """
    _require_triton()
    _check_input(x_pruned, n, m, mask)
    if x_pruned.shape[1] != dw.in_features:
        raise ValueError(f"x has {x_pruned.shape[1]} features but the weight expects {dw.in_features}")
    if x_pruned.dtype != dw.wt.dtype or x_pruned.device != dw.wt.device:
        raise ValueError(f"x is {x_pruned.dtype} on {x_pruned.device} but the weight is {dw.wt.dtype} on {dw.wt.device}")
    idx, val = compact_nm(x_pruned, n, m, mask)
    return nm_gemv(idx, val, dw, out=out)


if triton is not None:

    @triton.jit
    def _nm_gemv_kernel(
        idx_ptr, val_ptr, wt_ptr, bias_ptr, y_ptr, part_ptr, count_ptr,
        B, KEPT, O,
        CHUNK: tl.constexpr, N_SPLIT: tl.constexpr, RED: tl.constexpr, HAS_BIAS: tl.constexpr,
        BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_O: tl.constexpr,
    ):
        pid_o = tl.program_id(0)
        pid_s = tl.program_id(1)
        toks = tl.arange(0, BLOCK_B)
        cols = pid_o * BLOCK_O + tl.arange(0, BLOCK_O)
        tok_ok = toks < B
        col_ok = cols < O
        start = pid_s * CHUNK
        stop = start + CHUNK  # this program's rows are start <= i < min(stop, KEPT)
        ks = start + tl.arange(0, BLOCK_K)
        ok = tok_ok[:, None] & ((ks < KEPT) & (ks < stop))[None, :]
        rows = tl.load(idx_ptr + toks[:, None] * KEPT + ks[None, :], mask=ok, other=0)
        acc = tl.zeros((BLOCK_B, BLOCK_K, BLOCK_O), dtype=tl.float32)
        for _ in range(0, CHUNK, BLOCK_K):
            # The next step's row numbers are requested before this step's weight rows, so the
            # dependent idx -> Wt load chain is not paid in full every step.
            ks_next = ks + BLOCK_K
            ok_next = tok_ok[:, None] & ((ks_next < KEPT) & (ks_next < stop))[None, :]
            rows_next = tl.load(idx_ptr + toks[:, None] * KEPT + ks_next[None, :], mask=ok_next, other=0)
            vals = tl.load(val_ptr + toks[:, None] * KEPT + ks[None, :], mask=ok, other=0.0).to(tl.float32)
            w_ptrs = wt_ptr + rows.to(tl.int64)[:, :, None] * O + cols[None, None, :]
            w = tl.load(w_ptrs, mask=ok[:, :, None] & col_ok[None, None, :], other=0.0)
            acc += vals[:, :, None] * w.to(tl.float32)
            ks, ok, rows = ks_next, ok_next, rows_next
        y = tl.sum(acc, axis=1)  # [BLOCK_B, BLOCK_O]
        out_at = toks[:, None] * O + cols[None, :]
        out_ok = tok_ok[:, None] & col_ok[None, :]
        if N_SPLIT > 1:
            tl.store(part_ptr + pid_s * B * O + out_at, y, mask=out_ok)
            tl.debug_barrier()  # every thread's partial is written before the release below
            done = tl.atomic_add(count_ptr + pid_o, 1, sem="acq_rel", scope="gpu")
            if done == N_SPLIT - 1:  # last program of this tile: add the partials in a fixed order
                y = tl.zeros((BLOCK_B, BLOCK_O), dtype=tl.float32)
                for first in tl.static_range(0, N_SPLIT, RED):
                    splits = first + tl.arange(0, RED)
                    ptrs = part_ptr + splits[:, None, None] * B * O + out_at[None, :, :]
                    part_ok = (splits < N_SPLIT)[:, None, None] & out_ok[None, :, :]
                    y += tl.sum(tl.load(ptrs, mask=part_ok, other=0.0, cache_modifier=".cg"), axis=0)
                if HAS_BIAS:
                    y += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
                tl.store(y_ptr + out_at, y.to(y_ptr.dtype.element_ty), mask=out_ok)
                tl.atomic_xchg(count_ptr + pid_o, 0)  # ready for the next call
        else:
            if HAS_BIAS:
                y += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
            tl.store(y_ptr + out_at, y.to(y_ptr.dtype.element_ty), mask=out_ok)
