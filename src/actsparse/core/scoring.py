"""Scoring criteria: how important each input feature of each token is (docs/methods.md, Criteria).

A criterion has up to two parts:

- ``feature_vector(weight, stats)``: a per-input-feature multiplier, computed once when the
  layer is sparsified (from the weight ``[out, in]`` or from calibration statistics);
- ``score(x, vector, generator)``: the score of every element of ``x`` ``[tokens, in]``.

Adding a criterion is one function plus one ``register_criterion`` line.

CLACT's score carries a factor ``1/||x_t||``; it is the same for every feature of a token,
so it never changes an N:M or per-row mask, and it is left out: dividing could only make
two different scores round to a tie, and then the reference and the kernels could differ.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from actsparse.core.stats import InputStats
from actsparse.errors import ActsparseError
from actsparse.registry import Registry

VectorFn = Callable[[torch.Tensor, InputStats | None], torch.Tensor]
ScoreFn = Callable[[torch.Tensor, torch.Tensor | None, torch.Generator | None], torch.Tensor]


@dataclass(frozen=True)
class Criterion:
    name: str
    score: ScoreFn
    feature_vector: VectorFn | None = None
    needs_calibration: bool = False
    causal: bool = True  # False: a token's mask depends on other tokens of the batch
    random: bool = False  # True: the score draws from the layer's seeded generator (made only for such criteria)
    description: str = ""
    # What the Triton kernels compute for it: "abs_times_vector" (the score is |x_tj| * v_j, with
    # v this criterion's feature_vector or 1), or None (no kernel: the PyTorch reference runs).
    kernel_score: str | None = None


ABS_TIMES_VECTOR = "abs_times_vector"  # kernel_score: |x_tj| * v_j (clact's 1/||x_t|| is constant in a row)

CRITERIA = Registry("criterion")
register_criterion = CRITERIA.add  # register_criterion(Criterion(...))
get_criterion = CRITERIA.find


# ---- scores -------------------------------------------------------------------------------


def scaled_magnitude(x: torch.Tensor, vector: torch.Tensor | None, generator=None) -> torch.Tensor:
    """``|x_tj| * v_j`` (just ``|x_tj|`` without a vector), in float32."""
    score = x.float().abs()
    return score if vector is None else score * vector


def clact_batch_score(x: torch.Tensor, vector=None, generator=None) -> torch.Tensor:
    """The error-mitigation paper's exact CLACT: ``c_j`` is the norm of feature j over the tokens of this batch (non-causal)."""
    return scaled_magnitude(x, x.float().norm(dim=0))


def random_score(x: torch.Tensor, vector=None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Uniform random scores (a control); reproducible through the layer's seeded generator."""
    return torch.rand(x.shape, generator=generator, device=x.device)


# ---- per-feature vectors ------------------------------------------------------------------


def wina_vector(weight: torch.Tensor, stats=None) -> torch.Tensor:
    """Column norms ``||W_{:,j}||_2``."""
    return weight.float().norm(dim=0)


def quantile(values: torch.Tensor, q: float) -> torch.Tensor:
    """Linear-interpolation quantile of a flat tensor of any size (torch.quantile caps the size)."""
    flat = values.flatten()
    position = q * (flat.numel() - 1)
    lo, frac = int(position), position - int(position)
    low = torch.kthvalue(flat, lo + 1).values
    if frac == 0.0:
        return low
    high = torch.kthvalue(flat, lo + 2).values
    return low + frac * (high - low)


def amber_vector(weight: torch.Tensor, stats=None, clamp: bool = False) -> torch.Tensor:
    """Amber's column factor ``f_j = ||Ŵ_{:,j}|| / min_k ||Ŵ_{:,k}||`` with a robust z-score Ŵ.

    μ and σ (population) come from the weights inside the [0.5%, 99.5%] quantile range;
    every weight, outliers included, is then normalised (unless ``clamp``).
    """
    w = weight.float()
    lo, hi = quantile(w, 0.005), quantile(w, 0.995)
    inside = w[(w >= lo) & (w <= hi)]
    mu, sigma = inside.mean(), inside.std(correction=0).clamp_min(1e-12)
    if clamp:
        w = w.clamp(lo, hi)
    norms = ((w - mu) / sigma).norm(dim=0)
    return norms / norms.min().clamp_min(1e-12)


def amber_clamped_vector(weight: torch.Tensor, stats=None) -> torch.Tensor:
    return amber_vector(weight, stats, clamp=True)


def var_weight_vector(weight: torch.Tensor, stats=None) -> torch.Tensor:
    """Population variance of each input column over the output rows, ``Var_i(W_ij)``."""
    return weight.float().var(dim=0, correction=0)


def calibration_norm_vector(weight: torch.Tensor, stats: InputStats | None) -> torch.Tensor:
    """``c_j = ||X_{:,j}||_2`` over the calibration tokens."""
    if stats is None:
        raise ActsparseError("criterion 'clact' needs calibration statistics; pass calibration data (CLI: --calib-data)")
    return stats.feature_norm()


register_criterion(Criterion("magnitude", scaled_magnitude, description="|x|", kernel_score=ABS_TIMES_VECTOR))
register_criterion(Criterion("wina", scaled_magnitude, wina_vector, description="|x| * ||W_:,j||", kernel_score=ABS_TIMES_VECTOR))
register_criterion(
    Criterion("amber", scaled_magnitude, amber_vector, description="|x| * robust column norm of W", kernel_score=ABS_TIMES_VECTOR)
)
register_criterion(
    Criterion(
        "amber-clamp",
        scaled_magnitude,
        amber_clamped_vector,
        description="amber with outlier weights clamped",
        kernel_score=ABS_TIMES_VECTOR,
    )
)
register_criterion(
    Criterion("var-weight", scaled_magnitude, var_weight_vector, description="|x| * Var_i(W_ij)", kernel_score=ABS_TIMES_VECTOR)
)
register_criterion(
    Criterion(
        "clact",
        scaled_magnitude,
        calibration_norm_vector,
        needs_calibration=True,
        kernel_score=ABS_TIMES_VECTOR,
        description="|x| * calibration ||X_:,j|| / ||x_t||",
    )
)
register_criterion(
    Criterion(
        "clact-batch",
        clact_batch_score,
        causal=False,
        description="the error-mitigation paper's CLACT over the batch (non-causal)",
    )
)
register_criterion(Criterion("random", random_score, random=True, description="uniform random (control)"))
