"""Which layers stay dense: budgeted skipping by sensitivity, the Amber Pruner paper's published presets, a random control.

All of them return skip entries for ``SparsityConfig.skip`` (``"ROLE@L1,L2"``, see
``actsparse.config.parse_skip``) and measure fractions as ``SparsifyReport`` does: the share
of the decoder's linear-layer FLOPs per token that run sparse (``lm_head`` excluded, layers
with no recognised role counted as dense).
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from actsparse.errors import ActsparseError
from actsparse.models.discovery import ROLES, LinearSite

ORDERS = ("score", "score-per-flop")

# The Amber Pruner paper's published rule: always skip k, v, o, up; always prune down; q and gate are skipped only
# in these layers. {name: (decoder depth, layers where q and gate stay dense)}
AMBER_PRESETS: dict[str, tuple[int, tuple[int, ...]]] = {
    "llama3.1-8b": (32, (19, 21, 28, 30, 31)),
    "qwen2-7b": (28, (0, 6, 23, 26, 27)),
}
ALWAYS_DENSE = ("k", "v", "o", "up")
SOMETIMES_DENSE = ("q", "gate")


@dataclass(frozen=True)
class BudgetChoice:
    """The outcome of a budgeted choice."""

    sparse: tuple[str, ...]  # module names that run sparse
    dense: tuple[str, ...]  # recognised module names kept dense
    skip: tuple[str, ...]  # the skip entries that keep ``dense`` dense
    target_fraction: float
    fraction: float  # sparse share of linear FLOPs actually reached
    order: str

    @property
    def met(self) -> bool:
        return abs(self.fraction - self.target_fraction) <= 1e-9

    def to_dict(self) -> dict:
        return {
            "target_fraction": self.target_fraction, "fraction": self.fraction, "met": self.met, "order": self.order,
            "skip": list(self.skip), "sparse_layers": len(self.sparse), "dense_layers": len(self.dense),
        }  # fmt: skip


def flop_fraction(sites: Sequence[LinearSite], sparse_names: Iterable[str]) -> float:
    """Share of the linear FLOPs of ``sites`` that the named layers hold."""
    names = set(sparse_names)
    total = sum(s.flops_per_token for s in sites)
    return sum(s.flops_per_token for s in sites if s.name in names) / total if total else 0.0


def skip_entries(sites: Sequence[LinearSite], dense_names: Iterable[str]) -> tuple[str, ...]:
    """Compact skip entries, one per role: ``"q@19,21"``; a role dense in every layer it occurs in gives ``"k"``."""
    dense = set(dense_names)
    entries = []
    for role in ROLES:
        of_role = [s for s in sites if s.role == role]
        layers = sorted({s.layer for s in of_role if s.name in dense})
        if not layers:
            continue
        if len(layers) == len({s.layer for s in of_role}):
            entries.append(role)
        else:
            entries.append(f"{role}@{','.join(map(str, layers))}")
    return tuple(entries)


def _fill(sites: Sequence[LinearSite], order: Sequence[LinearSite], target_fraction: float) -> tuple[set[str], float]:
    """Walk ``order``, sparsifying each layer that keeps the fraction at or under the target.

    Then, if the target is not met exactly, compare with also sparsifying the first layer
    passed over; the nearer of the two fractions wins (a tie goes to the one reaching the target).
    """
    total = sum(s.flops_per_token for s in sites)
    target = target_fraction * total
    tol = 1e-9 * total
    chosen, flops, passed = set(), 0, None
    for site in order:
        if flops + site.flops_per_token <= target + tol:
            chosen.add(site.name)
            flops += site.flops_per_token
        elif passed is None:
            passed = site
    if passed is not None and abs(flops - target) > tol:
        over = flops + passed.flops_per_token
        if over - target <= target - flops + tol:
            chosen.add(passed.name)
            flops = over
    return chosen, flops / total if total else 0.0


def _check_target(target_fraction: float) -> None:
    if not 0.0 <= target_fraction <= 1.0:
        raise ActsparseError(f"target FLOP fraction must be in [0, 1], got {target_fraction}")


def budget_skip(
    sites: Sequence[LinearSite], scores: dict[str, float], target_fraction: float, order: str = "score"
) -> BudgetChoice:
    """Keep the most sensitive layers dense so that ``target_fraction`` of linear FLOPs run sparse.

    Greedy: layers with a recognised role, least sensitive first (``order="score"``: plain
    sensitivity ``e_q``; ``"score-per-flop"``: ``e_q`` divided by the layer's FLOPs, which
    favours big layers), are made sparse while the fraction stays at or under the target; a
    layer that would overshoot is passed over and later, smaller ones may still fit. If the
    target is not met exactly, the nearest achievable of "under" and "under + the first layer
    passed over" is taken and the fraction reached is reported (``BudgetChoice.fraction``).
    Ties in sensitivity go to the earlier site.
    """
    _check_target(target_fraction)
    if order not in ORDERS:
        raise ActsparseError(f"unknown order '{order}'; choose one of: {', '.join(ORDERS)}")
    candidates = [s for s in sites if s.role is not None]
    missing = [s.name for s in candidates if s.name not in scores]
    if missing:
        raise ActsparseError(f"no sensitivity score for {len(missing)} layers (e.g. {missing[0]})")
    if order == "score":
        key = lambda s: scores[s.name]  # noqa: E731
    else:
        key = lambda s: scores[s.name] / s.flops_per_token  # noqa: E731
    ranked = sorted(candidates, key=key)  # stable: ties keep the site order
    return _choice(sites, candidates, ranked, target_fraction, order)


def random_skip(sites: Sequence[LinearSite], target_fraction: float, seed: int = 0) -> BudgetChoice:
    """The control: the same budget rule over a seeded random order of the layers."""
    _check_target(target_fraction)
    candidates = [s for s in sites if s.role is not None]
    ranked = list(candidates)
    random.Random(seed).shuffle(ranked)
    return _choice(sites, candidates, ranked, target_fraction, f"random:{seed}")


def _choice(sites, candidates, ranked, target_fraction, order) -> BudgetChoice:
    chosen, fraction = _fill(sites, ranked, target_fraction)
    dense = tuple(s.name for s in candidates if s.name not in chosen)
    return BudgetChoice(
        sparse=tuple(s.name for s in candidates if s.name in chosen), dense=dense, skip=skip_entries(sites, dense),
        target_fraction=target_fraction, fraction=fraction, order=order,
    )  # fmt: skip


def amber_skip(dense_layers: Iterable[int]) -> tuple[str, ...]:
    """The Amber Pruner paper's rule for any model: skip k, v, o, up everywhere; q and gate in ``dense_layers``; prune down."""
    layers = sorted(set(dense_layers))
    entries = list(ALWAYS_DENSE)
    if layers:
        entries += [f"{role}@{','.join(map(str, layers))}" for role in SOMETIMES_DENSE]
    return tuple(entries)


def amber_preset(name: str, num_layers: int | None = None) -> tuple[str, ...]:
    """The Amber Pruner paper's published skip rule as ``SparsityConfig.skip``: ``amber_preset("llama3.1-8b")``.

    Presets: ``llama3.1-8b`` (32 layers; q/gate dense in 19, 21, 28, 30, 31) and ``qwen2-7b``
    (28 layers; 0, 6, 23, 26, 27). ``num_layers`` other than the preset's depth maps the layer
    indices proportionally, ``round(i · (L−1) / (L₀−1))`` — an extrapolation, not the paper's rule.
    Models with fused ``qkv``/``gate_up`` layers are not covered by the rule.
    """
    if name not in AMBER_PRESETS:
        raise ActsparseError(f"unknown Amber preset '{name}'; choose one of: {', '.join(AMBER_PRESETS)}")
    depth, layers = AMBER_PRESETS[name]
    if num_layers is not None and num_layers != depth:
        if num_layers < 1:
            raise ActsparseError(f"num_layers must be positive, got {num_layers}")
        layers = tuple(round(i * (num_layers - 1) / (depth - 1)) for i in layers)
    return amber_skip(layers)
