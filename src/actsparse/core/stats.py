"""Per-feature statistics of a linear layer's inputs over calibration tokens."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class InputStats:
    """Running sums over the tokens seen so far, one entry per input feature (float64).

    The sums live where the activations are (moved there on the first update), so that
    collecting statistics on a GPU costs no host copies or synchronisation. ``dtype`` and
    ``device`` (the sums' precision, and a device the inputs are moved to instead) are what
    the weight pruners' ``baselines.methods.LayerInputs`` sets (float32, its device).

    The one accumulator of layer inputs: ``calibration.mitigations.CovarianceStats`` adds what
    the calibrated mitigations collect, ``LayerInputs`` what the weight pruners need.
    """

    width: int
    tokens: int = 0
    square_sum: torch.Tensor = field(default=None)  # sum_t x_tj^2
    abs_max: torch.Tensor = field(default=None)  # max_t |x_tj|
    dtype: torch.dtype = torch.float64
    device: torch.device | str | None = None

    def __post_init__(self):
        if self.square_sum is None:
            self.square_sum = torch.zeros(self.width, dtype=self.dtype, device=self.device)
        if self.abs_max is None:
            self.abs_max = torch.zeros(self.width, dtype=self.dtype, device=self.device)

    def _rows(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` as ``[tokens, width]`` rows in the sums' dtype (on ``device`` when one is set)."""
        rows = x.detach().reshape(-1, self.width)
        return rows.to(self.dtype) if self.device is None else rows.to(self.device, self.dtype)

    def _follow(self, device: torch.device) -> None:
        """Move every tensor sum to ``device`` (the activations' device)."""
        for name, value in vars(self).items():
            if isinstance(value, torch.Tensor) and value.device != device:
                setattr(self, name, value.to(device))

    def update(self, x: torch.Tensor) -> None:
        rows = self._rows(x)
        self._follow(rows.device)
        self.tokens += rows.shape[0]
        self.square_sum += rows.square().sum(0)
        if rows.shape[0]:
            self.abs_max = torch.maximum(self.abs_max, rows.abs().amax(0))

    def feature_norm(self) -> torch.Tensor:
        """``||X_{:,j}||_2`` over the calibration tokens, float32."""
        return self.square_sum.sqrt().float()
