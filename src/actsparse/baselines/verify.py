"""Check that pruned weights really follow their pattern."""

from __future__ import annotations

import torch
from torch import nn

from actsparse.baselines.prune import RECORD_ATTR, get_weight
from actsparse.core.patterns import Pattern, parse_pattern
from actsparse.errors import ActsparseError
from actsparse.models.discovery import find_linear_sites


def check_weight(weight: torch.Tensor, pattern: Pattern | str, name: str = "weight") -> None:
    """Raise unless the ``[out, in]`` ``weight`` follows ``pattern``.

    - ``N:M``: at most N non-zero weights in every group of M consecutive input columns of a row;
    - ``unstructured:S``: at most ``rows * round(K(1-S))`` non-zero weights in the layer (the
      per-row budget in total: SparseGPT's per-block masks spread it unevenly over rows);
    - ``dense``: anything.
    """
    parse_pattern(pattern).check_pruned(weight, name)


@torch.no_grad()
def verify_pattern(model: nn.Module, pattern: Pattern | str | None = None, names: list[str] | None = None) -> int:
    """Check every pruned linear layer of ``model``; raise ``ActsparseError`` naming the first bad one.

    ``names`` default to the layers that ``prune_weights_`` / ``load_pruned_`` pruned (each
    checked against its own pattern when ``pattern`` is None), else every recognised
    decoder linear layer. Returns the number of layers checked.
    """
    record = getattr(model, RECORD_ATTR, None)
    if names is None:
        if record:
            names = list(record["layers"])
        else:
            names = [s.name for s in find_linear_sites(model) if s.role is not None]
    if pattern is None and not record:
        raise ActsparseError("model was not pruned by actsparse.prune_weights_ or load_pruned_; pass the pattern to check")
    for name in names:
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise ActsparseError(f"model has no layer {name}") from None
        layer_pattern = pattern if pattern is not None else record["layers"].get(name)
        if layer_pattern is None:
            raise ActsparseError(f"no pattern recorded for {name}; pass the pattern to check")
        check_weight(get_weight(module), layer_pattern, name)
    return len(names)
