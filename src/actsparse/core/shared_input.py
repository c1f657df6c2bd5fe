"""Sparse layers that read one input select its kept features once.

An attention block's q, k and v projections read the same hidden states, and so do a gated
MLP's gate and up projections. When their configs keep the same features (the same N:M, a
criterion whose score needs no per-layer vector, the same mitigation), the fast path selects
once for all of them: on decode rows one sparse GEMV over the layers' weights side by side,
and on prefill rows one sparsify pass feeding each layer's own product
(``core.dispatch.shared_outputs``). The results are those of each layer alone (the same mask,
the same formulas); only the number of launches changes.

``sparsify_`` links the layers of each such group (:func:`link_shared_input`). The layer that
is called first with an input computes every member's output and keeps the others'; a member
called with the same tensor object (and an unchanged version counter) takes its own, once. A
member called with any other input computes from that input (and keeps the others' outputs of
it instead), so a model that feeds its projections differently is still right, only not faster.
Under torch.compile the same code is traced: the identity is decided while tracing and the
shared computation is part of the graph (no graph break); the version counter cannot be read
there, so an input changed in place between two members' calls inside one compiled region would
not be noticed (no Hugging Face model does that).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from actsparse.core.dispatch import DECODE_CHOICE
from actsparse.kernels.gemv_weight import GemvWeight

if TYPE_CHECKING:
    from actsparse.core.sparse_linear import SparseLinear


def selection_key(layer: SparseLinear) -> tuple | None:
    """What decides a fast-path layer's kept features, or None when they are its own (a per-layer
    score vector, the reference backend, a dense form of its own) or when its weight is not on
    hand between calls (offloaded by accelerate: each layer's hook loads only its own weight)."""
    if layer.backend != "triton" or layer.feature_vector is not None or layer.dense_apply is not None:
        return None
    if layer.weight.is_meta:
        return None
    if layer.pattern.is_dense:
        return None
    return (
        layer.pattern.nm,
        layer.criterion,
        layer.mitigation,
        layer.prefill_only,
        layer.in_features,
        layer.weight.dtype,
        layer.weight.device,
    )


def _version(tensor: torch.Tensor) -> int | None:
    """The version counter (in-place changes bump it); None where there is none to read: inference
    tensors, and while torch.compile traces (dynamo cannot read it; the identity alone decides there)."""
    if torch.compiler.is_compiling() or tensor.is_inference():
        return None
    return tensor._version


class SharedInput:
    """Linked sparse layers that read one input and keep the same features of it."""

    def __init__(self, layers):
        self.layers = tuple(layers)
        self.in_features = self.layers[0].in_features
        widths = [layer.out_features for layer in self.layers]
        self.out_features = sum(widths)
        self.bounds = [(sum(widths[:i]), sum(widths[: i + 1])) for i in range(len(widths))]
        self._index = {id(layer): i for i, layer in enumerate(self.layers)}
        self._gemv: GemvWeight | None = None
        self._source: torch.Tensor | None = None
        self._version: int | None = None
        self._pending: dict[int, torch.Tensor] = {}  # index in layers -> output not yet taken

    @property
    def lead(self) -> SparseLinear:
        """The member whose pattern, criterion and mitigation stand for all (they are the same)."""
        return self.layers[0]

    def index(self, layer: SparseLinear) -> int:
        return self._index[id(layer)]

    def active(self) -> bool:
        """Whether the members still keep the same features (a score vector set later breaks it)."""
        return all(member.feature_vector is None for member in self.layers)

    def gemv_weight(self) -> GemvWeight:
        """The members' weights side by side (``[sum O, K]``) in the decode GEMV's layout, made on first use."""
        device = self.lead.weight.device
        if self._gemv is None or self._gemv.device != device:
            weight = torch.cat([member.dense_weight().detach() for member in self.layers])
            biases = [member.bias for member in self.layers]
            bias = None
            if any(b is not None for b in biases):
                bias = torch.cat([
                    torch.zeros(m.out_features, dtype=weight.dtype, device=weight.device) if b is None else b.detach()
                    for m, b in zip(self.layers, biases)
                ])  # fmt: skip
            sums = [getattr(member, "weight_row_sum", None) for member in self.layers]
            row_sum = None if any(s is None for s in sums) else torch.cat(sums).to(weight.device)
            pattern = self.lead.pattern
            block_o = DECODE_CHOICE.block_o(self.in_features, self.out_features, pattern.n, pattern.m)
            self._gemv = GemvWeight(weight, bias, row_sum, block_o)
        return self._gemv

    def split(self, y: torch.Tensor) -> list[torch.Tensor]:
        """Each member's columns of an output over all of them (views)."""
        return [y[:, lo:hi] for lo, hi in self.bounds]

    def take(self, layer: SparseLinear, source: torch.Tensor) -> torch.Tensor | None:
        """The output kept for ``layer`` from ``source`` (the same tensor, unchanged), once; else None."""
        if self._source is not source or _version(source) != self._version:
            return None
        out = self._pending.pop(self.index(layer), None)
        if not self._pending:
            self._source = None
        return out

    def keep(self, source: torch.Tensor, layer: SparseLinear, outputs: list[torch.Tensor]) -> torch.Tensor:
        """Keep the other members' outputs from ``source``; returns ``layer``'s."""
        own = self.index(layer)
        self._source, self._version = source, _version(source)
        self._pending = {i: out for i, out in enumerate(outputs) if i != own}
        return outputs[own]

    def clear(self) -> None:
        self._source, self._pending = None, {}


def link_shared_input(layers) -> list[SharedInput]:
    """Link the layers (which read one input) that keep the same features; returns the groups made."""
    by_key: dict[tuple, list] = {}
    for layer in layers:
        key = selection_key(layer)
        if key is not None:
            by_key.setdefault(key, []).append(layer)
    groups = []
    for members in by_key.values():
        if len(members) < 2:
            continue
        group = SharedInput(members)
        for member in members:
            member.shared_input = group
        groups.append(group)
    return groups


def unlink_shared_input(layers) -> None:
    """Every layer computes alone again (and kept outputs are dropped)."""
    for layer in layers:
        if layer.shared_input is not None:
            layer.shared_input.clear()
            layer.shared_input = None
