"""Sparsity patterns: which and how many input features survive per token.

A pattern is parsed from a string:

- ``"N:M"``             keep exactly N of every M consecutive features (1 <= N < M)
- ``"unstructured:S"``  keep ``round(K * (1 - S))`` features per token row (0 <= S < 1)
- ``"dense"``           keep everything (the layer runs unchanged)

Selection is always "largest score first, ties to the lower index"; the mask code
lives in :mod:`actsparse.core.masks`.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from actsparse.errors import ActsparseError

PATTERN_HELP = "use 'N:M' with 1 <= N < M (e.g. 2:4, 8:16), 'unstructured:S' with 0 <= S < 1 (e.g. unstructured:0.5), or 'dense'"


@dataclass(frozen=True)
class Dense:
    """Keep every feature."""

    name = "dense"

    @property
    def density(self) -> float:
        return 1.0

    def check_width(self, width: int) -> None:
        pass

    def kept(self, width: int) -> int:
        return width

    def __str__(self) -> str:
        return "dense"


@dataclass(frozen=True)
class NM:
    """Keep exactly ``n`` of every ``m`` consecutive input features."""

    n: int
    m: int

    @property
    def density(self) -> float:
        return self.n / self.m

    def check_width(self, width: int) -> None:
        if width % self.m:
            raise ActsparseError(
                f"pattern {self} needs the input width to be a multiple of {self.m}, "
                f"but a layer has {width} input features; pick an M that divides {width} "
                f"or skip that layer's role (--skip ROLE; `actsparse layers` lists each layer's role and width)"
            )

    def kept(self, width: int) -> int:
        return width // self.m * self.n

    def index_bits(self) -> int:
        """Bits per group when each kept feature stores its index inside the group."""
        return self.n * math.ceil(math.log2(self.m))

    def optimal_bits(self) -> int:
        """Fewest bits per group that can name every choice of n out of m."""
        return math.ceil(math.log2(math.comb(self.m, self.n)))

    def __str__(self) -> str:
        return f"{self.n}:{self.m}"


@dataclass(frozen=True)
class Unstructured:
    """Keep the ``round(K * (1 - sparsity))`` highest-scoring features of each row."""

    sparsity: float

    @property
    def density(self) -> float:
        return 1.0 - self.sparsity

    def check_width(self, width: int) -> None:
        pass

    def kept(self, width: int) -> int:
        return round(width * (1.0 - self.sparsity))

    def __str__(self) -> str:
        return f"unstructured:{self.sparsity:g}"


Pattern = Dense | NM | Unstructured

_NM = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")
_UNSTRUCTURED = re.compile(r"^\s*unstructured\s*:\s*([0-9.eE+-]+)\s*$")


def parse_pattern(text: str | Pattern) -> Pattern:
    """Parse ``"2:4"``, ``"unstructured:0.5"`` or ``"dense"`` into a pattern object."""
    if isinstance(text, (Dense, NM, Unstructured)):
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
        row = {"pattern": str(pattern), "density": pattern.density}
        if isinstance(pattern, NM):
            row["index_bits_per_group"] = pattern.index_bits()
            row["optimal_bits_per_group"] = pattern.optimal_bits()
            row["optimal_bits_per_kept"] = pattern.optimal_bits() / pattern.n
        rows.append(row)
    return rows
