"""Run a sweep: each run not yet in the store is evaluated and appended to it as soon as it finishes.

Models are loaded once per sweep (runs are grouped by model, one ``Evaluator`` each, which
also shares the dense baseline, the calibration statistics and the weight snapshot among its
runs). A killed sweep loses only the run in progress; running it again skips every key the
store already holds. Runs are claimed in the store before they start (``Store.claim``), so
sweeps sharing a store split the work and never store a run twice.
"""

from __future__ import annotations

import gc
import time
from dataclasses import asdict, dataclass, field, replace

import torch
from tqdm.auto import tqdm

from actsparse.amber.allocation import default_choices
from actsparse.baselines import WeightPruneConfig
from actsparse.calibration.state import state_config
from actsparse.config import SENSITIVITY, UNIFORM
from actsparse.data.sources import check_disjoint, load_text
from actsparse.errors import ActsparseError
from actsparse.eval.lmeval import prepare_tasks, require_lm_eval
from actsparse.eval.measure import measure
from actsparse.eval.run import Evaluator
from actsparse.models.discovery import find_linear_sites
from actsparse.models.loading import model_skeleton
from actsparse.selection import choose_sites
from actsparse.sweep.spec import Run, SweepSpec
from actsparse.sweep.store import Store, default_worker


@dataclass
class SweepSummary:
    total: int
    skipped: int  # already in the store
    done: list = field(default_factory=list)  # keys run now
    failed: list = field(default_factory=list)  # (label, error text) with keep_going
    elsewhere: list = field(default_factory=list)  # keys claimed or stored by another process meanwhile

    @property
    def remaining(self) -> int:
        return self.total - self.skipped - len(self.done) - len(self.elsewhere)


def execute(evaluator, run: Run, prepared=None) -> dict:
    """Evaluate one run with an ``Evaluator`` of its model; returns the record (with the run's key and identity)."""
    record = evaluator.run(run.method(), extra=measure(prepared, run.generate))
    record.update(run.tags or {})
    record.update(key=run.key, run=run.identity())
    return record


def check_sweep(spec: SweepSpec, models: bool = True) -> None:
    """Everything about a sweep that can be checked without weights, before any model loads:
    every run's texts (loadable, and evaluation and calibration text sharing nothing where the
    run calibrates), and with ``models`` every run's config against its model's layers, built
    from the model's config without weights (``model_skeleton``)."""
    texts, checked = {}, set()

    def text(spec_):
        if spec_ not in texts:
            texts[spec_] = load_text(spec_)
        return texts[spec_]

    for run in spec.runs:
        settings, calibrates = run.settings, run.method().calibrates()
        evaluation = text(settings.data)
        if calibrates and (settings.data, settings.calib_data) not in checked:
            check_disjoint(evaluation, text(settings.calib_data))
            checked.add((settings.data, settings.calib_data))
    if not models:
        return
    for model in dict.fromkeys(run.model for run in spec.runs):
        skeleton = model_skeleton(model)
        if skeleton is None:
            continue
        sites = find_linear_sites(skeleton)
        for run in spec.runs:
            if run.model == model and run.target != "dense":
                try:
                    choose_sites(run.config, sites, what="prune" if run.target == "weights" else "sparsify")
                except ActsparseError as error:
                    raise ActsparseError(f"{run.label()}: {error}") from error


def _recorded_sensitivity(config: dict) -> str:
    """What chose a record's per-layer N: its config's ``sensitivity``; ``eq`` when the config has none
    (records written while ``eq`` was the only estimate, or the default, which configs left out)."""
    return config.get("sensitivity", "eq")


def _same_config(run: Run, config: dict) -> bool:
    try:
        if run.target == "weights":
            return WeightPruneConfig.from_dict(config).to_dict() == run.config.to_dict()
        if config.get("allocation", UNIFORM) != UNIFORM:
            config = {**config, "sensitivity": _recorded_sensitivity(config)}
        return state_config({"config": config}).to_dict() == run.config.to_dict()
    except (ActsparseError, TypeError, KeyError, ValueError):
        return False


def _same_allocation(run: Run, record: dict) -> bool:
    """For a run with ``allocation="sensitivity"``: whether the record holds a per-layer map chosen the
    way the run chooses it. Its config holds the resolved map, so the choice is read from the record's
    ``allocation`` (``settings``: measured on the calibration text, the candidate N) and from the
    config's ``sensitivity`` (``eq`` when absent); the rest of the config must be the run's."""
    config, allocation = record["config"], record.get("allocation")
    if not isinstance(config.get("allocation"), dict) or not isinstance(allocation, dict):
        return False
    chosen = allocation.get("settings") or {}
    sensitivity = _recorded_sensitivity(config)
    if chosen.get("source") != SENSITIVITY or chosen.get("sensitivity", sensitivity) != sensitivity:
        return False
    choices = sorted(set(run.choices)) if run.choices is not None else list(default_choices(run.config.pattern_obj.m))
    if chosen.get("choices") != choices:
        return False
    return _same_config(run, {**config, "allocation": SENSITIVITY, "sensitivity": sensitivity})


def matches_keyless(run: Run, record: dict) -> bool:
    """Whether ``record``, written without a run key (by a table script before the table scripts ran
    through the sweep runner), is the result of ``run``: same model, target, settings (not the
    device), config, whole-decoder W8A8 or not (``w8a8_whole_decoder`` in the Amber table's
    records), and for a calibrated run the same calibration windows and options. A run with
    ``allocation="sensitivity"`` matches a record of the map it resolved to when that map was
    chosen the same way (``_same_allocation``: the same estimate, where a config without
    ``sensitivity`` was chosen by ``eq``, and the same candidate N). Runs with tasks or a
    generation check never match (those records have neither)."""
    if "key" in record or run.tasks.tasks or run.generate is not None or "config" not in record:
        return False
    if record.get("model") != run.model or record.get("target", "activations") != run.target:
        return False
    if bool(run.quantize_rest) != bool(record.get("quantize_rest", record.get("w8a8_whole_decoder"))):
        return False
    wanted = {k: v for k, v in asdict(run.settings).items() if k != "device"}
    settings = record.get("settings") or {}
    if {k: settings.get(k, v) for k, v in wanted.items()} != wanted:
        return False
    sensitivity = run.target == "activations" and run.config.allocation == SENSITIVITY
    if not (_same_allocation(run, record) if sensitivity else _same_config(run, record["config"])):
        return False
    if run.calibration:
        calibration = record.get("calibration") or {}
        given = {"windows": calibration.get("windows"), **(calibration.get("options") or {})}
        return all(given.get(k) == v for k, v in run.calibration.items())
    return True


def done_keys(spec: SweepSpec, records: list[dict], keyless: bool = False) -> set[str]:
    """The keys of ``spec``'s runs whose results ``records`` hold: a record with the run's key, or with
    ``keyless`` also a record without a key that is the run's result (``matches_keyless``)."""
    keys = {r["key"] for r in records if "key" in r}
    done = {run.key for run in spec.runs if run.key in keys}
    if keyless:
        old = [r for r in records if "key" not in r]
        done |= {run.key for run in spec.runs if run.key not in done and any(matches_keyless(run, r) for r in old)}
    return done


def _release_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_sweep(
    spec: SweepSpec,
    store_path,
    progress: bool = True,
    keep_going: bool = False,
    log=None,
    worker: str | None = None,
    keyless: bool = False,
    evaluators: dict | None = None,
) -> SweepSummary:
    """Run every run of ``spec`` not yet in the store at ``store_path``; see the module docstring.

    Each run is claimed in the store (``Store.claim``, as ``worker``) before it starts, so
    several processes can work through one sweep on one store: each run is done and stored
    once; ``summary.elsewhere`` lists the runs another process took (or stored) meanwhile.
    With ``keyless`` (the table scripts' stores), a run whose result the store holds in a
    record without a key (``matches_keyless``) counts as done too. ``evaluators``: ``Evaluator``s
    already loaded, by model name, used instead of loading those models again.
    """
    store = Store(store_path)
    done = done_keys(spec, store.records(), keyless)
    todo = [run for run in spec.runs if run.key not in done]
    summary = SweepSummary(total=len(spec.runs), skipped=len(spec.runs) - len(todo))
    if any(run.tasks.tasks for run in todo):
        require_lm_eval()  # before the first model loads
    check_sweep(replace(spec, runs=tuple(todo)))  # texts and every config against its model's layers, before any model loads
    worker = worker or default_worker()
    bar = tqdm(total=summary.total, initial=summary.skipped, unit="run", disable=not progress, dynamic_ncols=True)
    write = log or (bar.write if progress else print)
    write(f"{summary.skipped} of {summary.total} runs already in {store.path}; {len(todo)} to go")
    try:
        for model in dict.fromkeys(run.model for run in todo):  # models in sweep order, each loaded once
            runs = [run for run in todo if run.model == model]
            evaluator, prepared = (evaluators or {}).get(model), {}
            for run in runs:
                if not store.claim(run.key, worker):  # stored or being run by another process meanwhile
                    summary.elsewhere.append(run.key)
                    bar.update(1)
                    continue
                try:
                    if evaluator is None:  # loaded only when this process has a run of the model to do
                        bar.set_description(f"{model}: loading")
                        evaluator = Evaluator(runs[0].settings, progress=False)
                    bar.set_description(run.label())
                    if run.tasks.tasks and run.tasks not in prepared:
                        prepared[run.tasks] = prepare_tasks(run.tasks, evaluator.source)
                    start = time.perf_counter()
                    record = execute(evaluator, run, prepared.get(run.tasks))
                except Exception as error:  # noqa: BLE001 - reported, and re-raised unless keep_going
                    store.release(run.key, worker)
                    if not keep_going:
                        raise
                    summary.failed.append((run.label(), f"{type(error).__name__}: {error}"))
                    write(f"FAILED {run.label()}: {type(error).__name__}: {error}")
                    bar.update(1)
                    continue
                except BaseException:
                    store.release(run.key, worker)
                    raise
                record["run_seconds"] = time.perf_counter() - start
                record["sweep"] = spec.name
                record["worker"] = worker
                if store.append(record):
                    summary.done.append(run.key)
                else:
                    summary.elsewhere.append(run.key)
                bar.update(1)
                write(_line(run, record))
            evaluator = prepared = None  # this model is done: free it before the next one loads
            _release_memory()
    finally:
        bar.close()
    return summary


def _line(run: Run, record: dict) -> str:
    text = f"{run.label():60} ppl {record['sparse_ppl']:10.3f} (dense {record['dense_ppl']:.3f})"
    for name, scores in record.get("tasks", {}).items():
        text += f"  {name} acc {scores.get('acc', float('nan')):.3f}"
    return text + f"  {record['run_seconds']:.1f} s"
