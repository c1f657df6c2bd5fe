"""``ActsparseConfig`` and ``ActsparseHfQuantizer``: actsparse as a transformers quantization method.

The checkpoint keeps the model's own weights under their own names (a weight-pruned or a
dense model's file looks the same), so everything but the activation sparsity is an
ordinary checkpoint. actsparse's tensors sit beside them in the same safetensors files:

- ``actsparse.state.<module>.<name>``: every tensor a calibrated mitigation owns (the
  tensors of ``save_state``), including clact's channel norms;
- ``actsparse.stats.<module>.{square_sum,abs_max,tokens}``: the calibration statistics of a
  dynamic criterion or mitigation that needs them (clact, smooth-static).

``config.json``'s ``quantization_config`` lists them (names, shapes, dtypes) next to the
``SparsityConfig``, the calibration record and the versions; loading refuses a checkpoint
whose tensors differ from that list.
"""

from __future__ import annotations

import torch
from safetensors import safe_open
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from actsparse._version import __version__
from actsparse.artifacts import versions
from actsparse.calibration.layerwise import CALIBRATION_ATTR
from actsparse.calibration.mitigations import own_feature_vector
from actsparse.calibration.state import _owned, apply_state_, state_config, uncalibrated
from actsparse.config import SparsityConfig
from actsparse.core.mitigation_state import MitigationState
from actsparse.core.stats import InputStats
from actsparse.errors import ActsparseError
from actsparse.hf import QUANT_METHOD, STATE_PREFIX
from actsparse.models.discovery import find_linear_sites
from actsparse.models.placement import offload_hook, onloaded
from actsparse.sparsify import SPARSITY_ATTR, sparse_layers, sparsify_

FORMAT_VERSION = 1
STATE = STATE_PREFIX + "state."
STATS = STATE_PREFIX + "stats."
_STATS_FIELDS = ("square_sum", "abs_max")


def _sparsity(raw: dict) -> SparsityConfig:
    fields = set(SparsityConfig.__dataclass_fields__)
    unknown = sorted(set(raw) - fields)
    if unknown:
        raise ActsparseError(
            f"unknown sparsity field(s) {', '.join(unknown)} in an actsparse quantization_config; known: {', '.join(sorted(fields))}"
        )
    return state_config({"config": raw})


class ActsparseConfig(QuantizationConfigMixin):
    """The ``quantization_config`` of an actsparse checkpoint.

    ``ActsparseConfig(pattern="8:16", criterion="amber", mitigation="var")`` (or
    ``ActsparseConfig(SparsityConfig(...))``) passed to ``from_pretrained`` sparsifies a dense
    checkpoint while it loads. ``save_pretrained`` of a sparsified model writes the rest:
    ``calibration`` (the calibration record; ``None`` for dynamic mitigations), ``tensors``
    (actsparse's tensors in the checkpoint), ``sparse_flop_fraction`` and ``versions``.
    """

    def __init__(
        self, sparsity: SparsityConfig | dict | None = None, *, calibration: dict | None = None, tensors: dict | None = None,
        sparse_flop_fraction: float | None = None, versions: dict | None = None, format_version: int = FORMAT_VERSION,
        quant_method: str = QUANT_METHOD, **fields,
    ):  # fmt: skip
        if quant_method != QUANT_METHOD:
            raise ActsparseError(f"ActsparseConfig has quant_method '{QUANT_METHOD}', got '{quant_method}'")
        if format_version > FORMAT_VERSION:
            raise ActsparseError(
                f"this checkpoint has actsparse format version {format_version}; this actsparse reads up to {FORMAT_VERSION}: upgrade actsparse"
            )
        if isinstance(sparsity, SparsityConfig):
            if fields:
                raise ActsparseError(
                    "pass either a SparsityConfig or its fields (pattern=..., criterion=...) to ActsparseConfig, not both"
                )
            config = sparsity
        else:
            config = _sparsity({**(sparsity or {}), **fields})
        self.quant_method = QUANT_METHOD
        self.format_version = format_version
        self.sparsity = config.to_dict()
        self.calibration = calibration
        self.tensors = dict(tensors or {})
        self.sparse_flop_fraction = sparse_flop_fraction
        self.versions = dict(versions or {})

    def sparsity_config(self) -> SparsityConfig:
        return _sparsity(dict(self.sparsity))

    def to_dict(self) -> dict:
        out = super().to_dict()
        out["sparsity"] = {k: list(v) if isinstance(v, tuple) else v for k, v in out["sparsity"].items()}
        return out


def sparsity_config_of(model) -> SparsityConfig | None:
    """The ``SparsityConfig`` a model was sparsified (or calibrated, or loaded) with; None when dense."""
    report = getattr(model, CALIBRATION_ATTR, None)
    if report is not None:
        return report.config
    return getattr(model, SPARSITY_ATTR, None)


def _has_state(layers) -> bool:
    return any(layer.mitigation_state.tensors() for layer in layers.values())


def _needs_stats(layer) -> bool:
    return (layer.criterion.needs_calibration or layer.mitigation.needs_calibration) and layer.stats is not None


def actsparse_tensors(model, check: bool = True, copy: bool = True) -> dict[str, torch.Tensor]:
    """actsparse's tensors of a sparsified model, under their checkpoint keys (see the module doc).

    ``check``: refuse layers that still wait for calibration (as ``save_state`` does);
    ``copy``: detached copies (for saving) rather than the tensors themselves (for listing).
    """
    layers = sparse_layers(model)
    if check:
        waiting = uncalibrated(model)
        if waiting:
            raise ActsparseError(
                f"{len(waiting)} sparse layers are not calibrated (e.g. {waiting[0]}); run actsparse.calibrate_ before saving"
            )
    tensors = {}
    if _has_state(layers):
        for layer in layers.values():
            own_feature_vector(layer)  # a calibration-dependent criterion's vector travels with the state
        tensors.update({STATE + key: t for key, t in _owned(model).items()})
    else:
        for name, layer in layers.items():
            if _needs_stats(layer):
                for field in _STATS_FIELDS:
                    tensors[f"{STATS}{name}.{field}"] = getattr(layer.stats, field)
                tensors[f"{STATS}{name}.tokens"] = torch.tensor(layer.stats.tokens, dtype=torch.int64)
    return {key: t.detach().clone().contiguous() if copy else t for key, t in tensors.items()}


def _listing(tensors: dict[str, torch.Tensor]) -> dict:
    return {key: {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")} for key, t in sorted(tensors.items())}


def _read_tensors(files) -> dict[str, torch.Tensor]:
    tensors = {}
    for path in files or ():
        if not str(path).endswith(".safetensors"):
            continue
        with safe_open(str(path), framework="pt") as handle:
            for key in handle.keys():
                if key.startswith(STATE_PREFIX):
                    tensors[key] = handle.get_tensor(key)
    return tensors


def _onload_sparse_weights(model, state_dict: dict) -> None:
    """The offloaded weights of sparse layers (accelerate's disk/CPU offload), read through the hook of
    the layer they replaced: transformers reads other offloaded weights itself, but not through our layers."""
    for name, layer in sparse_layers(model).items():
        if offload_hook(layer.original) is None:
            continue
        with onloaded(layer.original):
            for attr in ("weight", "bias"):
                value = getattr(layer.original, attr, None)
                if value is not None and f"{name}.{attr}" in state_dict:
                    state_dict[f"{name}.{attr}"] = value.detach().to("cpu", copy=True)


class ActsparseHfQuantizer(HfQuantizer):
    """Loads an actsparse checkpoint: the dense weights as usual, then ``sparsify_`` with the
    saved config and tensors; and makes ``save_pretrained`` write one."""

    requires_calibration = False

    def __init__(self, quantization_config, **kwargs):
        if isinstance(quantization_config, dict):
            quantization_config = ActsparseConfig.from_dict(quantization_config)
        super().__init__(quantization_config, **kwargs)
        self._checkpoint_files = None

    def validate_environment(self, *args, **kwargs):
        return

    def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs):
        self._checkpoint_files = list(checkpoint_files or [])
        ignore = set(getattr(model, "_keys_to_ignore_on_load_unexpected", None) or ())
        model._keys_to_ignore_on_load_unexpected = ignore | {r"^" + STATE_PREFIX.replace(".", r"\.")}
        return model

    def _process_model_after_weight_loading(self, model, **kwargs):
        qc = self.quantization_config
        config = qc.sparsity_config()
        tensors = _read_tensors(self._checkpoint_files) if self.pre_quantized else {}
        where = f"the actsparse checkpoint {getattr(model.config, 'name_or_path', '')}".rstrip()
        if self.pre_quantized and set(tensors) != set(qc.tensors):
            differ = sorted(set(tensors) ^ set(qc.tensors))
            raise ActsparseError(
                f"{where} is damaged: its safetensors files and config.json's quantization_config do not list the same actsparse "
                f"tensors (e.g. {differ[0]}); export it again"
            )
        state = {key.removeprefix(STATE): t for key, t in tensors.items() if key.startswith(STATE)}
        if qc.calibration is not None or state:
            apply_state_(model, config, state, qc.calibration or {}, where=where)
        else:
            stats = {}
            for key, t in tensors.items():
                name, _, field = key.removeprefix(STATS).rpartition(".")
                entry = stats.setdefault(name, {})
                entry[field] = int(t.item()) if field == "tokens" else t.to(torch.float64)
            built = {
                name: InputStats(v["square_sum"].numel(), v["tokens"], v["square_sum"], v["abs_max"]) for name, v in stats.items()
            }
            sparsify_(model, config, stats=built or None)
        return model

    def refresh(self, model) -> None:
        """Describe the model as it is now in ``quantization_config`` (and ``model.config``)."""
        config = sparsity_config_of(model)
        if config is None:
            return
        report = getattr(model, CALIBRATION_ATTR, None)
        layers = sparse_layers(model)
        tensors = actsparse_tensors(model, check=False, copy=False)
        calibration = report.to_dict() if report is not None else ({} if _has_state(layers) else None)

        sparse = sum(layer.in_features * layer.out_features for layer in layers.values())
        try:
            dense = sum(site.in_features * site.out_features for site in find_linear_sites(model))
        except ActsparseError:  # no dense linear layer left in the decoder layers
            dense = 0
        fraction = sparse / (sparse + dense) if sparse + dense else 0.0
        self.quantization_config = ActsparseConfig(
            config, calibration=calibration, tensors=_listing(tensors), sparse_flop_fraction=fraction, versions=versions(),
        )  # fmt: skip
        model.config.quantization_config = self.quantization_config

    def get_state_dict_and_metadata(self, model):
        if sparsity_config_of(model) is None:
            raise ActsparseError(
                "model has the actsparse quantizer but is not sparsified; call actsparse.sparsify_ (or unsparsify_ to save it dense)"
            )
        tensors = actsparse_tensors(model, check=True)
        self.refresh(model)
        state_dict = model.state_dict()
        _onload_sparse_weights(model, state_dict)
        # learned parameters are in the module tree (….mitigation_state.<name>); saved once, under actsparse.state.
        for name, module in model.named_modules():
            if isinstance(module, MitigationState):
                for key in module.state_dict():
                    state_dict.pop(f"{name}.{key}", None)
        state_dict.update(tensors)
        return state_dict, {"actsparse": __version__}

    def is_serializable(self, *args, **kwargs):
        return True

    @property
    def is_trainable(self) -> bool:
        return True


def register() -> None:
    from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING

    if AUTO_QUANTIZER_MAPPING.get(QUANT_METHOD) is not ActsparseHfQuantizer:
        AUTO_QUANTIZER_MAPPING.pop(QUANT_METHOD, None)
        AUTO_QUANTIZATION_CONFIG_MAPPING.pop(QUANT_METHOD, None)
        from transformers.quantizers.auto import register_quantization_config, register_quantizer

        register_quantization_config(QUANT_METHOD)(ActsparseConfig)
        register_quantizer(QUANT_METHOD)(ActsparseHfQuantizer)


register()
