"""Helpers over ``nn.Module`` trees that every layer may use: Linear or GPT-2 ``Conv1D``, and
putting a submodule in place by its dotted name."""

from __future__ import annotations

from torch import nn


def is_conv1d(module: nn.Module) -> bool:
    """GPT-2 style ``Conv1D``: ``y = x @ W + b`` with ``W`` stored ``[in, out]``."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def io_features(module: nn.Module) -> tuple[int, int]:
    """``(in_features, out_features)`` of a Linear or Conv1D."""
    if is_conv1d(module):
        return module.weight.shape[0], module.weight.shape[1]
    return module.in_features, module.out_features


def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put ``module`` at the dotted path ``name`` of ``model``."""
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)
