"""The layer-by-layer pipeline shared by ``calibrate_`` and ``prune_weights_``.

- :func:`forward_window` / :func:`run_windows`: windows of token ids through a model, no KV cache;
- :func:`capture_layer_inputs`: one normal forward records what every decoder layer receives
  besides its hidden states (position embeddings, masks, ...) and the inputs of decoder
  layer 0 for every window, stopping each later forward at layer 0;
- :class:`LayerCall`: replays one decoder layer on stored inputs, a batch of windows at a time.

Both sequential procedures then walk the decoder layers in order: calibrate or prune the
layer's linear layers on its stored inputs, run the changed layer to give the next layer's
inputs, so every layer sees the outputs of the already changed layers before it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from actsparse.errors import ActsparseError
from actsparse.models.discovery import find_decoder_layers
from actsparse.models.placement import input_device


def forward_window(model: nn.Module, window: torch.Tensor, bos_id: int | None = None):
    """Run one window of token ids through ``model`` (BOS first when ``bos_id`` is given), no KV cache."""
    ids = window if bos_id is None else torch.cat([window.new_tensor([bos_id]), window])
    return model(ids.unsqueeze(0).to(input_device(model)), use_cache=False)


@torch.no_grad()
def run_windows(model: nn.Module, windows, *, bos_id: int | None = None, desc: str = "windows", progress: bool = True) -> None:
    """Run every window through ``model`` for the hooks it carries, with a progress bar."""
    for window in tqdm(windows, desc=desc, unit="window", disable=not progress):
        forward_window(model, window, bos_id)


class _Stop(Exception):
    """Raised from a hook to end a forward pass early."""


REPLAY_BATCH = 16  # windows per replayed decoder-layer call; one window's call is launch-bound on a GPU


@dataclass
class _LayerCall:
    """The arguments a decoder layer receives besides its hidden states."""

    args: tuple
    kwargs: dict
    hidden_as_kwarg: bool

    def run(self, layer: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        if self.hidden_as_kwarg:
            out = layer(*self.args, hidden_states=hidden, **self.kwargs)
        else:
            out = layer(hidden, *self.args, **self.kwargs)
        return out[0] if isinstance(out, (tuple, list)) else out

    def run_all(
        self, layer: nn.Module, inputs: list[torch.Tensor], device, cache_device, batch: int = REPLAY_BATCH
    ) -> list[torch.Tensor]:
        """``run`` over every stored input, ``batch`` windows per call (the layer's extra arguments
        are those of one window and broadcast over the batch); outputs back on ``cache_device``."""
        outputs = []
        for hidden in _batches(inputs, device, batch):
            outputs.extend(o.unsqueeze(0).to(cache_device) for o in self.run(layer, hidden))
        return outputs


def _batches(inputs: list[torch.Tensor], device, batch: int = REPLAY_BATCH):
    """The stored ``[1, T, H]`` inputs joined ``batch`` at a time into ``[b, T, H]`` on ``device``."""
    for start in range(0, len(inputs), batch):
        yield torch.cat([h.to(device) for h in inputs[start : start + batch]])


def _split_call(args: tuple, kwargs: dict) -> tuple[torch.Tensor, _LayerCall]:
    if "hidden_states" in kwargs:
        rest = {k: v for k, v in kwargs.items() if k != "hidden_states"}
        return kwargs["hidden_states"], _LayerCall(tuple(args), rest, True)
    return args[0], _LayerCall(tuple(args[1:]), dict(kwargs), False)


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (
            isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape
            and a.dtype == b.dtype and torch.equal(a, b)
        )  # fmt: skip
    if isinstance(a, (tuple, list)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if a is None or isinstance(a, (bool, int, float, str)):
        return a == b
    return type(a) is type(b)  # opaque objects (fresh per forward): same kind is all we can check


@torch.no_grad()
def capture_layer_inputs(
    model: nn.Module,
    windows: torch.Tensor,
    *,
    bos_id: int | None = None,
    cache_device: str | torch.device = "cpu",
) -> tuple[list[torch.Tensor], list[_LayerCall]]:
    """Inputs of decoder layer 0 for every window, and the extra arguments of every decoder layer."""
    _, layers = find_decoder_layers(model)
    count = len(layers)
    calls: list[_LayerCall | None] = [None] * count
    inputs: list[torch.Tensor] = []
    window_index = 0

    def hook(index):
        def fn(module, args, kwargs):
            hidden, call = _split_call(args, kwargs)
            if index == 0:
                inputs.append(hidden.detach().to(cache_device))
            if window_index == 0:
                calls[index] = call
            elif window_index == 1:
                if not (_same(call.args, calls[index].args) and _same(call.kwargs, calls[index].kwargs)):
                    raise ActsparseError(
                        f"decoder layer {index} of {type(model).__name__} receives arguments that depend on the tokens, "
                        "so it cannot be replayed one layer at a time; weight pruning with calibration does not support this model"
                    )
            if window_index >= 2 or index == count - 1:
                raise _Stop

        return fn

    handles = [layer.register_forward_pre_hook(hook(i), with_kwargs=True) for i, layer in enumerate(layers)]
    try:
        for window_index, window in enumerate(windows):  # noqa: B007  (the hooks read window_index)
            try:
                forward_window(model, window, bos_id)
            except _Stop:
                pass
    finally:
        for handle in handles:
            handle.remove()
    if any(call is None for call in calls) or len(inputs) != len(windows):
        raise ActsparseError(
            f"{type(model).__name__}: not every decoder layer ran during a forward pass; cannot prune it layer by layer"
        )
    return inputs, calls


def as_windows(calib_windows) -> torch.Tensor:
    """Calibration windows as one ``[n, seqlen]`` long tensor (a tensor, or a list of equal-length rows)."""
    if isinstance(calib_windows, torch.Tensor):
        windows = calib_windows
    else:
        try:
            windows = torch.stack([torch.as_tensor(w) for w in calib_windows])
        except (RuntimeError, TypeError) as error:
            raise ActsparseError(f"calibration windows must all have the same length ({error})") from error
    if windows.dim() != 2 or windows.shape[0] == 0:
        raise ActsparseError(
            f"calibration windows must be a [n, seqlen] tensor of token ids with n >= 1, got shape {tuple(windows.shape)}"
        )
    return windows.long()


_as_windows = as_windows  # the old private name
LayerCall = _LayerCall
