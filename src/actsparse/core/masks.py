"""Keep-masks from scores: largest first, ties broken by the lower index.

This is the reference every fast kernel must match bit for bit.
"""

from __future__ import annotations

import torch

from actsparse.core.patterns import Pattern
from actsparse.kernels.ranking import nm_mask, topk_mask


def keep_mask(scores: torch.Tensor, pattern: Pattern) -> torch.Tensor:
    """Boolean mask of the features that survive, same shape as ``scores``.

    ``scores`` has the input features on its last dimension; every other dimension
    is a separate token row.
    """
    return pattern.mask(scores)


_topk_mask = topk_mask  # the old private names
_nm_mask = nm_mask


def reference_keep_mask(scores: list[float], pattern: Pattern) -> list[bool]:
    """Plain-Python definition of the mask for one row, used by the tests."""
    width = len(scores)
    size, keep = pattern.group_width(width), pattern.kept_per_group(width)
    groups = [range(start, start + size) for start in range(0, width, size)]
    mask = [False] * width
    for group in groups:
        for index in sorted(group, key=lambda i: (-scores[i], i))[:keep]:
            mask[index] = True
    return mask
