"""The Amber Pruner table: layer skipping by sensitivity vs random vs none, and W8A8 + sparsity.

    .venv/bin/python scripts/amber_table.py --model smollm2-135m --max-tokens 32768 --out results/amber-smollm2-135m.jsonl

Rows, for each pattern (default 2:4 and 8:16):

- naive: magnitude criterion, every linear layer sparse;
- amber, all layers;
- amber, sensitivity skip: the layers kept dense are chosen from the Amber Pruner paper's sensitivity e_q
  (measured on calibration text with that pattern and criterion amber) so that
  ``--target-fraction`` (default 0.55) of the linear FLOPs run sparse (``budget_skip``);
- amber, random skip: a seeded random choice of layers at the fraction the sensitivity
  choice reached (``random_skip``);
- amber, P2 rule: the Amber Pruner paper's Llama-3.1-8B skip rule with its layers mapped to this model's depth;
- W8A8 + amber (no smoothing), W8A8 SmoothQuant + amber, Outstanding-sparse: with the
  sensitivity skip; every other decoder linear layer runs the same W8A8 mitigation dense
  (``quantize_rest_``), so the whole decoder is W8A8 and the chosen layers are also sparse;

plus W8A8 dense (pattern dense, mitigation w8a8) once. Each pattern's sensitivity
measurement is appended to the JSONL store at once (atomically) and measured only when the
store has none; the rows (``runs``: sweep runs, each tagged with its row) then go through the
sweep runner into the same store, so running the same command again skips what is already
there (records written before the script used the sweep runner, without a run key, count
too). The Markdown table is printed at the end (and written beside the store as .md).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from actsparse.amber import QUANT_MITIGATIONS, amber_preset, budget_skip, measure_sensitivity, random_skip
from actsparse.cli.main import add_eval_options, settings_from
from actsparse.config import SparsityConfig
from actsparse.eval.results import append_jsonl_atomic, read_jsonl, versions
from actsparse.eval.run import Evaluator
from actsparse.models.discovery import find_linear_sites
from actsparse.models.loading import model_skeleton
from actsparse.sweep import Run, SweepSpec, run_sweep

PATTERNS = ["2:4", "8:16"]
ROWS = [
    "naive (magnitude, all layers)",
    "amber, all layers",
    "amber, sensitivity skip",
    "amber, random skip",
    "amber, P2 rule (layers mapped)",
    "W8A8 + amber, sensitivity skip",
    "W8A8 SmoothQuant + amber, sensitivity skip",
    "Outstanding-sparse + amber, sensitivity skip",
]
W8A8_DENSE = "W8A8 dense"


def plan(
    pattern: str, sens_skip: tuple[str, ...], random_entries: tuple[str, ...], preset: tuple[str, ...]
) -> dict[str, SparsityConfig]:
    """The config of every row for one pattern."""
    return {
        ROWS[0]: SparsityConfig(pattern=pattern, criterion="magnitude"),
        ROWS[1]: SparsityConfig(pattern=pattern, criterion="amber"),
        ROWS[2]: SparsityConfig(pattern=pattern, criterion="amber", skip=sens_skip),
        ROWS[3]: SparsityConfig(pattern=pattern, criterion="amber", skip=random_entries),
        ROWS[4]: SparsityConfig(pattern=pattern, criterion="amber", skip=preset),
        ROWS[5]: SparsityConfig(pattern=pattern, criterion="amber", mitigation="w8a8", skip=sens_skip),
        ROWS[6]: SparsityConfig(pattern=pattern, criterion="amber", mitigation="w8a8-smoothquant", skip=sens_skip),
        ROWS[7]: SparsityConfig(pattern=pattern, criterion="amber", mitigation="outstanding-sparse", skip=sens_skip),
    }


def runs(settings, rows: dict[str, dict[str, SparsityConfig]]) -> list[Run]:
    """The table's runs, as sweep runs: ``rows`` is pattern -> row -> config (``plan``), W8A8 dense first.
    A W8A8 mitigation runs the whole decoder W8A8 (``quantize_rest``); each record is tagged with its row."""
    planned = {"dense": {W8A8_DENSE: SparsityConfig(pattern="dense", criterion="magnitude", mitigation="w8a8")}, **rows}
    out = []
    for pattern, configs in planned.items():
        for row, config in configs.items():
            whole = config.mitigation in QUANT_MITIGATIONS
            tags = {"kind": "run", "row": row, "row_pattern": pattern, "w8a8_whole_decoder": whole}
            out.append(Run(settings, "activations", config, quantize_rest=whole, tags=tags))
    return out


def table(records: list[dict], patterns: list[str]) -> str:
    runs = [r for r in records if r.get("kind") == "run"]
    if not runs:
        return "(no runs yet)"
    by_key = {(r["row"], r["row_pattern"]): r for r in runs}
    dense = runs[0]["dense_ppl"]
    lines = [
        "| method | " + " | ".join(f"{p} ppl | {p} sparse FLOPs" for p in patterns) + " |",
        "|---|" + "---:|---:|" * len(patterns),
        "| dense | " + " | ".join(f"{dense:.2f} | 0%" for _ in patterns) + " |",
    ]
    w8a8 = by_key.get((W8A8_DENSE, "dense"))
    if w8a8:
        lines.append(f"| {W8A8_DENSE} | " + " | ".join(f"{w8a8['sparse_ppl']:.2f} | 0%" for _ in patterns) + " |")
    for row in ROWS:
        cells = []
        for pattern in patterns:
            record = by_key.get((row, pattern))
            cells.append(f"{record['sparse_ppl']:.2f} | {record['sparse_flop_fraction']:.1%}" if record else "– | –")
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    first = runs[0]
    sens = [r for r in records if r.get("kind") == "sensitivity"]
    lines.append("")
    lines.append(
        f"{first['model']} on {first['data']}, seqlen {first['settings']['seqlen']}, {first['windows']} windows, "
        f"{first['tokens']} predicted tokens, {first['settings']['dtype']}. Sensitivity on "
        f"{sens[0]['calibration']['data'] if sens else '?'} ({sens[0]['calibration']['windows'] if sens else '?'} windows); "
        f"target {sens[0]['budget']['target_fraction'] if sens else '?'} of linear FLOPs sparse."
    )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_eval_options(parser)  # --model --data --calib-data --calib-windows --seqlen --max-tokens ...
    parser.set_defaults(max_tokens=32768, calib_windows=32)
    parser.add_argument("--sens-windows", type=int, default=8, help="calibration windows for the sensitivity (default 8)")
    parser.add_argument("--patterns", default=",".join(PATTERNS))
    parser.add_argument("--target-fraction", type=float, default=0.55)
    parser.add_argument("--order", default="score", choices=["score", "score-per-flop"])
    parser.add_argument("--seed", type=int, default=0, help="seed of the random skip control")
    parser.add_argument("--out", required=True, help="JSONL results store (resumed if it exists)")
    args = parser.parse_args()
    patterns = [p.strip() for p in args.patterns.split(",") if p.strip()]

    store = Path(args.out)
    settings = settings_from(args)
    evaluator = None

    def get_evaluator() -> Evaluator:
        nonlocal evaluator
        if evaluator is None:
            evaluator = Evaluator(settings, progress=not args.no_progress)
        return evaluator

    def sites():
        skeleton = model_skeleton(args.model) if evaluator is None else None  # no weights needed for the layers
        return find_linear_sites(skeleton if skeleton is not None else get_evaluator().model)

    rows = {}
    for pattern in patterns:
        sens = next((r for r in read_jsonl(store) if r.get("kind") == "sensitivity" and r["pattern"] == pattern), None)
        if sens is None:
            ev = get_evaluator()
            windows, calib_spec = ev.calibration_windows(args.sens_windows, args.seed)
            result = measure_sensitivity(ev.model, windows, pattern, "amber", bos_id=ev.bos_id, progress=not args.no_progress)
            choice = budget_skip(sites(), result.scores, args.target_fraction, order=args.order)
            control = random_skip(sites(), choice.fraction, seed=args.seed)
            sens = {
                "kind": "sensitivity", "pattern": pattern, "model": args.model, "scores": result.scores,
                "calibration": {"data": calib_spec, "windows": len(windows), "seqlen": args.seqlen},
                "budget": choice.to_dict(), "random": control.to_dict(), "versions": versions(),
            }  # fmt: skip
            append_jsonl_atomic(store, sens)
            print(
                f"{pattern:>6}  sensitivity: target {args.target_fraction:.1%}, reached {choice.fraction:.2%}; skip {','.join(choice.skip) or '-'}"
            )
            print(
                f"{pattern:>6}  random control (seed {args.seed}): {control.fraction:.2%}; skip {','.join(control.skip) or '-'}"
            )
            print(result.heatmap_text(), flush=True)
        num_layers = 1 + max(s.layer for s in sites())
        preset = amber_preset("llama3.1-8b", num_layers)
        rows[pattern] = plan(pattern, tuple(sens["budget"]["skip"]), tuple(sens["random"]["skip"]), preset)
    spec = SweepSpec(name="amber-table", runs=tuple(runs(settings, rows)))
    loaded = {settings.model: evaluator} if evaluator is not None else None
    run_sweep(spec, store, progress=not args.no_progress, keyless=True, evaluators=loaded)
    markdown = table(read_jsonl(store), patterns)
    store.with_suffix(".md").write_text(markdown + "\n")
    print(markdown)


if __name__ == "__main__":
    main()
