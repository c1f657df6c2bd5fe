"""Sparsity patterns: which and how many input features survive per token.

A pattern is parsed from a string:

- ``"N:M"``             keep exactly N of every M consecutive features (1 <= N < M)
- ``"unstructured:S"``  keep ``round(K * (1 - S))`` features per token row (0 <= S < 1)
- ``"dense"``           keep everything (the layer runs unchanged)

Each pattern answers for itself what callers need, so that none of them branches on its type:

- ``mask(scores)``: the keep-mask of a score tensor (largest first, ties to the lower index);
- ``fits(width)`` / ``check_width(width, ...)``: whether a layer of that input width can have
  it, and the error that says how to fix it;
- ``kept(width)`` features kept per row, ``group_width(width)`` / ``kept_per_group(width)`` the
  group the choice is made in and how many survive in it, ``group`` its fixed size (M) if any;
- ``density``, ``is_dense`` (nothing is removed and the layer runs unchanged);
- ``nm``: ``(N, M)`` where the N:M kernels express the pattern, else None;
- ``check_pruned(weight, name)``: whether a pruned ``[out, in]`` weight follows it;
- ``sort_key``, ``metadata_bits()``: report order and the cost of storing the mask.

The string form (``str(pattern)``) is what configs, records and JSON files hold.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch

from actsparse.errors import ActsparseError
from actsparse.kernels.ranking import nm_mask, topk_mask

PATTERN_HELP = "use 'N:M' with 1 <= N < M (e.g. 2:4, 8:16), 'unstructured:S' with 0 <= S < 1 (e.g. unstructured:0.5), or 'dense'"


class PatternBase:
    """What every pattern answers; the subclasses below override what differs."""

    is_dense = False  # True: nothing is removed, the layer runs unchanged
    group: int | None = None  # the fixed group size (M of N:M); None: the whole row is one group

    @property
    def density(self) -> float:
        raise NotImplementedError

    @property
    def nm(self) -> tuple[int, int] | None:
        """``(N, M)`` when the N:M kernels express this pattern, else None."""
        return None

    def kept(self, width: int) -> int:
        """Features kept in a row of ``width``."""
        raise NotImplementedError

    def group_width(self, width: int) -> int:
        """The width of the groups a row of ``width`` is ranked in."""
        return width if self.group is None else self.group

    def kept_per_group(self, width: int) -> int:
        """Features kept in each group of a row of ``width``."""
        return self.kept(width)

    def fits(self, width: int) -> bool:
        """Whether a layer with ``width`` input features can have this pattern."""
        return True

    def check_width(self, width: int, layer: str | None = None, role: str | None = None, widths=None) -> None:
        """Raise unless ``fits(width)``; ``layer`` / ``role`` / ``widths`` (the role's widths) name the fix."""

    def mask(self, scores: torch.Tensor) -> torch.Tensor:
        """Boolean keep-mask, the shape of ``scores`` (features on the last dimension, every other one a row)."""
        return topk_mask(scores, self.kept(scores.shape[-1]))

    def check_pruned(self, weight: torch.Tensor, name: str) -> None:
        """Raise unless the pruned ``[out, in]`` ``weight`` (layer ``name``) follows the pattern."""

    @property
    def sort_key(self) -> tuple:
        """Dense first, then by sparsity; N:M before unstructured at equal sparsity, smaller M first."""
        raise NotImplementedError

    def metadata_bits(self) -> dict[str, float]:
        """The bits that store a group's choice (``index_bits_per_group`` ...); empty when not counted."""
        return {}


@dataclass(frozen=True)
class Dense(PatternBase):
    """Keep every feature."""

    name = "dense"
    is_dense = True

    @property
    def density(self) -> float:
        return 1.0

    def kept(self, width: int) -> int:
        return width

    def mask(self, scores: torch.Tensor) -> torch.Tensor:
        return torch.ones_like(scores, dtype=torch.bool)

    @property
    def sort_key(self) -> tuple:
        return (0, 0.0, 0, 0)

    def __str__(self) -> str:
        return "dense"


@dataclass(frozen=True)
class NM(PatternBase):
    """Keep exactly ``n`` of every ``m`` consecutive input features."""

    n: int
    m: int

    @property
    def group(self) -> int:
        return self.m

    @property
    def density(self) -> float:
        return self.n / self.m

    @property
    def nm(self) -> tuple[int, int]:
        return (self.n, self.m)

    def kept(self, width: int) -> int:
        return width // self.m * self.n

    def kept_per_group(self, width: int) -> int:
        return self.n

    def fits(self, width: int) -> bool:
        return width % self.m == 0

    def check_width(self, width: int, layer: str | None = None, role: str | None = None, widths=None) -> None:
        if self.fits(width):
            return
        if layer is None:
            raise ActsparseError(
                f"pattern {self} needs the input width to be a multiple of {self.m}, "
                f"but a layer has {width} input features; pick an M that divides {width} "
                f"or skip that layer's role (--skip ROLE; `actsparse layers` lists each layer's role and width)"
            )
        raise ActsparseError(
            f"pattern {self} needs the input width to be a multiple of {self.m}, but {layer} (role {role}) "
            f"has {width} input features; pick an M that divides {', '.join(map(str, widths or [width]))}, "
            f"or skip that role (--skip {role})"
        )

    def mask(self, scores: torch.Tensor) -> torch.Tensor:
        return nm_mask(scores, self.n, self.m)

    def check_pruned(self, weight: torch.Tensor, name: str) -> None:
        rows, width = weight.shape
        if width % self.m:
            raise ActsparseError(f"{name}: {width} input columns is not a multiple of {self.m}, so it cannot be {self}")
        counts = (weight.reshape(rows, width // self.m, self.m) != 0).sum(-1)
        bad = (counts > self.n).nonzero()
        if len(bad):
            row, group = bad[0].tolist()
            raise ActsparseError(
                f"{name} is not {self}: row {row}, columns {group * self.m}-{group * self.m + self.m - 1} "
                f"keep {counts[row, group].item()} non-zero weights (at most {self.n} allowed)"
            )

    @property
    def sort_key(self) -> tuple:
        return (1, round(1 - self.density, 6), 0, self.m)

    def index_bits(self) -> int:
        """Bits per group when each kept feature stores its index inside the group."""
        return self.n * math.ceil(math.log2(self.m))

    def optimal_bits(self) -> int:
        """Fewest bits per group that can name every choice of n out of m."""
        return math.ceil(math.log2(math.comb(self.m, self.n)))

    def metadata_bits(self) -> dict[str, float]:
        return {
            "index_bits_per_group": self.index_bits(),
            "optimal_bits_per_group": self.optimal_bits(),
            "optimal_bits_per_kept": self.optimal_bits() / self.n,
        }

    def __str__(self) -> str:
        return f"{self.n}:{self.m}"


@dataclass(frozen=True)
class Unstructured(PatternBase):
    """Keep the ``round(K * (1 - sparsity))`` highest-scoring features of each row."""

    sparsity: float

    @property
    def density(self) -> float:
        return 1.0 - self.sparsity

    def kept(self, width: int) -> int:
        return round(width * (1.0 - self.sparsity))

    def check_pruned(self, weight: torch.Tensor, name: str) -> None:
        """At most ``rows * round(K(1-S))`` non-zero weights in the layer (the per-row budget in
        total: SparseGPT's per-block masks spread it unevenly over rows)."""
        rows, width = weight.shape
        allowed = rows * self.kept(width)
        found = int(weight.count_nonzero())
        if found > allowed:
            raise ActsparseError(
                f"{name} is not {self}: {found} non-zero weights, at most {allowed} allowed ({rows} rows x {self.kept(width)})"
            )

    @property
    def sort_key(self) -> tuple:
        return (1, round(self.sparsity, 6), 1, 0)

    def __str__(self) -> str:
        return f"unstructured:{self.sparsity:g}"


Pattern = Dense | NM | Unstructured

_NM = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")
_UNSTRUCTURED = re.compile(r"^\s*unstructured\s*:\s*([0-9.eE+-]+)\s*$")


def parse_pattern(text: str | Pattern) -> Pattern:
    """Parse ``"2:4"``, ``"unstructured:0.5"`` or ``"dense"`` into a pattern object (a pattern is returned as is)."""
    if isinstance(text, PatternBase):
        return text
    if not isinstance(text, str):
        raise ActsparseError(f"pattern must be a string, got {type(text).__name__}; {PATTERN_HELP}")
    if text.strip().lower() == "dense":
        return Dense()
    if match := _NM.match(text):
        n, m = int(match[1]), int(match[2])
        if not 1 <= n < m:
            raise ActsparseError(f"pattern '{text}' is invalid: N must satisfy 1 <= N < M; {PATTERN_HELP}")
        return NM(n, m)
    if match := _UNSTRUCTURED.match(text.lower()):
        try:
            sparsity = float(match[1])
        except ValueError:
            sparsity = math.nan
        if not 0.0 <= sparsity < 1.0:
            raise ActsparseError(f"pattern '{text}' is invalid: sparsity must be in [0, 1); {PATTERN_HELP}")
        return Unstructured(sparsity)
    raise ActsparseError(f"cannot parse pattern '{text}'; {PATTERN_HELP}")


def pattern_table(patterns: list[str] | None = None) -> list[dict]:
    """Density and metadata cost of each pattern (the ``actsparse patterns`` table)."""
    names = patterns or ["2:4", "4:8", "8:16", "16:32", "1:4", "2:8", "4:16", "unstructured:0.5", "unstructured:0.7"]
    rows = []
    for name in names:
        pattern = parse_pattern(name)
        rows.append({"pattern": str(pattern), "density": pattern.density, **pattern.metadata_bits()})
    return rows
