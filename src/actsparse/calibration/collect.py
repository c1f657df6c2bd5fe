"""Run calibration windows through a model and gather per-layer input statistics."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from actsparse.core.stats import InputStats
from actsparse.models.discovery import LinearSite, find_linear_sites
from actsparse.pipeline import forward_window, run_windows  # noqa: F401  (forward_window: also imported from here)


@torch.no_grad()
def collect_input_stats(
    model: nn.Module,
    windows: torch.Tensor,
    names: list[str] | None = None,
    *,
    bos_id: int | None = None,
    progress: bool = True,
    make: Callable[[LinearSite], InputStats] | None = None,
) -> dict[str, InputStats]:
    """Input statistics of every decoder linear layer (or of ``names``) over ``windows`` ``[n, seqlen]``.

    The model runs dense here; the statistics describe the dense model's activations.
    ``make(site)`` builds each layer's statistics object (default: ``InputStats``); it needs
    an ``update(x)`` method.
    """
    make = make or (lambda site: InputStats(site.in_features))
    sites = [s for s in find_linear_sites(model) if names is None or s.name in names]
    stats = {s.name: make(s) for s in sites}
    hooks = [
        model.get_submodule(s.name).register_forward_pre_hook(lambda mod, args, name=s.name: stats[name].update(args[0]))
        for s in sites
    ]
    try:
        run_windows(model, windows, bos_id=bos_id, desc="calibration stats", progress=progress)
    finally:
        for hook in hooks:
            hook.remove()
    return stats
