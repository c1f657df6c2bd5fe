"""Per-layer sensitivity to activation sparsity (the Amber Pruner paper's layer analysis).

For each decoder linear layer with a recognised role,
``e_q = ‖Y − Y'‖₂ / (‖Y‖₂ + ε)``: ``Y`` the dense layer's output on the calibration inputs,
``Y'`` the output of the same layer with only its own input sparsified, on exactly the same
inputs. The norms are Frobenius norms over all calibration tokens (the sums of squares are
accumulated window by window in float64). The model runs dense once; a forward hook on every
layer feeds the captured input to a ``SparseLinear`` built on the fly (sharing the weight),
so no layer's inputs are ever stored.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from actsparse.calibration.collect import run_windows
from actsparse.core.mitigation import get_mitigation
from actsparse.core.patterns import parse_pattern
from actsparse.core.scoring import get_criterion
from actsparse.core.sparse_linear import SparseLinear
from actsparse.core.stats import InputStats
from actsparse.errors import ActsparseError
from actsparse.models.discovery import ROLES, LinearSite, find_linear_sites
from actsparse.models.placement import bridge_offload_, input_device, onloaded
from actsparse.sparsify import sparse_layers

SENSITIVITY_EPS = 1e-8


def relative_error(y: torch.Tensor, y_sparse: torch.Tensor, eps: float = SENSITIVITY_EPS) -> float:
    """``‖Y − Y'‖₂ / (‖Y‖₂ + ε)`` (Frobenius), in float64."""
    y, y_sparse = y.double(), y_sparse.double()
    return ((y - y_sparse).norm() / (y.norm() + eps)).item()


@dataclass
class Sensitivity:
    """Sensitivity ``e_q`` of every recognised decoder linear layer."""

    sites: list[LinearSite]
    scores: dict[str, float]
    settings: dict = field(default_factory=dict)

    def roles(self) -> list[str]:
        present = {s.role for s in self.sites if s.name in self.scores}
        return [r for r in ROLES if r in present]

    def num_layers(self) -> int:
        return 1 + max(s.layer for s in self.sites)

    def grid(self) -> dict[str, list[float | None]]:
        """``{role: [e_q of layer 0, 1, …]}`` (None where a layer has no such role)."""
        grid = {role: [None] * self.num_layers() for role in self.roles()}
        for site in self.sites:
            if site.name in self.scores:
                grid[site.role][site.layer] = self.scores[site.name]
        return grid

    def heatmap_text(self, digits: int = 3) -> str:
        """Roles × layer index as a text table of ``e_q`` values."""
        width = digits + 3
        header = "role  " + " ".join(f"{i:>{width}}" for i in range(self.num_layers()))
        lines = [header]
        for role, values in self.grid().items():
            cells = ["-".rjust(width) if v is None else f"{v:{width}.{digits}f}" for v in values]
            lines.append(f"{role:<5} " + " ".join(cells))
        return "\n".join(lines)

    def save_png(self, path: str | Path) -> str | None:
        """Write the heat map with matplotlib; returns a note (and writes nothing) when it is not installed."""
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            return "matplotlib is not installed; no PNG written (pip install matplotlib)"
        grid = self.grid()
        data = [[math.nan if v is None else v for v in values] for values in grid.values()]
        fig, ax = plt.subplots(figsize=(max(6, 0.35 * self.num_layers() + 2), 0.5 * len(grid) + 1.5))
        image = ax.imshow(data, aspect="auto", cmap="viridis")
        ax.set_yticks(range(len(grid)), list(grid))
        ax.set_xlabel("decoder layer")
        ax.set_title(f"e_q  {self.settings.get('pattern', '')} {self.settings.get('criterion', '')}")
        fig.colorbar(image, ax=ax)
        fig.tight_layout()
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return None

    def to_dict(self) -> dict:
        return {
            "scores": dict(self.scores),
            "sites": [
                {"name": s.name, "layer": s.layer, "role": s.role, "in_features": s.in_features, "out_features": s.out_features,
                 "flops_per_token": s.flops_per_token}
                for s in self.sites
            ],
            "grid": self.grid(),
            "settings": dict(self.settings),
        }  # fmt: skip


def measure_sensitivity(
    model: nn.Module,
    windows: torch.Tensor,
    pattern: str = "8:16",
    criterion: str = "amber",
    mitigation: str = "none",
    *,
    stats: dict[str, InputStats] | None = None,
    bos_id: int | None = None,
    names: list[str] | None = None,
    progress: bool = True,
    eps: float = SENSITIVITY_EPS,
) -> Sensitivity:
    """``e_q`` of every recognised decoder linear layer (or of ``names``) over ``windows`` ``[n, seqlen]``.

    ``stats`` (``actsparse.collect_input_stats``) is needed by criteria and mitigations that
    need calibration statistics. The model must be dense (not sparsified).
    """
    curves = measure_curves(
        model, windows, [pattern], criterion, mitigation, stats=stats, bos_id=bos_id, names=names, progress=progress, eps=eps
    )
    return next(iter(curves.values()))


@torch.no_grad()
def measure_curves(
    model: nn.Module,
    windows: torch.Tensor,
    patterns: list[str],
    criterion: str = "amber",
    mitigation: str = "none",
    *,
    stats: dict[str, InputStats] | None = None,
    bos_id: int | None = None,
    names: list[str] | None = None,
    progress: bool = True,
    eps: float = SENSITIVITY_EPS,
) -> dict[str, Sensitivity]:
    """``e_q`` of every layer at each of ``patterns``, in one dense pass over ``windows``:
    ``{str(pattern): Sensitivity}`` (the sensitivity curves a per-layer allocation reads)."""
    sites, pattern_objs, chosen, wrappers = _wrappers(model, patterns, criterion, mitigation, stats, names)
    sums = {name: [[0.0, 0.0] for _ in pattern_objs] for name in wrappers}  # per pattern: sum (Y - Y')^2, sum Y^2

    def hook(module, args, output, name):
        # one wrapper per layer (its mitigation prepared once), its pattern switched per candidate:
        # the prepared tensors of the mitigations measured here do not depend on the pattern
        y = output.double()
        reference = y.square().sum().item()
        wrapper = wrappers[name]
        for pattern_obj, acc in zip(pattern_objs, sums[name]):
            wrapper.pattern = pattern_obj
            acc[0] += (y - wrapper(args[0]).double()).square().sum().item()
            acc[1] += reference

    handles = [
        model.get_submodule(s.name).register_forward_hook(lambda m, a, o, name=s.name: hook(m, a, o, name)) for s in chosen
    ]
    try:
        run_windows(model, windows, bos_id=bos_id, desc="sensitivity", progress=progress)
    finally:
        for handle in handles:
            handle.remove()
    out = {}
    for position, pattern_obj in enumerate(pattern_objs):
        scores = {name: math.sqrt(acc[position][0]) / (math.sqrt(acc[position][1]) + eps) for name, acc in sums.items()}
        settings = {
            "pattern": str(pattern_obj),
            "criterion": criterion,
            "mitigation": mitigation,
            "windows": len(windows),
            "eps": eps,
        }
        out[str(pattern_obj)] = Sensitivity(sites=sites, scores=scores, settings=settings)
    return out


def _sparse_patterns(patterns: list[str]):
    pattern_objs = [parse_pattern(p) for p in patterns]
    if not pattern_objs or any(p.is_dense for p in pattern_objs):
        raise ActsparseError("sensitivity needs sparse patterns (N:M or unstructured:S), not dense")
    return pattern_objs


@torch.no_grad()
def _wrappers(model, patterns, criterion, mitigation, stats, names):
    """The model's linear sites, the parsed ``patterns``, the recognised (or named) layers and one
    ``SparseLinear`` per layer sharing its weight, at the first pattern (switched per candidate by
    the caller); refuses a sparsified model."""
    if sparse_layers(model):
        raise ActsparseError("model is sparsified; measure sensitivity on the dense model (actsparse.unsparsify_ first)")
    pattern_objs = _sparse_patterns(patterns)
    sites = find_linear_sites(model)
    criterion_obj, mitigation_obj = get_criterion(criterion), get_mitigation(mitigation)
    chosen = [s for s in sites if s.role is not None and (names is None or s.name in names)]
    wrappers: dict[str, SparseLinear] = {}
    for index, site in enumerate(chosen):
        module = model.get_submodule(site.name)
        for pattern_obj in pattern_objs[1:]:
            pattern_obj.check_width(site.in_features)
        with onloaded(module):
            wrappers[site.name] = SparseLinear(
                module,
                pattern_objs[0],
                criterion_obj,
                mitigation_obj,
                name=site.name,
                stats=(stats or {}).get(site.name),
                seed=index,
                backend="torch",
            )
        bridge_offload_(wrappers[site.name], module)
    return sites, pattern_objs, chosen, wrappers


@dataclass
class LossTerms:
    """What one backward pass gives for one layer at one pattern, summed over the calibration tokens
    (``t``) and the layer's output channels (``j``); ``g`` is the gradient of the summed NLL of the
    calibration tokens with respect to the layer's output, ``d = Y − Y'`` the layer's output error."""

    diagonal: float = 0.0  # Σ_t Σ_j g² d²
    rank_one: float = 0.0  # Σ_t (Σ_j g d)²
    first_order: float = 0.0  # Σ_t Σ_j g d
    error: float = 0.0  # Σ_t Σ_j d²
    reference: float = 0.0  # Σ_t Σ_j Y²
    channel_grad: torch.Tensor | None = None  # [O]: Σ_t g_j²
    channel_error: torch.Tensor | None = None  # [O]: Σ_t d_j²


def _window_loss(model: nn.Module, window: torch.Tensor, bos_id: int | None) -> tuple[torch.Tensor, int]:
    """The summed NLL of one window's predicted tokens, exactly as the perplexity counts them."""
    ids = window if bos_id is None else torch.cat([window.new_tensor([bos_id]), window])
    ids = ids.unsqueeze(0).to(input_device(model))
    logits = model(ids, use_cache=False).logits
    targets = ids[:, 1:]
    return nn.functional.cross_entropy(logits[:, :-1].float().flatten(0, 1), targets.flatten(), reduction="sum"), targets.numel()


def measure_loss_terms(
    model: nn.Module,
    windows: torch.Tensor,
    patterns: list[str],
    criterion: str = "amber",
    mitigation: str = "none",
    *,
    stats: dict[str, InputStats] | None = None,
    bos_id: int | None = None,
    names: list[str] | None = None,
    progress: bool = True,
) -> tuple[dict[str, dict[str, LossTerms]], int]:
    """``LossTerms`` of every layer at each pattern, ``{str(pattern): {name: LossTerms}}``, and the
    number of predicted tokens: one dense forward and backward pass per window.

    The forward hooks keep each layer's input and dense output; a hook on the output's gradient
    sparsifies the kept input at every candidate pattern (the layer alone, as ``e_q`` does) and
    pairs the error with that gradient token by token. The parameters get no gradient.
    """
    _, pattern_objs, chosen, wrappers = _wrappers(model, patterns, criterion, mitigation, stats, names)
    terms = {str(p): {name: LossTerms() for name in wrappers} for p in pattern_objs}

    def backward(grad: torch.Tensor, name: str, x: torch.Tensor, y: torch.Tensor) -> None:
        with torch.no_grad():
            g = grad.double().flatten(0, -2)
            wrapper = wrappers[name]
            g2 = g.square()
            for pattern_obj in pattern_objs:
                wrapper.pattern = pattern_obj
                d = (y - wrapper(x).double()).flatten(0, -2)
                t = terms[str(pattern_obj)][name]
                gd = g * d
                t.diagonal += (gd * gd).sum().item()
                t.rank_one += gd.sum(-1).square().sum().item()
                t.first_order += gd.sum().item()
                t.error += d.square().sum().item()
                t.reference += y.square().sum().item()
                t.channel_grad = g2.sum(0) if t.channel_grad is None else t.channel_grad + g2.sum(0)
                channel = d.square().sum(0)
                t.channel_error = channel if t.channel_error is None else t.channel_error + channel

    def forward(module, args, output, name):
        x, y = args[0].detach(), output.detach().double()
        output.register_hook(lambda grad: backward(grad, name, x, y))

    flags = {p: p.requires_grad for p in model.parameters()}
    handles = [
        model.get_submodule(s.name).register_forward_hook(lambda m, a, o, name=s.name: forward(m, a, o, name)) for s in chosen
    ]
    handles.append(model.get_input_embeddings().register_forward_hook(lambda m, a, o: o.requires_grad_(True)))
    tokens = 0
    try:
        for p in flags:
            p.requires_grad_(False)
        with torch.enable_grad():
            for window in tqdm(windows, desc="loss sensitivity", unit="window", disable=not progress):
                loss, count = _window_loss(model, window, bos_id)
                loss.backward()
                tokens += count
    finally:
        for handle in handles:
            handle.remove()
        for p, flag in flags.items():
            p.requires_grad_(flag)
    return terms, tokens


def measure_fisher_curves(
    model: nn.Module,
    windows: torch.Tensor,
    patterns: list[str],
    criterion: str = "amber",
    mitigation: str = "none",
    *,
    stats: dict[str, InputStats] | None = None,
    bos_id: int | None = None,
    names: list[str] | None = None,
    progress: bool = True,
) -> dict[str, Sensitivity]:
    """The Fisher estimate of the increase of the mean NLL when each layer alone is sparsified at each
    of ``patterns``: ``Δ = Σ_t Σ_j g_tj² d_tj² / (2T)`` (``LossTerms.diagonal`` over the ``T``
    predicted tokens; docs/methods.md, Per-layer allocation). ``{str(pattern): Sensitivity}``."""
    terms, tokens = measure_loss_terms(
        model, windows, patterns, criterion, mitigation, stats=stats, bos_id=bos_id, names=names, progress=progress
    )
    sites = find_linear_sites(model)
    out = {}
    for pattern, by_name in terms.items():
        scores = {name: t.diagonal / (2 * tokens) for name, t in by_name.items()}
        settings = {"pattern": pattern, "criterion": criterion, "mitigation": mitigation, "windows": len(windows),
                    "tokens": tokens, "measure": "fisher"}  # fmt: skip
        out[pattern] = Sensitivity(sites=sites, scores=scores, settings=settings)
    return out
