"""One-pass N:M activation sparsification in Triton.

``nm_sparsify(x, n, m)`` keeps the ``n`` largest-scoring of every ``m`` consecutive
features of each row of ``x`` (score ``|x|`` or ``|x| * vector``, ties to the lower
index) and zeroes the rest, reading ``x`` once. Options: VAR rescaling of each row
(``var=True``) and a per-row shift ``x - eta`` applied before pruning (D-PTS).
``nm_sparsify_reference`` is the plain PyTorch definition; the masks are identical.

Kernel design: each thread owns whole groups. A tile of ``BLOCK_T`` rows x
``BLOCK_G`` groups is loaded as ``MP / VEC`` coalesced chunks ``[BLOCK_T, BLOCK_G, VEC]``
(16-byte vectors), which ``tl.split`` takes apart in registers into ``MP`` lane
tensors ``[BLOCK_T, BLOCK_G]`` (``MP`` = ``m`` rounded up to a power of two; padded
lanes never win). Scores become order-preserving int32 keys, a bitonic network
finds the n-th largest key of each group (only the comparators feeding that one
output survive dead-code elimination), and ``key >= threshold`` is the mask. For
16-bit inputs without a vector the lane index fits in the key's low bits, so keys
are unique; otherwise ties at the threshold go to the lowest lanes by a running
count. With VAR a program owns whole rows and makes two passes: prune, store and sum
x, x^2, P(x), P(x)^2 per row; then rescale the stored rows in place (they are still
in L2), or with ``VAR_RESCALE_Y = False`` re-read x and recompute the mask instead.
"""

from __future__ import annotations

import os

import torch

from actsparse.kernels.launch import Launcher

try:
    import triton
    import triton.language as tl
except ImportError:  # the module still imports; nm_sparsify then raises
    triton = None

BLOCK = 4096  # elements per tile
NUM_WARPS = 4  # at most; fewer when a tile is small
ELEMS_PER_THREAD = 32
VAR_RESCALE_Y = True  # VAR pass 2 rescales the stored output (True) or re-reads x and recomputes the mask (False)
MAX_M = 32
SCALE_ROWS = 256  # rows per program of the kernel that turns the tiles' sums into VAR's scale
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
NAN_KEY = {torch.float16: 0x7C01, torch.bfloat16: 0x7F81}  # smallest NaN bit pattern of |x|


def triton_available() -> bool:
    """Triton importable and something to run it on (CUDA, or the CPU interpreter)."""
    return triton is not None and (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1")


def nm_sparsify_reference(x, n, m, vector=None, var=False, shift=None):
    """Plain PyTorch N:M pruning with the same semantics as :func:`nm_sparsify`."""
    if shift is not None:
        x = (x.float() - shift.float().reshape(-1, 1)).to(x.dtype)
    scores = x.float().abs()
    if vector is not None:
        scores = scores * vector
    groups = scores.reshape(-1, m)
    order = torch.sort(groups, dim=-1, descending=True, stable=True).indices
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, order[:, :n], True).reshape(x.shape)
    pruned = torch.where(mask, x, torch.zeros((), dtype=x.dtype))
    if var:
        ratio = x.float().var(dim=-1, keepdim=True) / pruned.float().var(dim=-1, keepdim=True).clamp_min(1e-8)
        pruned = (pruned.float() * ratio.sqrt()).to(x.dtype)
    return pruned


def _check(x, n, m, vector, shift):
    if x.dim() != 2 or not x.is_contiguous():
        raise ValueError(f"x must be a contiguous 2-D [tokens, features] tensor, got shape {tuple(x.shape)}")
    if x.dtype not in DTYPES:
        raise ValueError(f"x must be float32, float16 or bfloat16, got {x.dtype}")
    T, K = x.shape
    if not 2 <= m <= MAX_M:
        raise ValueError(f"M must be between 2 and {MAX_M}, got {m}")
    if not 1 <= n <= m:
        raise ValueError(f"N must be between 1 and M={m}, got {n}")
    if K % m:
        raise ValueError(f"M={m} must divide the number of features K={K}")
    if vector is not None and (vector.dtype != torch.float32 or vector.numel() != K or vector.device != x.device):
        raise ValueError(f"vector must be a float32 tensor of {K} elements on {x.device}")
    if shift is not None and (shift.dtype != torch.float32 or shift.numel() != T or shift.device != x.device):
        raise ValueError(f"shift must be a float32 tensor of {T} elements ([T] or [T, 1]) on {x.device}")


def _config(T, K, m, elem_bytes, var):
    """Launch shape: tiles of BLOCK_T rows x BLOCK_G groups, ~32 elements a thread; VAR programs own whole rows."""
    mp = triton.next_power_of_2(m)
    vec = min(mp, 16 // elem_bytes)  # 16-byte loads
    groups = K // m
    tile = BLOCK // mp  # groups per tile
    block_g = min(groups & -groups, tile)  # a power of two dividing the groups of a row: no ragged tile
    if block_g * 8 < min(groups, tile):  # K / m has few factors of two: accept a ragged last tile
        block_g = min(triton.next_power_of_2(groups), tile)
    block_t = max(1, min(tile // block_g, triton.next_power_of_2(T)))
    if var:  # several rows per program only while they fit one tile (keeps the rows re-read in pass 2 few)
        block_t = max(1, min(block_t, tile // triton.next_power_of_2(groups)))
    num_warps = max(1, min(NUM_WARPS, block_t * block_g * mp // (32 * ELEMS_PER_THREAD)))
    return dict(
        MP=mp,
        VEC=vec,
        LOG_VEC=vec.bit_length() - 1,
        LOG_MP=mp.bit_length() - 1,
        BLOCK_T=block_t,
        BLOCK_G=block_g,
        num_warps=num_warps,
    )


def nm_sparsify(x, n, m, vector=None, var=False, shift=None):
    """Keep ``n`` of every ``m`` features of each row of ``x`` (see the module docstring); returns a new tensor."""
    y = _output_for(x, n, m, vector, shift, "nm_sparsify")
    if x.numel():
        _launch(x, y, n, m, vector, shift, var=var)
    return y


def _output_for(x, n, m, vector, shift, name: str):
    """Check the arguments of a kernel call and return its (empty) output tensor."""
    if triton is None:
        raise RuntimeError(f"{name} needs triton; use {name}_reference")
    _check(x, n, m, vector, shift)
    if not x.is_cuda and not _INTERPRETED:
        raise ValueError("x must be a CUDA tensor (or set TRITON_INTERPRET=1 before importing to run on the CPU)")
    return torch.empty_like(x)


def nm_sparsify_var_scale(x, n, m, vector=None):
    """VAR with its per-token scale left for the product's output: returns ``(P(x), scale)`` with
    ``scale [T]`` float32, so that ``scale * (P(x) Wᵀ)`` is VAR's ``(scale * P(x)) Wᵀ``.

    One pass over ``x`` tiled like plain pruning (no whole-row programs, no second pass); each tile
    writes its share of the four row sums and the scale is reduced from them in a fixed order."""
    y = _output_for(x, n, m, vector, None, "nm_sparsify_var_scale")
    T, K = x.shape
    if x.numel() == 0:
        return y, torch.ones(T, dtype=torch.float32, device=x.device)
    sums = _launch(x, y, n, m, vector, None, var=False, sums=True)
    scale = torch.empty(T, dtype=torch.float32, device=x.device)
    _var_scale_kernel[(triton.cdiv(T, SCALE_ROWS),)](sums, scale, T, sums.shape[-1], K, BLOCK=SCALE_ROWS)
    return y, scale


def nm_sparsify_var_scale_reference(x, n, m, vector=None):
    """Plain PyTorch definition of :func:`nm_sparsify_var_scale` (same mask; scale from torch.var)."""
    pruned = nm_sparsify_reference(x, n, m, vector=vector)
    ratio = x.float().var(dim=-1) / pruned.float().var(dim=-1).clamp_min(1e-8)
    return pruned, ratio.sqrt()


def _launch(x, y, n, m, vector, shift, *, var: bool, sums: bool = False):
    T, K = x.shape
    cfg = _config(T, K, m, x.element_size(), var)
    unique = x.element_size() == 2 and vector is None  # 15-bit |x| and a 5-bit lane fit one int32 key
    grid = (triton.cdiv(T, cfg["BLOCK_T"]), 1 if var else triton.cdiv(K // m, cfg["BLOCK_G"]))
    partial = torch.empty(4, T, grid[1], dtype=torch.float32, device=x.device) if sums else x
    _NM_LAUNCH(
        grid,
        x,
        y,
        x if vector is None else vector.contiguous(),
        x if shift is None else shift.contiguous(),
        partial,
        T,
        K,
        N=n,
        M=m,
        HAS_VECTOR=vector is not None,
        HAS_SHIFT=shift is not None,
        VAR=var,
        RESCALE_Y=VAR_RESCALE_Y,
        SUMS=sums,
        UNIQUE=unique,
        NAN_KEY=NAN_KEY.get(x.dtype, 0),
        INTERPRET=_INTERPRETED,
        **cfg,
    )
    return partial if sums else None


if triton is not None:

    @triton.jit
    def _split(chunk, LOG_VEC: tl.constexpr):
        """[BT, G, VEC] -> tuple of VEC lane tensors [BT, G] (entry j holds lane j), in registers."""
        parts = (chunk,)
        for _ in tl.static_range(LOG_VEC):
            evens = ()
            odds = ()
            for p in tl.static_range(len(parts)):
                u = parts[p]
                a, b = tl.split(tl.reshape(u, [u.shape[0], u.shape[1], u.shape[2] // 2, 2]))
                evens = evens + (a,)
                odds = odds + (b,)
            parts = evens + odds  # entry p holds the lanes == p modulo len(parts)
        lanes = ()
        for p in tl.static_range(len(parts)):
            lanes = lanes + (tl.reshape(parts[p], [chunk.shape[0], chunk.shape[1]]),)
        return lanes

    @triton.jit
    def _join(lanes, first: tl.constexpr, VEC: tl.constexpr, LOG_VEC: tl.constexpr):
        """Inverse of ``_split`` for lanes ``first .. first + VEC``: -> [BT, G, VEC]."""
        parts = ()
        for p in tl.static_range(VEC):
            u = lanes[first + p]
            parts = parts + (tl.reshape(u, [u.shape[0], u.shape[1], 1]),)
        for _ in tl.static_range(LOG_VEC):
            joined = ()
            for p in tl.static_range(len(parts) // 2):
                a = parts[p]
                ab = tl.join(a, parts[p + len(parts) // 2])
                joined = joined + (tl.reshape(ab, [a.shape[0], a.shape[1], a.shape[2] * 2]),)
            parts = joined
        return parts[0]

    @triton.jit
    def _f32(x, INTERPRET: tl.constexpr):
        """Exact widening to float32; the CPU interpreter flushes bfloat16 subnormals, so shift the bits there."""
        if INTERPRET and x.dtype == tl.bfloat16:
            return (x.to(tl.uint16, bitcast=True).to(tl.uint32) << 16).to(tl.float32, bitcast=True)
        else:
            return x.to(tl.float32)

    @triton.jit
    def _cast(x, dtype: tl.constexpr, INTERPRET: tl.constexpr):
        """float32 -> dtype rounding to nearest even; the CPU interpreter truncates to bfloat16, so round by hand there."""
        if INTERPRET and dtype == tl.bfloat16:
            bits = x.to(tl.uint32, bitcast=True)
            bits = tl.where(x != x, 0x7FC00000, bits + 0x7FFF + ((bits >> 16) & 1))
            return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
        else:
            return x.to(dtype)

    @triton.jit
    def _load_lanes(row_ptr, cols, ok, M: tl.constexpr, MP: tl.constexpr, VEC: tl.constexpr, LOG_VEC: tl.constexpr):
        """Tuple of MP lane tensors of the groups starting at ``cols`` ([1, G, 1]); padded lanes read as 0."""
        lanes = ()
        for c in tl.static_range(MP // VEC):
            lane = c * VEC + tl.arange(0, VEC)[None, None, :]
            if MP == M:
                chunk = tl.load(row_ptr + cols + lane, mask=ok, other=0.0)
            else:
                chunk = tl.load(row_ptr + cols + lane, mask=ok & (lane < M), other=0.0)
            lanes = lanes + _split(chunk, LOG_VEC)
        return lanes

    @triton.jit
    def _store_lanes(row_ptr, cols, ok, lanes, M: tl.constexpr, MP: tl.constexpr, VEC: tl.constexpr, LOG_VEC: tl.constexpr):
        """Inverse of ``_load_lanes``: join the lanes back into chunks and store them."""
        for c in tl.static_range(MP // VEC):
            lane = c * VEC + tl.arange(0, VEC)[None, None, :]
            chunk = _join(lanes, c * VEC, VEC, LOG_VEC)
            if MP == M:
                tl.store(row_ptr + cols + lane, chunk, mask=ok)
            else:
                tl.store(row_ptr + cols + lane, chunk, mask=ok & (lane < M))

    @triton.jit
    def _key(
        x,
        v,
        j: tl.constexpr,
        M: tl.constexpr,
        MP: tl.constexpr,
        HAS_VECTOR: tl.constexpr,
        UNIQUE: tl.constexpr,
        NAN_KEY: tl.constexpr,
        INTERPRET: tl.constexpr,
    ):
        """Order-preserving int32 key of lane j's score (|x| or |x| * v); NaN is largest, -0 == +0."""
        if j >= M:
            key = tl.full(x.shape, -2147483648, tl.int32)  # padded lane: never kept
        elif UNIQUE:  # 16-bit |x|: magnitude bits, then the lane so that the lower index wins ties
            bits = tl.minimum(x.to(tl.int16, bitcast=True).to(tl.int32) & 0x7FFF, NAN_KEY)
            key = bits * 32 + (31 - j)
        elif not HAS_VECTOR:  # float32 |x|: magnitude bits, every NaN one value above +inf
            key = tl.minimum(x.to(tl.int32, bitcast=True) & 0x7FFFFFFF, 0x7F800001)
        else:  # |x| * v may be negative: sign-magnitude -> two's complement (-0 == +0), NaNs above +inf
            bits = (tl.abs(_f32(x, INTERPRET)) * v).to(tl.int32, bitcast=True)
            mag = bits & 0x7FFFFFFF
            sign = bits >> 31
            key = tl.where(mag > 0x7F800000, 0x7F800001, (mag ^ sign) - sign)
        return key

    @triton.jit
    def _bitonic_stage(keys, k: tl.constexpr, j: tl.constexpr, MP: tl.constexpr):
        """One compare-exchange stage of an ascending bitonic sort of MP lanes."""
        out = ()
        for i in tl.static_range(MP):
            if (i < (i ^ j)) == ((i & k) == 0):
                out = out + (tl.minimum(keys[i], keys[i ^ j]),)
            else:
                out = out + (tl.maximum(keys[i], keys[i ^ j]),)
        return out

    @triton.jit
    def _nth_largest(keys, N: tl.constexpr, MP: tl.constexpr, LOG_MP: tl.constexpr):
        """The N-th largest key of each group (unused comparators are removed by the compiler)."""
        for s in tl.static_range(LOG_MP):
            for t in tl.static_range(s + 1):
                keys = _bitonic_stage(keys, 2 << s, (1 << s) >> t, MP)
        return keys[MP - N]

    @triton.jit
    def _prune_tile(
        v_ptr,
        row_ptr,
        cols,
        ok,
        eta,
        N: tl.constexpr,
        M: tl.constexpr,
        MP: tl.constexpr,
        VEC: tl.constexpr,
        LOG_VEC: tl.constexpr,
        LOG_MP: tl.constexpr,
        HAS_VECTOR: tl.constexpr,
        HAS_SHIFT: tl.constexpr,
        UNIQUE: tl.constexpr,
        NAN_KEY: tl.constexpr,
        INTERPRET: tl.constexpr,
    ):
        """Load a tile ([BT, 1, 1] row pointers, [1, G, 1] group columns); return its x lanes (shifted if asked)
        and keep-mask lanes."""
        xs = _load_lanes(row_ptr, cols, ok, M, MP, VEC, LOG_VEC)
        if HAS_SHIFT:
            shifted = ()
            for j in tl.static_range(MP):
                shifted = shifted + (_cast(_f32(xs[j], INTERPRET) - eta, xs[j].dtype, INTERPRET),)
            xs = shifted
        if HAS_VECTOR:
            vs = _load_lanes(v_ptr, cols, ok, M, MP, VEC, LOG_VEC)  # [BT, G] like x: same layout, no shuffles
        else:
            vs = xs
        keys = ()
        for j in tl.static_range(MP):
            keys = keys + (_key(xs[j], vs[j], j, M, MP, HAS_VECTOR, UNIQUE, NAN_KEY, INTERPRET),)
        thr = _nth_largest(keys, N, MP, LOG_MP)
        keep = ()
        if UNIQUE:
            for j in tl.static_range(MP):
                keep = keep + (keys[j] >= thr,)
        else:  # ties at the threshold: keep the lowest lanes until N are kept
            need = tl.full(thr.shape, N, tl.int32)
            for j in tl.static_range(MP):
                need -= (keys[j] > thr).to(tl.int32)
            for j in tl.static_range(MP):
                tie = keys[j] == thr
                keep = keep + ((keys[j] > thr) | (tie & (need > 0)),)
                need -= tie.to(tl.int32)
        return xs, keep

    @triton.jit
    def _nm_kernel(
        x_ptr,
        y_ptr,
        v_ptr,
        shift_ptr,
        sums_ptr,
        T,
        K,
        N: tl.constexpr,
        M: tl.constexpr,
        MP: tl.constexpr,
        VEC: tl.constexpr,
        LOG_VEC: tl.constexpr,
        LOG_MP: tl.constexpr,
        BLOCK_T: tl.constexpr,
        BLOCK_G: tl.constexpr,
        HAS_VECTOR: tl.constexpr,
        HAS_SHIFT: tl.constexpr,
        VAR: tl.constexpr,
        RESCALE_Y: tl.constexpr,
        SUMS: tl.constexpr,
        UNIQUE: tl.constexpr,
        NAN_KEY: tl.constexpr,
        INTERPRET: tl.constexpr,
    ):
        rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
        row_ok = rows[:, None, None] < T
        offset = rows.to(tl.int64)[:, None, None] * K
        x_row = x_ptr + offset
        y_row = y_ptr + offset
        eta = 0.0
        if HAS_SHIFT:
            eta = tl.load(shift_ptr + rows, mask=rows < T, other=0.0)[:, None]
        groups = tl.arange(0, BLOCK_G)[None, :, None] * M
        if not VAR:  # one tile per program
            cols = tl.program_id(1) * (BLOCK_G * M) + groups
            ok = row_ok & (cols < K)
            xs, keep = _prune_tile(
                v_ptr, x_row, cols, ok, eta, N, M, MP, VEC, LOG_VEC, LOG_MP, HAS_VECTOR, HAS_SHIFT, UNIQUE, NAN_KEY, INTERPRET
            )
            out = ()
            for j in tl.static_range(MP):
                out = out + (tl.where(keep[j], xs[j], 0.0),)
            _store_lanes(y_row, cols, ok, out, M, MP, VEC, LOG_VEC)
            if SUMS:  # this tile's share of each row's sums of x, x^2, P(x), P(x)^2 (VAR's scale, at the output)
                sx = tl.zeros([BLOCK_T, BLOCK_G], tl.float32)
                sxx = tl.zeros([BLOCK_T, BLOCK_G], tl.float32)
                sp = tl.zeros([BLOCK_T, BLOCK_G], tl.float32)
                spp = tl.zeros([BLOCK_T, BLOCK_G], tl.float32)
                for j in tl.static_range(M):
                    xf = _f32(xs[j], INTERPRET)
                    pf = tl.where(keep[j], xf, 0.0)
                    sx += xf
                    sxx += xf * xf
                    sp += pf
                    spp += pf * pf
                tiles = tl.num_programs(1)
                at = sums_ptr + rows.to(tl.int64) * tiles + tl.program_id(1)
                plane = T * tiles  # int32 is ample: tokens x tiles per row
                tl.store(at, tl.sum(sx, axis=1), mask=rows < T)
                tl.store(at + plane, tl.sum(sxx, axis=1), mask=rows < T)
                tl.store(at + 2 * plane, tl.sum(sp, axis=1), mask=rows < T)
                tl.store(at + 3 * plane, tl.sum(spp, axis=1), mask=rows < T)
        else:  # whole rows per program
            # pass 1: row sums of x, x^2, pruned, pruned^2 in float32 (and the unscaled output if RESCALE_Y)
            sx = tl.zeros([BLOCK_T, BLOCK_G], tl.float32)
            sxx = tl.zeros([BLOCK_T, BLOCK_G], tl.float32)
            sp = tl.zeros([BLOCK_T, BLOCK_G], tl.float32)
            spp = tl.zeros([BLOCK_T, BLOCK_G], tl.float32)
            k0 = 0
            while k0 < K:  # (a while loop: the CPU interpreter cannot range() over a runtime bound)
                cols = k0 + groups
                ok = row_ok & (cols < K)
                xs, keep = _prune_tile(
                    v_ptr, x_row, cols, ok, eta, N, M, MP, VEC, LOG_VEC, LOG_MP, HAS_VECTOR, HAS_SHIFT, UNIQUE, NAN_KEY, INTERPRET
                )
                out = ()
                for j in tl.static_range(MP):
                    out = out + (tl.where(keep[j], xs[j], 0.0),)
                    if j < M:
                        xf = _f32(xs[j], INTERPRET)
                        if HAS_SHIFT:  # out-of-range elements read as 0 but shift to -eta
                            xf = tl.where(tl.reshape(ok, [BLOCK_T, BLOCK_G]), xf, 0.0)
                        pf = tl.where(keep[j], xf, 0.0)
                        sx += xf
                        sxx += xf * xf
                        sp += pf
                        spp += pf * pf
                if RESCALE_Y:
                    _store_lanes(y_row, cols, ok, out, M, MP, VEC, LOG_VEC)
                k0 += BLOCK_G * M
            sx = tl.sum(sx, axis=1)
            sp = tl.sum(sp, axis=1)
            var_x = (tl.sum(sxx, axis=1) - sx * sx / K) / (K - 1)
            var_p = (tl.sum(spp, axis=1) - sp * sp / K) / (K - 1)
            scale = tl.sqrt_rn(tl.div_rn(var_x, tl.maximum(var_p, 1e-8)))[:, None, None]
            # pass 2: rescale y in place, or re-read x (from L2) and recompute the mask; then store
            if RESCALE_Y:
                tl.debug_barrier()  # pass-1 stores are visible to every thread of the program
            k0 = 0
            while k0 < K:
                cols = k0 + groups
                ok = row_ok & (cols < K)
                if RESCALE_Y:
                    for c in tl.static_range(MP // VEC):
                        lane = c * VEC + tl.arange(0, VEC)[None, None, :]
                        ok_c = ok & (lane < M) if MP != M else ok
                        y = tl.load(y_row + cols + lane, mask=ok_c, other=0.0)
                        tl.store(y_row + cols + lane, _cast(_f32(y, INTERPRET) * scale, y.dtype, INTERPRET), mask=ok_c)
                else:
                    xs, keep = _prune_tile(
                        v_ptr,
                        x_row,
                        cols,
                        ok,
                        eta,
                        N,
                        M,
                        MP,
                        VEC,
                        LOG_VEC,
                        LOG_MP,
                        HAS_VECTOR,
                        HAS_SHIFT,
                        UNIQUE,
                        NAN_KEY,
                        INTERPRET,
                    )
                    out = ()
                    for j in tl.static_range(MP):
                        scaled = _f32(xs[j], INTERPRET) * tl.reshape(scale, [BLOCK_T, 1])
                        out = out + (tl.where(keep[j], _cast(scaled, xs[j].dtype, INTERPRET), 0.0),)
                    _store_lanes(y_row, cols, ok, out, M, MP, VEC, LOG_VEC)
                k0 += BLOCK_G * M

    @triton.jit
    def _var_scale_kernel(sums_ptr, scale_ptr, T, TILES, K, BLOCK: tl.constexpr):
        """VAR's scale ``sqrt(var(x) / var(P(x)))`` per row from the tiles' sums ``[4, T, TILES]``
        of x, x^2, P(x), P(x)^2, added in tile order (deterministic)."""
        rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        ok = rows < T
        plane = T * TILES
        at = sums_ptr + rows.to(tl.int64) * TILES
        sx = tl.zeros([BLOCK], tl.float32)
        sxx = tl.zeros([BLOCK], tl.float32)
        sp = tl.zeros([BLOCK], tl.float32)
        spp = tl.zeros([BLOCK], tl.float32)
        t = 0
        while t < TILES:  # (a while loop: the CPU interpreter cannot range() over a runtime bound)
            sx += tl.load(at + t, mask=ok, other=0.0)
            sxx += tl.load(at + plane + t, mask=ok, other=0.0)
            sp += tl.load(at + 2 * plane + t, mask=ok, other=0.0)
            spp += tl.load(at + 3 * plane + t, mask=ok, other=0.0)
            t += 1
        var_x = (sxx - sx * sx / K) / (K - 1)
        var_p = (spp - sp * sp / K) / (K - 1)
        tl.store(scale_ptr + rows, tl.sqrt_rn(tl.div_rn(var_x, tl.maximum(var_p, 1e-8))), mask=ok)

    _INTERPRETED = type(_nm_kernel).__name__ == "InterpretedFunction"  # decorated under TRITON_INTERPRET=1
    _NM_LAUNCH = Launcher(_nm_kernel)


# ----------------------------------------------------------------------------- the PyTorch ops
# ``torch.ops.actsparse.nm_sparsify`` / ``nm_sparsify_var_scale``: one opaque call each for
# torch.compile(fullgraph=True) and CUDA-graph capture; the Triton kernel on CUDA (and under the
# interpreter), the PyTorch reference elsewhere.


def _runs_kernel(x: torch.Tensor) -> bool:
    return triton is not None and (x.is_cuda or _INTERPRETED)


def nm_sparsify_auto(
    x: torch.Tensor, n: int, m: int, vector: torch.Tensor | None, shift: torch.Tensor | None, var: bool
) -> torch.Tensor:
    """:func:`nm_sparsify` where the kernel runs, the reference elsewhere (the op's body, callable directly)."""
    if _runs_kernel(x):
        return nm_sparsify(x, n, m, vector=vector, var=var, shift=shift)
    return nm_sparsify_reference(x, n, m, vector=vector, var=var, shift=shift)


def nm_sparsify_var_scale_auto(x: torch.Tensor, n: int, m: int, vector: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`nm_sparsify_var_scale` where the kernel runs, the reference elsewhere."""
    if _runs_kernel(x):
        return nm_sparsify_var_scale(x, n, m, vector=vector)
    return nm_sparsify_var_scale_reference(x, n, m, vector=vector)


nm_sparsify_op = torch.library.custom_op("actsparse::nm_sparsify", nm_sparsify_auto, mutates_args=())
nm_sparsify_var_scale_op = torch.library.custom_op(
    "actsparse::nm_sparsify_var_scale", nm_sparsify_var_scale_auto, mutates_args=()
)


@nm_sparsify_op.register_fake
def _(x, n, m, vector, shift, var):
    return torch.empty_like(x)


@nm_sparsify_var_scale_op.register_fake
def _(x, n, m, vector):
    return torch.empty_like(x), x.new_empty(x.shape[0], dtype=torch.float32)
