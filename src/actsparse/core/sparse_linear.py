"""The sparse linear layer: criterion -> mask -> mitigation -> product.

``SparseLinear`` wraps an ``nn.Linear`` (or GPT-2's ``Conv1D``) and shares its weight and
bias parameters, so the model's state dict keys and values do not change and the original
module can be put back exactly (``original``). What its mitigation fits or learns lives in
its child ``mitigation_state`` (``core/mitigation_state.py``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from actsparse.core.dispatch import DECODE_CHOICE, choose_backend, runs_here, triton_forward
from actsparse.core.masks import keep_mask
from actsparse.core.mitigation import Mitigation
from actsparse.core.mitigation_state import FEATURE_VECTOR, MitigationState
from actsparse.core.patterns import Pattern
from actsparse.core.scoring import Criterion
from actsparse.core.stats import InputStats
from actsparse.kernels.cslt24 import Cslt24Linear
from actsparse.kernels.gemv_weight import GemvWeight
from actsparse.modules import io_features, is_conv1d  # noqa: F401  (is_conv1d: also imported from here)


class SparseLinear(nn.Module):
    """A linear layer whose input is pruned per token before the product.

    ``prefill_only``: a call with a single token position (``x`` 3-D with ``x.shape[-2] == 1``,
    i.e. a decode step with a KV cache) runs dense; prompt (prefill) calls are sparsified.
    Under teacher forcing (perplexity) every call is a prefill call. A mitigation's
    ``prepare`` may set ``dense_apply(layer, rows)``: the layer's form without sparsity
    (e.g. W8A8 fake quantisation), used for dense calls instead of the plain product.

    ``mitigation_state`` (a ``MitigationState``) holds the mitigation's fitted and learned
    tensors and its ``calibrated`` flag; the layer reads each of them as its own attribute
    (``layer.eta`` is ``layer.mitigation_state.eta``), and ``layer.calibrated`` is the state's.
    """

    prefill_only: bool = False
    dense_apply = None
    shared_input = None  # a core.shared_input.SharedInput when linked to layers reading the same input

    def __init__(
        self,
        module: nn.Module,
        pattern: Pattern,
        criterion: Criterion,
        mitigation: Mitigation,
        *,
        name: str = "",
        stats: InputStats | None = None,
        seed: int = 0,
        backend: str = "auto",
        prefill_only: bool = False,
    ):
        super().__init__()
        self.prefill_only = prefill_only
        self.in_features, self.out_features = io_features(module)
        pattern.check_width(self.in_features)
        self.weight = module.weight
        self.bias = module.bias
        self.transposed = is_conv1d(module)
        self.pattern, self.criterion, self.mitigation = pattern, criterion, mitigation
        self.name, self.stats, self.seed = name, stats, seed
        object.__setattr__(self, "original", module)  # kept out of the module tree
        self._generator: torch.Generator | None = None
        self.backend = choose_backend(backend, pattern, criterion, mitigation)
        self.forced_backend = backend == "triton"
        self._gemv_weight = self._cslt_linear = None
        self.register_buffer("criterion_vector", self.criterion_vector_of(self.dense_weight(), stats), persistent=False)
        self.mitigation_state = MitigationState()
        if mitigation.prepare is not None:
            mitigation.prepare(self)

    def __getattr__(self, name: str):
        """The layer's own parameters, buffers and children, then its mitigation state's tensors."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            state = self.__dict__.get("_modules", {}).get("mitigation_state")
            found = None if state is None else state.get(name)
            if found is None:
                raise
            return found

    @property
    def calibrated(self) -> bool:
        """Whether the mitigation state is fitted (``mitigation_state.calibrated``)."""
        return self.mitigation_state.calibrated

    @calibrated.setter
    def calibrated(self, value: bool) -> None:
        self.mitigation_state.calibrated = bool(value)

    @property
    def state_names(self) -> tuple[str, ...]:
        """The names of the mitigation state's tensors (read-only; ``mitigation_state.tensors()``)."""
        return tuple(self.mitigation_state.tensors())

    def criterion_vector_of(self, weight: torch.Tensor, stats: InputStats | None) -> torch.Tensor | None:
        """The criterion's per-feature vector of ``weight`` ``[out, in]`` and ``stats`` on the
        layer's device; None for a criterion without one."""
        if self.criterion.feature_vector is None:
            return None
        return self.criterion.feature_vector(weight, stats).to(self.weight.device)

    @property
    def feature_vector(self) -> torch.Tensor | None:
        """The vector the criterion scores with: the mitigation state's (rotation's of the rotated
        weight, a calibrated clact's norms) where it holds one, else ``criterion_vector``, the
        criterion's vector of the layer's weight (W8A8 with smoothing: of the folded weight)."""
        owned = self.mitigation_state.get(FEATURE_VECTOR)
        return self.criterion_vector if owned is None else owned

    @feature_vector.setter
    def feature_vector(self, vector: torch.Tensor | None) -> None:
        """Score with ``vector`` from now on: it replaces the state's vector where the state holds one,
        else ``criterion_vector``."""
        if self.mitigation_state.get(FEATURE_VECTOR) is not None:
            self.mitigation_state.own(FEATURE_VECTOR, vector)
        else:
            self.criterion_vector = vector

    def dense_weight(self) -> torch.Tensor:
        """The weight as ``[out, in]`` whatever the storage layout."""
        return self.weight.t() if self.transposed else self.weight

    def product(self, x: torch.Tensor, row_scale: torch.Tensor | None = None) -> torch.Tensor:
        """The wrapped layer's own ``x Wᵀ + b``; with ``row_scale`` (float32 ``[rows]``),
        ``row_scale * (x Wᵀ) + b``, scaled in float32 and written in place in x's dtype."""
        if row_scale is None and not self.transposed:
            return F.linear(x, self.weight, self.bias)
        out = x @ self.weight if self.transposed else F.linear(x, self.weight)
        if row_scale is None:
            return out if self.bias is None else out + self.bias
        scale = row_scale[:, None]
        if torch.is_grad_enabled() and (out.requires_grad or (self.bias is not None and self.bias.requires_grad)):
            out = (out.float() * scale).to(out.dtype)  # out= ops do not take part in autograd
            return out if self.bias is None else out + self.bias
        if self.bias is None:
            return torch.mul(out, scale, out=out)
        return torch.addcmul(self.bias, out, scale, out=out)

    def generator(self, device: torch.device) -> torch.Generator:
        if self._generator is None or self._generator.device != device:
            self._generator = torch.Generator(device=device).manual_seed(self.seed)
        return self._generator

    def keep(self, x: torch.Tensor) -> torch.Tensor:
        """The boolean keep-mask of rows ``x`` ``[tokens, in]``."""
        generator = self.generator(x.device) if self.criterion.random else None  # none made under torch.compile
        scores = self.criterion.score(x, self.feature_vector, generator)
        return keep_mask(scores, self.pattern)

    def prune(self, x: torch.Tensor) -> torch.Tensor:
        """``P(x)``: ``x`` with the features outside the mask set to zero."""
        return torch.where(self.keep(x), x, torch.zeros((), dtype=x.dtype, device=x.device))

    def gemv_weight(self) -> GemvWeight:
        """The transposed weight copy (and workspace) the decode GEMV reads, made on first use."""
        weight = self.dense_weight()
        if self._gemv_weight is None or self._gemv_weight.device != weight.device:
            row_sum = getattr(self, "weight_row_sum", None)
            block_o = DECODE_CHOICE.block_o(self.in_features, self.out_features, self.pattern.n, self.pattern.m)
            self._gemv_weight = GemvWeight(weight, self.bias, None if row_sum is None else row_sum.to(weight.device),
                                           block_o)  # fmt: skip
        return self._gemv_weight

    def cslt_linear(self):
        """The cuSPARSELt 2:4 product of this layer's weight (made on first use)."""
        if self._cslt_linear is None:
            bias = None if self.bias is None else self.bias.detach()
            self._cslt_linear = Cslt24Linear(self.dense_weight().detach(), bias)
        return self._cslt_linear

    def dense_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The layer without sparsity: the wrapped product, or the mitigation's ``dense_apply``."""
        if self.dense_apply is None:
            return self.product(x)
        out = self.dense_apply(x.reshape(-1, self.in_features))
        return out.reshape(*x.shape[:-1], self.out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pattern.is_dense or (self.prefill_only and x.dim() == 3 and x.shape[-2] == 1):
            return self.dense_forward(x)
        rows = x.reshape(-1, self.in_features)
        if self.backend == "triton" and runs_here(rows, self.forced_backend):
            out = triton_forward(self, rows, source=x)
        else:
            out = self.mitigation.apply(self, rows)
        return out.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (
            f"in={self.in_features}, out={self.out_features}, bias={self.bias is not None}, "
            f"pattern={self.pattern}, criterion={self.criterion.name}, mitigation={self.mitigation.name}, backend={self.backend}"
            + (", prefill_only=True" if self.prefill_only else "")
        )
