"""Dynamic error mitigations: what to do around the pruned product (docs/methods.md, Dynamic mitigations).

A mitigation gets the layer and its input rows ``x`` ``[tokens, in]`` and returns the
output rows. It calls ``layer.prune(x)`` (criterion -> mask -> zeroed input),
``layer.keep(x)`` (the mask alone) and ``layer.product(x)`` (the wrapped layer's
``x Wᵀ + b``). ``prepare(layer)`` runs once at sparsification time to precompute buffers.

Adding a mitigation is one function plus one ``register_mitigation`` line.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from actsparse.errors import ActsparseError
from actsparse.registry import Registry

if TYPE_CHECKING:
    from actsparse.core.sparse_linear import SparseLinear

VAR_EPS = 1e-8
SMOOTH_EPS = 1e-5


@dataclass(frozen=True)
class Mitigation:
    name: str
    apply: Callable[[SparseLinear, torch.Tensor], torch.Tensor]
    prepare: Callable[[SparseLinear], None] | None = None
    needs_calibration: bool = False  # needs input statistics (collect_input_stats) or a calibration
    causal: bool = True  # False: a token's output depends on other tokens of the batch
    description: str = ""
    # Which epilogue of the Triton kernels expresses it: "plain" (P(x) Wᵀ + b), "variance_scale"
    # (VAR's per-token scale of P(x)), "median_shift" (P(x − η_t) Wᵀ + η_t (W 1)ᵀ + b, η_t the
    # lower median of x_t), or None (no kernel: the PyTorch reference runs).
    kernel: str | None = None
    # Fitted on calibration text by calibrate_ (or loaded from a saved state) before it runs.
    fitted: bool = False
    learned: bool = False  # fitted by training (it has parameters), not in closed form
    # What the calibration statistics must collect for it: {"covariance", "rows", "median"}.
    collects: frozenset[str] = frozenset()


PLAIN, VARIANCE_SCALE, MEDIAN_SHIFT = "plain", "variance_scale", "median_shift"  # kernel epilogues

MITIGATIONS = Registry("mitigation")
register_mitigation = MITIGATIONS.add  # register_mitigation(Mitigation(...))
get_mitigation = MITIGATIONS.find


def plain(layer: SparseLinear, x: torch.Tensor) -> torch.Tensor:
    """``P(x) Wᵀ + b``."""
    return layer.product(layer.prune(x))


def variance_scale(x: torch.Tensor, pruned: torch.Tensor) -> torch.Tensor:
    """VAR's per-token factor ``sqrt(Var_j(x_t) / max(Var_j(P(x)_t), eps))`` (unbiased), float32."""
    ratio = x.float().var(dim=-1, keepdim=True) / pruned.float().var(dim=-1, keepdim=True).clamp_min(VAR_EPS)
    return ratio.sqrt()


def var(layer: SparseLinear, x: torch.Tensor) -> torch.Tensor:
    """VAR: rescale each pruned token to the variance of the dense token."""
    pruned = layer.prune(x)
    return layer.product((pruned.float() * variance_scale(x, pruned)).to(x.dtype))


def prepare_row_sums(layer: SparseLinear) -> None:
    layer.register_buffer("weight_row_sum", layer.dense_weight().float().sum(dim=1), persistent=False)


def shifted_product(layer: SparseLinear, x: torch.Tensor, eta: torch.Tensor) -> torch.Tensor:
    """``P(x - η) Wᵀ + η (W 1)ᵀ + b``: the median shift of D-PTS (η per token) and S-PTS (η
    calibrated); ``x - η`` in ``x``'s dtype, the rank-1 term in float32 (``layer.weight_row_sum``)."""
    return add_shift_term(layer.product(layer.prune(x - eta.to(x.dtype))), eta, layer.weight_row_sum)


def add_shift_term(y: torch.Tensor, eta: torch.Tensor, row_sum: torch.Tensor) -> torch.Tensor:
    """``y + η (W 1)ᵀ`` in float32, back in y's dtype: the rank-1 term of a shift (η ``[T, 1]``)."""
    return (y.float() + eta.float() * row_sum).to(y.dtype)


def dynamic_shift(layer: SparseLinear, x: torch.Tensor) -> torch.Tensor:
    """D-PTS in hardware form: ``P(x - η_t) Wᵀ + η_t (W 1)ᵀ + b`` with η_t the lower median of x_t."""
    return shifted_product(layer, x, x.median(dim=-1, keepdim=True).values)


def smooth_scale(input_abs_max: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """SmoothQuant migration ``s_j = sqrt(max_t|x_tj| / max_i|W_ij|)``."""
    weight_max = weight.float().abs().amax(dim=0).clamp_min(SMOOTH_EPS)
    return (input_abs_max.float() / weight_max).sqrt().clamp_min(SMOOTH_EPS)


def smooth(layer: SparseLinear, x: torch.Tensor) -> torch.Tensor:
    """``P(x/s)(W diag(s))ᵀ`` with s from this batch's tokens: select on ``x/s``, multiply ``x``."""
    s = smooth_scale(x.float().abs().amax(dim=0), layer.dense_weight())
    return layer.product(x * layer.keep(x.float() / s))


def prepare_static_smooth(layer: SparseLinear) -> None:
    if layer.stats is None:
        raise ActsparseError("mitigation 'smooth-static' needs calibration statistics; pass calibration data (CLI: --calib-data)")
    scale = smooth_scale(layer.stats.abs_max, layer.dense_weight()).to(layer.dense_weight().device)
    layer.register_buffer("smooth_scale", scale, persistent=False)


def static_smooth(layer: SparseLinear, x: torch.Tensor) -> torch.Tensor:
    """``smooth`` with s from calibration maxima (causal, usable in decode)."""
    return layer.product(x * layer.keep(x.float() / layer.smooth_scale))


register_mitigation(Mitigation("none", plain, description="no mitigation", kernel=PLAIN))
register_mitigation(Mitigation("var", var, description="per-token variance correction", kernel=VARIANCE_SCALE))
register_mitigation(
    Mitigation("dpts", dynamic_shift, prepare_row_sums, description="dynamic median shift + rank-1 term", kernel=MEDIAN_SHIFT)
)
register_mitigation(Mitigation("smooth", smooth, causal=False, description="SmoothQuant-style migration, s from this batch"))
register_mitigation(
    Mitigation(
        "smooth-static",
        static_smooth,
        prepare_static_smooth,
        needs_calibration=True,
        description="smooth with s from calibration",
    )
)
