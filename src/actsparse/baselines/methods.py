"""Weight pruning of one linear layer: magnitude, Wanda and SparseGPT.

Every pruner is a function ``(weight, inputs, pattern) -> pruned weight``:

- ``weight``: the layer's weight as ``[out, in]`` in float32 (a copy the function may change);
- ``inputs``: the layer's calibration inputs summarised by :class:`LayerInputs` (``None``
  for pruners that do not need calibration);
- ``pattern``: the same pattern objects as activation sparsity
  (:func:`actsparse.core.patterns.parse_pattern`). N always means the number of weights KEPT
  per group of M consecutive input columns of one output row.

Adding a method is one function plus one ``register_pruner(...)`` line.

Selection is "largest score first, ties to the lower index" everywhere
(:func:`actsparse.core.masks.keep_mask`):

- magnitude: score ``|W_ij|``;
- wanda: score ``|W_ij| * ||X_{:,j}||_2``;
  both compared per output row: N:M keeps N of every M consecutive input columns of a row,
  ``unstructured:S`` keeps ``round(K(1-S))`` per row;
- sparsegpt: optimal brain surgeon with weight update (Frantar & Alistarh 2023): H = 2XᵀX/n,
  dampened by 1% of its mean diagonal, upper Cholesky factor U of H⁻¹, columns pruned one by
  one in blocks of 128 with the error ``(w - q) / U_jj`` propagated to the later columns. N:M
  masks are chosen every M columns by the score ``w² / U_jj²`` of the weights as updated so
  far; ``unstructured:S`` masks are chosen per block over all its rows and columns (so rows
  differ in density) and the blocks' budgets add up to exactly ``rows * round(K(1-S))``, the
  same number of weights as magnitude and Wanda keep.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from actsparse.core.masks import keep_mask
from actsparse.core.patterns import Pattern, parse_pattern
from actsparse.core.stats import InputStats
from actsparse.errors import ActsparseError
from actsparse.kernels.ranking import topk_mask
from actsparse.registry import Registry

NEEDS = ("none", "norms", "hessian")


class LayerInputs(InputStats):
    """Running sums over the calibration inputs ``x`` ``[tokens, K]`` of one linear layer:
    ``core.stats.InputStats`` in float32 on ``device``.

    ``need``: ``"norms"`` keeps ``sum_t x_tj²`` per feature; ``"hessian"`` also ``XᵀX``
    (``K x K``, float32, on ``device``).
    """

    def __init__(self, width: int, need: str = "hessian", device: torch.device | str = "cpu"):
        if need not in NEEDS[1:]:
            raise ValueError(f"need must be 'norms' or 'hessian', got {need!r}")
        super().__init__(width, dtype=torch.float32, device=device)
        self.need = need
        self.xtx = torch.zeros(width, width, dtype=torch.float32, device=device) if need == "hessian" else None

    @classmethod
    def from_tensor(cls, x: torch.Tensor, need: str = "hessian") -> LayerInputs:
        inputs = cls(x.shape[-1], need, x.device)
        inputs.add(x)
        return inputs

    __eq__ = object.__eq__  # compared and hashed by identity (not field by field like InputStats)
    __hash__ = object.__hash__

    def update(self, x: torch.Tensor) -> None:
        rows = self._rows(x)
        super().update(rows)
        if self.xtx is not None:
            self.xtx.addmm_(rows.t(), rows)

    add = update

    def hessian(self) -> torch.Tensor:
        """``H = 2 XᵀX / n`` (a new tensor)."""
        if self.xtx is None:
            raise ValueError("these inputs were summarised without the Hessian (need='norms')")
        return self.xtx * (2.0 / max(self.tokens, 1))


PruneFn = Callable[[torch.Tensor, LayerInputs | None, Pattern], torch.Tensor]


@dataclass(frozen=True)
class Pruner:
    name: str
    prune: PruneFn
    needs: str = "none"  # "none", "norms" (per-feature input norms) or "hessian" (XᵀX)
    description: str = ""

    @property
    def needs_calibration(self) -> bool:
        return self.needs != "none"


PRUNERS = Registry("weight pruning method")
get_pruner = PRUNERS.find


def register_pruner(pruner: Pruner) -> Pruner:
    if pruner.needs not in NEEDS:
        raise ValueError(f"pruner '{pruner.name}': needs must be one of {NEEDS}")
    return PRUNERS.add(pruner)


# ---- the methods ---------------------------------------------------------------------------


def _apply_scores(weight: torch.Tensor, scores: torch.Tensor, pattern: Pattern) -> torch.Tensor:
    """Keep the weights whose score survives ``pattern`` per output row; zero the rest."""
    return weight.masked_fill(~keep_mask(scores, pattern), 0.0)


def magnitude(weight: torch.Tensor, inputs: LayerInputs | None, pattern: Pattern) -> torch.Tensor:
    return _apply_scores(weight, weight.abs(), pattern)


def wanda(weight: torch.Tensor, inputs: LayerInputs | None, pattern: Pattern) -> torch.Tensor:
    norm = inputs.feature_norm().to(weight.device)
    return _apply_scores(weight, weight.abs() * norm, pattern)


def sparsegpt(
    weight: torch.Tensor,
    inputs: LayerInputs | None,
    pattern: Pattern,
    *,
    blocksize: int = 128,
    percdamp: float = 0.01,
) -> torch.Tensor:
    """SparseGPT (OBS with weight update), written from the paper's Algorithm 1.

    Columns whose calibration input is always zero ("dead") get ``H_jj = 1`` so H stays
    invertible and score 0 (pruning them costs nothing on the calibration data); their
    weights are otherwise left alone. For N:M the block is shrunk to a multiple of M
    (``max(M, 128 // M * M)``) so no group straddles two blocks.
    """
    if pattern.is_dense:
        return weight
    W = weight.float().clone()
    rows, width = W.shape
    H = inputs.hessian().to(W.device)
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    H.diagonal().add_(percdamp * torch.mean(torch.diag(H)))
    try:
        U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    except torch.linalg.LinAlgError as error:
        raise ActsparseError(
            f"sparsegpt: the calibration Hessian of a {rows}x{width} layer is not positive definite ({error}); "
            "use more calibration windows"
        ) from error
    live = (~dead).float()
    m = pattern.group  # N:M: groups of m columns, each keeping N; None: one budget for the whole layer
    if m:
        block = max(m, blocksize // m * m)
    else:
        block = blocksize
        budget = rows * pattern.kept(width)  # weights kept in the whole layer
    for i1 in range(0, width, block):
        i2 = min(i1 + block, width)
        W1 = W[:, i1:i2].clone()
        Q1, E1 = torch.zeros_like(W1), torch.zeros_like(W1)
        U1 = U[i1:i2, i1:i2]
        d1 = torch.diag(U1)
        pruned = torch.zeros_like(W1, dtype=torch.bool)
        if not m:
            # cumulative rounding: the blocks' budgets sum exactly to ``budget``
            keep = (budget * i2 + width // 2) // width - (budget * i1 + width // 2) // width
            scores = W1.square() / d1.square() * live[i1:i2]
            pruned = ~topk_mask(scores.flatten(), keep).reshape(W1.shape)
        for i in range(i2 - i1):
            if m and i % m == 0:
                group = slice(i, i + m)
                scores = W1[:, group].square() / d1[group].square() * live[i1 + i : i1 + i + m]
                pruned[:, group] = ~keep_mask(scores, pattern)
            w = W1[:, i]
            q = w.masked_fill(pruned[:, i], 0.0)
            err = (w - q) / d1[i]
            W1[:, i:] -= err.unsqueeze(1) * U1[i, i:].unsqueeze(0)
            Q1[:, i] = q
            E1[:, i] = err
        W[:, i1:i2] = Q1
        W[:, i2:] -= E1 @ U[i1:i2, i2:]
    return W


register_pruner(Pruner("magnitude", magnitude, "none", "|W_ij|, per output row"))
register_pruner(Pruner("wanda", wanda, "norms", "|W_ij| * ||X_j||_2, per output row (Sun et al. 2023)"))
register_pruner(
    Pruner("sparsegpt", sparsegpt, "hessian", "OBS with weight update, blocks of 128, 1% dampening (Frantar & Alistarh 2023)")
)


def prune_matrix(
    weight: torch.Tensor, pattern: Pattern | str, method: str, inputs: torch.Tensor | LayerInputs | None = None
) -> torch.Tensor:
    """Prune one ``[out, in]`` weight with ``method``; ``inputs`` are calibration inputs ``[tokens, in]``.

    Returns a new float32 tensor; ``weight`` is left unchanged.
    """
    pattern = parse_pattern(pattern)
    pruner = get_pruner(method)
    pattern.check_width(weight.shape[1])
    if pruner.needs_calibration:
        if inputs is None:
            raise ActsparseError(f"weight pruning method '{method}' needs calibration inputs")
        if isinstance(inputs, torch.Tensor):
            inputs = LayerInputs.from_tensor(inputs, pruner.needs)
    if pattern.is_dense:
        return weight.float().clone()
    return pruner.prune(weight.float().clone(), inputs if pruner.needs_calibration else None, pattern)
