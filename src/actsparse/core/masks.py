"""Keep-masks from scores: largest first, ties broken by the lower index.

This is the reference every fast kernel must match bit for bit.
"""

from __future__ import annotations

import torch

from actsparse.core.patterns import NM, Dense, Pattern, Unstructured
from actsparse.kernels.ranking import nm_mask, topk_mask


def keep_mask(scores: torch.Tensor, pattern: Pattern) -> torch.Tensor:
    """Boolean mask of the features that survive, same shape as ``scores``.

    ``scores`` has the input features on its last dimension; every other dimension
    is a separate token row.
    """
    if isinstance(pattern, Dense):
        return torch.ones_like(scores, dtype=torch.bool)
    if isinstance(pattern, NM):
        return nm_mask(scores, pattern.n, pattern.m)
    if isinstance(pattern, Unstructured):
        return topk_mask(scores, pattern.kept(scores.shape[-1]))
    raise TypeError(f"not a pattern: {pattern!r}")


_topk_mask = topk_mask  # the old private names
_nm_mask = nm_mask


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
