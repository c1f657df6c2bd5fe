"""Reverse-engineer the metadata layout of ``torch._cslt_compress`` (cuSPARSELt, 2:4, 16-bit).

``dump``:  compress matrices whose groups keep chosen index pairs and save the raw metadata words
           (``$OUT/cslt_probe.pt``) for offline decoding; every group keeps (0,1) except those whose
           linear id ``row * K/4 + col/4`` has bit k set, which keep another pair, so each metadata bit
           that changes spells out the id of the group it belongs to.
           Also records which shapes cuSPARSELt accepts, zero/odd-group handling, and test vectors.
``check``: compare ``compress24_reference`` (and the Triton kernel) with ``torch._cslt_compress``
           on many shapes.

Run on CUDA:  PYTHONPATH=src python3 benchmarks/probe_cslt_layout.py dump|check
"""

import math
import os
import sys

import torch

PAIRS = [(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)]


def pattern_values(T, K, dtype=torch.bfloat16, device="cuda"):
    """Deterministic nonzero values (small integers, exact in bf16/fp16)."""
    i = torch.arange(T, device=device).view(-1, 1)
    j = torch.arange(K, device=device).view(1, -1)
    v = (i * 7 + j * 13) % 31 - 15
    return torch.where(v == 0, torch.full_like(v, 16), v).to(dtype)


def keep_mask(pair_ids):
    """Bool mask [T, K] from per-group pair ids [T, K/4] (indices into PAIRS)."""
    table = torch.zeros(6, 4, dtype=torch.bool, device=pair_ids.device)
    for p, (a, b) in enumerate(PAIRS):
        table[p, a] = table[p, b] = True
    return table[pair_ids].reshape(pair_ids.shape[0], -1)


def split(c, T, K):
    flat = c.view(-1)
    n = T * K // 2
    return flat[:n], flat[n:].view(torch.int16)


def dump(out):
    res = {"version": torch.backends.cusparselt.version(), "shapes": {}, "accept": {}}
    # which shapes are accepted, and the compressed size
    for T in (1, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 256, 320):
        for K in (16, 32, 48, 64, 80, 96, 128, 160, 192, 256, 320):
            x = pattern_values(T, K) * keep_mask(torch.zeros(T, K // 4, dtype=torch.long, device="cuda"))
            try:
                c = torch._cslt_compress(x)
                res["accept"][(T, K)] = (tuple(c.shape), c.numel())
            except Exception as e:
                res["accept"][(T, K)] = repr(e)[:120]
    ok = {k: v for k, v in res["accept"].items() if not isinstance(v, str)}
    print("accepted", len(ok), "of", len(res["accept"]))
    print("rejected:", sorted(k for k, v in res["accept"].items() if isinstance(v, str)))
    odd = {k: v for k, v in ok.items() if v[1] != k[0] * k[1] * 9 // 16}
    print("size != T*K*9/16:", odd)
    # bit probes
    shapes = [
        (32, 64),
        (64, 64),
        (64, 128),
        (128, 64),
        (128, 128),
        (96, 160),
        (160, 96),
        (192, 192),
        (256, 512),
        (512, 256),
        (1024, 128),
        (128, 1024),
        (320, 320),
    ]
    for T, K in shapes:
        if not isinstance(res["accept"].get((T, K), None), tuple) and (T, K) in res["accept"]:
            continue
        G = T * K // 4
        gid = torch.arange(G, device="cuda").view(T, K // 4)
        vals = pattern_values(T, K)
        entry = {}
        try:
            for p in range(6):
                x = vals * keep_mask(torch.full_like(gid, p))
                v, m = split(torch._cslt_compress(x), T, K)
                assert torch.equal(v, x[x != 0])
                entry[f"uniform{p}"] = m.cpu()
            for p1 in (5, 3, 1):
                bits = []
                for k in range(max(1, math.ceil(math.log2(G)))):
                    pid = torch.where((gid >> k) & 1 == 1, p1, 0)
                    x = vals * keep_mask(pid)
                    bits.append(split(torch._cslt_compress(x), T, K)[1].cpu())
                entry[f"bits{p1}"] = torch.stack(bits)
        except Exception as e:
            print("probe failed", T, K, repr(e)[:200])
            continue
        res["shapes"][(T, K)] = entry
        print(
            "probed",
            T,
            K,
            "meta words",
            entry["uniform0"].numel(),
            "uniform words:",
            [hex(entry[f"uniform{p}"][0].item() & 0xFFFF) for p in range(6)],
        )
    torch.save(res, os.path.join(out, "cslt_probe.pt"))
    # zero / non-2:4 groups: group g keeps the nonzero subset (g % 16) of its 4 positions
    for T, K in ((64, 64), (128, 128)):
        try:
            sub = torch.arange(T * K // 4, device="cuda").view(T, K // 4) % 16
            nz = torch.stack([(sub >> b) & 1 for b in range(4)], -1).reshape(T, K).bool()
            v, m = split(torch._cslt_compress(pattern_values(T, K) * nz), T, K)
            res["subsets"] = {"shape": (T, K), "values": v.float().cpu(), "meta": m.cpu()}
            break
        except Exception as e:
            print("subsets failed", T, K, repr(e)[:200])
    # test vectors: deterministic pair ids, all six pairs present
    res["vectors"] = {}
    for T, K in ((32, 64), (64, 64), (64, 128), (128, 128), (128, 256)):
        try:
            i = torch.arange(T, device="cuda").view(-1, 1)
            j = torch.arange(K // 4, device="cuda").view(1, -1)
            x = pattern_values(T, K) * keep_mask((i * 5 + j * 3 + i * j) % 6)
            c = torch._cslt_compress(x)
            res["vectors"][(T, K)] = {"shape": tuple(c.shape), "meta": split(c, T, K)[1].cpu()}
        except Exception as e:
            print("vector failed", T, K, repr(e)[:120])
    try:  # fp16 vs bf16; tile op (xformers' reverse-engineered cuSPARSELt layout)
        pid = torch.arange(128 * 32, device="cuda").view(128, 32) % 6
        xb = pattern_values(128, 128) * keep_mask(pid)
        mb = split(torch._cslt_compress(xb), 128, 128)[1]
        mh = split(torch._cslt_compress(xb.half()), 128, 128)[1]
        print("fp16 meta == bf16 meta:", torch.equal(mb, mh))
        tile = torch._sparse_semi_structured_tile(xb, algorithm="", use_cutlass=False)
        cb = torch._cslt_compress(xb)
        print(
            "tile[0] shape",
            tuple(tile[0].shape),
            "numel",
            tile[0].numel(),
            "cslt numel",
            cb.numel(),
            "equal:",
            tile[0].numel() == cb.numel() and torch.equal(tile[0].view(-1), cb.view(-1)),
        )
    except Exception as e:
        print("tile op failed", repr(e)[:200])
    torch.save(res, os.path.join(out, "cslt_probe.pt"))


def check():
    """Reference layout and Triton kernel vs cuSPARSELt, random 2:4 inputs, many shapes."""
    from actsparse.kernels import cslt24

    torch.manual_seed(0)
    bad = 0
    shapes = [(T, K) for T in (64, 128, 192, 256, 1024, 8192) for K in (64, 128, 192, 320, 4096, 14336)]
    for T, K in shapes:
        x = torch.randn(T, K, device="cuda", dtype=torch.bfloat16)
        x[x == 0] = 1.0  # cuSPARSELt codes groups whose kept values are zero differently
        try:
            want = torch._cslt_compress(x * cslt24.mask24(x))
        except Exception as e:
            print(f"{T}x{K}: cslt rejects ({repr(e)[:60]})")
            continue
        ref = cslt24.compress24_reference(x, cslt24.mask24(x))
        tri = cslt24.sparsify_compress24(x)
        r_ok = ref.shape == want.shape and torch.equal(ref.view(torch.int16), want.view(torch.int16))
        t_ok = tri.shape == want.shape and torch.equal(tri.view(torch.int16), want.view(torch.int16))
        bad += not (r_ok and t_ok)
        if not (r_ok and t_ok) or K >= 4096:
            print(f"{T}x{K}: reference {'ok' if r_ok else 'MISMATCH'}  triton {'ok' if t_ok else 'MISMATCH'}")
    print("check:", "ALL OK" if bad == 0 else f"{bad} FAILED")


if __name__ == "__main__":
    if sys.argv[1] == "dump":
        dump(os.environ.get("OUT", "."))
    else:
        check()
