"""``calibrate_(model, config, windows)``: sparsify a model and calibrate its mitigation layer by layer (the error-mitigation paper's procedure).

For each decoder layer in order:

1. its inputs are the outputs of the already calibrated sparse layers before it (layer 0's
   inputs and every layer's extra arguments are captured once, as in weight pruning);
2. the dense decoder layer runs on them: its outputs are the targets, and (for the
   statistics-only mitigations) hooks on its linear layers collect ``CovarianceStats``;
3. its selected linear layers become ``SparseLinear`` (same seeds as ``sparsify_``), the
   statistics-only mitigations compute their tensors from the statistics (and ``clact`` its
   channel norms, from the same inputs);
4. learned mitigations train their parameters only (everything else frozen): MSE between
   the sparse and the dense decoder-layer outputs, AdamW (lr 1e-4, betas 0.9/0.95, no weight
   decay), 3% linear warm-up then linear decay to 0, batch 1 window, gradient clipping 1.0,
   ``steps`` steps (default: one pass over the windows); on CUDA each step's forward and
   backward pass is replayed as a CUDA graph (the same numbers, far fewer launches);
5. the calibrated sparse layer produces the next layer's inputs.

Calibration inputs and targets are kept on ``cache_device`` (CPU by default); one window's
activations of one decoder layer are on the compute device at a time. The model's own weights
stay where they were loaded.
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import asdict, dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

import actsparse.validate as validate
from actsparse.calibration.collect import collect_input_stats
from actsparse.calibration.mitigations import (
    CovarianceStats,
    collects,
    ensure_mitigation,
    is_calibrated,
    is_learned,
    own_feature_vector,
)
from actsparse.config import SparsityConfig
from actsparse.core.sparse_linear import SparseLinear
from actsparse.errors import ActsparseError
from actsparse.models.discovery import find_decoder_layers, find_linear_sites
from actsparse.models.placement import bridge_offload_, input_device, is_offloaded, layer_device, onloaded
from actsparse.modules import io_features, set_module
from actsparse.pipeline import as_windows, capture_layer_inputs
from actsparse.selection import choose_sites
from actsparse.sparsify import CALIBRATION_ATTR, mark_sparsified_, sparse_layers, unsparsify_  # noqa: F401  (CALIBRATION_ATTR: also imported from here)

SHOW_EVERY = 16  # training steps between loss updates of the progress bar (each one waits for the device)


@dataclass(frozen=True)
class CalibrationOptions:
    """How learned mitigations are trained (the error-mitigation paper's recipe); ``steps=None``: one pass over the windows."""

    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.0
    warmup: float = 0.03
    clip: float = 1.0
    steps: int | None = None
    seed: int = 0

    def __post_init__(self):
        validate.number("lr", self.lr, 0.0, open_low=True)
        if not isinstance(self.betas, (tuple, list)) or len(self.betas) != 2:
            raise ActsparseError(f"betas must be two numbers in [0, 1), got {self.betas!r}")
        for beta in self.betas:
            validate.number("betas entry", beta, 0.0, 1.0)
        validate.number("weight_decay", self.weight_decay, 0.0)
        validate.number("warmup", self.warmup, 0.0, 1.0)
        validate.number("clip", self.clip, 0.0, open_low=True)
        validate.whole("steps", self.steps, optional=True)
        validate.whole("seed", self.seed, minimum=None)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class CalibrationReport:
    config: SparsityConfig
    options: CalibrationOptions
    windows: int
    seqlen: int
    seconds: float = 0.0
    layers: dict = field(default_factory=dict)  # decoder index -> {"mse": ..., "first_loss": ..., "last_loss": ...}

    def to_dict(self) -> dict:
        return {
            "config": self.config.to_dict(), "options": self.options.to_dict(), "windows": self.windows, "seqlen": self.seqlen,
            "seconds": self.seconds, "layers": {str(k): v for k, v in self.layers.items()},
        }  # fmt: skip


_set_module = set_module  # the old private name


def lr_factor(step: int, total: int, warmup: float) -> float:
    """Linear warm-up over ``ceil(warmup·total)`` steps, then linear decay to 0 at ``total``."""
    warm = max(1, math.ceil(warmup * total))
    if step < warm:
        return (step + 1) / warm
    return max(0.0, (total - step) / max(1, total - warm))


def trainable_parameters(layer: nn.Module) -> list[nn.Parameter]:
    """The mitigation parameters of the SparseLinear layers inside ``layer``: their mitigation states' ``parameters()``."""
    return [p for module in layer.modules() if isinstance(module, SparseLinear) for p in module.mitigation_state.parameters()]


class _WindowLoss:
    """MSE between ``layer``'s output on one window and its target, and the gradients of ``params``
    (written to their ``.grad``). Eager: every step launches each kernel from Python."""

    def __init__(self, layer, call, params):
        self.layer, self.call, self.params = layer, call, params

    def compute(self, x: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, tuple]:
        out = self.call.run(self.layer, x)
        loss = torch.nn.functional.mse_loss(out.float(), target.float())
        return loss, torch.autograd.grad(loss, self.params)

    def __call__(self, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        loss, grads = self.compute(x, target)
        for p, g in zip(self.params, grads):
            p.grad = g
        return loss.detach()


class _GraphedWindowLoss(_WindowLoss):
    """``_WindowLoss`` captured once as a CUDA graph and replayed every step: a step of a small
    decoder layer is hundreds of tiny kernels, and launching them one by one from Python costs
    more than running them. The window is copied into static buffers; the graph writes the loss
    and the gradients into its own static tensors (the same numbers as the eager step)."""

    WARMUP = 3  # eager runs on a side stream before capture, as CUDA graphs require

    def __init__(self, layer, call, params, x: torch.Tensor, target: torch.Tensor):
        super().__init__(layer, call, params)
        self.x, self.target = x.clone(), target.clone()
        device = x.device
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(self.WARMUP):
                self.compute(self.x, self.target)
        torch.cuda.current_stream(device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.loss, self.grads = self.compute(self.x, self.target)

    def __call__(self, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        self.x.copy_(x, non_blocking=True)
        self.target.copy_(target, non_blocking=True)
        self.graph.replay()
        for p, g in zip(self.params, self.grads):
            p.grad = g  # the clipping and the optimizer read (and the clipping scales) these in place
        return self.loss.detach().clone()  # the static loss is overwritten by the next replay


def use_cuda_graph(cuda_graph: bool | None, device) -> bool:
    """Whether training steps are graphed: ``None`` means on CUDA devices; ``True`` off CUDA is refused."""
    on_cuda = torch.device(device).type == "cuda"
    if cuda_graph and not on_cuda:
        raise ActsparseError(f"cuda_graph=True needs the model on a CUDA device, it is on {device}; leave cuda_graph unset")
    return on_cuda if cuda_graph is None else cuda_graph


def _window_loss(layer, call, params, x, target, device, cuda_graph: bool | None) -> _WindowLoss:
    """The graphed step where ``use_cuda_graph`` says so and it can be captured, else eager."""
    if not use_cuda_graph(cuda_graph, device):
        return _WindowLoss(layer, call, params)
    try:
        return _GraphedWindowLoss(layer, call, params, x, target)
    except Exception as error:  # an operation that cannot be captured (a host sync, a CPU generator, ...)
        warnings.warn(
            f"calibration: the training step could not be captured as a CUDA graph ({error}); training eagerly", stacklevel=2
        )
        torch.cuda.synchronize(device)
        return _WindowLoss(layer, call, params)


def train_layer(
    layer, call, inputs, targets, options: CalibrationOptions, device, *, progress=True, desc="", cuda_graph=None
) -> dict:
    """Train the mitigation parameters of one decoder layer; everything else frozen.

    ``cuda_graph``: replay the forward and backward pass of a step as a CUDA graph (default:
    on CUDA devices; the numbers are those of the eager step)."""
    params = trainable_parameters(layer)
    if not params:
        return {}
    flags = {p: p.requires_grad for p in layer.parameters()}
    for p in layer.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    steps = options.steps if options.steps is not None else len(inputs)
    fused = all(p.is_cuda and p.dtype in (torch.float32, torch.float16, torch.bfloat16) for p in params)  # one kernel per step
    optimizer = torch.optim.AdamW(
        params, lr=options.lr, betas=options.betas, weight_decay=options.weight_decay, fused=fused or None
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, steps, options.warmup))
    order = torch.randperm(len(inputs), generator=torch.Generator().manual_seed(options.seed)).tolist()
    losses = []
    bar = tqdm(range(steps), desc=desc, unit="step", disable=not progress, leave=False)
    try:
        with torch.enable_grad():
            window_loss = _window_loss(
                layer, call, params, inputs[order[0]].to(device), targets[order[0]].to(device), device, cuda_graph
            )
            for step in bar:
                index = order[step % len(order)]
                loss = window_loss(inputs[index].to(device), targets[index].to(device))
                torch.nn.utils.clip_grad_norm_(params, options.clip)
                optimizer.step()
                scheduler.step()
                losses.append(loss)  # no host sync per step: the device runs ahead
                if step % SHOW_EVERY == 0 or step == steps - 1:
                    bar.set_postfix(loss=f"{losses[-1].item():.3e}")
    finally:
        bar.close()
        for p, flag in flags.items():
            p.requires_grad_(flag)
        for p in params:
            p.requires_grad_(False)
            p.grad = None
    return {"steps": steps, "first_loss": losses[0].item(), "last_loss": losses[-1].item()}


@torch.no_grad()
def _dense_pass(layer, call, inputs, modules: dict, needs: set, device, cache_device):
    """Dense outputs of ``layer`` on ``inputs`` (targets), and CovarianceStats of ``modules``' inputs."""
    stats = {name: CovarianceStats.collecting(io_features(m)[0], needs) for name, m in modules.items()}
    handles = []
    if needs:
        handles = [
            module.register_forward_pre_hook(lambda mod, args, kwargs, name=name: stats[name].update(args[0] if args else kwargs["input"]), with_kwargs=True)
            for name, module in modules.items()
        ]  # fmt: skip
    try:
        targets = call.run_all(layer, inputs, device, cache_device)
    finally:
        for handle in handles:
            handle.remove()
    return targets, stats


def calibrate_(
    model: nn.Module,
    config: SparsityConfig,
    calib_windows: torch.Tensor,
    *,
    options: CalibrationOptions | None = None,
    bos_id: int | None = None,
    progress: bool = True,
    cache_device: str | torch.device | None = None,
    cuda_graph: bool | None = None,
) -> CalibrationReport:
    """Sparsify ``model`` with ``config`` and calibrate its mitigation layer by layer, in place.

    ``calib_windows``: ``[n, seqlen]`` token ids from calibration text (never the evaluation
    text). Afterwards the model is sparsified as by ``sparsify_`` (undo with ``unsparsify_``)
    and ``save_state`` can write the calibrated tensors. ``cache_device``: where the windows'
    activations wait between decoder layers (default: the model's device; ``"cpu"`` offloads
    them, so that only one decoder layer's activations are on the device at a time).
    ``cuda_graph``: train the learned mitigations with each step replayed as a CUDA graph
    (default: on CUDA; ``False`` launches every kernel eagerly, for debugging).
    """
    options = options or CalibrationOptions()
    start = time.perf_counter()
    if sparse_layers(model):
        raise ActsparseError("model is already sparsified; call actsparse.unsparsify_(model) first")
    ensure_mitigation(config.mitigation)
    pattern, criterion, mitigation = config.pattern_obj, config.criterion_obj, config.mitigation_obj
    if mitigation.needs_calibration and not is_calibrated(mitigation.name):
        raise ActsparseError(
            f"mitigation '{mitigation.name}' uses whole-model input statistics; "
            "layer-by-layer calibration supports the calibrated mitigations and the dynamic ones"
        )
    windows = as_windows(calib_windows)
    sites = find_linear_sites(model)

    chosen = choose_sites(config, sites, what="calibrate", resolved=True)
    report = CalibrationReport(config, options, len(windows), windows.shape[1])
    if pattern.is_dense or not chosen:
        return report
    seeds = {site.name: config.seed + index for index, site in enumerate(chosen)}  # as sparsify_
    by_layer: dict[int, list] = {}
    for site in chosen:
        by_layer.setdefault(site.layer, []).append(site)
    needs = collects(mitigation.name)
    if criterion.needs_calibration:
        needs.add("norms")  # clact: its channel norms come from this layer's calibration inputs
    learned = is_learned(mitigation.name)

    device = model_device = input_device(model)
    cuda_graph = use_cuda_graph(cuda_graph, device)  # checked before any work
    if cuda_graph and is_offloaded(model):  # offloaded weights are copied in during each step: nothing to capture
        cuda_graph = False
    cache_device = device if cache_device is None else cache_device
    _, layers = find_decoder_layers(model)
    last = max(by_layer)
    try:
        inputs, calls = capture_layer_inputs(model, windows, bos_id=bos_id, cache_device=cache_device)
        bar = tqdm(
            total=last + 1, desc=f"calibrate {pattern} {criterion.name} {mitigation.name}", unit="layer", disable=not progress
        )
        for index, layer in enumerate(layers):
            if index > last:
                break
            device = layer_device(layer, model_device)  # each decoder layer on its own device (device_map)
            group = by_layer.get(index, [])
            if not group:
                if index < last:
                    with torch.no_grad():
                        inputs = calls[index].run_all(layer, inputs, device, cache_device)
                bar.update(1)
                continue
            modules = {s.name: model.get_submodule(s.name) for s in group}
            targets, stats = _dense_pass(layer, calls[index], inputs, modules, needs, device, cache_device)
            for site in group:
                with onloaded(modules[site.name]):
                    sparse = SparseLinear(
                        modules[site.name], config.pattern_of(site.role, site.layer), criterion, mitigation, name=site.name, stats=stats[site.name],
                        seed=seeds[site.name], backend=config.backend, prefill_only=config.prefill_only,
                    )  # fmt: skip
                bridge_offload_(sparse, modules[site.name])
                own_feature_vector(sparse)  # clact's norms are saved with the state
                sparse.stats = None  # the statistics are folded into the mitigation's tensors
                set_module(model, site.name, sparse)
            del stats
            info = {}
            if learned:
                for site in group:  # trained from the no-op initialisation
                    model.get_submodule(site.name).calibrated = True
                info = train_layer(
                    layer,
                    calls[index],
                    inputs,
                    targets,
                    options,
                    device,
                    progress=progress,
                    desc=f"layer {index}",
                    cuda_graph=cuda_graph,
                )
            with torch.no_grad():
                outputs = calls[index].run_all(layer, inputs, device, cache_device)
                errors = [torch.nn.functional.mse_loss(out.float(), target.float()) for out, target in zip(outputs, targets)]
            info["mse"] = torch.stack(errors).mean().item()
            report.layers[index] = info
            bar.set_postfix(mse=f"{info['mse']:.3e}")
            bar.update(1)
            inputs = outputs if index < last else None
            del targets
        bar.close()
    except BaseException:
        unsparsify_(model)
        raise
    report.seconds = time.perf_counter() - start
    setattr(model, CALIBRATION_ATTR, report)
    mark_sparsified_(model, config)
    return report


@torch.no_grad()
def collect_covariance_stats(
    model: nn.Module, windows: torch.Tensor, mitigation: str, *, bos_id: int | None = None, progress: bool = True
) -> dict[str, CovarianceStats]:
    """``CovarianceStats`` of every decoder linear layer's inputs in the *dense* model, for ``sparsify_(..., stats=...)``.

    What is collected follows ``mitigation`` (covariance for rotation, token rows for scap).
    ``calibrate_`` is the error-mitigation paper's procedure (statistics from the sparse upstream layers); this is
    the one-pass alternative for the statistics-only mitigations.
    """
    needs = collects(ensure_mitigation(mitigation))

    def make(site):
        return CovarianceStats.collecting(site.in_features, needs)

    return collect_input_stats(model, as_windows(windows), bos_id=bos_id, progress=progress, make=make)
