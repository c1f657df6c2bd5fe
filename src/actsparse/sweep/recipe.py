"""The best recipe for a model, a pattern and a density budget: criterion × mitigation × allocation.

``search_recipe(search, store)`` evaluates every candidate on **selection text** — calibration
text that is neither the evaluation text nor the text the calibrations and sensitivity
curves are measured on (default Brown *lore*; checked disjoint from the evaluation text) —
ranks them by perplexity there, and evaluates only the winner on the evaluation text. Every
run goes through the sweep runner into one results store, so an interrupted search resumes,
and the winner's run uses the winner's resolved config (its per-layer map as measured at
selection), so what is reported is exactly what was chosen.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import actsparse.validate as validate
from actsparse.calibration.mitigations import ensure_mitigation, is_calibrated
from actsparse.calibration.state import state_config
from actsparse.config import SparsityConfig
from actsparse.core.patterns import parse_pattern
from actsparse.data.sources import check_disjoint, load_text
from actsparse.errors import ActsparseError
from actsparse.eval.run import EvalSettings
from actsparse.sweep.runner import run_sweep
from actsparse.sweep.spec import Run, SweepSpec
from actsparse.sweep.store import Store

DEFAULT_SELECT = "brown:lore"
CRITERIA = ("magnitude", "amber")
MITIGATIONS = ("none", "var", "lowrank")
ALLOCATIONS = ("uniform", "sensitivity")


@dataclass(frozen=True)
class RecipeSearch:
    """What to search: ``settings`` are the evaluation's (model, text, seqlen, tokens, dtype)."""

    settings: EvalSettings
    pattern: str = "8:16"
    criteria: tuple[str, ...] = CRITERIA
    mitigations: tuple[str, ...] = MITIGATIONS
    allocations: tuple[str, ...] = ALLOCATIONS
    select_data: str = DEFAULT_SELECT
    select_tokens: int = 8192

    def __post_init__(self):
        if parse_pattern(self.pattern).nm is None:
            raise ActsparseError(f"a recipe search needs an N:M pattern (the density budget), not {self.pattern}")
        for name in ("criteria", "mitigations", "allocations"):
            object.__setattr__(self, name, validate.names(name, getattr(self, name)))
            if not getattr(self, name):
                raise ActsparseError(f"{name} is empty; give at least one")
        validate.whole("select_tokens", self.select_tokens, minimum=self.settings.seqlen)
        validate.text("select_data", self.select_data)

    def selection_settings(self) -> EvalSettings:
        return replace(self.settings, data=self.select_data, max_tokens=self.select_tokens)

    def candidates(self) -> list[Run]:
        """One run per criterion × mitigation × allocation, on the selection text."""
        settings = self.selection_settings()
        runs = []
        for criterion in self.criteria:
            for mitigation in self.mitigations:
                ensure_mitigation(mitigation)
                for allocation in self.allocations:
                    config = SparsityConfig(
                        pattern=self.pattern, criterion=criterion, mitigation=mitigation, allocation=allocation
                    )
                    runs.append(Run(settings, "activations", config, calibration=_calibration(settings, mitigation)))
        return runs

    def check_texts(self) -> None:
        """The selection text must load and share nothing with the evaluation text (nor the calibration text
        when a candidate calibrates: the runner checks that one)."""
        check_disjoint(load_text(self.settings.data), load_text(self.select_data))


def _calibration(settings: EvalSettings, mitigation: str) -> dict | None:
    if not is_calibrated(mitigation):
        return None
    return {"windows": settings.calib_windows, "lr": 1e-4, "steps": None, "seed": 0}


def winner_run(search: RecipeSearch, record: dict) -> Run:
    """The winner's run on the evaluation text, with the config the selection run resolved (its per-layer map)."""
    config = state_config({"config": record["config"]})
    return Run(search.settings, "activations", config, calibration=_calibration(search.settings, config.mitigation))


def search_recipe(search: RecipeSearch, store_path, progress: bool = True, log=None) -> dict:
    """Run the search into the store at ``store_path`` (resuming it); returns
    ``{"candidates": [selection records, best first], "winner": the winner's evaluation record}``."""
    search.check_texts()
    candidates = search.candidates()
    dense = Run(search.selection_settings(), "dense", SparsityConfig(pattern="dense"))
    run_sweep(SweepSpec(name="recipe-select", runs=(dense, *candidates)), store_path, progress=progress, log=log)
    by_key = {r.get("key"): r for r in Store(store_path).records()}
    ranked = sorted((by_key[run.key] for run in candidates), key=lambda r: r["sparse_ppl"])
    final = winner_run(search, ranked[0])
    dense_eval = Run(search.settings, "dense", SparsityConfig(pattern="dense"))
    run_sweep(SweepSpec(name="recipe-winner", runs=(dense_eval, final)), store_path, progress=progress, log=log)
    by_key = {r.get("key"): r for r in Store(store_path).records()}
    return {"candidates": ranked, "winner": by_key[final.key], "select_dense_ppl": by_key[dense.key]["sparse_ppl"]}


def recipe_name(config: dict) -> str:
    """``amber + lowrank, sensitivity N`` from a record's config."""
    allocation = config.get("allocation", "uniform")
    return f"{config['criterion']} + {config['mitigation']}, {'uniform' if allocation == 'uniform' else 'per-layer'} N"
