"""Calibrated and learned error mitigations (the error-mitigation paper's statistics-only and trained corrections; docs/methods.md, Calibrated mitigations).

Statistics-only (estimated from calibration inputs, no training):

- ``spts``: S-PTS. One scalar ``η`` per layer, the mean over calibration tokens of the per-token
  lower median; ``y = P(x − η) Wᵀ + η (W1)ᵀ + b`` (D-PTS with a static ``η``).
- ``scap``: ``η`` = (lower) median of all calibration activations of the layer, folded into a
  bias: ``y = P(x − η) Wᵀ + (W η) + b``; ``scap-feature``: ``η ∈ ℝ^K`` the per-feature median.
- ``rotation``: LaRoSa-style. ``Q`` = eigenvectors (descending eigenvalues) of the centred
  covariance of the calibration inputs; ``y = P(x Q) (W Q)ᵀ + b``, ``W Q`` precomputed. The
  criterion's per-feature vector (wina, amber, …) is recomputed from ``W Q``.
  ``rotation-spread``: the same ``Q`` with its columns reordered for N:M patterns so that the
  r-th direction lands in group ``r mod G`` (G = K/M groups): each group holds directions of
  every rank instead of M neighbouring ones (with the literal order the M largest directions
  share the first group, and N:M must drop some of them).
- ``lowrank`` / ``lowrank:R``: R-Sparse. ``y = P(x) Wᵀ + (x − P(x)) V_r S_r U_rᵀ + b`` with
  ``W ≈ U_r S_r V_rᵀ`` the rank-r SVD (default r = 16). Needs no calibration at all.

Learned (trained layer by layer by ``actsparse.calibration.layerwise.calibrate_``; init = no-op):

- ``lpts``: ``y = (P(x − 1sᵀ) + 1sᵀ) Wᵀ + b``, ``s ∈ ℝ^K``.
- ``oshift``: ``y = P(x) Wᵀ + b + β``; ``oscale``: ``y = (P(x) Wᵀ) ⊙ (1 + γ) + b``;
  ``oscale-shift``: both; ``var-oscale`` / ``var-oshift`` / ``var-oscale-shift``: the same
  on VAR's rescaled ``P(x)``.

Options reach a mitigation through its name: ``lowrank:32`` is made on demand by
``ensure_mitigation`` (``lowrank:8/16/32/64/128`` are registered up front, so they also pass
``SparsityConfig`` validation directly).

Every tensor a mitigation owns (buffers and parameters) is held by the layer's
``mitigation_state`` (``core.mitigation_state.MitigationState``; the layer reads them as its own
attributes, ``layer.eta``): those are what ``save_state`` writes, and its parameters are what
``calibrate_`` trains. Mitigations in ``CALIBRATED`` say ``needs_calibration``
and refuse to run until their layer is calibrated: by ``calibrate_`` (layer by layer, the
normal way), by a saved state (``load_state_``), or for the statistics-only ones by
``sparsify_(model, config, stats=collect_covariance_stats(model, windows, config.mitigation))``
(statistics of the dense model). ``sparsify_`` with statistics that have no tokens builds
the layers uncalibrated (placeholders of the right shapes, filled by ``load_state_``).
"""

from __future__ import annotations

import re
from collections.abc import Set
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from actsparse.core.mitigation import (
    MITIGATIONS,
    Mitigation,
    get_mitigation,
    register_mitigation,
    shifted_product,
    variance_scale,
)
from actsparse.core.mitigation_state import FEATURE_VECTOR
from actsparse.core.stats import InputStats
from actsparse.errors import ActsparseError

DEFAULT_RANK = 16
MAX_MEDIAN_ROWS = 4096  # tokens kept per layer for medians (the first ones seen)


# ---- statistics ----------------------------------------------------------------------------


@dataclass
class CovarianceStats(InputStats):
    """``InputStats`` plus what the calibrated mitigations need.

    - ``feature_sum``: ``Σ_t x_t`` (float64); ``outer_sum``: ``Σ_t x_t x_tᵀ`` (float64, only
      with ``covariance=True``);
    - ``token_median_sum``: ``Σ_t lowermedian(x_t)`` (a float64 scalar tensor);
    - ``rows``: up to ``max_rows`` calibration tokens (float32, CPU), for medians.
    """

    covariance: bool = False
    keep_rows: bool = False
    max_rows: int = MAX_MEDIAN_ROWS
    feature_sum: torch.Tensor = None
    outer_sum: torch.Tensor = None
    token_median_sum: torch.Tensor = None
    rows: list = None

    def __post_init__(self):
        super().__post_init__()
        if self.feature_sum is None:
            self.feature_sum = torch.zeros(self.width, dtype=torch.float64)
        if self.covariance and self.outer_sum is None:
            self.outer_sum = torch.zeros(self.width, self.width, dtype=torch.float64)
        if self.token_median_sum is None:
            self.token_median_sum = torch.zeros((), dtype=torch.float64)
        if self.rows is None:
            self.rows = []

    @classmethod
    def collecting(cls, width: int, needs: Set[str]) -> CovarianceStats:
        """The accumulator for what ``needs`` asks (a mitigation's ``collects``: ``"covariance"``,
        ``"rows"``; the sums and the token medians are always kept)."""
        return cls(width, covariance="covariance" in needs, keep_rows="rows" in needs)

    def update(self, x: torch.Tensor) -> None:
        rows = x.detach().reshape(-1, self.width)
        super().update(rows)
        wide = rows.double()
        self.feature_sum += wide.sum(0)
        if self.covariance:  # K x K float64
            self.outer_sum += wide.T @ wide
        self.token_median_sum += rows.float().median(dim=-1).values.double().sum()
        if self.keep_rows:
            have = sum(r.shape[0] for r in self.rows)
            if have < self.max_rows:
                self.rows.append(rows[: self.max_rows - have].float().cpu())

    def mean(self) -> torch.Tensor:
        return self.feature_sum / max(self.tokens, 1)

    def centred_covariance(self) -> torch.Tensor:
        mean = self.mean().to(self.outer_sum.device)
        return self.outer_sum / max(self.tokens, 1) - torch.outer(mean, mean)

    def sample(self) -> torch.Tensor:
        return torch.cat(self.rows) if self.rows else torch.zeros(0, self.width)


# ---- helpers ---------------------------------------------------------------------------------


def _start(layer) -> None:
    layer.calibrated = False  # the tensors owned next are placeholders until fitted


def _check(layer) -> None:
    if not layer.calibrated:
        raise ActsparseError(
            f"layer {layer.name}: mitigation '{layer.mitigation.name}' is calibrated layer by layer; run "
            "actsparse.calibrate_(model, config, windows) (CLI: actsparse calibrate) or load a saved state "
            "(actsparse.load_state_, CLI: eval --state DIR) first"
        )


def _matmul(layer, x: torch.Tensor) -> torch.Tensor:
    """``x Wᵀ`` without the bias."""
    return x @ layer.weight if layer.transposed else F.linear(x, layer.weight)


def _add_bias(layer, out: torch.Tensor) -> torch.Tensor:
    return out if layer.bias is None else out + layer.bias


def _stats(layer) -> CovarianceStats | None:
    stats = layer.stats
    return stats if isinstance(stats, CovarianceStats) and stats.tokens > 0 else None


def _device(layer):
    return layer.weight.device


# ---- statistics-only -------------------------------------------------------------------------


def prepare_spts(layer) -> None:
    _start(layer)
    stats = _stats(layer)
    eta = torch.zeros((), dtype=torch.float32)
    if stats is not None:
        eta = (stats.token_median_sum / stats.tokens).float().cpu()
        layer.calibrated = True
    layer.mitigation_state.own("eta", eta.to(_device(layer)))
    layer.mitigation_state.own("weight_row_sum", layer.dense_weight().detach().float().sum(dim=1))


def apply_shift(layer, x: torch.Tensor) -> torch.Tensor:
    """``P(x − η) Wᵀ + η (W1)ᵀ + b`` (spts)."""
    _check(layer)
    return shifted_product(layer, x, layer.eta)  # layer.eta: float32


def _prepare_scap(layer, per_feature: bool) -> None:
    _start(layer)
    stats = _stats(layer)
    eta = torch.zeros(layer.in_features if per_feature else (), dtype=torch.float32)
    if stats is not None:
        sample = stats.sample()
        eta = sample.median(dim=0).values if per_feature else sample.flatten().median()
        layer.calibrated = True
    eta = eta.to(_device(layer))
    weight = layer.dense_weight().detach().float()
    folded = weight @ eta if per_feature else eta * weight.sum(dim=1)
    layer.mitigation_state.own("eta", eta)
    layer.mitigation_state.own("eta_bias", folded)


def prepare_scap(layer) -> None:
    _prepare_scap(layer, per_feature=False)


def prepare_scap_feature(layer) -> None:
    _prepare_scap(layer, per_feature=True)


def apply_scap(layer, x: torch.Tensor) -> torch.Tensor:
    """``P(x − η) Wᵀ + (W η) + b``."""
    _check(layer)
    sparse = layer.product(layer.prune(x - layer.eta.to(x.dtype)))
    return (sparse.float() + layer.eta_bias).to(sparse.dtype)


def own_feature_vector(layer) -> None:
    """Make a calibration-dependent criterion's feature vector (clact's ``||X_:,j||``) part of the
    layer's saved state, so that a loaded state scores as the calibrated layer did."""
    if layer.criterion.needs_calibration and layer.feature_vector is not None:
        layer.mitigation_state.own(FEATURE_VECTOR, layer.feature_vector)


def _rotated_stats(stats, q: torch.Tensor):
    """``InputStats`` of the rotated inputs ``xQ`` from the uncentred second moments of ``x``:
    ``Σ_t (x_t q_j)² = q_jᵀ (Σ_t x_t x_tᵀ) q_j``. Only the square sums (``feature_norm``, what
    clact reads) are known; ``abs_max`` of the rotated inputs is not, and is left at zero."""
    if stats is None or getattr(stats, "outer_sum", None) is None:
        return stats
    outer = stats.outer_sum.to(q.device, torch.float64)
    square_sum = ((outer @ q.double()) * q.double()).sum(0).clamp_min(0)
    return InputStats(stats.width, stats.tokens, square_sum, torch.zeros_like(square_sum))


def set_rotation(layer, q: torch.Tensor) -> None:
    """Install ``Q`` (columns = directions): the rotated weight, and the criterion's feature vector
    of the rotated weight and inputs, held by the state (the layer scores with it)."""
    q = q.float().to(_device(layer))
    rotated = layer.dense_weight().detach().float() @ q
    layer.mitigation_state.own("rotation", q)
    layer.mitigation_state.own("rotated_weight", rotated.to(layer.weight.dtype))
    vector = layer.criterion_vector_of(rotated, _rotated_stats(layer.stats, q))
    if vector is not None:  # the criterion sees rotated features and the rotated weight
        layer.mitigation_state.own(FEATURE_VECTOR, vector)


def spread_order(width: int, m: int) -> torch.Tensor:
    """Column order that puts the r-th of ``width`` ranked directions at position ``(r mod G)·m + r div G``
    (G = width/m groups of m): returns ``order`` with ``new[:, p] = ranked[:, order[p]]``."""
    groups = width // m
    ranks = torch.arange(width)
    order = torch.empty(width, dtype=torch.long)
    order[(ranks % groups) * m + ranks // groups] = ranks
    return order


def _prepare_rotation(layer, spread: bool) -> None:
    _start(layer)
    stats = _stats(layer)
    if stats is not None and stats.outer_sum is not None:
        values, vectors = torch.linalg.eigh(stats.centred_covariance())  # float64, on the activations' device
        q = vectors.flip(-1)  # descending eigenvalues
        if spread and layer.pattern.group:
            q = q[:, spread_order(q.shape[1], layer.pattern.group).to(q.device)]
        set_rotation(layer, q)
        stats.outer_sum = None  # free the K x K sum
        layer.calibrated = True
    else:
        set_rotation(layer, torch.eye(layer.in_features))


def prepare_rotation(layer) -> None:
    _prepare_rotation(layer, spread=False)


def prepare_rotation_spread(layer) -> None:
    _prepare_rotation(layer, spread=True)


def apply_rotation(layer, x: torch.Tensor) -> torch.Tensor:
    """``P(x Q) (W Q)ᵀ + b``."""
    _check(layer)
    rotated = (x.float() @ layer.rotation).to(x.dtype)
    return F.linear(layer.prune(rotated), layer.rotated_weight, layer.bias)


def _prepare_lowrank(layer, rank: int) -> None:
    _start(layer)
    weight = layer.dense_weight().detach().float()
    rank = min(rank, *weight.shape)
    u, s, vh = torch.linalg.svd(weight, full_matrices=False)
    layer.mitigation_state.own("lowrank_u", (u[:, :rank] * s[:rank]).to(layer.weight.dtype))  # U_r S_r  [out, r]
    layer.mitigation_state.own("lowrank_v", vh[:rank].to(layer.weight.dtype))  # V_rᵀ  [r, in]
    layer.calibrated = True  # needs no calibration


def apply_lowrank(layer, x: torch.Tensor) -> torch.Tensor:
    """``P(x) Wᵀ + (x − P(x)) V_r S_r U_rᵀ + b``."""
    pruned = layer.prune(x)
    residual = x - pruned
    return layer.product(pruned) + F.linear(F.linear(residual, layer.lowrank_v), layer.lowrank_u)


# ---- learned ---------------------------------------------------------------------------------


def prepare_lpts(layer) -> None:
    _start(layer)
    layer.mitigation_state.own("input_shift", torch.zeros(layer.in_features, device=_device(layer)), parameter=True)


def apply_lpts(layer, x: torch.Tensor) -> torch.Tensor:
    """``(P(x − 1sᵀ) + 1sᵀ) Wᵀ + b``; the mask is a constant, gradients flow through the kept values."""
    _check(layer)
    shift = layer.input_shift.to(x.dtype)
    return layer.product(layer.prune(x - shift) + shift)


def _learned(scale: bool, shift: bool, var: bool):
    def prepare(layer) -> None:
        _start(layer)
        if scale:
            layer.mitigation_state.own("output_scale", torch.zeros(layer.out_features, device=_device(layer)), parameter=True)
        if shift:
            layer.mitigation_state.own("output_shift", torch.zeros(layer.out_features, device=_device(layer)), parameter=True)

    def apply(layer, x: torch.Tensor) -> torch.Tensor:
        _check(layer)
        pruned = layer.prune(x)
        if var:
            pruned = (pruned.float() * variance_scale(x, pruned)).to(x.dtype)
        out = _matmul(layer, pruned)
        if scale:
            out = (out.float() * (1 + layer.output_scale)).to(out.dtype)
        out = _add_bias(layer, out)
        if shift:
            out = (out.float() + layer.output_shift).to(out.dtype)
        return out

    return prepare, apply


# ---- registry --------------------------------------------------------------------------------


class _Named(Set):
    """The names of the registered mitigations whose ``field`` is set, read from the registry
    each time (so they follow what is registered later)."""

    def __init__(self, field: str):
        self.field = field

    @classmethod
    def _from_iterable(cls, iterable):
        return set(iterable)

    def _names(self) -> set[str]:
        return {name for name, item in MITIGATIONS.items() if getattr(item, self.field)}

    def __contains__(self, name) -> bool:
        return name in self._names()

    def __iter__(self):
        return iter(self._names())

    def __len__(self) -> int:
        return len(self._names())


CALIBRATED = _Named("fitted")  # need calibrate_ or a saved state before they run
LEARNED = _Named("learned")  # have trainable parameters
_LOWRANK = re.compile(r"^lowrank(?::(\d+))?$")


def _register(name, apply, prepare, description, *, learned=False, needs=(), calibrated=True) -> None:
    register_mitigation(
        Mitigation(name, apply, prepare, needs_calibration=calibrated, description=description,
                   fitted=calibrated, learned=learned, collects=frozenset(needs))
    )  # fmt: skip


def lowrank(rank: int) -> Mitigation:
    """R-Sparse with rank ``rank``: the mitigation named ``lowrank:<rank>``."""
    if rank < 1:
        raise ActsparseError(f"lowrank rank must be >= 1, got {rank}")
    return Mitigation(
        f"lowrank:{rank}", apply_lowrank, lambda layer, r=rank: _prepare_lowrank(layer, r),
        description=f"R-Sparse: rank-{rank} SVD of W carries the pruned part",
    )  # fmt: skip


def _lowrank_factory(option: str) -> Mitigation | None:
    return lowrank(int(option)) if option.isdigit() else None


def register_lowrank(rank: int) -> str:
    """Register ``lowrank:<rank>`` (as any lookup of that name does); returns the name."""
    return get_mitigation(lowrank(rank).name).name


def ensure_mitigation(name: str) -> str:
    """Kept for old callers: the registry makes ``lowrank:R`` on lookup now. Returns the name."""
    match = _LOWRANK.match(name or "")
    if match and match[1] is not None:
        register_lowrank(int(match[1]))
    return name


def _find(name: str) -> Mitigation | None:
    try:
        return get_mitigation(name)
    except ActsparseError:
        return None


def is_calibrated(name: str) -> bool:
    """Whether the mitigation is fitted by calibrate_ (or loaded from a state) before it runs."""
    found = _find(name)
    return found is not None and found.fitted


def is_learned(name: str) -> bool:
    found = _find(name)
    return found is not None and found.learned


def collects(name: str) -> set[str]:
    """What the calibration statistics must collect for this mitigation (empty for an unknown name)."""
    found = _find(name)
    return set(found.collects) if found is not None else set()


_register("spts", apply_shift, prepare_spts, "static median shift η (mean token median) + rank-1 term", needs={"median"})
_register("scap", apply_scap, prepare_scap, "shift by the median of calibration activations, folded into a bias", needs={"rows"})
_register("scap-feature", apply_scap, prepare_scap_feature, "scap with a per-feature median", needs={"rows"})
_register(
    "rotation", apply_rotation, prepare_rotation, "LaRoSa-style rotation by the covariance eigenvectors", needs={"covariance"}
)
_register(
    "rotation-spread", apply_rotation, prepare_rotation_spread,
    "rotation with the eigenvectors spread over the N:M groups (rank r in group r mod G)", needs={"covariance"},
)  # fmt: skip
_register(
    "lowrank",
    apply_lowrank,
    lambda layer: _prepare_lowrank(layer, DEFAULT_RANK),
    f"R-Sparse: rank-{DEFAULT_RANK} SVD of W carries the pruned part (lowrank:R for rank R)",
    calibrated=False,
)
MITIGATIONS.add_factory("lowrank", _lowrank_factory)  # lowrank:R for any R >= 1, made on first lookup
for _rank in (8, 16, 32, 64, 128):
    register_lowrank(_rank)
_register("lpts", apply_lpts, prepare_lpts, "learned input shift s (trained layer by layer)", learned=True)
for _name, _scale, _shift, _var, _text in (
    ("oshift", False, True, False, "learned output shift β"),
    ("oscale", True, False, False, "learned output scale 1+γ"),
    ("oscale-shift", True, True, False, "learned output scale and shift"),
    ("var-oscale", True, False, True, "VAR + learned output scale"),
    ("var-oshift", False, True, True, "VAR + learned output shift"),
    ("var-oscale-shift", True, True, True, "VAR + learned output scale and shift"),
):
    _prepare, _apply = _learned(_scale, _shift, _var)
    _register(_name, _apply, _prepare, _text + " (trained layer by layer)", learned=True)
