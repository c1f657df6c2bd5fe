"""A sparse layer's mitigation state: the child module ``SparseLinear.mitigation_state``.

A ``MitigationState`` holds what a mitigation fits, learns or must carry with a saved state,
as an ``nn.Module`` of its own under its ``SparseLinear``:

- buffers (S-PTS's ``eta``, rotation's ``Q`` and ``W Q``, R-Sparse's factors, …), registered
  non-persistent, so that the model's ``state_dict`` does not change when it is sparsified;
- parameters (``nn.Parameter``): what a learned mitigation trains (L-PTS's input shift, the
  output scales and shifts), and nothing else;
- ``feature_vector``, when it holds one: the criterion scores with it instead of the vector of
  the layer's own weight (``SparseLinear.feature_vector``): rotation's vector of the rotated
  weight and inputs, a calibrated clact's channel norms;
- ``calibrated``: whether those tensors have been fitted (by ``calibrate_``, by statistics given
  to ``sparsify_``, by a loaded state); a layer that is not refuses to run.

``tensors()`` (its ``named_parameters`` and ``named_buffers``) is exactly what a saved state
holds for the layer, under ``<layer name>.<tensor name>``; training optimises ``parameters()``.
The layer reads them as its own attributes: ``layer.eta`` is ``layer.mitigation_state.eta``.

Buffers a dynamic mitigation's ``prepare`` derives at sparsify time from the weight or the input
statistics (D-PTS's row sums, smooth-static's scales, W8A8's quantised weight) are the layer's
own (``layer.register_buffer``): they are made again with the layer and are not state.
"""

from __future__ import annotations

import torch
from torch import nn

FEATURE_VECTOR = "feature_vector"  # the name of a criterion vector the state holds


class MitigationState(nn.Module):
    """The tensors a mitigation owns on one sparse layer, and whether they are fitted."""

    def __init__(self, calibrated: bool = True):
        super().__init__()
        self.calibrated = calibrated  # nothing to fit until a mitigation owns tensors it has to fit

    def own(self, name: str, tensor: torch.Tensor, parameter: bool = False) -> torch.Tensor:
        """Hold ``tensor`` under ``name``: a learned ``nn.Parameter`` (``parameter``), else a
        non-persistent buffer. Returns what is held (a second call with a name replaces it)."""
        if parameter:
            self.register_parameter(name, nn.Parameter(tensor))
        else:
            self.register_buffer(name, tensor, persistent=False)
        return getattr(self, name)

    def get(self, name: str) -> torch.Tensor | None:
        """The tensor held under ``name``, or None."""
        found = self._parameters.get(name)
        return self._buffers.get(name) if found is None else found

    def tensors(self) -> dict[str, torch.Tensor]:
        """``{name: tensor}`` of everything it holds: the parameters, then the buffers."""
        return {
            **dict(self.named_parameters(recurse=False, remove_duplicate=False)),
            **dict(self.named_buffers(recurse=False, remove_duplicate=False)),
        }

    def extra_repr(self) -> str:
        return f"calibrated={self.calibrated}, tensors=({', '.join(self.tensors())})"
