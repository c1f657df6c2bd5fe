"""N per layer under a global density budget, M fixed (docs/methods.md, Per-layer allocation).

``allocate(model, config, calib_windows)`` resolves ``SparsityConfig(allocation="sensitivity")``:

1. the sensitivity curves: a cost of every selected layer at each candidate N (``choices``,
   by default N = M/4 … M in steps of M/8, N = M meaning dense, cost 0), measured on
   calibration windows with the config's criterion and mitigation (a mitigation fitted by
   calibration is measured as ``none``, since it has nothing fitted yet). The config's
   ``sensitivity`` names the objective (``OBJECTIVES``): ``fisher`` (the default), the Fisher
   estimate of the mean NLL's increase ``½ E_t Σ_j g_tj² d_tj(N)²`` from one dense forward and
   backward pass (``measure_fisher_curves``), or ``eq``, the cost ``e_q(N)²`` from one dense
   pass (``measure_curves``);
2. an exact choice: N per layer minimising the summed cost subject to the FLOP-weighted density
   ``Σ F_i N_i / (M Σ F_i)`` (``F_i`` the layer's FLOPs per token, over the selected layers)
   being the pattern's ``N/M``. A multiple-choice knapsack solved by dynamic programming over
   the FLOPs in units of their greatest common divisor (coarsened to at most ``MAX_STATES``
   units for models whose widths share no large divisor); when the budget cannot be met
   exactly the nearest achievable density is taken (under it on a tie) and reported.

The result is the config with an explicit ``{"ROLE@LAYER": "N:M"}`` map, which is what gets
saved with a state, a checkpoint or a result record, so the evaluation is reproducible
without measuring again; the ``Allocation`` says how it was chosen.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from functools import reduce

import numpy as np
from torch import nn

from actsparse.amber.sensitivity import Sensitivity, measure_curves, measure_fisher_curves
from actsparse.calibration.collect import collect_input_stats
from actsparse.config import SENSITIVITIES, SENSITIVITY, SparsityConfig, site_key
from actsparse.core.mitigation import get_mitigation
from actsparse.errors import ActsparseError
from actsparse.models.discovery import LinearSite, find_linear_sites
from actsparse.pipeline import as_windows
from actsparse.selection import choose_sites

MAX_STATES = 200_000  # DP states (FLOP units of the whole budget range)


def default_choices(m: int) -> tuple[int, ...]:
    """Candidate N for group size M: M/4 … M in steps of M/8 (every N from 1 for M < 8)."""
    step = max(1, m // 8)
    return tuple(range(max(1, math.ceil(m / 4)), m + 1, step)) if m >= 8 else tuple(range(1, m + 1))


def pattern_name(n: int, m: int) -> str:
    return "dense" if n == m else f"{n}:{m}"


@dataclass(frozen=True)
class Allocation:
    """An N per layer and what it reaches."""

    m: int
    n: dict[str, int]  # site key ("down@3") -> N
    target_density: float
    density: float  # FLOP-weighted over the allocated layers, exactly
    sparse_flop_fraction: float  # share of the allocated layers' FLOPs with N < M
    objective: float  # the summed cost of the choice (Σ e_q(N)² for eq)
    uniform_objective: float | None = None  # the summed cost at the average N, for comparison (None when not a candidate)
    settings: dict = field(default_factory=dict)

    @property
    def met(self) -> bool:
        return abs(self.density - self.target_density) <= 1e-12

    def patterns(self) -> dict[str, str]:
        return {key: pattern_name(n, self.m) for key, n in self.n.items()}

    def histogram(self) -> dict[str, int]:
        counts: dict[int, int] = {}
        for n in self.n.values():
            counts[n] = counts.get(n, 0) + 1
        return {pattern_name(n, self.m): counts[n] for n in sorted(counts)}

    def to_dict(self) -> dict:
        return {
            "m": self.m, "target_density": self.target_density, "density": self.density, "met": self.met,
            "sparse_flop_fraction": self.sparse_flop_fraction, "objective": self.objective,
            "uniform_objective": self.uniform_objective, "histogram": self.histogram(), "settings": dict(self.settings),
        }  # fmt: skip


def density_of(sites: Sequence[LinearSite], n: dict[str, int], m: int) -> tuple[float, float]:
    """(FLOP-weighted density, sparse FLOP fraction) of N per site key over ``sites``."""
    total = sum(s.flops_per_token for s in sites)
    kept = sum(s.flops_per_token * n[site_key(s.role, s.layer)] for s in sites) / m
    sparse = sum(s.flops_per_token for s in sites if n[site_key(s.role, s.layer)] < m)
    return kept / total, sparse / total


def choose_n(
    sites: Sequence[LinearSite], costs: dict[int, dict[str, float]], m: int, target_density: float
) -> tuple[dict[str, int], float]:
    """N per site (by key) minimising ``Σ costs[N][name]`` at the FLOP-weighted density nearest ``target_density``.

    ``costs[N]`` maps module names to a layer's additive cost at N (``e_q²``, or an estimated loss
    increase; N = M is dense: cost 0 whether given or not). Returns the choice and its objective.
    """
    if not sites:
        raise ActsparseError("no layers to allocate; select at least one linear layer")
    if not 0.0 < target_density <= 1.0:
        raise ActsparseError(f"target density must be in (0, 1], got {target_density}")
    choices = sorted(costs if m in costs else {**costs, m: {}})
    if any(not 1 <= n <= m for n in choices):
        raise ActsparseError(f"candidate N must be in 1..{m}, got {choices}")
    flops = [s.in_features * s.out_features for s in sites]
    unit = reduce(math.gcd, flops)
    weights = [f // unit for f in flops]
    span = sum(weights) * m
    if span > MAX_STATES:  # coarsen: the constraint becomes approximate, the density reached stays exact
        scale = MAX_STATES / span
        weights = [max(1, round(w * scale)) for w in weights]
        span = sum(weights) * m
    target = target_density * span
    cost = np.array([[0.0 if n == m else costs[n][s.name] for n in choices] for s in sites], dtype=np.float64)  # [sites, choices]
    best = np.full(span + 1, np.inf)
    best[0] = 0.0
    picks = np.zeros((len(sites), span + 1), dtype=np.int16)
    for i, weight in enumerate(weights):
        new = np.full(span + 1, np.inf)
        pick = np.zeros(span + 1, dtype=np.int16)
        for c, n in enumerate(choices):
            shift = weight * n
            candidate = np.full(span + 1, np.inf)
            candidate[shift:] = best[: span + 1 - shift] + cost[i, c]
            better = candidate < new
            new[better] = candidate[better]
            pick[better] = c
        best, picks[i] = new, pick
    reachable = np.flatnonzero(np.isfinite(best))
    distance = np.abs(reachable - target)
    nearest = distance.min()
    state = int(reachable[distance <= nearest + 1e-9].min())  # equally near: the one under the target
    objective = float(best[state])
    chosen: dict[str, int] = {}
    for i in range(len(sites) - 1, -1, -1):
        n = choices[picks[i, state]]
        chosen[site_key(sites[i].role, sites[i].layer)] = n
        state -= weights[i] * n
    return chosen, objective


@dataclass(frozen=True)
class Objective:
    """A sensitivity a per-layer allocation minimises: ``measure`` gives the curves (``measure_curves``'
    signature), ``cost`` a layer's additive cost from its score at one N."""

    name: str
    description: str  # what is minimised, for records
    measure: Callable[..., dict[str, Sensitivity]]
    cost: Callable[[float], float]


OBJECTIVES = {
    o.name: o
    for o in (
        Objective("fisher", "sum of Fisher loss-increase estimates", measure_fisher_curves, lambda delta: delta),
        Objective("eq", "sum of e_q^2", measure_curves, lambda e: e * e),
    )
}
assert tuple(OBJECTIVES) == SENSITIVITIES, "config.SENSITIVITIES names the objectives here"


def _measured_mitigation(name: str) -> str:
    """The mitigation the curves are measured with: a fitted one has nothing fitted yet, so ``none``."""
    return "none" if get_mitigation(name).fitted else name


def allocate(
    model: nn.Module,
    config: SparsityConfig,
    calib_windows,
    *,
    choices: Sequence[int] | None = None,
    stats=None,
    bos_id: int | None = None,
    progress: bool = True,
) -> tuple[SparsityConfig, Allocation]:
    """Resolve ``config.allocation == "sensitivity"`` on calibration windows (never the evaluation text).

    Returns the config with the per-layer map (the one to sparsify, save and report) and the
    ``Allocation``. ``stats``: input statistics for criteria/mitigations that need them.
    A config whose allocation is already a map or uniform comes back unchanged with its
    ``Allocation`` computed from the map (no measuring).
    """
    pattern = config.pattern_obj
    sites = choose_sites(replace(config, allocation="uniform"), find_linear_sites(model))
    if pattern.nm is None:
        raise ActsparseError(f"a per-layer allocation needs an N:M pattern, not {pattern}")
    m = pattern.m
    if config.allocation != SENSITIVITY:
        n = {site_key(s.role, s.layer): (config.pattern_of(s.role, s.layer).nm or (m, m))[0] for s in sites}  # dense -> M
        density, fraction = density_of(sites, n, m)
        return config, Allocation(m, n, pattern.density, density, fraction, math.nan, settings={"source": "map"})
    choices = tuple(sorted(set(choices or default_choices(m))))
    if any(not 1 <= c <= m for c in choices):
        raise ActsparseError(f"allocation choices must be whole numbers in 1..{m} (M = {m}), got {list(choices)}")
    if pattern.n < min(choices) or pattern.n > max(choices):
        raise ActsparseError(f"the average N {pattern.n} is outside the choices {list(choices)}; include N values on both sides")
    windows = as_windows(calib_windows)
    measured = _measured_mitigation(config.mitigation)
    if stats is None and (config.criterion_obj.needs_calibration or get_mitigation(measured).needs_calibration):
        stats = collect_input_stats(model, windows, bos_id=bos_id, progress=progress)  # clact, smooth-static
    sparse_choices = [c for c in choices if c < m]
    objective_obj = OBJECTIVES[config.sensitivity]
    curves = objective_obj.measure(
        model, windows, [f"{c}:{m}" for c in sparse_choices], config.criterion, measured, stats=stats, bos_id=bos_id,
        names=[s.name for s in sites], progress=progress,
    )  # fmt: skip
    scores = {c: curves[f"{c}:{m}"].scores for c in sparse_choices}
    costs = {c: {name: objective_obj.cost(value) for name, value in scores[c].items()} for c in sparse_choices}
    n, objective = choose_n(sites, costs, m, pattern.density)
    density, fraction = density_of(sites, n, m)
    uniform = sum(costs[pattern.n][s.name] for s in sites) if pattern.n in costs else None
    settings = {
        "source": SENSITIVITY, "choices": list(choices), "windows": len(windows), "seqlen": windows.shape[1],
        "criterion": config.criterion, "mitigation": measured, "sensitivity": objective_obj.name,
        "objective": objective_obj.description,
        "curves": {str(c): {site_key(s.role, s.layer): scores[c][s.name] for s in sites} for c in sparse_choices},
    }  # fmt: skip
    allocation = Allocation(m, n, pattern.density, density, fraction, objective, uniform, settings)
    return replace(config, allocation=allocation.patterns()), allocation
