"""Equal-budget comparison: uniform N:M, N per layer by sensitivity, Amber's layer skipping, SparseGPT, the recipe search.

    .venv/bin/python scripts/allocation_table.py --model smollm2-135m --max-tokens 32768 --calib-windows 8 --out results/allocation-smollm2-135m.jsonl

Every row has the same FLOP-weighted density of the decoder's linear-layer inputs (the
pattern's N/M, default 8:16 = 50%), on every projection of every layer:

- uniform: every layer at the pattern (amber + none, amber + lowrank);
- sensitivity: N per layer chosen from e_q curves on the calibration text (``allocation="sensitivity", sensitivity="eq"``);
- Fisher: N per layer chosen from the Fisher estimates of the loss increase on the calibration
  text (``allocation="sensitivity", sensitivity="fisher"``; rows 6 and 7, after the others so
  that the numbers of the earlier rows keep their meaning); row 8 the same with every N from
  M/4 to M as a candidate (``allocate(..., choices=...)``), not only M/4 … M in steps of M/8;
- Amber's layer skipping at the same density: the least sensitive layers at ``--low`` (default
  4:16), the others dense, the FLOP fraction chosen so that the density is the pattern's
  (``budget_skip`` on e_q measured at ``--low``; the exact density reached is reported);
- SparseGPT weight pruning at the pattern: read from ``results/weights-MODEL.jsonl`` when that
  store has it (``--sparsegpt run`` runs it here instead);
- the recipe search's winner (``actsparse recipe``: criteria × mitigations × allocations,
  selected on ``--select-data``, the winner evaluated on ``--data``), its store beside ``--out``.

Each finished row is appended to the store at once; running the command again skips what is
there. The Markdown table is printed at the end and written beside the store as .md.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from actsparse.amber import allocate, budget_skip, measure_sensitivity
from actsparse.artifacts import append_jsonl_atomic, read_jsonl
from actsparse.baselines import WeightPruneConfig
from actsparse.cli.options import add_eval_options, settings_from
from actsparse.config import SparsityConfig
from actsparse.core.patterns import parse_pattern
from actsparse.eval.run import Evaluator
from actsparse.models.discovery import find_linear_sites
from actsparse.sweep.recipe import DEFAULT_SELECT, RecipeSearch, recipe_name, search_recipe

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
    for row in (*SHOWN, "SparseGPT weights", "recipe search winner"):
        r = runs.get(row)
        if r is None:
            lines.append(f"| {row} | – | – | – | – | – | – |")
            continue
        ns = ", ".join(f"{k}: {v}" for k, v in r.get("layer_patterns", {}).items()) or pattern
        name = f"{row} ({r['recipe']})" if r.get("recipe") else row
        seconds = r.get("row_seconds", r.get("total_seconds", 0.0))
        lines.append(
            f"| {name} | {r['sparse_ppl']:.2f} | {r['sparse_ppl'] - dense:.2f} | {r.get('density', float('nan')):.2%} | "
            f"{r['sparse_flop_fraction']:.1%} | {ns} | {seconds:.0f} |"
        )
    lines.append("")
    lines.append(
        f"{first['model']} on {first['data']}, seqlen {first['settings']['seqlen']}, {first['windows']} windows, "
        f"{first['tokens']} predicted tokens, {first['settings']['dtype']}; calibration {first['settings']['calib_data']} "
        f"({first['settings']['calib_windows']} windows for the sensitivity curves)."
    )
    return "\n".join(lines)


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
    pattern, low = parse_pattern(args.pattern), parse_pattern(args.low)
    wanted = list(ROWS) if args.rows is None else [ROWS[int(i) - 1] for i in args.rows.split(",")]  # in this order
    evaluator = None

    def get() -> Evaluator:
        nonlocal evaluator
        if evaluator is None:
            evaluator = Evaluator(settings, progress=not args.no_progress)
            earlier = [r for r in read_jsonl(store) if r.get("kind") == "run" and "dense_ppl" in r] if store.exists() else []
            if earlier:  # resumed: the dense perplexity of the first run, not measured again
                evaluator.reuse_dense(earlier[0])
        return evaluator

    def done() -> set[str]:
        return {r["row"] for r in read_jsonl(store) if r.get("kind") == "run"} if store.exists() else set()

    def save(row: str, record: dict, seconds: float) -> None:
        record.update(kind="run", row=row, row_seconds=seconds)
        append_jsonl_atomic(store, record)
        print(f"{row:<44} ppl {record['sparse_ppl']:.3f} (dense {record['dense_ppl']:.3f}) density {record.get('density', 1):.4f}"
              f"  sparse FLOPs {record['sparse_flop_fraction']:.1%}  {seconds:.0f} s", flush=True)  # fmt: skip

    configs = {
        ROWS[0]: SparsityConfig(pattern=args.pattern, criterion="amber"),
        ROWS[1]: SparsityConfig(pattern=args.pattern, criterion="amber", mitigation="lowrank"),
        ROWS[2]: SparsityConfig(pattern=args.pattern, criterion="amber", allocation="sensitivity", sensitivity="eq"),
        ROWS[3]: SparsityConfig(
            pattern=args.pattern, criterion="amber", mitigation="lowrank", allocation="sensitivity", sensitivity="eq"
        ),
        ROWS[5]: SparsityConfig(pattern=args.pattern, criterion="amber", allocation="sensitivity", sensitivity="fisher"),
        ROWS[6]: SparsityConfig(
            pattern=args.pattern, criterion="amber", mitigation="lowrank", allocation="sensitivity", sensitivity="fisher"
        ),
    }
    for row in wanted:
        if row in done():
            continue
        start = time.perf_counter()
        if row in configs:
            save(row, get().run(configs[row]), time.perf_counter() - start)
            continue
        ev = get()
        windows, calib_spec = ev.calibration_windows(settings.calib_windows)
        if row == ROWS[7]:
            fine = range(max(1, pattern.m // 4), pattern.m + 1)
            resolved, allocation = allocate(
                ev.model, configs[ROWS[6]], windows, choices=fine, bos_id=ev.bos_id, progress=not args.no_progress
            )
            seconds = time.perf_counter() - start
            record = ev.run(resolved)
            record["allocation"] = {**allocation.to_dict(), "data": calib_spec, "seconds": seconds}
            save(row, record, time.perf_counter() - start)
            continue
        sens = measure_sensitivity(
            ev.model, windows, str(low), "amber", "lowrank", bos_id=ev.bos_id, progress=not args.no_progress
        )
        fraction = (1 - pattern.density) / (1 - low.density)  # density = 1 - fraction * (1 - low density)
        choice = budget_skip(find_linear_sites(ev.model), sens.scores, fraction)
        record = ev.run(SparsityConfig(pattern=str(low), criterion="amber", mitigation="lowrank", skip=choice.skip))
        record["budget"] = {**choice.to_dict(), "calibration": {"data": calib_spec, "windows": len(windows)}}
        save(ROWS[4], record, time.perf_counter() - start)
    if "SparseGPT weights" not in done():
        weights = Path("results") / f"weights-{args.model}.jsonl"
        found = None
        if args.sparsegpt == "store" and weights.exists():
            found = next(
                (r for r in read_jsonl(weights) if r.get("config", {}).get("method") == "sparsegpt"
                 and r["config"].get("pattern") == args.pattern and r.get("data") == get().source.spec
                 and r.get("tokens") == get().dense()[0].predicted_tokens),
                None,
            )  # fmt: skip
            if found is not None:
                found = {**found, "from_store": str(weights), "density": pattern.density}
        if found is None and args.sparsegpt == "run":
            start = time.perf_counter()
            found = get().run_weights(WeightPruneConfig(pattern=args.pattern, method="sparsegpt", calib_windows=128))
            found["density"] = pattern.density
            found["row_seconds"] = time.perf_counter() - start
        if found is not None:
            save("SparseGPT weights", found, found.get("row_seconds", found.get("total_seconds", 0.0)))
    if not args.no_recipe and "recipe search winner" not in done():
        start = time.perf_counter()
        search = RecipeSearch(
            settings, args.pattern, criteria=tuple(args.criteria.split(",")), mitigations=tuple(args.mitigations.split(",")),
            select_data=args.select_data, select_tokens=args.select_tokens,
        )  # fmt: skip
        result = search_recipe(search, store.with_name(store.stem + "-recipe.jsonl"), progress=not args.no_progress)
        winner = dict(result["winner"])
        winner["recipe"] = recipe_name(winner["config"])
        winner["candidates"] = [{"recipe": recipe_name(c["config"]), "select_ppl": c["sparse_ppl"]} for c in result["candidates"]]
        save("recipe search winner", winner, time.perf_counter() - start)
        for c in winner["candidates"]:
            print(f"  selection ({args.select_data}) {c['recipe']:<40} ppl {c['select_ppl']:.3f}")
    markdown = table(read_jsonl(store), args.pattern)
    store.with_suffix(".md").write_text(markdown + "\n")
    print(markdown)


if __name__ == "__main__":
    main()
