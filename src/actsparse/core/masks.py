"""Keep-masks from scores: largest first, ties broken by the lower index.

This is the reference every fast kernel must match bit for bit.
"""

from __future__ import annotations

import torch

from actsparse.core.patterns import NM, Dense, Pattern, Unstructured

def keep_mask(scores: torch.Tensor, pattern: Pattern) -> torch.Tensor:
    """Boolean mask of the features that survive, same shape as ``scores``.

    ``scores`` has the input features on its last dimension; every other dimension
    is a separate token row.
    """
    if isinstance(pattern, Dense):
        return torch.ones_like(scores, dtype=torch.bool)
    if isinstance(pattern, NM):
        return _nm_mask(scores, pattern.n, pattern.m)
    if isinstance(pattern, Unstructured):
        return _topk_mask(scores, pattern.kept(scores.shape[-1]))
    raise TypeError(f"not a pattern: {pattern!r}")


def _topk_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the ``k`` largest of each row; a stable descending sort puts ties lower-index first."""
    mask = torch.zeros_like(scores, dtype=torch.bool)
    if k <= 0:
        return mask
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices
    return mask.scatter_(-1, order[..., :k], True)


def _nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep ``n`` of each group of ``m`` consecutive features along the last dimension."""
    return _topk_mask(scores.reshape(-1, m), n).reshape(scores.shape)


def reference_keep_mask(scores: list[float], pattern: Pattern) -> list[bool]:
    """Plain-Python definition of the mask for one row, used by the tests."""
    width = len(scores)
    if isinstance(pattern, Dense):
        return [True] * width
    if isinstance(pattern, Unstructured):
        groups, keep = [range(width)], pattern.kept(width)
    else:
        groups, keep = [range(s, s + pattern.m) for s in range(0, width, pattern.m)], pattern.n
    mask = [False] * width
    for group in groups:
        for index in sorted(group, key=lambda i: (-scores[i], i))[:keep]:
            mask[index] = True
    return mask
