"""Regenerate the core perplexity table of RESULTS.md.

    .venv/bin/python scripts/core_table.py --model smollm2-135m --max-tokens 32768 --out results/core-smollm2-135m.jsonl

Every finished run is appended to the JSONL store at once (atomically); running the same
command again skips the runs already there, so an interrupted run resumes. The Markdown
table is printed at the end (and written beside the store as .md).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from actsparse.cli.main import add_eval_options, settings_from
from actsparse.config import SparsityConfig
from actsparse.eval.results import append_jsonl_atomic, read_jsonl
from actsparse.eval.run import Evaluator

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_eval_options(parser)  # --model --data --calib-data --calib-windows --seqlen --max-tokens ...
    parser.set_defaults(max_tokens=32768)
    parser.add_argument("--out", required=True, help="JSONL results store (resumed if it exists)")
    args = parser.parse_args()

    store = Path(args.out)
    done = {key(r) for r in read_jsonl(store)}
    settings = settings_from(args)
    configs = [SparsityConfig(pattern=p, criterion=c, mitigation=m) for p in PATTERNS for c in CRITERIA for m in MITIGATIONS]
    todo = [c for c in configs if key(c.to_dict()) not in done]
    print(f"{len(configs) - len(todo)} of {len(configs)} runs already in {store}; {len(todo)} to go")
    if todo:
        evaluator = Evaluator(settings)
        for config in todo:
            record = evaluator.run(config)
            append_jsonl_atomic(store, record)
            print(
                f"{config.pattern:>18} {config.criterion:>10} {config.mitigation:>5}  dense {record['dense_ppl']:.3f}  sparse {record['sparse_ppl']:.3f}",
                flush=True,
            )
    markdown = table(read_jsonl(store))
    store.with_suffix(".md").write_text(markdown + "\n")
    print(markdown)


if __name__ == "__main__":
    main()
