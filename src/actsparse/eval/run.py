"""The main job: dense and sparse perplexity of one model on one text, for one or many methods.

``Evaluator`` loads the model, the evaluation windows and (when a method needs them) the
calibration statistics once, then evaluates any number of methods (``eval/methods.py``:
``Dense``, ``Activations``, ``Calibrated``, ``FromState``, ``Weights``; a ``SparsityConfig`` is
``Activations``) against the same dense baseline with ``run(method)``. Each evaluation returns
one self-describing record, which names its method (``method_kind``, ``label``). ``run_dense``,
``run_calibrated``, ``run_state`` and ``run_weights`` are ``run`` of the matching method object.

``run`` takes ``extra``: a function ``(model, tokenizer) -> dict`` called while the model
is still sparse (or pruned, or calibrated), whose result is added to the record — how the
zero-shot tasks and the generation check measure the very model the perplexity was taken on.
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
from actsparse.baselines import snapshot_weights
from actsparse.calibration.collect import collect_input_stats
from actsparse.config import SparsityConfig
from actsparse.data.sources import DEFAULT_CALIB, DEFAULT_EVAL, check_disjoint, load_text
from actsparse.errors import ActsparseError
from actsparse.eval.methods import Calibrated, Dense, FromState, Method, Weights, as_method
from actsparse.eval.perplexity import Perplexity, encode, make_windows, perplexity
from actsparse.models import loading  # loading.load_model is looked up at each call (tests replace it)
from actsparse.models.loading import DTYPES, model_info, tokenizer_adds_bos

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

    def allocate(self, config: SparsityConfig, choices=None) -> tuple[SparsityConfig, dict | None]:
        """``config`` with ``allocation="sensitivity"`` resolved on the calibration text (the settings'
        ``calib_windows`` windows, never the evaluation text), and the allocation's record; any other
        config as it is, with None. ``choices``: the candidate N (``allocate``'s; default M/4 ... M in
        steps of M/8). Measured once per criterion, mitigation, pattern, selection, sensitivity and choices."""
        if config.resolved:
            return config, None
        choices = None if choices is None else tuple(sorted(set(choices)))
        key = (config.pattern, config.criterion, config.mitigation, config.roles, config.layers, config.skip, config.seed,
               config.sensitivity, choices)  # fmt: skip
        if key not in self._allocations:
            windows, calib_spec = self.calibration_windows(self.settings.calib_windows)
            criterion, mitigation = config.criterion_obj, config.mitigation_obj
            stats = None
            if (criterion.needs_calibration or mitigation.needs_calibration) and not mitigation.fitted:
                stats = self.calibration_stats()[0]
            start = time.perf_counter()
            resolved, allocation = allocate(
                self.model, config, windows, choices=choices, stats=stats, bos_id=self.bos_id, progress=self.progress
            )
            info = {**allocation.to_dict(), "data": calib_spec, "seconds": time.perf_counter() - start}
            self._allocations[key] = (resolved.allocation, info)
        allocation, info = self._allocations[key]
        return replace(config, allocation=allocation), info

    def calibration_source(self):
        """The calibration text (checked disjoint from the evaluation text), loaded once."""
        return self._calibration_tokens()[0]

    def weight_snapshot(self):
        """A CPU copy of the dense linear weights, taken once (before the first weight pruning)."""
        if self._weights is None:
            self._weights = snapshot_weights(self.model)
        return self._weights

    def run(self, method: Method | SparsityConfig, with_dense: bool = True, extra: Extra = None) -> dict:
        """Evaluate one method object (``eval/methods.py``), or one config; returns the record written to JSON.

        A ``SparsityConfig`` is ``Activations(config)``; a mitigation calibrated layer by layer
        (spts, scap, rotation, lpts, oshift, ...) is calibrated first on the calibration text
        (``Calibrated``). ``allocation="sensitivity"`` is resolved first on the calibration text
        (``allocate``); the record holds the resolved per-layer map in its config and how it was
        chosen under ``allocation``. Every method runs through the same steps: its checks and the
        record's head (before the dense pass), the dense pass, the model made sparse (timed), the
        perplexity and ``extra``, the model dense again.
        """
        method = as_method(method)
        record = self._record(method.target, with_dense or method.target == "dense", **method.check(self))
        start = time.perf_counter()
        prepared = method.apply(self, record)
        try:
            if prepared.result is None:
                result, seconds = self._perplexity(prepared.desc), None
            else:
                result, seconds = prepared.result
            measured = self._extra(extra)
        finally:
            method.undo(self)
        record.update(method.fields(prepared))
        return self._complete(record, result, start, prepared.causal, prepared.config, prepared.report, measured, seconds)

    def run_calibrated(
        self,
        config: SparsityConfig,
        options=None,
        with_dense: bool = True,
        save: str | None = None,
        extra: Extra = None,
        calib_windows: int | None = None,
    ) -> dict:
        """``run(Calibrated(config, options, calib_windows, save))``: calibrate ``config`` layer by layer
        on ``calib_windows`` windows of calibration text, then evaluate.

        ``options``: ``CalibrationOptions`` (default: the error-mitigation paper's recipe); ``save``: also write the
        calibrated state to this directory; ``calib_windows``: how many windows (default: the
        settings'). The model is dense again afterwards.
        """
        return self.run(Calibrated(config, options, calib_windows, save), with_dense=with_dense, extra=extra)

    def run_state(
        self,
        directory,
        expect: SparsityConfig | None = None,
        with_dense: bool = True,
        extra: Extra = None,
        backend: str | None = None,
    ) -> dict:
        """``run(FromState(directory, expect, backend))``: evaluate a calibrated state saved by
        ``actsparse calibrate`` / ``save_state`` (its own config; ``backend`` overrides its backend).

        Refused, before the dense pass, when the state is damaged, altered or made for another
        model, and when its calibration text overlaps the evaluation text (by name, and by
        content where the state keeps its calibration text's fingerprints).
        """
        return self.run(FromState(directory, expect, backend), with_dense=with_dense, extra=extra)

    def run_weights(self, config, with_dense: bool = True, extra: Extra = None) -> dict:
        """``run(Weights(config))``: evaluate one ``WeightPruneConfig`` against the same dense baseline;
        the model is restored afterwards.

        The record has the keys of ``run`` plus ``target: "weights"``, ``method`` and the
        pruning details; calibration windows come from the calibration text
        (``config.calib_windows`` windows of ``seqlen`` tokens, chosen with ``config.seed``).
        """
        return self.run(Weights(config), with_dense=with_dense, extra=extra)

    def run_dense(self, extra: Extra = None) -> dict:
        """``run(Dense())``: the dense model's record, in the form of the others: ``sparse_ppl`` is the
        dense perplexity, config ``dense``."""
        return self.run(Dense(), extra=extra)

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

    def _complete(
        self, record: dict, result: Perplexity, start: float, causal: bool, config, report, measured=None, seconds=None
    ) -> dict:
        """Add the measured perplexity, the config, the settings, the versions and ``extra``'s fields to a record
        (``seconds``: the measurement's time when it was not measured now, the dense record's)."""
        if seconds is None:
            seconds = time.perf_counter() - start - (measured or {}).get("extra_seconds", 0.0)
        record.update(
            sparse_ppl=result.ppl,
            sparse_seconds=seconds,
            tokens=result.predicted_tokens,
            windows=result.windows,
            causal=causal,
            config=config.to_dict(),
            settings=asdict(self.settings),
            bos=self.bos_id is not None,
            load_seconds=self.load_seconds,
            versions=versions(),
            **(report.to_dict() if report is not None else {}),
        )
        record.update(measured or {})
        return record
