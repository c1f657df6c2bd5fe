"""2:4 activation sparsity in cuSPARSELt's compressed format, written in one pass.

``torch._cslt_compress(x)`` (x ``[T, K]`` bf16/fp16, 2:4 sparse along K) is slow (ms at T=8192), so
``sparsify_compress24`` picks the 2:4 mask *and* writes the compressed buffer itself; the buffer then
goes straight to ``torch._cslt_sparse_mm`` (see ``Cslt24Linear``).

Compressed layout (cuSPARSELt 0.8.0, reverse-engineered on an H100 with
``benchmarks/probe_cslt_layout.py``; T % 64 == 0, K % 64 == 0)
----------------------------------------------------------------------------------------------
Flat buffer of ``T * K * 9/16`` elements of x's dtype, shaped ``[T, 9K/16]``:

* ``[0, T*K/2)``: the kept values, row-major: for each row, for each group of 4, its 2 kept values
  in ascending index order.
* ``[T*K/2, T*K*9/16)``: metadata as int16 words, one 4-bit code per group:
  ``code = i0 | i1 << 2`` for kept indices ``i0 < i1`` ((0,1)->4, (0,2)->8, (0,3)->12, (1,2)->9,
  (1,3)->13, (2,3)->14).  The code of the group at row r, columns c..c+3 (c % 4 == 0) is nibble
  ``n`` (bits ``4*(n%4) .. 4*(n%4)+3`` of word ``n//4``, little-endian) with::

      n = (r // 64) * (K // 32) * 512      # 64-row bands, one after the other
        + (c // 32) * 512                  # 64x32 blocks along K inside a band
        + (r % 64 // 16) * 128             # 16x32 tiles down the block
        + (r % 8) * 16 + (c % 16 // 4) * 4 # word inside the tile: 8 rows x 4 groups
        + (c % 32 // 16) * 2 + (r % 16 // 8)  # nibble inside the word

  so one 16-bit word holds the groups at rows {r, r+8} x columns {c, c+16}.

Evidence: the probe compressed matrices in which every group keeps (0,1) except the groups whose
linear id has bit k set, which keep (2,3), (1,2) or (0,2); each metadata bit that flips spells the id
of its group and which code bit it is; matrices where every group keeps the same pair give the six
codes.  The formula reproduces every probe of T x K in {64x64, 64x128, 128x64, 128x128, 192x192,
256x512, 512x256, 1024x128, 128x1024, 320x320}; fp16 gives the same metadata as bf16; and
``benchmarks/probe_cslt_layout.py check`` found ``compress24_reference`` and ``sparsify_compress24``
byte-identical to ``torch._cslt_compress`` for T in {64, 128, 192, 256, 1024, 8192} x K in
{64, 128, 192, 320, 4096, 14336}.  ``tests/data/cslt24_meta.json`` keeps a few captured buffers.

Speed (H100, T=8192, block 64 x 128, 8 warps): about 2.1-2.6 TB/s counting bytes read + written, i.e.
near copy bandwidth, vs ~1 ms for ``torch._cslt_compress`` at K=4096 (``benchmarks/bench_prefill24.py``).

Shapes: cuSPARSELt takes T % 16 == 0 and K % 16 == 0 and pads the metadata of other shapes (seen:
T=32, K=64 stores T*K/2 values, then the metadata of 64 rows, the missing rows coded 0xE; shapes with
K % 64 != 0 were not decoded).  This module needs K % 64 == 0 and, when T % 64 != 0,
compresses x padded with zero rows to ``Tp = ceil(T/64)*64`` (buffer ``[Tp, 9K/16]``); the matmul
then gives Tp rows and ``Cslt24Linear`` returns the first T.

Groups with fewer than 2 nonzeros: ``torch._cslt_compress`` keeps the first two nonzeros and fills up
with the highest zero positions (no nonzero -> (2,3); one at p<3 -> (p,3)).  Here the mask decides
(ties to the lower index, so an all-zero group keeps (0,1)); the metadata then differs but the
product is the same, since the values kept are zeros either way.
"""

import os
import warnings

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs
    triton = None

BAND = 64  # rows per metadata band


def triton_available() -> bool:
    """True when the Triton kernel can run here (Triton installed)."""
    return triton is not None


def padded_rows(T: int) -> int:
    """Rows of the compressed buffer: T rounded up to a multiple of 64."""
    return -(-T // BAND) * BAND


def _check_shape(x: torch.Tensor):
    if x.dim() != 2 or x.shape[1] % 64 or x.dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"need a 2-D bf16/fp16 tensor with K % 64 == 0, got {tuple(x.shape)} {x.dtype}")


def mask24(x: torch.Tensor, vector: torch.Tensor | None = None) -> torch.Tensor:
    """Bool mask keeping the 2 largest of every 4 scores ``|x|`` (``|x| * vector``) along the last dim;
    ties go to the lower index (stable descending sort)."""
    scores = x.float().abs()
    if vector is not None:
        scores = scores * vector.float()
    groups = scores.reshape(-1, 4)
    top2 = torch.sort(groups, dim=-1, descending=True, stable=True).indices[:, :2]
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, top2, True)
    return mask.reshape(x.shape)


def _words_from_codes(codes: torch.Tensor) -> torch.Tensor:
    """Metadata int16 words from per-group codes ``[Tp, K/4]`` (Tp % 64 == 0), in cuSPARSELt order."""
    Tp, G = codes.shape
    # rows -> (band, tile16, r8, rm8); groups -> (chunk32, c16, c4)
    c = codes.to(torch.int32).reshape(Tp // 64, 4, 2, 8, G // 8, 2, 4)
    shift = 4 * (2 * torch.arange(2).view(1, 1, 1, 1, 1, 2, 1) + torch.arange(2).view(1, 1, 2, 1, 1, 1, 1))
    words = (c << shift.to(codes.device)).sum(dim=(2, 5))  # [band, tile16, rm8, chunk32, c4]
    words = words.permute(0, 3, 1, 2, 4).reshape(-1)
    return (words - ((words >= 32768).to(torch.int32) << 16)).to(torch.int16)


def compress24_reference(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Plain PyTorch: the cuSPARSELt compressed buffer ``[Tp, 9K/16]`` of ``x * mask``
    (mask: exactly 2 True per group of 4).  Equals ``torch._cslt_compress(x * mask)`` when T % 64 == 0
    and every kept value is nonzero."""
    _check_shape(x)
    T, K = x.shape
    Tp = padded_rows(T)
    groups = mask.reshape(T, K // 4, 4)
    if not bool((groups.sum(-1) == 2).all()):
        raise ValueError("mask must keep exactly 2 of every 4")
    first = groups.to(torch.int8).argmax(-1)
    last = 3 - groups.flip(-1).to(torch.int8).argmax(-1)
    codes = torch.full((Tp, K // 4), 4, dtype=torch.int32, device=x.device)  # zero rows keep (0,1)
    codes[:T] = (first | (last << 2)).to(torch.int32)
    values = torch.zeros(Tp, K // 2, dtype=x.dtype, device=x.device)
    values[:T] = x[mask].reshape(T, K // 2)
    meta = _words_from_codes(codes).view(x.dtype)
    return torch.cat([values.reshape(-1), meta]).reshape(Tp, K * 9 // 16)


def decompress24_reference(compressed: torch.Tensor, K: int) -> torch.Tensor:
    """Dense ``[Tp, K]`` matrix from a compressed buffer (inverse of ``compress24_reference``)."""
    Tp = compressed.shape[0]
    flat = compressed.reshape(-1)
    values = flat[: Tp * K // 2].reshape(Tp, K // 4, 2)
    words = flat[Tp * K // 2 : Tp * K * 9 // 16].view(torch.int16).to(torch.int32) & 0xFFFF
    nib = (words.view(-1, 1) >> torch.arange(0, 16, 4, device=words.device)) & 15
    # nibble index of every group, from the layout formula
    r = torch.arange(Tp, device=words.device).view(-1, 1)
    c = torch.arange(0, K, 4, device=words.device).view(1, -1)
    n = (
        (r // 64) * (K // 32) * 512
        + (c // 32) * 512
        + (r % 64 // 16) * 128
        + (r % 8) * 16
        + (c % 16 // 4) * 4
        + (c % 32 // 16) * 2
        + (r % 16 // 8)
    )
    codes = nib.view(-1)[n]
    dense = torch.zeros(Tp, K // 4, 4, dtype=compressed.dtype, device=compressed.device)
    dense.scatter_(-1, torch.stack([codes & 3, codes >> 2], -1), values)
    return dense.reshape(Tp, K)


if triton is not None:

    @triton.jit
    def _sparsify_compress24_kernel(x_ptr, v_ptr, vals_ptr, meta_ptr, T, K, stride_x, HAS_V: tl.constexpr, BK: tl.constexpr):
        """One 64 x BK block per program, in 4 quarters: rows with (r % 16)//8 == R8 and columns
        with (c % 32)//16 == C16, so each quarter fills one nibble of every metadata word."""
        kb = tl.program_id(0)
        band = tl.program_id(1)
        i = tl.arange(0, 32)  # (tile16, rm8)
        k = tl.arange(0, BK // 2)  # (chunk32, column inside the 16)
        m = tl.arange(0, BK // 4)  # kept values of a quarter row
        words = tl.full([32, BK // 8], 0, dtype=tl.int32)
        for q in tl.static_range(4):
            R8 = q % 2
            C16 = q // 2
            rows = band * 64 + (i // 8) * 16 + R8 * 8 + (i % 8)
            cols = kb * BK + (k // 16) * 32 + C16 * 16 + (k % 16)
            x = tl.load(x_ptr + rows.to(tl.int64)[:, None] * stride_x + cols[None, :], mask=rows[:, None] < T, other=0.0)
            s = tl.abs(x.to(tl.float32))
            if HAS_V:
                s = s * tl.load(v_ptr + cols)[None, :]
            # the 4 positions of each group: [32, BK/8, 2, 2] -> (0, 2), (1, 3)
            xe, xo = tl.split(tl.reshape(x, [32, BK // 8, 2, 2]))
            x0, x2 = tl.split(xe)
            x1, x3 = tl.split(xo)
            se, so = tl.split(tl.reshape(s, [32, BK // 8, 2, 2]))
            s0, s2 = tl.split(se)
            s1, s3 = tl.split(so)
            # rank of each position among the 4; ties go to the lower index
            c01 = (s0 >= s1).to(tl.int32)
            c02 = (s0 >= s2).to(tl.int32)
            c03 = (s0 >= s3).to(tl.int32)
            c12 = (s1 >= s2).to(tl.int32)
            c13 = (s1 >= s3).to(tl.int32)
            c23 = (s2 >= s3).to(tl.int32)
            k0 = (3 - c01 - c02 - c03) < 2
            k1 = (c01 + 2 - c12 - c13) < 2
            k2 = (c02 + c12 + 1 - c23) < 2
            k3 = (c03 + c13 + c23) < 2
            i0 = tl.where(k0, 0, tl.where(k1, 1, 2))
            i1 = tl.where(k3, 3, tl.where(k2, 2, 1))
            v0 = tl.where(k0, x0, tl.where(k1, x1, x2))
            v1 = tl.where(k3, x3, tl.where(k2, x2, x1))
            vals = tl.reshape(tl.join(v0, v1), [32, BK // 4])
            vcols = kb * (BK // 2) + (m // 8) * 16 + C16 * 8 + (m % 8)
            tl.store(vals_ptr + rows.to(tl.int64)[:, None] * (K // 2) + vcols[None, :], vals)
            words = words | ((i0 | (i1 << 2)) << (4 * (2 * C16 + R8)))
        g = tl.arange(0, BK // 8)  # (chunk32, c4)
        offs = (
            band.to(tl.int64) * (K // 32) * 128
            + (kb * (BK // 32) + g[None, :] // 4) * 128
            + (i[:, None] // 8) * 32
            + (i[:, None] % 8) * 4
            + g[None, :] % 4
        )
        tl.store(meta_ptr + offs, words.to(tl.int16))

    _interpreted = None

    def _kernel_for(x: torch.Tensor):
        """The compiled kernel for CUDA tensors; Triton's interpreter for CPU tensors."""
        global _interpreted
        if x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1":
            return _sparsify_compress24_kernel
        if _interpreted is None:
            from triton.runtime.interpreter import InterpretedFunction

            _interpreted = InterpretedFunction(_sparsify_compress24_kernel.fn)
        return _interpreted


def sparsify_compress24(
    x: torch.Tensor, vector: torch.Tensor | None = None, block_k: int | None = None, num_warps: int = 8
) -> torch.Tensor:
    """One pass over x ``[T, K]``: keep the 2 of every 4 with the largest ``|x|`` (``|x| * vector``,
    ties to the lower index) and return the cuSPARSELt compressed buffer ``[Tp, 9K/16]``
    (Tp = T rounded up to 64; the padding rows are zeros)."""
    if triton is None:
        raise RuntimeError("sparsify_compress24 needs triton")
    _check_shape(x)
    if x.stride(1) != 1:
        x = x.contiguous()
    T, K = x.shape
    Tp = padded_rows(T)
    bk = block_k or (128 if K % 128 == 0 else 64)
    if K % bk:
        raise ValueError(f"K={K} is not a multiple of block_k={bk}")
    out = torch.empty(Tp, K * 9 // 16, dtype=x.dtype, device=x.device)
    flat = out.view(-1)
    vals, meta = flat[: Tp * K // 2], flat[Tp * K // 2 :].view(torch.int16)
    has_v = vector is not None
    v = vector.float().contiguous() if has_v else x  # dummy pointer when unused
    _kernel_for(x)[(K // bk, Tp // BAND)](x, v, vals, meta, T, K, x.stride(0), HAS_V=has_v, BK=bk, num_warps=num_warps)
    return out


def _search_alg(compressed: torch.Tensor, dense: torch.Tensor) -> int:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return int(torch._cslt_sparse_mm_search(compressed, dense))
    except (RuntimeError, AttributeError):
        return 0


ALG_IDS: dict[tuple, int] = {}  # (rows, K, O, dtype, device) -> searched algorithm, shared by every weight of that shape


class Cslt24Linear:
    """``y = x_sparse @ weight.T + bias`` with x given compressed (``sparsify_compress24``).
    weight ``[O, K]``; the cuSPARSELt algorithm is searched once per (rows, K, O, dtype) for all
    weights of that shape (:data:`ALG_IDS`). Inside a CUDA-graph capture, where no search can run,
    a shape not searched yet takes algorithm 0 (call once outside the capture, or ``tune_``, first)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        self.weight = weight
        self.bias = bias

    def __call__(self, compressed: torch.Tensor, T: int) -> torch.Tensor:
        O, K = self.weight.shape
        key = (compressed.shape[0], K, O, self.weight.dtype, self.weight.device)
        alg_id = ALG_IDS.get(key)
        if alg_id is None:
            if torch.cuda.is_current_stream_capturing():
                alg_id = 0
            else:
                alg_id = ALG_IDS[key] = _search_alg(compressed, self.weight.t())
        y = torch._cslt_sparse_mm(compressed, self.weight.t(), alg_id=alg_id)
        if y.shape[0] != T:
            y = y[:T]
        return y if self.bias is None else y + self.bias


# ``torch.ops.actsparse.sparsify_compress24``: the kernel as one opaque op for torch.compile and
# CUDA-graph capture (the Triton kernel everywhere Triton is installed: on CUDA, or interpreted).


def sparsify_compress24_auto(x: torch.Tensor, vector: torch.Tensor | None) -> torch.Tensor:
    """:func:`sparsify_compress24` with the op's signature (the op's body, callable directly)."""
    return sparsify_compress24(x, vector)


sparsify_compress24_op = torch.library.custom_op("actsparse::sparsify_compress24", sparsify_compress24_auto, mutates_args=())


@sparsify_compress24_op.register_fake
def _(x, vector):
    T, K = x.shape
    return x.new_empty(padded_rows(T), K * 9 // 16)
