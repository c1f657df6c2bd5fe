"""A sweep file, and the runs it expands into.

A sweep file (YAML) names models, shared evaluation settings, optional lm-eval tasks and
generation check, and a list of grids; each grid is a product of patterns × criteria ×
mitigations (``target: activations``) or patterns × methods (``target: weights``)::

    models: [smollm2-135m, gemma3-270m]
    settings: {data: brown:news, seqlen: 512, max_tokens: 32768}
    tasks: {names: [actsparse_lastword, actsparse_continuation], batch_size: 16}
    generate: {max_new_tokens: 32}
    grids:
      - {target: activations, patterns: ["2:4", "8:16"], criteria: [magnitude, amber], mitigations: [none, var]}
      - {target: weights, patterns: ["2:4"], methods: [magnitude, wanda, sparsegpt], calib_windows: 128}
      - {target: activations, patterns: ["8:16"], criteria: [amber], mitigations: [lowrank], allocations: [uniform, sensitivity]}

``allocations`` (default ``[uniform]``): ``sensitivity`` runs choose N per layer on the
calibration text with the pattern as the average (``SparsityConfig.allocation``).

Every model also gets one ``dense`` run (the baseline the report compares against). A run's
``key`` is a hash of everything that changes its numbers — model, settings (not the device),
target, full config, calibration options, tasks, generation — so a store can be resumed,
and the same run listed twice is run once.
"""

from __future__ import annotations

import hashlib
import json
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import yaml

import actsparse.validate as validate
from actsparse.baselines import WeightPruneConfig
from actsparse.calibration.layerwise import CalibrationOptions
from actsparse.calibration.mitigations import ensure_mitigation, is_calibrated
from actsparse.config import SparsityConfig
from actsparse.core.patterns import parse_pattern
from actsparse.errors import ActsparseError
from actsparse.eval.generate import PROMPTS, GenerateSettings
from actsparse.eval.lmeval import TaskSettings
from actsparse.eval.methods import Activations, Calibrated, Dense, Weights
from actsparse.eval.run import EvalSettings

TARGETS = ("activations", "weights")
_TOP = {"name", "store", "models", "settings", "tasks", "generate", "grids"}
_SHARED = {"roles", "layers", "skip", "seed"}  # config fields a grid may set for all its runs
_GRID = {
    "activations": {
        "target",
        "patterns",
        "criteria",
        "mitigations",
        "allocations",
        "backend",
        "prefill_only",
        "calibration",
        *_SHARED,
    },
    "weights": {"target", "patterns", "methods", "calib_windows", *_SHARED},
}
_CALIBRATION = {"windows", "lr", "steps", "seed"}


@dataclass(frozen=True)
class Run:
    """One evaluation of a sweep: a model, a target and its config, and what to measure."""

    settings: EvalSettings
    target: str  # dense, activations or weights
    config: object  # SparsityConfig (dense, activations) or WeightPruneConfig (weights)
    tasks: TaskSettings = field(default_factory=TaskSettings)
    generate: GenerateSettings | None = None
    calibration: dict | None = None  # calibrated mitigations: {"windows": ..., "lr": ..., "steps": ..., "seed": ...}
    save: str | None = None  # calibrated mitigations: also write the state here (not part of the key)
    quantize_rest: bool = False  # W8A8 mitigations: the layers left dense run W8A8 too (Activations.quantize_rest)
    choices: tuple[int, ...] | None = None  # allocation="sensitivity": the candidate N (Activations.choices; default M/4 ... M)
    tags: dict | None = None  # fields added to the record as they are (a table's row names; not part of the key)

    @property
    def model(self) -> str:
        return self.settings.model

    def identity(self) -> dict:
        """Everything that changes this run's numbers, as plain JSON (the device is not part of it)."""
        settings = {k: v for k, v in asdict(self.settings).items() if k != "device"}
        tasks = None
        if self.tasks.tasks:
            tasks = {k: v for k, v in self.tasks.to_dict().items() if k != "task_dir"}
            tasks["tasks"] = sorted(tasks["tasks"])
        identity = {
            "model": self.model, "settings": settings, "target": self.target, "config": self.config.to_dict(),
            "calibration": self.calibration, "tasks": tasks, "generate": self.generate.to_dict() if self.generate else None,
        }  # fmt: skip
        if self.quantize_rest:  # only when set: the keys of every other run stay what they were
            identity["quantize_rest"] = True
        if self.choices is not None:  # the same
            identity["choices"] = sorted(set(self.choices))
        return identity

    @property
    def key(self) -> str:
        text = json.dumps(self.identity(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()[:20]

    def method(self):
        """The method object the evaluator runs (``eval/methods.py``)."""
        if self.target == "dense":
            return Dense()
        if self.target == "weights":
            return Weights(self.config)
        if is_calibrated(self.config.mitigation):
            if self.choices is not None:
                raise ActsparseError(f"{self.config.mitigation} is calibrated layer by layer: no allocation choices")
            calibration = self.calibration or {}
            options = CalibrationOptions(**{k: v for k, v in calibration.items() if k != "windows"})
            return Calibrated(self.config, options, calibration.get("windows"), self.save)
        return Activations(self.config, quantize_rest=self.quantize_rest, choices=self.choices)

    def label(self) -> str:
        return f"{self.model}: {self.method().title()}"


@dataclass(frozen=True)
class SweepSpec:
    """A parsed sweep file: runs in order (per model: dense first, then the grids in file order)."""

    name: str
    runs: tuple[Run, ...]
    store: str | None = None
    models: tuple[str, ...] = ()

    def with_tasks(self, tasks: tuple[str, ...]) -> SweepSpec:
        """The same sweep with other lm-eval task names (``()``: no tasks); other task settings kept."""
        runs = tuple(replace(run, tasks=replace(run.tasks, tasks=tuple(tasks))) for run in self.runs)
        return replace(self, runs=_unique(runs))

    def with_device(self, device: str) -> SweepSpec:
        """The same runs on another device (keys do not change)."""
        return replace(self, runs=tuple(replace(run, settings=replace(run.settings, device=device)) for run in self.runs))


def _unique(runs) -> tuple[Run, ...]:
    seen, out = set(), []
    for run in runs:
        if run.key not in seen:
            seen.add(run.key)
            out.append(run)
    return tuple(out)


def _check_keys(where: str, given: dict, allowed: set) -> None:
    unknown = sorted(set(given) - allowed)
    if unknown:
        prefix = f"{where}: " if where else ""
        raise ActsparseError(f"{prefix}unknown key(s) {', '.join(unknown)}; allowed: {', '.join(sorted(allowed))}")


def _list(where: str, value, name: str) -> list[str]:
    if value is None:
        raise ActsparseError(f"{where}: '{name}' is missing")
    items = value if isinstance(value, list) else [value]
    if not items:
        raise ActsparseError(f"{where}: '{name}' is empty")
    for item in items:
        if isinstance(item, int) and not isinstance(item, bool) and name == "patterns":
            raise ActsparseError(f'{where}: pattern {item} is a number (YAML reads an unquoted 2:4 as 124); quote it, e.g. "2:4"')
        if not isinstance(item, str) or not item.strip():
            raise ActsparseError(f"{where}: every entry of '{name}' must be a name, got {item!r}")
    return items


def _mapping(where: str, value) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ActsparseError(f"{where} must be a mapping (key: value, ...), got {value!r}")
    return dict(value)


@contextmanager
def _at(where: str):
    """Prefix the message of an ``ActsparseError`` raised inside with where it comes from in the file."""
    try:
        yield
    except ActsparseError as error:
        raise ActsparseError(f"{where}: {error}") from error


def _settings(data) -> dict:
    data = _mapping("settings", data)
    allowed = {f.name for f in fields(EvalSettings)} - {"model"}
    _check_keys("settings", data, allowed)
    with _at("settings"):
        EvalSettings(**data)  # every value checked now, whatever the model
    return data


def _tasks(data) -> TaskSettings:
    if data is None:
        return TaskSettings()
    if isinstance(data, list):
        data = {"names": data}
    data = _mapping("tasks", data)
    _check_keys("tasks", data, {"names", "task_dir", "batch_size", "limit", "proxy_seed", "proxy_count"})
    with _at("tasks"):
        names = validate.names("names", data.pop("names", None) or [])
        return TaskSettings(tasks=names, **data)


def _generate(data) -> GenerateSettings | None:
    if data is None or data is False:
        return None
    data = {} if data is True else _mapping("generate", data)
    _check_keys("generate", data, {"prompts", "max_new_tokens"})
    with _at("generate"):
        prompts = validate.names("prompts", data.get("prompts") or list(PROMPTS))
        return GenerateSettings(prompts=prompts, max_new_tokens=data.get("max_new_tokens", 32))


def _grid_runs(index: int, grid: dict, settings: EvalSettings, tasks, generate) -> list[Run]:
    with _at(f"grids[{index}]"):
        return _grid_runs_checked(grid, settings, tasks, generate)


def _grid_runs_checked(grid: dict, settings: EvalSettings, tasks, generate) -> list[Run]:
    if not isinstance(grid, dict):
        raise ActsparseError("expected a mapping with target, patterns, ...")
    target = grid.get("target", "activations")
    if target not in TARGETS:
        raise ActsparseError(f"target must be one of {', '.join(TARGETS)}, got {target!r}")
    _check_keys("", grid, _GRID[target])
    patterns = [str(parse_pattern(p)) for p in _list("patterns", grid.get("patterns"), "patterns")]
    shared = {
        "roles": grid.get("roles"),
        "layers": grid.get("layers"),
        "skip": grid.get("skip") or (),
        "seed": grid.get("seed", 0),
    }
    runs = []
    if target == "weights":
        windows = grid.get("calib_windows", 128)
        for pattern in patterns:
            for method in _list("methods", grid.get("methods"), "methods"):
                config = WeightPruneConfig(pattern=pattern, method=method, calib_windows=windows, **shared)
                runs.append(Run(settings, "weights", config, tasks, generate))
        return runs
    calibration = _mapping("calibration", grid.get("calibration"))
    _check_keys("calibration", calibration, _CALIBRATION)
    with _at("calibration"):
        validate.whole("windows", calibration.get("windows", settings.calib_windows))
        CalibrationOptions(**{k: v for k, v in calibration.items() if k != "windows"})
    for pattern in patterns:
        for criterion in _list("criteria", grid.get("criteria"), "criteria"):
            for mitigation in _list("mitigations", grid.get("mitigations"), "mitigations"):
                for allocation in _list("allocations", grid.get("allocations", ["uniform"]), "allocations"):
                    ensure_mitigation(mitigation)
                    config = SparsityConfig(
                        pattern=pattern, criterion=criterion, mitigation=mitigation, backend=grid.get("backend", "auto"),
                        prefill_only=grid.get("prefill_only", False), allocation=allocation, **shared,
                    )  # fmt: skip
                    options = None
                    if is_calibrated(mitigation):
                        options = {"windows": settings.calib_windows, "lr": 1e-4, "steps": None, "seed": 0, **calibration}
                    runs.append(Run(settings, "activations", config, tasks, generate, options))
    return runs


def parse_sweep(data: dict, name: str = "sweep") -> SweepSpec:
    """Expand a sweep (the YAML's mapping) into its runs; every config is validated here, before any model loads."""
    if not isinstance(data, dict):
        raise ActsparseError("a sweep file must be a YAML mapping with models, settings, grids, ...")
    _check_keys("sweep", data, _TOP)
    models = _list("sweep", data.get("models"), "models")
    for key in ("name", "store"):
        if data.get(key) is not None and (not isinstance(data[key], str) or not data[key].strip()):
            raise ActsparseError(f"sweep: '{key}' must be a non-empty string, got {data[key]!r}")
    settings = _settings(data.get("settings"))
    tasks, generate = _tasks(data.get("tasks")), _generate(data.get("generate"))
    grids = data.get("grids") or []
    if not isinstance(grids, list):
        raise ActsparseError("sweep: 'grids' must be a list of grids")
    runs = []
    for model in models:
        model_settings = EvalSettings(model=model, **settings)
        runs.append(Run(model_settings, "dense", SparsityConfig(pattern="dense"), tasks, generate))
        for index, grid in enumerate(grids):
            runs += _grid_runs(index, grid, model_settings, tasks, generate)
    return SweepSpec(name=str(data.get("name", name)), runs=_unique(runs), store=data.get("store"), models=tuple(models))


def load_sweep(path) -> SweepSpec:
    """Read and expand a sweep file."""
    path = Path(path)
    if not path.is_file():
        raise ActsparseError(f"no sweep file {str(path)!r}; see sweeps/ for examples")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ActsparseError(f"{path} is not valid YAML: {e}") from e
    return parse_sweep(data, name=path.stem)
