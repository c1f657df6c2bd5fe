"""Regenerate the core perplexity table of RESULTS.md.

    .venv/bin/python scripts/core_table.py --model smollm2-135m --max-tokens 32768 --out results/core-smollm2-135m.jsonl

The runs go through the sweep runner into the JSONL store (``runs``: the sweep spec); running
the same command again skips the runs already there, so an interrupted run resumes (records
written before the script used the sweep runner, without a run key, count too). The Markdown
table is printed at the end (and written beside the store as .md).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from actsparse.cli.main import add_eval_options, settings_from
from actsparse.config import SparsityConfig
from actsparse.eval.results import read_jsonl
from actsparse.sweep import Run, SweepSpec, run_sweep

PATTERNS = ["2:4", "4:8", "8:16", "16:32", "unstructured:0.5", "unstructured:0.7"]
CRITERIA = ["magnitude", "amber"]
MITIGATIONS = ["none", "var"]


def key(record_or_config) -> tuple:
    config = record_or_config.get("config", record_or_config)
    return (config["pattern"], config["criterion"], config["mitigation"])


def table(records: list[dict]) -> str:
    dense = records[0]["dense_ppl"]
    by_key = {key(r): r for r in records}
    columns = [(c, m) for c in CRITERIA for m in MITIGATIONS]
    lines = [
        "| pattern | " + " | ".join(f"{c} + {m}" for c, m in columns) + " |",
        "|---|" + "---:|" * len(columns),
        "| dense | " + " | ".join(f"{dense:.2f}" for _ in columns) + " |",
    ]
    for pattern in PATTERNS:
        cells = []
        for c, m in columns:
            record = by_key.get((pattern, c, m))
            cells.append(f"{record['sparse_ppl']:.2f}" if record else "–")
        lines.append(f"| {pattern} | " + " | ".join(cells) + " |")
    first = records[0]
    lines.append("")
    lines.append(
        f"{first['model']} on {first['data']}, seqlen {first['settings']['seqlen']}, {first['windows']} windows, "
        f"{first['tokens']} predicted tokens, {first['settings']['dtype']}; every linear layer of every decoder layer sparse "
        f"({first['sparse_flop_fraction']:.0%} of linear FLOPs)."
    )
    return "\n".join(lines)


def runs(settings) -> list[Run]:
    """The table's runs: every pattern x criterion x mitigation."""
    return [
        Run(settings, "activations", SparsityConfig(pattern=p, criterion=c, mitigation=m))
        for p in PATTERNS
        for c in CRITERIA
        for m in MITIGATIONS
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_eval_options(parser)  # --model --data --calib-data --calib-windows --seqlen --max-tokens ...
    parser.set_defaults(max_tokens=32768)
    parser.add_argument("--out", required=True, help="JSONL results store (resumed if it exists)")
    args = parser.parse_args()

    store = Path(args.out)
    spec = SweepSpec(name="core-table", runs=tuple(runs(settings_from(args))))
    run_sweep(spec, store, progress=not args.no_progress, keyless=True)
    markdown = table(read_jsonl(store))
    store.with_suffix(".md").write_text(markdown + "\n")
    print(markdown)


if __name__ == "__main__":
    main()
