"""Simulated W8A8 (int8 fake quantisation) combined with activation sparsity (the Amber Pruner paper's Outstanding-sparse).

Symmetric int8 fake quantisation ``q(x) = clamp(round(x/s), -127, 127) · s`` with
``s = max|·| / 127``: activations per token (each row of ``x`` ``[tokens, in]``), weights per
output channel (each row of ``W`` ``[out, in]``). The arithmetic is simulated in PyTorch
(float32 for the activations, the weight's dtype for the stored weight); nothing runs in int8.

Three mitigations, registered with ``register_mitigation`` (usable through ``sparsify_``):

- ``w8a8``: ``y = q(P(x)) q(W)ᵀ + b``.
- ``w8a8-smoothquant``: SmoothQuant first, ``s_j = max|X_j|^α / max|W_{:,j}|^{1−α}``
  (α = 0.5, ``max|X_j|`` over calibration tokens), folded as ``x/s`` and ``W·diag(s)``; then
  ``y = q(P(x/s)) q(W diag(s))ᵀ + b``.
- ``outstanding-sparse``: the Amber Pruner paper's inverted smoothing ``ŝ_j = max|W_{:,j}|^{1−α} / max|X_j|^{α}``
  with α = 0.10, folded the same way (``x/ŝ``, ``W·diag(ŝ)``), then the same order.

Order: smooth -> sparsify -> quantise. The criterion scores the smoothed input, and its
per-feature vector (amber, wina, …) is the one of the folded weight ``W·diag(s)``
(``prepare`` sets the layer's ``criterion_vector`` to it), i.e. the criterion sees the smoothed
model as if it were the model. With a ``dense`` pattern (or a decode step under
``prefill_only``) the same layers run without sparsity: "W8A8 dense". The quantised weight is
precomputed into a buffer in ``prepare``; the shared original weight is never modified. These
buffers are made again whenever the layer is built (from the weight and the input statistics):
they are the layer's own, not mitigation state (``core/mitigation_state.py``), and are not saved.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F

from actsparse.core.mitigation import Mitigation, register_mitigation
from actsparse.core.patterns import Dense
from actsparse.core.sparse_linear import SparseLinear
from actsparse.errors import ActsparseError
from actsparse.modules import set_module

QMAX = 127
SCALE_EPS = 1e-12  # smallest quantisation step (an all-zero row quantises to zeros)
SMOOTH_EPS = 1e-5
SMOOTHQUANT_ALPHA = 0.5
OUTSTANDING_ALPHA = 0.10


def int8_scale(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Symmetric int8 step ``s = max|x| / 127`` along ``dim`` (kept), float32."""
    return (x.float().abs().amax(dim=dim, keepdim=True) / QMAX).clamp_min(SCALE_EPS)


def fake_quant(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """``clamp(round(x/s), -127, 127) · s`` with one scale per slice along ``dim``; float32 result."""
    scale = int8_scale(x, dim)
    return (x.float() / scale).round().clamp(-QMAX, QMAX) * scale


def quantize_activations(x: torch.Tensor) -> torch.Tensor:
    """Per-token fake quantisation of rows ``[tokens, in]``."""
    return fake_quant(x, dim=-1)


def quantize_weight(weight: torch.Tensor) -> torch.Tensor:
    """Per-output-channel fake quantisation of ``W`` ``[out, in]``."""
    return fake_quant(weight, dim=1)


def smoothquant_scale(input_abs_max: torch.Tensor, weight: torch.Tensor, alpha: float = SMOOTHQUANT_ALPHA) -> torch.Tensor:
    """SmoothQuant ``s_j = max|X_j|^α / max_i|W_ij|^{1−α}`` (float32); fold as ``x/s``, ``W·diag(s)``."""
    x_max = input_abs_max.float().clamp_min(SMOOTH_EPS)
    w_max = weight.float().abs().amax(dim=0).clamp_min(SMOOTH_EPS)
    return (x_max.pow(alpha) / w_max.pow(1.0 - alpha)).clamp_min(SMOOTH_EPS)


def outstanding_scale(input_abs_max: torch.Tensor, weight: torch.Tensor, alpha: float = OUTSTANDING_ALPHA) -> torch.Tensor:
    """The Amber Pruner paper's inverted smoothing ``ŝ_j = max_i|W_ij|^{1−α} / max|X_j|^{α}`` (float32); folded as ``x/ŝ``, ``W·diag(ŝ)``."""
    return 1.0 / smoothquant_scale(input_abs_max, weight, alpha)


def _forward(layer: SparseLinear, x: torch.Tensor, sparse: bool = True) -> torch.Tensor:
    """smooth -> sparsify -> quantise -> product, for rows ``x`` ``[tokens, in]``."""
    xs = x.float()
    if layer.w8a8_smooth is not None:
        xs = xs / layer.w8a8_smooth
    if sparse:
        xs = torch.where(layer.keep(xs), xs, torch.zeros((), dtype=xs.dtype, device=xs.device))
    xq = quantize_activations(xs).to(layer.w8a8_weight.dtype)
    bias = None if layer.bias is None else layer.bias.to(xq.dtype)
    return F.linear(xq, layer.w8a8_weight, bias).to(x.dtype)


def _prepare(layer: SparseLinear, scale_fn=None, name: str = "w8a8") -> None:
    weight = layer.dense_weight().detach()
    smooth = None
    if scale_fn is not None:
        if layer.stats is None:
            raise ActsparseError(f"mitigation '{name}' needs calibration statistics; pass calibration data (CLI: --calib-data)")
        smooth = scale_fn(layer.stats.abs_max.to(weight.device), weight)
        weight = weight.float() * smooth  # W diag(s): column j times s_j
        layer.criterion_vector = layer.criterion_vector_of(weight, layer.stats)  # the criterion sees the folded weight
    layer.register_buffer("w8a8_smooth", smooth, persistent=False)
    layer.register_buffer("w8a8_weight", quantize_weight(weight).to(layer.dense_weight().dtype), persistent=False)
    layer.dense_apply = partial(_forward, layer, sparse=False)


def w8a8(layer: SparseLinear, x: torch.Tensor) -> torch.Tensor:
    """``q(P(x)) q(W)ᵀ + b``."""
    return _forward(layer, x)


register_mitigation(
    Mitigation("w8a8", w8a8, _prepare, description="simulated W8A8: int8 per-token activations, per-channel weights")
)
register_mitigation(
    Mitigation(
        "w8a8-smoothquant",
        w8a8,
        partial(_prepare, scale_fn=smoothquant_scale, name="w8a8-smoothquant"),
        needs_calibration=True,
        description="SmoothQuant (alpha 0.5) then sparsify then W8A8",
    )
)
register_mitigation(
    Mitigation(
        "outstanding-sparse",
        w8a8,
        partial(_prepare, scale_fn=outstanding_scale, name="outstanding-sparse"),
        needs_calibration=True,
        description="Amber Pruner's inverted smoothing (alpha 0.1) then sparsify then W8A8",
    )
)


QUANT_MITIGATIONS = ("w8a8", "w8a8-smoothquant", "outstanding-sparse")


def quantize_rest_(model, config, report, stats=None) -> int:
    """After ``report = sparsify_(model, config)`` with a W8A8 mitigation: run the decoder linear layers
    it left dense (``report.dense``: skipped, or outside ``roles``/``layers``) through the same mitigation without sparsity, so
    the whole decoder is W8A8 and only the chosen layers are sparse. Returns how many were wrapped;
    ``unsparsify_`` restores them with the rest. Layers with no recognised role stay untouched.
    """
    if config.mitigation not in QUANT_MITIGATIONS:
        raise ActsparseError(
            f"quantize_rest_ needs a W8A8 mitigation ({', '.join(QUANT_MITIGATIONS)}), got '{config.mitigation}'"
        )
    criterion, mitigation = config.criterion_obj, config.mitigation_obj
    count = 0
    for site in report.dense:
        module = model.get_submodule(site.name)
        if site.role is None or isinstance(module, SparseLinear):
            continue
        layer = SparseLinear(
            module, Dense(), criterion, mitigation, name=site.name, stats=(stats or {}).get(site.name), backend="torch"
        )
        set_module(model, site.name, layer)
        count += 1
    return count
