"""Perplexity of the calibrated and learned mitigations (the error-mitigation paper), with the calibration time of each run.

    .venv/bin/python scripts/calibrated_table.py --model smollm2-135m --max-tokens 32768 --out results/calibrated-smollm2-135m.jsonl

Patterns 2:4 and 8:16 x criteria magnitude and amber x mitigations none, var, dpts, spts, scap,
rotation, rotation-spread, lowrank, lpts, oshift, oscale, oscale-shift, var-oscale. Mitigations calibrated layer by
layer (``actsparse.calibrate_``) use ``--calib-windows`` windows of calibration text (the error-mitigation paper: 256) and
``--steps`` training steps per decoder layer (default: one pass). Every finished run is appended to
the JSONL store at once (atomically); running the same command again skips the runs already there,
so an interrupted run resumes. The Markdown table is printed at the end (and written beside the
store as .md). ``--save-states DIR`` also keeps each calibrated state (for ``eval --state``).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from actsparse.calibration.layerwise import CalibrationOptions
from actsparse.calibration.mitigations import ensure_mitigation, is_calibrated
from actsparse.cli.main import add_eval_options, settings_from
from actsparse.config import SparsityConfig
from actsparse.eval.results import append_jsonl_atomic, read_jsonl
from actsparse.eval.run import Evaluator

PATTERNS = ["2:4", "8:16"]
CRITERIA = ["magnitude", "amber"]
MITIGATIONS = [
    "none",
    "var",
    "dpts",
    "spts",
    "scap",
    "rotation",
    "rotation-spread",
    "lowrank",
    "lpts",
    "oshift",
    "oscale",
    "oscale-shift",
    "var-oscale",
]


def key(record_or_config) -> tuple:
    config = record_or_config.get("config", record_or_config)
    return (config["pattern"], config["criterion"], config["mitigation"])


def table(records: list[dict], mitigations=MITIGATIONS, patterns=PATTERNS, criteria=CRITERIA) -> str:
    dense = records[0]["dense_ppl"]
    by_key = {key(r): r for r in records}
    columns = [(p, c) for p in patterns for c in criteria]
    lines = [
        "| mitigation | " + " | ".join(f"{p} {c}" for p, c in columns) + " | calibration s (max) |",
        "|---|" + "---:|" * (len(columns) + 1),
        "| dense | " + " | ".join(f"{dense:.2f}" for _ in columns) + " | |",
    ]
    for mitigation in mitigations:
        cells, seconds = [], {}  # device -> calibration seconds of this row's runs there
        for p, c in columns:
            record = by_key.get((p, c, mitigation))
            cells.append(f"{record['sparse_ppl']:.2f}" if record else "–")
            if record and record.get("calibration"):
                device = record.get("versions", {}).get("device", "?")
                seconds.setdefault(device, []).append(record["calibration"].get("seconds") or 0.0)
        shown = " / ".join(
            f"{max(values):.1f}" + (f" ({device})" if len(seconds) > 1 else "") for device, values in seconds.items()
        )
        lines.append(f"| {mitigation} | " + " | ".join(cells) + f" | {shown or '–'} |")
    first = records[0]
    calib = next((r["calibration"] for r in records if "calibration" in r and "options" in r["calibration"]), None)
    lines.append("")
    text = (
        f"{first['model']} on {first['data']}, seqlen {first['settings']['seqlen']}, {first['windows']} windows, "
        f"{first['tokens']} predicted tokens, {first['settings']['dtype']}; every linear layer of every decoder layer sparse."
    )
    if calib:
        options = calib["options"]
        text += (
            f" Calibrated layer by layer on {calib['data']} ({calib['windows']} windows x {calib['seqlen']} tokens); learned "
            f"mitigations: AdamW lr {options['lr']:g}, {options['steps'] or calib['windows']} steps per decoder layer."
        )
    devices = sorted({r.get("versions", {}).get("device", "?") for r in records})
    text += (
        f" Device: {', '.join(devices)} (calibration seconds by device where they differ)."
        if len(devices) > 1
        else f" Device: {devices[0]}."
    )
    lines.append(text)
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_eval_options(parser)  # --model --data --calib-data --calib-windows --seqlen --max-tokens ...
    parser.set_defaults(max_tokens=32768, calib_windows=256)
    parser.add_argument(
        "--steps", type=int, default=None, help="training steps per decoder layer (default: one pass over the windows)"
    )
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--patterns", default=",".join(PATTERNS))
    parser.add_argument("--criteria", default=",".join(CRITERIA))
    parser.add_argument("--mitigations", default=",".join(MITIGATIONS))
    parser.add_argument("--save-states", default=None, metavar="DIR", help="also write each calibrated state under DIR")
    parser.add_argument("--out", required=True, help="JSONL results store (resumed if it exists)")
    args = parser.parse_args()
    patterns, criteria, mitigations = (args.patterns.split(","), args.criteria.split(","), args.mitigations.split(","))
    for name in mitigations:
        ensure_mitigation(name)

    store = Path(args.out)
    done = {key(r) for r in read_jsonl(store)}
    settings = settings_from(args)
    options = CalibrationOptions(lr=args.lr, steps=args.steps)
    configs = [SparsityConfig(pattern=p, criterion=c, mitigation=m) for p in patterns for c in criteria for m in mitigations]
    todo = [c for c in configs if key(c.to_dict()) not in done]
    print(f"{len(configs) - len(todo)} of {len(configs)} runs already in {store}; {len(todo)} to go")
    if todo:
        evaluator = Evaluator(settings, progress=not args.no_progress)
        for config in todo:
            if is_calibrated(config.mitigation):
                save = None
                if args.save_states:
                    save = str(
                        Path(args.save_states) / f"{config.pattern.replace(':', '-')}_{config.criterion}_{config.mitigation}"
                    )
                record = evaluator.run_calibrated(config, options, save=save)
            else:
                record = evaluator.run(config)
            append_jsonl_atomic(store, record)
            seconds = record.get("calibration", {}).get("seconds")
            print(
                f"{config.pattern:>6} {config.criterion:>10} {config.mitigation:>13}  dense {record['dense_ppl']:.3f}  sparse {record['sparse_ppl']:.3f}"
                + (f"  calibration {seconds:.1f} s" if seconds is not None else ""),
                flush=True,
            )
    markdown = table(read_jsonl(store), mitigations, patterns, criteria)
    store.with_suffix(".md").write_text(markdown + "\n")
    print(markdown)


if __name__ == "__main__":
    main()
