"""Probe cuSPARSELt through torch on this GPU: API shapes and raw 2:4 matmul speed."""

import torch
import torch.nn.functional as F
from triton.testing import do_bench

print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name())
print("cslt version", torch.backends.cusparselt.version() if hasattr(torch.backends, "cusparselt") else None)
for name in (
    "_cslt_compress",
    "_cslt_sparse_mm",
    "_cslt_sparse_mm_search",
    "_sparse_semi_structured_tile",
    "_sparse_semi_structured_linear",
):
    fn = getattr(torch, name, None)
    print(name, getattr(fn, "__doc__", None) and fn.__doc__.splitlines()[0:3])
    try:
        print("   schema:", torch._C._jit_get_schemas_for_operator(f"aten::{name}"))
    except Exception as e:
        print("   no schema", e)


def mask24(x):
    g = x.abs().reshape(-1, 4)
    idx = g.topk(2, dim=-1).indices
    m = torch.zeros_like(g, dtype=torch.bool).scatter_(-1, idx, True)
    return x * m.reshape(x.shape)


torch.manual_seed(0)
T, K, O = 8192, 4096, 14336
x = mask24(torch.randn(T, K, device="cuda", dtype=torch.bfloat16))
w = torch.randn(O, K, device="cuda", dtype=torch.bfloat16) / 64
c = torch._cslt_compress(x)
print("compressed", c.shape, c.dtype, c.numel() * c.element_size() / (x.numel() * 2))
try:
    r = torch._cslt_sparse_mm_search(c, w.t())
    print("search ->", r)
except Exception as e:
    print("search failed", repr(e)[:300])
for B in (w.t(), w.t().contiguous()):
    try:
        y = torch._cslt_sparse_mm(c, B)
        ref = x.float() @ w.float().t()
        print("mm ok", y.shape, y.dtype, ((y.float() - ref).norm() / ref.norm()).item(), B.is_contiguous())
    except Exception as e:
        print("mm failed", repr(e)[:300])
# tile op
try:
    out = torch._sparse_semi_structured_tile(x, algorithm="", use_cutlass=False)
    print("tile outputs", [(o.shape, o.dtype) for o in out])
    print(
        "tile packed == cslt_compress:",
        torch.equal(out[0].view(-1)[: c.numel()].view(c.dtype) if out[0].dtype == c.dtype else out[0], c)
        if out[0].numel() == c.numel()
        else "sizes differ",
        out[0].numel(),
        c.numel(),
    )
except Exception as e:
    print("tile failed", repr(e)[:300])
for T in (512, 2048, 8192, 16384):
    for K, O in ((4096, 14336), (14336, 4096)):
        x = mask24(torch.randn(T, K, device="cuda", dtype=torch.bfloat16))
        w = torch.randn(O, K, device="cuda", dtype=torch.bfloat16) / 64
        c = torch._cslt_compress(x)
        try:
            alg = torch._cslt_sparse_mm_search(c, w.t())
        except Exception:
            alg = 0
        alg_id = alg[0] if isinstance(alg, (tuple, list)) else alg
        dense = do_bench(lambda: F.linear(x, w), return_mode="median")
        sp0 = do_bench(lambda: torch._cslt_sparse_mm(c, w.t()), return_mode="median")
        try:
            sp = do_bench(lambda: torch._cslt_sparse_mm(c, w.t(), alg_id=alg_id), return_mode="median")
        except Exception as e:
            sp = float("nan")
            print(e)
        comp = do_bench(lambda: torch._cslt_compress(x), return_mode="median")
        print(
            f"T={T:6} K={K:6} O={O:6} dense {dense * 1e3:8.1f}us  cslt(alg0) {sp0 * 1e3:8.1f}  cslt(search {alg}) {sp * 1e3:8.1f}  compress {comp * 1e3:7.1f}  ratio {dense / sp:.2f}"
        )
