"""Equal-budget comparison: uniform N:M, N per layer by sensitivity, Amber's layer skipping, SparseGPT, the recipe search.

    .venv/bin/python scripts/allocation_table.py --model smollm2-135m --max-tokens 32768 --calib-windows 8 --out results/allocation-smollm2-135m.jsonl

Every row has the same FLOP-weighted density of the decoder's linear-layer inputs (the
pattern's N/M, default 8:16 = 50%), on every projection of every layer:

- uniform: every layer at the pattern (amber + none, amber + lowrank);
- sensitivity: N per layer chosen from e_q curves on the calibration text (``allocation="sensitivity", sensitivity="eq"``);
- Fisher: N per layer chosen from the Fisher estimates of the loss increase on the calibration
  text (``allocation="sensitivity", sensitivity="fisher"``; rows 6 and 7, after the others so
  that the numbers of the earlier rows keep their meaning); row 8 the same with every N from
  M/4 to M as a candidate (``Run.choices``, ``allocate(..., choices=...)``), not only M/4 … M in steps of M/8;
- Amber's layer skipping at the same density: the least sensitive layers at ``--low`` (default
  4:16), the others dense, the FLOP fraction chosen so that the density is the pattern's
  (``budget_skip`` on e_q measured at ``--low``; the exact density reached is reported);
- SparseGPT weight pruning at the pattern: read from ``results/weights-MODEL.jsonl`` when that
  store has it (the weights table's run: the same settings, 128 calibration windows;
  ``--sparsegpt run`` runs it here instead);
- the recipe search's winner (``actsparse recipe``: criteria × mitigations × allocations,
  selected on ``--select-data``, the winner evaluated on ``--data``), its store beside ``--out``.

The rows are sweep runs (``runs``), each tagged with its row, and go through the sweep runner
into the store, so running the command again skips what is there; records written before the
script used the sweep runner, without a run key, count too (``sweep.runner.matches_keyless``:
a per-layer row is matched by how its map was chosen, its estimate and candidate N, ``eq``
where its config names no sensitivity). Amber's layer skipping needs its choice of layers
first: that measurement is appended to the store at once, a record of its own (kind
``sensitivity``), and made only when the store has none (stores written before hold it in the
row's own record, ``budget``). The SparseGPT row is copied in, and the recipe search's winner
(the search resumes from its own store), once each. The Markdown table is printed at the end
and written beside the store as .md.
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import asdict, replace
from pathlib import Path

from actsparse.amber import budget_skip, measure_sensitivity
from actsparse.artifacts import append_jsonl_atomic, read_jsonl, versions
from actsparse.baselines import WeightPruneConfig
from actsparse.cli.options import add_eval_options, settings_from
from actsparse.config import SparsityConfig
from actsparse.core.patterns import parse_pattern
from actsparse.eval.run import Evaluator
from actsparse.models.discovery import find_linear_sites
from actsparse.sweep import Run, Store, SweepSpec, run_sweep
from actsparse.sweep.recipe import DEFAULT_SELECT, RecipeSearch, recipe_name, search_recipe
from actsparse.sweep.runner import done_keys, matches_keyless

ROWS = (
    "uniform, amber + none",
    "uniform, amber + lowrank",
    "sensitivity N, amber + none",
    "sensitivity N, amber + lowrank",
    "Amber layer skipping, amber + lowrank",
    "Fisher N, amber + none",
    "Fisher N, amber + lowrank",
    "Fisher N in steps of 1, amber + lowrank",
)
SHOWN = (*ROWS[:4], *ROWS[5:], ROWS[4])  # the table's order: the per-layer rows together
SKIP_ROW, FINE_ROW = ROWS[4], ROWS[7]
SPARSEGPT_ROW, RECIPE_ROW = "SparseGPT weights", "recipe search winner"
SPARSEGPT_WINDOWS = 128  # calibration windows of the SparseGPT row (the weights table's)


def plan(pattern: str) -> dict[str, SparsityConfig]:
    """The config of every row but Amber's layer skipping (whose layers are measured first)."""
    eq = {"allocation": "sensitivity", "sensitivity": "eq"}
    fisher = {"allocation": "sensitivity", "sensitivity": "fisher"}
    return {
        ROWS[0]: SparsityConfig(pattern=pattern, criterion="amber"),
        ROWS[1]: SparsityConfig(pattern=pattern, criterion="amber", mitigation="lowrank"),
        ROWS[2]: SparsityConfig(pattern=pattern, criterion="amber", **eq),
        ROWS[3]: SparsityConfig(pattern=pattern, criterion="amber", mitigation="lowrank", **eq),
        ROWS[5]: SparsityConfig(pattern=pattern, criterion="amber", **fisher),
        ROWS[6]: SparsityConfig(pattern=pattern, criterion="amber", mitigation="lowrank", **fisher),
        FINE_ROW: SparsityConfig(pattern=pattern, criterion="amber", mitigation="lowrank", **fisher),
    }


def fine_choices(pattern: str) -> tuple[int, ...]:
    """Row 8's candidate N: every N from M/4 to M."""
    m = parse_pattern(pattern).m
    return tuple(range(max(1, m // 4), m + 1))


def skip_fraction(pattern: str, low: str) -> float:
    """The FLOP fraction at ``low`` that gives the pattern's density, the others dense."""
    return (1 - parse_pattern(pattern).density) / (1 - parse_pattern(low).density)  # density = 1 - fraction * (1 - low density)


def skip_config(low: str, skip) -> SparsityConfig:
    return SparsityConfig(pattern=low, criterion="amber", mitigation="lowrank", skip=tuple(skip))


def runs(settings, pattern: str, low: str, rows=ROWS, budget: dict | None = None) -> list[Run]:
    """The table's rows as sweep runs, in the order of ``rows``, each tagged with its row (``kind: run``).
    Amber's layer skipping takes its layers from ``budget`` (``skip_choice`` or ``measure_skip``),
    which its record keeps."""
    configs, out = plan(pattern), []
    for row in rows:
        tags = {"kind": "run", "row": row}
        if row == SKIP_ROW:
            if budget is None:
                raise ValueError(f"{SKIP_ROW}: its layers are measured first; pass their budget")
            out.append(Run(settings, "activations", skip_config(low, budget["skip"]), tags={**tags, "budget": budget}))
            continue
        choices = fine_choices(pattern) if row == FINE_ROW else None
        out.append(Run(settings, "activations", configs[row], choices=choices, tags=tags))
    return out


def sparsegpt_runs(settings, pattern: str) -> tuple[Run, Run]:
    """The SparseGPT row: as ``--sparsegpt run`` runs it here, and as the weights table runs it (its
    settings' calibration windows are the pruning's), the record ``--sparsegpt store`` copies in."""
    config = WeightPruneConfig(pattern=pattern, method="sparsegpt", calib_windows=SPARSEGPT_WINDOWS)
    tags = {"kind": "run", "row": SPARSEGPT_ROW, "density": parse_pattern(pattern).density}
    return (
        Run(settings, "weights", config, tags=tags),
        Run(replace(settings, calib_windows=SPARSEGPT_WINDOWS), "weights", config),
    )


def holds(record: dict, run: Run) -> bool:
    """Whether ``record`` is the result of ``run``: it has the run's key, or it has none and is the same run
    (``matches_keyless``), as for the sweep runner."""
    return record.get("key") == run.key or matches_keyless(run, record)


def _same_settings(record: dict, settings) -> bool:
    wanted = {k: v for k, v in asdict(settings).items() if k != "device"}
    return {k: v for k, v in (record.get("settings") or {}).items() if k != "device"} == wanted


def skip_choice(records: list[dict], settings, low: str, fraction: float) -> dict | None:
    """The layers of Amber's layer skipping (a ``budget``) measured earlier on these settings'
    calibration text, at ``low`` and for ``fraction``: the store's record of that measurement, or in a
    store written before there was one, the row's own record."""

    def fits(record) -> bool:
        budget = record.get("budget")
        return (
            isinstance(budget, dict)
            and _same_settings(record, settings)
            and math.isclose(budget.get("target_fraction", math.nan), fraction)
        )

    for record in records:
        if record.get("kind") == "sensitivity" and record.get("row") == SKIP_ROW and record.get("pattern") == low:
            if fits(record):
                return record["budget"]
    for record in records:
        if record.get("kind") == "run" and record.get("row") == SKIP_ROW and fits(record):
            run = Run(settings, "activations", skip_config(low, record["budget"]["skip"]))
            if holds(record, run):
                return record["budget"]
    return None


def measure_skip(evaluator: Evaluator, store: Path, low: str, fraction: float, progress: bool) -> dict:
    """Measure e_q at ``low`` on the calibration text and choose the layers to keep dense
    (``budget_skip``); the measurement is appended to the store at once. Returns the ``budget``."""
    settings, start = evaluator.settings, time.perf_counter()
    windows, calib_spec = evaluator.calibration_windows(settings.calib_windows)
    sens = measure_sensitivity(evaluator.model, windows, low, "amber", "lowrank", bos_id=evaluator.bos_id, progress=progress)
    choice = budget_skip(find_linear_sites(evaluator.model), sens.scores, fraction)
    calibration = {"data": calib_spec, "windows": len(windows), "seconds": time.perf_counter() - start}
    budget = {**choice.to_dict(), "calibration": calibration}
    append_jsonl_atomic(
        store,
        {"kind": "sensitivity", "row": SKIP_ROW, "pattern": low, "model": settings.model, "settings": asdict(settings),
         "scores": sens.scores, "budget": budget, "versions": versions()},
    )  # fmt: skip
    print(f"{SKIP_ROW}: {choice.fraction:.2%} of the linear FLOPs at {low}; skip {','.join(choice.skip) or '-'}", flush=True)
    return budget


def dense_record(records: list[dict], settings) -> dict | None:
    """A row's record of these settings, whose dense perplexity a resumed table reuses."""
    return next((r for r in records if r.get("kind") == "run" and "dense_ppl" in r and _same_settings(r, settings)), None)


def row_seconds(record: dict) -> float:
    """A row's seconds: its measurements included (a sweep run's seconds plus its layer choice's)."""
    if "row_seconds" in record:
        return record["row_seconds"]
    if "run_seconds" in record:
        return record["run_seconds"] + ((record.get("budget") or {}).get("calibration") or {}).get("seconds", 0.0)
    return record.get("total_seconds", 0.0)


def table(records: list[dict], pattern: str) -> str:
    runs = {r["row"]: r for r in records if r.get("kind") == "run"}
    if not runs:
        return "(no runs yet)"
    first = next(iter(runs.values()))
    dense = first["dense_ppl"]
    lines = [
        f"| method ({pattern} average) | perplexity | gap to dense | density | sparse FLOPs | N per layer | seconds |",
        "|---|---:|---:|---:|---:|---|---:|",
        f"| dense | {dense:.2f} | 0 | 100% | 0% | – | {first.get('dense_seconds', 0):.0f} |",
    ]
    for row in (*SHOWN, SPARSEGPT_ROW, RECIPE_ROW):
        r = runs.get(row)
        if r is None:
            lines.append(f"| {row} | – | – | – | – | – | – |")
            continue
        ns = ", ".join(f"{k}: {v}" for k, v in r.get("layer_patterns", {}).items()) or pattern
        name = f"{row} ({r['recipe']})" if r.get("recipe") else row
        lines.append(
            f"| {name} | {r['sparse_ppl']:.2f} | {r['sparse_ppl'] - dense:.2f} | {r.get('density', float('nan')):.2%} | "
            f"{r['sparse_flop_fraction']:.1%} | {ns} | {row_seconds(r):.0f} |"
        )
    lines.append("")
    lines.append(
        f"{first['model']} on {first['data']}, seqlen {first['settings']['seqlen']}, {first['windows']} windows, "
        f"{first['tokens']} predicted tokens, {first['settings']['dtype']}; calibration {first['settings']['calib_data']} "
        f"({first['settings']['calib_windows']} windows for the sensitivity curves)."
    )
    return "\n".join(lines)


def _report(row: str, record: dict) -> None:
    print(f"{row:<44} ppl {record['sparse_ppl']:.3f} (dense {record['dense_ppl']:.3f}) density {record.get('density', 1):.4f}"
          f"  sparse FLOPs {record['sparse_flop_fraction']:.1%}  {row_seconds(record):.0f} s", flush=True)  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_eval_options(parser)
    parser.set_defaults(max_tokens=32768, calib_windows=8)
    parser.add_argument("--pattern", default="8:16", help="the density budget, N:M (default 8:16)")
    parser.add_argument("--low", default="4:16", help="Amber skipping: the pattern of the layers not skipped (default 4:16)")
    parser.add_argument(
        "--select-data", default=DEFAULT_SELECT, help=f"the recipe search's selection text (default {DEFAULT_SELECT})"
    )
    parser.add_argument("--select-tokens", type=int, default=8192)
    parser.add_argument("--criteria", default="magnitude,amber")
    parser.add_argument("--mitigations", default="none,lowrank")
    parser.add_argument("--no-recipe", action="store_true", help="leave the recipe search out")
    parser.add_argument("--rows", default=None, help="only these rows, by number from 1 (default: all), e.g. 2,4,5")
    parser.add_argument("--sparsegpt", choices=["store", "run"], default="store")
    parser.add_argument("--out", required=True, help="JSONL store of the rows (resumed if it exists)")
    args = parser.parse_args()
    store = Path(args.out)
    settings = settings_from(args)
    pattern, low = parse_pattern(args.pattern), str(parse_pattern(args.low))
    wanted = list(ROWS) if args.rows is None else [ROWS[int(i) - 1] for i in args.rows.split(",")]  # in this order
    records = read_jsonl(store) if store.exists() else []
    progress = not args.no_progress
    evaluator = None

    def get() -> Evaluator:
        nonlocal evaluator
        if evaluator is None:
            evaluator = Evaluator(settings, progress=progress)
            earlier = dense_record(records, settings)
            if earlier is not None:  # resumed: the dense perplexity of the earlier rows, not measured again
                evaluator.reuse_dense(earlier)
        return evaluator

    budget = None
    if SKIP_ROW in wanted:
        fraction = skip_fraction(args.pattern, low)
        budget = skip_choice(records, settings, low, fraction) or measure_skip(get(), store, low, fraction, progress)
    planned = runs(settings, args.pattern, low, wanted, budget)
    here, from_weights = sparsegpt_runs(settings, args.pattern)
    has_sparsegpt = any(holds(r, run) for r in records for run in (here, from_weights))
    if args.sparsegpt == "run" and not has_sparsegpt:
        planned.append(here)
    spec = SweepSpec(name="allocation-table", runs=tuple(planned))
    done = done_keys(spec, records, keyless=True)
    if evaluator is None and any(run.key not in done for run in spec.runs):
        get()  # the runner takes this one, so the dense perplexity stored with the earlier rows is reused
    loaded = {settings.model: evaluator} if evaluator is not None else None
    run_sweep(spec, store, progress=progress, keyless=True, evaluators=loaded)
    if args.sparsegpt == "store" and not has_sparsegpt:
        weights = Path("results") / f"weights-{args.model}.jsonl"
        found = next((r for r in read_jsonl(weights) if holds(r, from_weights)), None) if weights.exists() else None
        if found is not None:
            record = {**found, "from_store": str(weights), "density": pattern.density, "kind": "run", "row": SPARSEGPT_ROW,
                      "row_seconds": found.get("row_seconds", found.get("total_seconds", 0.0))}  # fmt: skip
            append_jsonl_atomic(store, record)
            _report(SPARSEGPT_ROW, record)
    if not args.no_recipe:
        start = time.perf_counter()
        search = RecipeSearch(
            settings, args.pattern, criteria=tuple(args.criteria.split(",")), mitigations=tuple(args.mitigations.split(",")),
            select_data=args.select_data, select_tokens=args.select_tokens,
        )  # fmt: skip
        result = search_recipe(search, store.with_name(store.stem + "-recipe.jsonl"), progress=progress)  # resumes its store
        winner = dict(result["winner"])
        winner["recipe"] = recipe_name(winner["config"])
        winner["candidates"] = [{"recipe": recipe_name(c["config"]), "select_ppl": c["sparse_ppl"]} for c in result["candidates"]]
        winner.update(kind="run", row=RECIPE_ROW, row_seconds=time.perf_counter() - start)
        if Store(store).append(winner):  # by the winner's run key: copied in once
            _report(RECIPE_ROW, winner)
            for c in winner["candidates"]:
                print(f"  selection ({args.select_data}) {c['recipe']:<40} ppl {c['select_ppl']:.3f}")
    markdown = table(read_jsonl(store), args.pattern)
    store.with_suffix(".md").write_text(markdown + "\n")
    print(markdown)


if __name__ == "__main__":
    main()
