"""The main job: dense and sparse perplexity of one model on one text, for one or many configs.

``Evaluator`` loads the model, the evaluation windows and (when a config needs them) the
calibration statistics once, then evaluates any number of ``SparsityConfig``s against the
same dense baseline. Each evaluation returns one self-describing record. ``run_weights``
evaluates a weight pruning baseline (``WeightPruneConfig``) against the same baseline and
restores the dense weights afterwards.

Every ``run*`` takes ``extra``: a function ``(model, tokenizer) -> dict`` called while the model
is still sparse (or pruned, or calibrated), whose result is added to the record — how the
zero-shot tasks and the generation check measure the very model the perplexity was taken on.
``run_dense`` gives the dense model's record in the same form.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace

import torch

import actsparse.validate as validate
from actsparse.amber.allocation import allocate
from actsparse.artifacts import versions
from actsparse.baselines import get_pruner, prune_weights_, restore_weights_, snapshot_weights, verify_pattern
from actsparse.calibration import layerwise  # layerwise.calibrate_ looked up at each call (tests replace it)
from actsparse.calibration.collect import collect_input_stats
from actsparse.calibration.layerwise import CalibrationOptions
from actsparse.calibration.mitigations import is_calibrated
from actsparse.calibration.state import check_state, check_state_text, load_state_, save_state
from actsparse.config import SparsityConfig
from actsparse.data.sources import DEFAULT_CALIB, DEFAULT_EVAL, check_disjoint, load_text, stored_sample
from actsparse.errors import ActsparseError
from actsparse.eval.perplexity import Perplexity, encode, make_windows, perplexity
from actsparse.models import loading  # loading.load_model is looked up at each call (tests replace it)
from actsparse.models.discovery import find_linear_sites
from actsparse.models.loading import DTYPES, model_info, tokenizer_adds_bos
from actsparse.sparsify import SparsifyReport, sparsify_, unsparsify_

DEFAULT_MODEL = "smollm2-135m"
Extra = Callable[..., dict] | None  # (model, tokenizer) -> fields added to the record


@dataclass(frozen=True)
class EvalSettings:
    """Everything about an evaluation except the sparsity config."""

    model: str = DEFAULT_MODEL
    data: str = DEFAULT_EVAL
    calib_data: str = DEFAULT_CALIB
    calib_windows: int = 32
    seqlen: int = 512
    max_tokens: int | None = None
    batch_size: int = 1
    dtype: str = "float32"
    device: str = "auto"

    def __post_init__(self):
        for name in ("model", "data", "calib_data", "device"):
            validate.text(name, getattr(self, name))
        validate.whole("calib_windows", self.calib_windows)
        validate.whole("seqlen", self.seqlen, minimum=2)
        validate.whole("max_tokens", self.max_tokens, optional=True)
        validate.whole("batch_size", self.batch_size)
        if self.max_tokens is not None and self.max_tokens < self.seqlen:
            raise ActsparseError(
                f"max_tokens {self.max_tokens} is less than one window of seqlen {self.seqlen} tokens, so nothing would be "
                "evaluated; raise max_tokens or lower seqlen"
            )
        if not isinstance(self.dtype, str) or self.dtype not in DTYPES:  # a list is refused, not a TypeError
            raise ActsparseError(f"unknown dtype {self.dtype!r}; use one of: {', '.join(DTYPES)}")
        if self.device != "auto":
            try:
                torch.device(self.device)
            except (RuntimeError, ValueError) as error:
                raise ActsparseError(f"unknown device {self.device!r}; use auto, cpu, cuda or cuda:N") from error

    def resolved_device(self) -> str:
        if self.device == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise ActsparseError(f"device '{self.device}' asked for, but no CUDA device is available; use --device cpu")
        return self.device


class Evaluator:
    """One model and one evaluation text; evaluates configs against a shared dense baseline."""

    def __init__(self, settings: EvalSettings, model=None, tokenizer=None, progress: bool = True, placement: dict | None = None):
        self.settings, self.progress = settings, progress
        self.source = load_text(settings.data)  # a bad text is refused before the model loads
        start = time.perf_counter()
        if model is None:
            model, tokenizer = loading.load_model(
                settings.model, dtype=settings.dtype, device=settings.resolved_device(), **(placement or {})
            )
        self.model, self.tokenizer = model, tokenizer
        self.load_seconds = time.perf_counter() - start
        self.info = model_info(model)
        self.bos_id = tokenizer.bos_token_id if tokenizer_adds_bos(tokenizer) else None
        self.windows = make_windows(encode(tokenizer, self.source.text), settings.seqlen, settings.max_tokens)
        self._dense: tuple[Perplexity, float] | None = None
        self._stats = None
        self._calib = None  # (calibration TextSource, its tokens)
        self._weights = None  # CPU copy of the dense linear weights, taken before the first weight pruning
        self._allocations: dict = {}  # measured allocations, by what they depend on

    def _perplexity(self, desc: str) -> Perplexity:
        return perplexity(
            self.model, self.windows, bos_id=self.bos_id, batch_size=self.settings.batch_size, progress=self.progress, desc=desc
        )

    def dense(self) -> tuple[Perplexity, float]:
        """Dense perplexity and the seconds it took (computed once)."""
        if self._dense is None:
            start = time.perf_counter()
            result = self._perplexity("dense")
            self._dense = (result, time.perf_counter() - start)
        return self._dense

    def reuse_dense(self, record: dict) -> None:
        """Take the dense perplexity from an earlier record of this model, text and settings instead of
        measuring it again (a resumed table); refused when the record was made otherwise."""
        if record.get("model") != self.settings.model or record.get("data") != self.source.spec:
            raise ActsparseError(f"the record is of {record.get('model')} on {record.get('data')}, not of this evaluation")
        same = {k: v for k, v in record.get("settings", {}).items() if k != "device"} == {
            k: v for k, v in asdict(self.settings).items() if k != "device"
        }
        if not same or record.get("windows") != len(self.windows):
            raise ActsparseError("the record was evaluated with other settings; measure the dense perplexity again")
        ppl = record["dense_ppl"]
        self._dense = (Perplexity(ppl, math.log(ppl), record["tokens"], record["windows"]), record.get("dense_seconds", 0.0))

    def calibration_stats(self):
        """Input statistics on the calibration text (computed once, never on evaluation text)."""
        if self._stats is None:
            calib, tokens = self._calibration_tokens()
            windows = make_windows(tokens, self.settings.seqlen)[: self.settings.calib_windows]
            start = time.perf_counter()
            stats = collect_input_stats(self.model, windows, bos_id=self.bos_id, progress=self.progress)
            self._stats = (stats, calib.spec, len(windows), time.perf_counter() - start)
        return self._stats

    def _calibration_tokens(self):
        """The calibration text (checked disjoint from the evaluation text) and its tokens, loaded once."""
        if self._calib is None:
            calib = load_text(self.settings.calib_data)
            check_disjoint(self.source, calib)
            self._calib = (calib, encode(self.tokenizer, calib.text))
        return self._calib

    def calibration_windows(self, count: int, seed: int = 0) -> tuple[torch.Tensor, str]:
        """``count`` windows of ``seqlen`` tokens of calibration text, and its spec.

        The windows are a seeded random choice (kept in text order) among all the
        non-overlapping windows of the calibration text; all of them when it has fewer.
        """
        calib, tokens = self._calibration_tokens()
        windows = make_windows(tokens, self.settings.seqlen)
        if count < len(windows):
            chosen = torch.randperm(len(windows), generator=torch.Generator().manual_seed(seed))[:count]
            windows = windows[chosen.sort().values]
        return windows, calib.spec

    def allocate(self, config: SparsityConfig) -> tuple[SparsityConfig, dict | None]:
        """``config`` with ``allocation="sensitivity"`` resolved on the calibration text (the settings'
        ``calib_windows`` windows, never the evaluation text), and the allocation's record; any other
        config as it is, with None. Measured once per criterion, mitigation, pattern, selection and sensitivity."""
        if config.resolved:
            return config, None
        key = (config.pattern, config.criterion, config.mitigation, config.roles, config.layers, config.skip, config.seed,
               config.sensitivity)  # fmt: skip
        if key not in self._allocations:
            windows, calib_spec = self.calibration_windows(self.settings.calib_windows)
            criterion, mitigation = config.criterion_obj, config.mitigation_obj
            stats = None
            if (criterion.needs_calibration or mitigation.needs_calibration) and not mitigation.fitted:
                stats = self.calibration_stats()[0]
            start = time.perf_counter()
            resolved, allocation = allocate(self.model, config, windows, stats=stats, bos_id=self.bos_id, progress=self.progress)
            info = {**allocation.to_dict(), "data": calib_spec, "seconds": time.perf_counter() - start}
            self._allocations[key] = (resolved.allocation, info)
        allocation, info = self._allocations[key]
        return replace(config, allocation=allocation), info

    def run(self, config: SparsityConfig, with_dense: bool = True, extra: Extra = None) -> dict:
        """Evaluate one config; returns the record written to JSON.

        A mitigation calibrated layer by layer (spts, scap, rotation, lpts, oshift, ...) is
        calibrated first on the calibration text (``run_calibrated``). ``allocation="sensitivity"``
        is resolved first on the calibration text (``allocate``); the record holds the resolved
        per-layer map in its config and how it was chosen under ``allocation``.
        """
        if is_calibrated(config.mitigation):
            return self.run_calibrated(config, with_dense=with_dense, extra=extra)
        config, allocation = self.allocate(config)
        criterion, mitigation = config.criterion_obj, config.mitigation_obj
        stats, calibration = None, {}
        if criterion.needs_calibration or mitigation.needs_calibration:  # before the dense run: it may refuse the texts
            stats, calib_spec, calib_windows, calib_seconds = self.calibration_stats()
            calibration = {"calibration": {"data": calib_spec, "windows": calib_windows, "seconds": calib_seconds}}
        if allocation is not None:
            calibration["allocation"] = allocation
        record = self._record("activations", with_dense, **calibration)
        start = time.perf_counter()
        report = sparsify_(self.model, config, stats=stats)
        try:
            sparse = self._perplexity(f"sparse {config.pattern} {config.criterion} {config.mitigation}")
            measured = self._extra(extra)
        finally:
            unsparsify_(self.model)
        return self._complete(record, sparse, start, criterion.causal and mitigation.causal, config, report, measured)

    def run_calibrated(
        self,
        config: SparsityConfig,
        options=None,
        with_dense: bool = True,
        save: str | None = None,
        extra: Extra = None,
        calib_windows: int | None = None,
    ) -> dict:
        """Calibrate ``config`` layer by layer on ``calib_windows`` windows of calibration text, then evaluate.

        ``options``: ``CalibrationOptions`` (default: the error-mitigation paper's recipe); ``save``: also write the
        calibrated state to this directory; ``calib_windows``: how many windows (default: the
        settings'). The model is dense again afterwards.
        """
        options = options or CalibrationOptions()
        config, allocation = self.allocate(config)
        windows, calib_spec = self.calibration_windows(calib_windows or self.settings.calib_windows, options.seed)
        record = self._record("activations", with_dense, **({"allocation": allocation} if allocation else {}))

        sites = find_linear_sites(self.model)  # before the swap: discovery sees the dense linear layers
        start = time.perf_counter()
        calibration = layerwise.calibrate_(
            self.model, config, windows, options=options, bos_id=self.bos_id, progress=self.progress
        )
        try:
            record["calibration"] = {
                "data": calib_spec,
                "data_parts": sorted(self._calibration_tokens()[0].parts),
                **calibration.to_dict(),
            }
            if save:
                described = {
                    "data": calib_spec,
                    "data_parts": record["calibration"]["data_parts"],
                    "fingerprints": stored_sample(self._calibration_tokens()[0]),
                }
                record["state"] = str(save_state(self.model, save, calibration=described))
            report = SparsifyReport.of(self.model, sites)
            sparse = self._perplexity(f"sparse {config.pattern} {config.criterion} {config.mitigation}")
            measured = self._extra(extra)
        finally:
            unsparsify_(self.model)
        causal = config.criterion_obj.causal and config.mitigation_obj.causal
        return self._complete(record, sparse, start, causal, config, report, measured)

    def run_state(
        self,
        directory,
        expect: SparsityConfig | None = None,
        with_dense: bool = True,
        extra: Extra = None,
        backend: str | None = None,
    ) -> dict:
        """Evaluate a calibrated state saved by ``actsparse calibrate`` / ``save_state`` (its own config;
        ``backend`` overrides its backend).

        Refused, before the dense pass, when the state is damaged, altered or made for another
        model, and when its calibration text overlaps the evaluation text (by name, and by
        content where the state keeps its calibration text's fingerprints).
        """
        meta = check_state(self.model, directory)
        check_state_text(meta, self.source)
        calib = meta.get("calibration", {})
        record = self._record("activations", with_dense)
        record["calibration"] = {k: calib.get(k) for k in ("data", "windows", "seqlen", "seconds", "options")}
        record["state"] = str(directory)
        sites = find_linear_sites(self.model)  # before the swap
        start = time.perf_counter()
        config = load_state_(self.model, directory, expect=expect, backend=backend)
        try:
            report = SparsifyReport.of(self.model, sites)
            sparse = self._perplexity(f"sparse {config.pattern} {config.criterion} {config.mitigation} (state)")
            measured = self._extra(extra)
        finally:
            unsparsify_(self.model)
        causal = config.criterion_obj.causal and config.mitigation_obj.causal
        return self._complete(record, sparse, start, causal, config, report, measured)

    def run_weights(self, config, with_dense: bool = True, extra: Extra = None) -> dict:
        """Evaluate one ``WeightPruneConfig`` against the same dense baseline; the model is restored afterwards.

        The record has the keys of ``run`` plus ``target: "weights"``, ``method`` and the
        pruning details; calibration windows come from the calibration text
        (``config.calib_windows`` windows of ``seqlen`` tokens, chosen with ``config.seed``).
        """
        pruner = get_pruner(config.method)
        windows, calibration = None, {}
        if pruner.needs_calibration:  # before the dense run: it may refuse the texts
            start = time.perf_counter()
            windows, calib_spec = self.calibration_windows(config.calib_windows, config.seed)
            calibration = {"calibration": {"data": calib_spec, "windows": len(windows), "seconds": time.perf_counter() - start}}
        record = self._record("weights", with_dense, method=config.method, **calibration)
        if self._weights is None:
            self._weights = snapshot_weights(self.model)
        start = time.perf_counter()
        try:
            report = prune_weights_(self.model, config, windows, bos_id=self.bos_id, progress=self.progress)
            if report.pruned:
                verify_pattern(self.model, config.pattern, [s.name for s in report.pruned])
            pruned = self._perplexity(f"weights {config.pattern} {config.method}")
            measured = self._extra(extra)
        finally:
            restore_weights_(self.model, self._weights)
        return self._complete(record, pruned, start, True, config, report, measured)

    def run_dense(self, extra: Extra = None) -> dict:
        """The dense model's record, in the form of the others: ``sparse_ppl`` is the dense perplexity, config ``dense``."""
        dense, dense_seconds = self.dense()
        record = self._record("dense", with_dense=True)
        measured = self._extra(extra)
        record.update(
            sparse_ppl=dense.ppl, sparse_seconds=dense_seconds, tokens=dense.predicted_tokens, windows=dense.windows,
            causal=True, config=SparsityConfig(pattern="dense").to_dict(), settings=asdict(self.settings), bos=self.bos_id is not None,
            load_seconds=self.load_seconds, versions=versions(), **measured,
        )  # fmt: skip
        return record

    def _record(self, target: str, with_dense: bool, **fields) -> dict:
        """A record's common head: model, data, target (and ``fields``), plus the dense perplexity when asked."""
        record: dict = {
            "model": self.settings.model,
            "model_info": self.info,
            "data": self.source.spec,
            "target": target,
            **fields,
        }
        device_map = getattr(self.model, "hf_device_map", None)
        if device_map and (len(set(device_map.values())) > 1 or "disk" in device_map.values()):  # placed over devices / offloaded
            record["device_map"] = {name: str(device) for name, device in device_map.items()}
        if with_dense:
            dense, dense_seconds = self.dense()
            record["dense_ppl"], record["dense_seconds"] = dense.ppl, dense_seconds
        return record

    def _extra(self, extra: Extra) -> dict:
        """``extra``'s fields and ``extra_seconds``, the time it took (not counted in ``sparse_seconds``)."""
        if extra is None:
            return {}
        start = time.perf_counter()
        fields = dict(extra(self.model, self.tokenizer))
        return {**fields, "extra_seconds": time.perf_counter() - start}

    def _complete(self, record: dict, result: Perplexity, start: float, causal: bool, config, report, measured=None) -> dict:
        """Add the measured perplexity, the config, the settings, the versions and ``extra``'s fields to a record."""
        record.update(
            sparse_ppl=result.ppl,
            sparse_seconds=time.perf_counter() - start - (measured or {}).get("extra_seconds", 0.0),
            tokens=result.predicted_tokens,
            windows=result.windows,
            causal=causal,
            config=config.to_dict(),
            settings=asdict(self.settings),
            bos=self.bos_id is not None,
            load_seconds=self.load_seconds,
            versions=versions(),
            **report.to_dict(),
        )
        record.update(measured or {})
        return record
