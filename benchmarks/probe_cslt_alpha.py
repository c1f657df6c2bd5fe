"""Does ``torch._cslt_sparse_mm``'s ``alpha`` scale the product per row of the sparse operand?

With x ``[T, K]`` 2:4 sparse (compressed by ``sparsify_compress24``) and a weight ``W [O, K]``,
``_cslt_sparse_mm(c, W.t(), alpha=s)`` should give ``s[:, None] * (x_sparse W^T)`` if alpha is a
per-row vector there: then VAR's per-token scale costs nothing on the 2:4 path.

    PYTHONPATH=src python3 benchmarks/probe_cslt_alpha.py
"""

import torch

from actsparse.kernels.cslt24 import Cslt24Linear, decompress24_reference, sparsify_compress24


def main():
    if not torch.cuda.is_available():
        print("probe_cslt_alpha: no CUDA device")
        return
    torch.manual_seed(0)
    for T, K, O in ((128, 256, 512), (200, 4096, 4096)):
        x = torch.randn(T, K, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(O, K, device="cuda", dtype=torch.bfloat16) / K**0.5
        c = sparsify_compress24(x)
        dense = decompress24_reference(c, K)[:T].float() @ w.float().t()
        plain = Cslt24Linear(w)(c, T).float()
        print(f"T={T} K={K} O={O}: plain vs dense max err {(plain - dense).abs().max().item():.3g}")
        Tp = c.shape[0]
        s = torch.rand(Tp, device="cuda") + 0.5
        for dtype in (torch.float32, torch.bfloat16):
            try:
                y = torch._cslt_sparse_mm(c, w.t(), alpha=s.to(dtype))[:T].float()
                err = (y - s[:T, None] * dense).abs().max().item()
                print(
                    f"  alpha {dtype}: per-row max err {err:.3g}; per-column? {(y - s[None, :O] * dense).abs().max().item() if Tp >= O else 'n/a'}"
                )
            except Exception as error:  # noqa: BLE001  (a probe: report whatever it raises)
                print(f"  alpha {dtype}: {type(error).__name__}: {str(error).splitlines()[0][:200]}")


if __name__ == "__main__":
    main()
