"""What an evaluation evaluates: one method object per kind of run, shared by the evaluator,
the sweep and the report.

- ``Dense()``: the dense model (its record's ``sparse_ppl`` is the dense perplexity);
- ``Activations(config)``: activation sparsity, ``sparsify_`` with a ``SparsityConfig``
  (input statistics and ``allocation="sensitivity"`` resolved on the calibration text first);
- ``Calibrated(config, options, windows, save)``: a mitigation calibrated layer by layer
  (``calibrate_`` on ``windows`` windows of calibration text), optionally saved as a state;
- ``FromState(directory, expect, backend)``: a calibrated state saved earlier;
- ``Weights(config)``: weight pruning with a ``WeightPruneConfig`` (the dense weights are
  restored afterwards).

``Evaluator.run(method)`` runs them all through one skeleton: ``check`` (the record's head
fields, and every refusal, before the dense pass), the dense pass, ``apply`` (the model made
sparse, pruned or calibrated; timed), the perplexity and the ``extra`` measurement, ``undo``.
Each record says what made it: ``method_kind`` (the ``kind`` below) and ``label``, the
method's name as the report shows it (``method_label``), so the report reads labels from the
records instead of rebuilding them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import ClassVar

from actsparse.amber.quant import QUANT_MITIGATIONS, quantize_rest_
from actsparse.baselines import WeightPruneConfig, get_pruner, prune_weights_, restore_weights_, verify_pattern
from actsparse.calibration import layerwise  # layerwise.calibrate_ looked up at each call (tests replace it)
from actsparse.calibration.layerwise import CalibrationOptions
from actsparse.calibration.mitigations import is_calibrated
from actsparse.calibration.state import check_state, check_state_text, load_state_, save_state
from actsparse.config import SparsityConfig
from actsparse.data.sources import stored_sample
from actsparse.errors import ActsparseError
from actsparse.models.discovery import find_linear_sites
from actsparse.sparsify import SparsifyReport, sparsify_, unsparsify_

TARGETS = ("dense", "activations", "weights")  # a record's ``target``
_DEFAULTS = {"roles": None, "layers": None, "skip": [], "prefill_only": False}  # config fields the label names when set


def method_label(target: str, config: dict) -> str:
    """``amber + var``; ``weights sparsegpt``; options that differ from the defaults in brackets."""
    if target == "dense":
        return "dense"
    base = f"weights {config.get('method')}" if target == "weights" else f"{config.get('criterion')} + {config.get('mitigation')}"
    extras = []
    for key, default in _DEFAULTS.items():
        value = config.get(key, default)
        if value not in (default, None, [], ()) and value != default:
            shown = ",".join(str(v) for v in value) if isinstance(value, (list, tuple)) else str(value)
            extras.append("prefill only" if key == "prefill_only" else f"{key} {shown}")
    if target == "activations" and config.get("criterion") == "random" and config.get("seed"):
        extras.append(f"seed {config['seed']}")
    return base + (f" [{'; '.join(extras)}]" if extras else "")


def record_label(record: dict) -> str:
    """A record's method label: the one it carries, or (records written before labels were) rebuilt from its config."""
    label = record.get("label")
    if isinstance(label, str):
        return label
    return method_label(record.get("target", "activations"), record["config"])


@dataclass
class Prepared:
    """What ``Method.apply`` did: the config the record holds, the report of what changed, whether
    the result is causal, the progress text; ``result``: the perplexity when none is to be measured (dense)."""

    config: object
    report: object | None
    causal: bool
    desc: str
    result: tuple | None = None  # (Perplexity, seconds)


class Method:
    """The protocol of a method object; see the module docstring."""

    target: ClassVar[str]
    kind: ClassVar[str]

    def title(self) -> str:
        """A short line for progress and errors: ``2:4 amber + none``."""
        raise NotImplementedError

    def calibrates(self) -> bool:
        """Whether the method reads calibration text (which must share nothing with the evaluation text)."""
        return False

    def check(self, evaluator) -> dict:
        """Fields of the record's head, after every check that must come before the dense pass."""
        return {}

    def apply(self, evaluator, record: dict) -> Prepared:
        """Make the model what is evaluated (on failure it leaves the model as it was)."""
        raise NotImplementedError

    def undo(self, evaluator) -> None:
        """Make the model dense again."""
        unsparsify_(evaluator.model)

    def fields(self, prepared: Prepared) -> dict:
        """The record's fields naming the method."""
        return {"method_kind": self.kind, "label": method_label(self.target, prepared.config.to_dict())}


def _causal(config: SparsityConfig) -> bool:
    return config.criterion_obj.causal and config.mitigation_obj.causal


def _activations_title(config: SparsityConfig) -> str:
    what = f"{config.pattern} {config.criterion} + {config.mitigation}"
    if getattr(config, "allocation", "uniform") != "uniform":
        what += f" ({config.allocation if isinstance(config.allocation, str) else 'per-layer'} N)"
    return what


@dataclass(frozen=True)
class Dense(Method):
    target: ClassVar[str] = "dense"
    kind: ClassVar[str] = "dense"

    def title(self) -> str:
        return "dense"

    def apply(self, evaluator, record: dict) -> Prepared:
        return Prepared(SparsityConfig(pattern="dense"), None, True, "dense", result=evaluator.dense())

    def undo(self, evaluator) -> None:
        pass


@dataclass(frozen=True)
class Activations(Method):
    """``sparsify_(model, config)``; a config whose mitigation is calibrated layer by layer is run as ``Calibrated(config)``.

    ``quantize_rest``: with a W8A8 mitigation, the decoder linear layers the config leaves dense
    run through the same mitigation without sparsity (``amber.quantize_rest_``: the whole decoder
    W8A8, the chosen layers also sparse); the record says ``quantize_rest: true``.
    ``choices``: with ``allocation="sensitivity"``, the candidate N per layer (``allocate(...,
    choices=...)``; default M/4 ... M in steps of M/8); the record's ``allocation`` lists them.
    """

    config: SparsityConfig
    quantize_rest: bool = False
    choices: tuple[int, ...] | None = None
    target: ClassVar[str] = "activations"
    kind: ClassVar[str] = "activations"

    def title(self) -> str:
        return _activations_title(self.config)

    def calibrates(self) -> bool:
        return self.config.criterion_obj.needs_calibration or self.config.mitigation_obj.needs_calibration

    def _stats(self, evaluator, config):
        if config.criterion_obj.needs_calibration or config.mitigation_obj.needs_calibration:
            return evaluator.calibration_stats()
        return None

    def check(self, evaluator) -> dict:
        config, allocation = evaluator.allocate(self.config, self.choices)
        fields = {}
        stats = self._stats(evaluator, config)  # before the dense run: it may refuse the texts
        if stats is not None:
            _, calib_spec, calib_windows, calib_seconds = stats
            fields["calibration"] = {"data": calib_spec, "windows": calib_windows, "seconds": calib_seconds}
        if allocation is not None:
            fields["allocation"] = allocation
        if self.quantize_rest:
            fields["quantize_rest"] = True
        return fields

    def apply(self, evaluator, record: dict) -> Prepared:
        config, _ = evaluator.allocate(self.config, self.choices)  # measured once, in check
        stats = self._stats(evaluator, config)
        stats = None if stats is None else stats[0]
        report = sparsify_(evaluator.model, config, stats=stats)
        if self.quantize_rest and config.mitigation in QUANT_MITIGATIONS:
            try:
                quantize_rest_(evaluator.model, config, report, stats)
            except BaseException:
                unsparsify_(evaluator.model)
                raise
        return Prepared(config, report, _causal(config), f"sparse {config.pattern} {config.criterion} {config.mitigation}")


@dataclass(frozen=True)
class Calibrated(Method):
    """Calibrate ``config`` layer by layer on ``windows`` windows of calibration text (default: the
    settings' ``calib_windows``) with ``options`` (default: the error-mitigation paper's recipe);
    ``save``: also write the calibrated state to this directory."""

    config: SparsityConfig
    options: CalibrationOptions | None = None
    windows: int | None = None
    save: str | None = None
    target: ClassVar[str] = "activations"
    kind: ClassVar[str] = "calibrated"

    def title(self) -> str:
        return _activations_title(self.config)

    def calibrates(self) -> bool:
        return True

    def _windows(self, evaluator):
        options = self.options or CalibrationOptions()
        return evaluator.calibration_windows(self.windows or evaluator.settings.calib_windows, options.seed)

    def check(self, evaluator) -> dict:
        _, allocation = evaluator.allocate(self.config)
        self._windows(evaluator)  # before the dense run: it may refuse the texts
        return {"allocation": allocation} if allocation else {}

    def apply(self, evaluator, record: dict) -> Prepared:
        config, _ = evaluator.allocate(self.config)
        windows, calib_spec = self._windows(evaluator)
        model = evaluator.model
        sites = find_linear_sites(model)  # before the swap: discovery sees the dense linear layers
        calibration = layerwise.calibrate_(
            model, config, windows, options=self.options or CalibrationOptions(), bos_id=evaluator.bos_id,
            progress=evaluator.progress,
        )  # fmt: skip
        try:
            source = evaluator.calibration_source()
            record["calibration"] = {"data": calib_spec, "data_parts": sorted(source.parts), **calibration.to_dict()}
            if self.save:
                described = {"data": calib_spec, "data_parts": record["calibration"]["data_parts"],
                             "fingerprints": stored_sample(source)}  # fmt: skip
                record["state"] = str(save_state(model, self.save, calibration=described))
            report = SparsifyReport.of(model, sites)
        except BaseException:
            unsparsify_(model)
            raise
        return Prepared(config, report, _causal(config), f"sparse {config.pattern} {config.criterion} {config.mitigation}")


@dataclass(frozen=True)
class FromState(Method):
    """A calibrated state saved by ``actsparse calibrate`` / ``save_state`` (its own config; ``expect``:
    refused unless it is this config; ``backend`` overrides its backend). Refused, before the dense
    pass, when the state is damaged, altered or made for another model, and when its calibration
    text overlaps the evaluation text."""

    directory: str
    expect: SparsityConfig | None = None
    backend: str | None = None
    target: ClassVar[str] = "activations"
    kind: ClassVar[str] = "state"

    def title(self) -> str:
        return f"state {self.directory}"

    def check(self, evaluator) -> dict:
        meta = check_state(evaluator.model, self.directory)
        check_state_text(meta, evaluator.source)
        calib = meta.get("calibration", {})
        return {
            "calibration": {k: calib.get(k) for k in ("data", "windows", "seqlen", "seconds", "options")},
            "state": str(self.directory),
        }

    def apply(self, evaluator, record: dict) -> Prepared:
        sites = find_linear_sites(evaluator.model)  # before the swap
        config = load_state_(evaluator.model, self.directory, expect=self.expect, backend=self.backend)
        try:
            report = SparsifyReport.of(evaluator.model, sites)
        except BaseException:
            unsparsify_(evaluator.model)
            raise
        desc = f"sparse {config.pattern} {config.criterion} {config.mitigation} (state)"
        return Prepared(config, report, _causal(config), desc)


@dataclass(frozen=True)
class Weights(Method):
    """Weight pruning with a ``WeightPruneConfig``; calibration windows (methods that need them) are
    ``config.calib_windows`` windows of the calibration text, chosen with ``config.seed``."""

    config: WeightPruneConfig
    target: ClassVar[str] = "weights"
    kind: ClassVar[str] = "weights"

    def title(self) -> str:
        return f"{self.config.pattern} weights {self.config.method}"

    def calibrates(self) -> bool:
        return get_pruner(self.config.method).needs_calibration

    def _windows(self, evaluator):
        return evaluator.calibration_windows(self.config.calib_windows, self.config.seed)

    def check(self, evaluator) -> dict:
        evaluator.weight_snapshot()  # the dense weights, kept before the first pruning
        fields: dict = {"method": self.config.method}
        if get_pruner(self.config.method).needs_calibration:  # before the dense run: it may refuse the texts
            start = time.perf_counter()
            windows, calib_spec = self._windows(evaluator)
            fields["calibration"] = {"data": calib_spec, "windows": len(windows), "seconds": time.perf_counter() - start}
        return fields

    def apply(self, evaluator, record: dict) -> Prepared:
        config = self.config
        windows = self._windows(evaluator)[0] if get_pruner(config.method).needs_calibration else None
        try:
            report = prune_weights_(evaluator.model, config, windows, bos_id=evaluator.bos_id, progress=evaluator.progress)
            if report.pruned:
                verify_pattern(evaluator.model, config.pattern, [s.name for s in report.pruned])
        except BaseException:
            self.undo(evaluator)
            raise
        return Prepared(config, report, True, f"weights {config.pattern} {config.method}")

    def undo(self, evaluator) -> None:
        restore_weights_(evaluator.model, evaluator.weight_snapshot())


def as_method(method) -> Method:
    """A method object from a method object or a config: ``SparsityConfig`` -> ``Activations`` (``Calibrated``
    when its mitigation is calibrated layer by layer), ``WeightPruneConfig`` -> ``Weights``."""
    if isinstance(method, Activations) and is_calibrated(method.config.mitigation):
        return Calibrated(method.config)
    if isinstance(method, Method):
        return method
    if isinstance(method, SparsityConfig):
        return as_method(Activations(method))
    if isinstance(method, WeightPruneConfig):
        return Weights(method)
    raise ActsparseError(f"cannot evaluate {method!r}: give a SparsityConfig, a WeightPruneConfig or a method object")
