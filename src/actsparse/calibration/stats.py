"""Per-feature statistics of a linear layer's inputs (kept here for old imports; the class
lives in :mod:`actsparse.core.stats`, beside the criteria and mitigations that read it)."""

from actsparse.core.stats import InputStats

__all__ = ["InputStats"]
