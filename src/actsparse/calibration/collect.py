"""Run calibration windows through a model and gather per-layer input statistics."""

from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm

from actsparse.calibration.stats import InputStats
from actsparse.models.discovery import find_linear_sites


@torch.no_grad()
def collect_input_stats(
    model: nn.Module,
    windows: torch.Tensor,
    names: list[str] | None = None,
    *,
    bos_id: int | None = None,
    progress: bool = True,
) -> dict[str, InputStats]:
    """Input statistics of every decoder linear layer (or of ``names``) over ``windows`` ``[n, seqlen]``.

    The model runs dense here; the statistics describe the dense model's activations.
    """
    sites = [s for s in find_linear_sites(model) if names is None or s.name in names]
    stats = {s.name: InputStats(s.in_features) for s in sites}
    hooks = [
        model.get_submodule(s.name).register_forward_pre_hook(lambda mod, args, name=s.name: stats[name].update(args[0]))
        for s in sites
    ]
    device = next(model.parameters()).device
    try:
        for window in tqdm(windows, desc="calibration stats", unit="window", disable=not progress):
            ids = window if bos_id is None else torch.cat([window.new_tensor([bos_id]), window])
            model(ids.unsqueeze(0).to(device), use_cache=False)
    finally:
        for hook in hooks:
            hook.remove()
    return stats
