"""What weight pruning to do: one plain, serialisable config object."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from functools import cached_property

import actsparse.validate as validate
from actsparse.baselines.methods import PRUNERS, get_pruner  # noqa: F401  (PRUNERS re-exported)
from actsparse.config import SparsityConfig, normalise_selection
from actsparse.core.patterns import Pattern, parse_pattern


@dataclass(frozen=True)
class WeightPruneConfig:
    """Weight pruning of the linear layers of a causal LM (the baseline to activation sparsity).

    - ``pattern``: ``"N:M"`` (keep N of every M consecutive input columns of each output
      row), ``"unstructured:S"`` or ``"dense"`` — the same patterns as ``SparsityConfig``.
    - ``method``: a name from ``PRUNERS`` (``magnitude``, ``wanda``, ``sparsegpt``).
    - ``roles`` / ``layers`` / ``skip``: which linear layers, exactly as ``SparsityConfig``.
    - ``calib_windows``: how many calibration windows to use (methods that need calibration).
    - ``seed``: which calibration windows (a seeded random choice among the calibration
      text's windows, see ``Evaluator.calibration_windows``).
    """

    pattern: str = "2:4"
    method: str = "magnitude"
    roles: tuple[str, ...] | None = None
    layers: tuple[int, ...] | None = None
    skip: tuple[str, ...] = field(default_factory=tuple)
    calib_windows: int = 128
    seed: int = 0

    def __post_init__(self):
        normalise_selection(self)
        parse_pattern(self.pattern)
        get_pruner(validate.text("method", self.method))
        validate.whole("calib_windows", self.calib_windows)
        validate.whole("seed", self.seed, minimum=None)

    def to_dict(self) -> dict:
        return asdict(self)

    @cached_property
    def pattern_obj(self) -> Pattern:
        """``pattern`` parsed once, on first use."""
        return parse_pattern(self.pattern)

    def __getstate__(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, data: dict) -> WeightPruneConfig:
        data = dict(data)
        for key in ("roles", "layers", "skip"):
            if data.get(key) is not None:
                data[key] = tuple(data[key])
        return cls(**data)

    def selects(self, role: str | None, layer: int) -> bool:
        """Whether the linear layer with this role in this decoder layer is pruned (same rules as SparsityConfig)."""
        return SparsityConfig(pattern="dense", roles=self.roles, layers=self.layers, skip=self.skip).selects(role, layer)
