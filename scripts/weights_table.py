"""Pruning weights vs pruning activations at the same sparsity: one perplexity table.

    .venv/bin/python scripts/weights_table.py --model smollm2-135m --out results/weights-smollm2-135m.jsonl

For each pattern (2:4, 4:8, 8:16, unstructured:0.5): weight pruning with magnitude, Wanda
and SparseGPT (calibrated on --calib-windows windows of --seqlen tokens of the calibration
text, which never overlaps the evaluation text), against activation pruning with magnitude
and Amber (mitigation none) and Amber with its best mitigation (var and dpts are both run;
the table shows the better one and names it). Every run uses the same protocol and the same
dense baseline: one model load, Brown news, seqlen 512, the first --max-tokens tokens.
Weight-pruned runs restore the dense weights from a CPU copy afterwards (checked equal).

The runs go through the sweep runner into the JSONL store (``runs``: the sweep spec); running
the same command again skips the runs already there, so an interrupted run resumes (records
written before the script used the sweep runner, without a run key, count too). The Markdown
table is printed at the end (and written beside the store as .md).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from actsparse.baselines import WeightPruneConfig
from actsparse.cli.main import add_eval_options, settings_from
from actsparse.config import SparsityConfig
from actsparse.core.patterns import parse_pattern
from actsparse.eval.results import read_jsonl
from actsparse.sweep import Run, SweepSpec, run_sweep

PATTERNS = ["2:4", "4:8", "8:16", "unstructured:0.5"]
WEIGHT_METHODS = ["magnitude", "wanda", "sparsegpt"]
ACTIVATION_RUNS = [("magnitude", "none"), ("amber", "none"), ("amber", "var"), ("amber", "dpts")]
BEST_OF = ["var", "dpts"]  # mitigations compared for the "amber + best" column
PROTOCOL = ("model", "data", "calib_data", "seqlen", "max_tokens", "dtype")


def key(record_or_config: dict, target: str | None = None) -> tuple:
    """("weights", pattern, method, "") or ("activations", pattern, criterion, mitigation)."""
    config = record_or_config.get("config", record_or_config)
    target = target or record_or_config.get("target", "activations")
    if target == "weights":
        return ("weights", str(parse_pattern(config["pattern"])), config["method"], "")
    return ("activations", str(parse_pattern(config["pattern"])), config["criterion"], config["mitigation"])


def planned(patterns: list[str], calib_windows: int, seed: int) -> list[tuple[str, object]]:
    runs: list[tuple[str, object]] = []
    for pattern in patterns:
        runs += [("activations", SparsityConfig(pattern=pattern, criterion=c, mitigation=m)) for c, m in ACTIVATION_RUNS]
        runs += [
            ("weights", WeightPruneConfig(pattern=pattern, method=m, calib_windows=calib_windows, seed=seed))
            for m in WEIGHT_METHODS
        ]
    return runs


def runs(settings, patterns: list[str], calib_windows: int, seed: int) -> list[Run]:
    """The table's runs, as sweep runs."""
    return [Run(settings, target, config) for target, config in planned(patterns, calib_windows, seed)]


def table(records: list[dict], patterns: list[str]) -> str:
    by_key = {key(r): r for r in records}
    dense = records[0]["dense_ppl"]
    headers = [f"weights {m}" for m in WEIGHT_METHODS] + [
        "activations magnitude",
        "activations amber",
        "activations amber + best mitigation",
    ]
    lines = [
        "| pattern | density | " + " | ".join(headers) + " |",
        "|---|---:|" + "---:|" * len(headers),
        "| dense | 1.00 | " + " | ".join(f"{dense:.2f}" for _ in headers) + " |",
    ]

    def cell(k) -> str:
        record = by_key.get(k)
        return f"{record['sparse_ppl']:.2f}" if record else "–"

    for pattern in patterns:
        name = str(parse_pattern(pattern))
        cells = [cell(("weights", name, m, "")) for m in WEIGHT_METHODS]
        cells += [cell(("activations", name, "magnitude", "none")), cell(("activations", name, "amber", "none"))]
        options = [(by_key[k]["sparse_ppl"], m) for m in BEST_OF if (k := ("activations", name, "amber", m)) in by_key]
        cells.append(f"{min(options)[0]:.2f} ({min(options)[1]})" if options else "–")
        lines.append(f"| {name} | {parse_pattern(pattern).density:.2f} | " + " | ".join(cells) + " |")
    first = records[0]
    weights = next((r for r in records if r.get("target") == "weights" and "calibration" in r), None)
    lines.append("")
    note = (
        f"{first['model']} on {first['data']}, seqlen {first['settings']['seqlen']}, {first['windows']} windows, "
        f"{first['tokens']} predicted tokens, {first['settings']['dtype']}; every linear layer of every decoder layer pruned "
        f"({first['sparse_flop_fraction']:.0%} of linear FLOPs). Weights: pruned once, per output row "
    )
    note += "(N kept of every M consecutive input columns), sequentially layer by layer"
    if weights:
        calibration = weights["calibration"]
        note += f", Wanda and SparseGPT calibrated on {calibration['windows']} windows of {weights['settings']['seqlen']} tokens of {calibration['data']}"
    note += (
        ". Activations: N kept of every M consecutive input features of every token, no calibration; "
        f"best mitigation = the lower perplexity of {' and '.join(BEST_OF)}."
    )
    lines.append(note)
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_eval_options(parser)  # --model --data --calib-data --calib-windows --seqlen --max-tokens ...
    parser.set_defaults(max_tokens=32768, calib_windows=128)
    parser.add_argument("--seed", type=int, default=0, help="which calibration windows (default: 0)")
    parser.add_argument("--patterns", default=",".join(PATTERNS), help=f"comma-separated (default: {','.join(PATTERNS)})")
    parser.add_argument("--out", required=True, help="JSONL results store (resumed if it exists)")
    args = parser.parse_args()

    patterns = [p.strip() for p in args.patterns.split(",") if p.strip()]
    store = Path(args.out)
    settings = settings_from(args)
    existing = read_jsonl(store)
    for record in existing:  # never mix protocols in one table
        wrong = [f for f in PROTOCOL if record["settings"][f] != getattr(settings, f)]
        if record.get("target") == "weights" and record["config"]["calib_windows"] != args.calib_windows:
            wrong.append("calib_windows")
        if wrong:
            sys.exit(f"{store} holds runs with other settings ({', '.join(wrong)}); use another --out or the same settings")
    spec = SweepSpec(name="weights-table", runs=tuple(runs(settings, patterns, args.calib_windows, args.seed)))
    run_sweep(spec, store, progress=not args.no_progress, keyless=True)
    markdown = table(read_jsonl(store), patterns)
    store.with_suffix(".md").write_text(markdown + "\n")
    print(markdown)


if __name__ == "__main__":
    main()
