"""Perplexity of the calibrated and learned mitigations (the error-mitigation paper), with the calibration time of each run.

    .venv/bin/python scripts/calibrated_table.py --model smollm2-135m --max-tokens 32768 --out results/calibrated-smollm2-135m.jsonl

Patterns 2:4 and 8:16 x criteria magnitude and amber x mitigations none, var, dpts, spts, scap,
rotation, rotation-spread, lowrank, lpts, oshift, oscale, oscale-shift, var-oscale. Mitigations calibrated layer by
layer (``actsparse.calibrate_``) use ``--calib-windows`` windows of calibration text (the error-mitigation paper: 256) and
``--steps`` training steps per decoder layer (default: one pass). The runs go through the sweep
runner into the JSONL store (``runs``: the sweep spec); running the same command again skips the
runs already there, so an interrupted run resumes (records written before the script used the
sweep runner, without a run key, count too). The Markdown table is printed at the end (and
written beside the store as .md). ``--save-states DIR`` also keeps each calibrated state (for
``eval --state``).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from actsparse.calibration.mitigations import ensure_mitigation, is_calibrated
from actsparse.cli.main import add_eval_options, settings_from
from actsparse.config import SparsityConfig
from actsparse.eval.results import read_jsonl
from actsparse.sweep import Run, SweepSpec, run_sweep

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


def runs(settings, patterns=PATTERNS, criteria=CRITERIA, mitigations=MITIGATIONS, lr=1e-4, steps=None, save_states=None):
    """The table's runs, as sweep runs: calibrated mitigations on the settings' ``calib_windows`` windows."""
    out = []
    for p in patterns:
        for c in criteria:
            for m in mitigations:
                config = SparsityConfig(pattern=p, criterion=c, mitigation=m)
                if not is_calibrated(m):
                    out.append(Run(settings, "activations", config))
                    continue
                save = str(Path(save_states) / f"{p.replace(':', '-')}_{c}_{m}") if save_states else None
                options = {"windows": settings.calib_windows, "lr": lr, "steps": steps, "seed": 0}
                out.append(Run(settings, "activations", config, calibration=options, save=save))
    return out


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
    planned = runs(settings_from(args), patterns, criteria, mitigations, args.lr, args.steps, args.save_states)
    run_sweep(SweepSpec(name="calibrated-table", runs=tuple(planned)), store, progress=not args.no_progress, keyless=True)
    markdown = table(read_jsonl(store), mitigations, patterns, criteria)
    store.with_suffix(".md").write_text(markdown + "\n")
    print(markdown)


if __name__ == "__main__":
    main()
