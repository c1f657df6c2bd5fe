"""GPU self-check and timing of the one-pass Triton N:M sparsifier (``actsparse.kernels.sparsify``).

    python benchmarks/bench_sparsify.py            # self-check, then the table
    python benchmarks/bench_sparsify.py --quick    # self-check and K=4096 only

Self-check: every kernel variant is compared with ``nm_sparsify_reference`` on fresh inputs
(random, tie-heavy and special values, all three dtypes): exact for plain pruning, same zero
pattern and 1-ulp closeness for VAR. Timing: T=8192 bf16 rows, K in {4096, 14336}, 2:4, 8:16,
16:32, with/without the score vector and VAR, median of ``triton.testing.do_bench`` (L2
flushed before every call). ``GB/s`` counts bytes read + written once (2 x T x K x 2 bytes) and
is compared with a plain ``y.copy_(x)`` of a 1 GiB buffer. ``var/x`` rows time VAR with pass 2
re-reading x and recomputing the mask instead of rescaling the stored output.
Exits cleanly (status 0) when there is no CUDA device.
"""

from __future__ import annotations

import argparse
import sys

import torch

T = 8192
WIDTHS = (4096, 14336)
PATTERNS = ((2, 4), (8, 16), (16, 32))


def check(S, x, n, m, **opts):
    got = S.nm_sparsify(x, n, m, **opts)
    want = S.nm_sparsify_reference(x, n, m, **opts)
    if opts.get("var"):
        ok = torch.equal(got == 0, want == 0) and torch.allclose(got.float(), want.float(), rtol=1e-2, atol=1e-2)
    else:  # bit for bit (-0 != +0: a kept -0 shows the mask), except NaN payloads, which conversions may change
        as_int = torch.int16 if x.element_size() == 2 else torch.int32
        ok = bool(((got.view(as_int) == want.view(as_int)) | (got.isnan() & want.isnan())).all())
    if not ok:
        raise SystemExit(f"MISMATCH {tuple(x.shape)} {x.dtype} {n}:{m} {sorted(opts)}")


def self_check(S, full: bool):
    """Patterns and options on random, tie-heavy and special-value inputs (all dtypes when ``full``)."""
    import time

    torch.manual_seed(0)
    special = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0, 0.0, 1e-40, 1e-7, 1.0, -1.0, 2.0])
    dtypes = (torch.bfloat16, torch.float16, torch.float32) if full else (torch.bfloat16,)
    patterns = PATTERNS + ((1, 4), (3, 8), (5, 32), (5, 12)) if full else PATTERNS
    for dtype in dtypes:
        for n, m in patterns:
            start = time.perf_counter()
            K = m * 150
            inputs = [
                torch.randn(257, K, device="cuda").to(dtype),
                torch.tensor([-0.0, 0.0, 1.0, -1.0, 2.0], device="cuda")[torch.randint(0, 5, (257, K), device="cuda")].to(dtype),
                special.cuda()[torch.randint(0, len(special), (33, K), device="cuda")].to(dtype),
            ]
            vector = torch.rand(K, device="cuda") + 0.5
            shift = torch.randn(257, device="cuda")
            for i, x in enumerate(inputs):
                for opts in (dict(), dict(vector=vector), dict(shift=shift[: len(x)])):
                    check(S, x, n, m, **opts)
                    if i < 2:  # VAR of NaN/inf rows is NaN either way
                        check(S, x, n, m, var=True, **opts)
                        S.VAR_RESCALE_Y = False
                        check(S, x, n, m, var=True, **opts)
                        S.VAR_RESCALE_Y = True
            print(f"  checked {dtype} {n}:{m} in {time.perf_counter() - start:.1f} s", flush=True)
    names = "/".join(str(d).removeprefix("torch.") for d in dtypes)
    print(f"self-check passed ({names}; random, ties, specials; vector, shift, VAR both ways)")


def copy_bandwidth(do_bench):
    src = torch.empty(2**29, dtype=torch.bfloat16, device="cuda")
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), return_mode="median")
    return 2 * src.numel() * src.element_size() / (ms * 1e-3) / 1e9


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="K=4096 only")
    parser.add_argument("--full-check", action="store_true", help="self-check every dtype and more patterns (many compilations)")
    parser.add_argument("--no-reference", action="store_true", help="skip timing the PyTorch reference")
    parser.add_argument("--var", action="store_true", help="VAR cases and the VAR layer table only (each case still checked)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("bench_sparsify: no CUDA device, nothing to do")
        return 0
    from triton.testing import do_bench

    from actsparse.kernels import sparsify as S

    print(torch.cuda.get_device_name())
    if not args.var:
        self_check(S, args.full_check)
    copy_gbs = copy_bandwidth(do_bench)
    print(f"copy bandwidth (read + write): {copy_gbs:.0f} GB/s\n")
    header = f"{'T x K':>12} {'N:M':>6} {'options':>9} {'us':>8} {'GB/s':>7} {'%copy':>6} {'ref us':>9} {'speedup':>8}  config"
    print(header)
    print("-" * len(header))
    for K in WIDTHS[:1] if args.quick else WIDTHS:
        torch.manual_seed(K)
        x = torch.randn(T, K, device="cuda", dtype=torch.bfloat16)
        vector = torch.rand(K, device="cuda") + 0.5
        for n, m in PATTERNS:
            cases = [
                ("-", dict()),
                ("vec", dict(vector=vector)),
                ("var", dict(var=True)),
                ("var+vec", dict(var=True, vector=vector)),
                ("var/x", dict(var=True)),
                ("var/x+vec", dict(var=True, vector=vector)),
                ("var@out", dict(var=True, at_output=True)),
                ("var@out+vec", dict(var=True, at_output=True, vector=vector)),
            ]
            for name, opts in cases:
                if args.var and "var" not in name:
                    continue
                S.VAR_RESCALE_Y = "/x" not in name
                if opts.pop("at_output", False):  # VAR's scale left for the product's output: one tiled pass
                    check_var_scale(S, torch.randn_like(x), n, m, opts.get("vector"))
                    fn = lambda: S.nm_sparsify_var_scale(x, n, m, vector=opts.get("vector"))  # noqa: E731
                else:
                    check(S, torch.randn_like(x), n, m, **opts)
                    fn = lambda: S.nm_sparsify(x, n, m, **opts)  # noqa: E731
                us = do_bench(fn, return_mode="median") * 1e3
                ref_us = float("nan")
                if not args.no_reference and "/x" not in name and "@out" not in name:
                    ref_us = do_bench(lambda: S.nm_sparsify_reference(x, n, m, **opts), return_mode="median") * 1e3
                gbs = 2 * x.numel() * x.element_size() / (us * 1e-6) / 1e9
                cfg = S._config(T, K, m, x.element_size(), bool(opts.get("var")))
                print(
                    flush=True,
                    *[
                        f"{T:>5} x {K:<5} {n:>2}:{m:<3} {name:>9} {us:8.1f} {gbs:7.0f} {100 * gbs / copy_gbs:5.0f}% "
                        f"{ref_us:9.1f} {ref_us / us:7.1f}x  "
                        f"BT={cfg['BLOCK_T']} BG={cfg['BLOCK_G']} warps={cfg['num_warps']}"
                    ],
                )
        S.VAR_RESCALE_Y = True
    var_layer_table(S, do_bench)
    return 0


def check_var_scale(S, x, n, m, vector):
    pruned, scale = S.nm_sparsify_var_scale(x, n, m, vector=vector)
    want_pruned, want_scale = S.nm_sparsify_var_scale_reference(x, n, m, vector=vector)
    if not (torch.equal(pruned, want_pruned) and torch.allclose(scale, want_scale, rtol=1e-3)):
        raise SystemExit(f"MISMATCH var_scale {tuple(x.shape)} {n}:{m}")


def var_layer_table(S, do_bench):
    """A whole VAR layer, T x K -> O: scale on the input (two-pass kernel) vs on the product's output."""
    import torch.nn.functional as F

    print("\nVAR layer, 8:16, bf16: scale on the input (nm_sparsify var) vs on the output (nm_sparsify_var_scale + addcmul)")
    print(f"{'T':>6} {'K->O':>12} {'input us':>9} {'output us':>10} {'ratio':>6}")
    for K, O in ((4096, 14336), (14336, 4096), (4096, 4096)):
        w = torch.randn(O, K, device="cuda", dtype=torch.bfloat16) / K**0.5
        b = torch.randn(O, device="cuda", dtype=torch.bfloat16)
        for T in (16, 64, 256, 1024, 8192):
            x = torch.randn(T, K, device="cuda", dtype=torch.bfloat16)

            def at_input():
                return F.linear(S.nm_sparsify(x, 8, 16, var=True), w, b)

            def at_output():
                pruned, scale = S.nm_sparsify_var_scale(x, 8, 16)
                y = F.linear(pruned, w)
                return torch.addcmul(b, y, scale[:, None], out=y)

            torch.testing.assert_close(at_output().float(), at_input().float(), rtol=3e-2, atol=3e-2)
            a, o = (do_bench(f, return_mode="median") * 1e3 for f in (at_input, at_output))
            print(f"{T:>6} {K:>5}->{O:<6} {a:9.1f} {o:10.1f} {a / o:5.2f}x", flush=True)


if __name__ == "__main__":
    sys.exit(main())
