"""Models spread over several devices or offloaded by accelerate (``device_map="auto"``).

``load_model(..., device_map="auto")`` lets transformers and accelerate place the model: whole
decoder layers on the GPUs, what does not fit on the CPU or on disk. accelerate moves each
layer's inputs to its device, and the weights of offloaded layers onto it for each call
(hooks on the modules, ``module._hf_hook``). What actsparse does on top:

- ``SparseLinear`` replacing an offloaded linear layer is built with the weights on hand
  (``onloaded``) and then loads them through the original layer's hook on each call
  (``bridge_offload_``), so they stay offloaded between calls;
- the layer-by-layer procedures (calibration, weight pruning, sensitivity) run each decoder
  layer on its own device (``layer_device``); one layer's weights are on a device at a time;
- a weight changed in place (pruning) while its layer is on hand is written back to the
  offload store in CPU memory (``keep_onloaded_``), so later calls load the changed weight.
"""

from __future__ import annotations

from contextlib import ExitStack, contextmanager

import torch
from torch import nn


def offload_hook(module: nn.Module):
    """accelerate's hook of a module whose own weights are offloaded, else None."""
    hook = getattr(module, "_hf_hook", None)
    hooks = getattr(hook, "hooks", None) or (hook,)  # SequentialHook or one hook
    for one in hooks:
        if getattr(one, "offload", False) and getattr(one, "weights_map", None) is not None:
            return one
    return None


def is_offloaded(model: nn.Module) -> bool:
    return any(offload_hook(m) is not None for m in model.modules())


def layer_device(layer: nn.Module, default) -> torch.device:
    """Where ``layer`` computes: its hook's execution device, else that of its first weight not on meta."""
    hook = getattr(layer, "_hf_hook", None)
    device = getattr(hook, "execution_device", None)
    if device is not None and not (isinstance(device, dict)):
        return torch.device(device if not isinstance(device, int) else f"cuda:{device}")
    for param in layer.parameters():
        if param.device.type != "meta":
            return param.device
    return torch.device(default)


@contextmanager
def onloaded(module: nn.Module):
    """The offloaded weights of ``module`` and its submodules on their execution devices for the block."""
    with ExitStack() as stack:
        for sub in module.modules():
            if offload_hook(sub) is not None:
                from accelerate.utils import align_module_device

                stack.enter_context(align_module_device(sub))
        yield module


@torch.no_grad()
def keep_onloaded_(module: nn.Module) -> None:
    """Inside ``onloaded(module)``: write the current weights of its offloaded submodules back to
    their offload store (kept in CPU memory), so that the next load gives these values."""
    for sub in module.modules():
        hook = offload_hook(sub)
        if hook is None:
            continue
        store = hook.weights_map
        for name, param in sub.named_parameters(recurse=False):
            if param.device.type == "meta":
                continue
            key = getattr(store, "prefix", "") + name
            dataset = getattr(store, "dataset", store)
            target = getattr(dataset, "state_dict", dataset)
            target[key] = param.detach().to("cpu", copy=True)


def _load(sparse, args):
    original = sparse.original
    hook = offload_hook(original)
    hook.pre_forward(original)
    sparse._parameters["weight"] = original.weight
    if sparse._parameters.get("bias") is not None or original.bias is not None:
        sparse._parameters["bias"] = original.bias
    device = hook.execution_device
    if device is not None:
        args = tuple(a.to(device) if isinstance(a, torch.Tensor) else a for a in args)
    return args


def _unload(sparse, args, output):
    original = sparse.original
    offload_hook(original).post_forward(original, output)
    sparse._parameters["weight"] = original.weight
    if sparse._parameters.get("bias") is not None or original.bias is not None:
        sparse._parameters["bias"] = original.bias
    return output


def bridge_offload_(sparse: nn.Module, original: nn.Module) -> None:
    """Make ``sparse`` (built from ``original`` inside ``onloaded(original)``) load the offloaded
    weights through ``original``'s hook on each call, and drop its own copy of them now."""
    if offload_hook(original) is None:
        return
    sparse._parameters["weight"] = original.weight
    if original.bias is not None:
        sparse._parameters["bias"] = original.bias
    sparse.register_forward_pre_hook(_load)
    sparse.register_forward_hook(_unload)


def input_device(model: nn.Module) -> torch.device:
    """Where a model's input ids go: its input embeddings' device (their hook's, when accelerate places them)."""
    try:
        embeddings = model.get_input_embeddings()
    except (AttributeError, NotImplementedError):
        embeddings = None
    if embeddings is not None:
        return layer_device(embeddings, "cpu")
    return next(model.parameters()).device
