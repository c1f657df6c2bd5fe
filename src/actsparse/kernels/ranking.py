"""The ranking rule every kernel matches: keep the largest scores, ties to the lower index.

Tensors and ints only (no pattern objects), so that the kernels need nothing above them;
``actsparse.core.masks`` builds the pattern-level masks on top of these.
"""

from __future__ import annotations

import torch


def topk_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the ``k`` largest of each row; a stable descending sort puts ties lower-index first."""
    mask = torch.zeros_like(scores, dtype=torch.bool)
    if k <= 0:
        return mask
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices
    return mask.scatter_(-1, order[..., :k], True)


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep ``n`` of each group of ``m`` consecutive features along the last dimension."""
    return topk_mask(scores.reshape(-1, m), n).reshape(scores.shape)
