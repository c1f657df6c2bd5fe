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

Every model also gets one ``dense`` run (the baseline the report compares against). A run's
``key`` is a hash of everything that changes its numbers — model, settings (not the device),
target, full config, calibration options, tasks, generation — so a store can be resumed,
and the same run listed twice is run once.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import yaml

from actsparse.config import SparsityConfig
from actsparse.core.patterns import parse_pattern
from actsparse.errors import ActsparseError
from actsparse.eval.generate import PROMPTS, GenerateSettings
from actsparse.eval.lmeval import TaskSettings
from actsparse.eval.run import EvalSettings

TARGETS = ("activations", "weights")
_TOP = {"name", "store", "models", "settings", "tasks", "generate", "grids"}
_SHARED = {"roles", "layers", "skip", "seed"}  # config fields a grid may set for all its runs
_GRID = {
    "activations": {"target", "patterns", "criteria", "mitigations", "backend", "prefill_only", "calibration", *_SHARED},
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
        return {
            "model": self.model, "settings": settings, "target": self.target, "config": self.config.to_dict(),
            "calibration": self.calibration, "tasks": tasks, "generate": self.generate.to_dict() if self.generate else None,
        }  # fmt: skip

    @property
    def key(self) -> str:
        text = json.dumps(self.identity(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()[:20]

    def label(self) -> str:
        c = self.config
        if self.target == "dense":
            what = "dense"
        elif self.target == "weights":
            what = f"{c.pattern} weights {c.method}"
        else:
            what = f"{c.pattern} {c.criterion} + {c.mitigation}"
        return f"{self.model}: {what}"


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
        raise ActsparseError(f"{where}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(sorted(allowed))}")


def _list(where: str, value, name: str) -> list:
    if value is None:
        raise ActsparseError(f"{where}: '{name}' is missing")
    items = value if isinstance(value, list) else [value]
    if not items:
        raise ActsparseError(f"{where}: '{name}' is empty")
    return [str(item) for item in items]


def _tuple_or_none(value):
    return None if value is None else tuple(value if isinstance(value, list) else [value])


def _settings(data: dict | None) -> dict:
    data = dict(data or {})
    allowed = {f.name for f in fields(EvalSettings)} - {"model"}
    _check_keys("settings", data, allowed)
    return data


def _tasks(data) -> TaskSettings:
    if data is None:
        return TaskSettings()
    if isinstance(data, list):
        data = {"names": data}
    data = dict(data)
    _check_keys("tasks", data, {"names", "task_dir", "batch_size", "limit", "proxy_seed", "proxy_count"})
    names = tuple(str(n) for n in data.pop("names", []) or [])
    return TaskSettings(tasks=names, **data)


def _generate(data) -> GenerateSettings | None:
    if not data:
        return None
    data = dict(data) if isinstance(data, dict) else {}
    _check_keys("generate", data, {"prompts", "max_new_tokens"})
    prompts = tuple(str(p) for p in data.get("prompts") or PROMPTS)
    return GenerateSettings(prompts=prompts, max_new_tokens=int(data.get("max_new_tokens", 32)))


def _grid_runs(index: int, grid: dict, settings: EvalSettings, tasks, generate) -> list[Run]:
    from actsparse.baselines import WeightPruneConfig
    from actsparse.calibration.mitigations import ensure_mitigation, is_calibrated

    where = f"grids[{index}]"
    if not isinstance(grid, dict):
        raise ActsparseError(f"{where}: expected a mapping with target, patterns, ...")
    target = grid.get("target", "activations")
    if target not in TARGETS:
        raise ActsparseError(f"{where}: target must be one of {', '.join(TARGETS)}, got {target!r}")
    _check_keys(where, grid, _GRID[target])
    patterns = [str(parse_pattern(p)) for p in _list(where, grid.get("patterns"), "patterns")]
    shared = {
        "roles": _tuple_or_none(grid.get("roles")), "layers": _tuple_or_none(grid.get("layers")),
        "skip": tuple(grid.get("skip") or ()), "seed": int(grid.get("seed", 0)),
    }  # fmt: skip
    runs = []
    if target == "weights":
        windows = int(grid.get("calib_windows", 128))
        for pattern in patterns:
            for method in _list(where, grid.get("methods"), "methods"):
                config = WeightPruneConfig(pattern=pattern, method=method, calib_windows=windows, **shared)
                runs.append(Run(settings, "weights", config, tasks, generate))
        return runs
    calibration = dict(grid.get("calibration") or {})
    _check_keys(f"{where}.calibration", calibration, _CALIBRATION)
    for pattern in patterns:
        for criterion in _list(where, grid.get("criteria"), "criteria"):
            for mitigation in _list(where, grid.get("mitigations"), "mitigations"):
                ensure_mitigation(mitigation)
                config = SparsityConfig(
                    pattern=pattern, criterion=criterion, mitigation=mitigation, backend=grid.get("backend", "auto"),
                    prefill_only=bool(grid.get("prefill_only", False)), **shared,
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
