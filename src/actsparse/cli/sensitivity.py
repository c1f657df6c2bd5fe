"""``actsparse sensitivity``: the Amber Pruner paper's per-layer sensitivity e_q, a heat map, and a FLOP budget."""

from __future__ import annotations

import time
from pathlib import Path

from actsparse.amber import budget_skip, measure_sensitivity
from actsparse.amber.budget import ORDERS
from actsparse.artifacts import versions, write_json_atomic
from actsparse.calibration.collect import collect_input_stats
from actsparse.cli.options import (
    EVALUATION,
    add_device_option,
    add_dtype_option,
    add_placement_options,
    placement_from,
    real,
    whole,
)
from actsparse.config import SparsityConfig
from actsparse.core.mitigation import get_mitigation
from actsparse.core.patterns import parse_pattern
from actsparse.core.scoring import get_criterion
from actsparse.data.sources import load_text
from actsparse.errors import ActsparseError
from actsparse.eval.perplexity import encode, make_windows
from actsparse.eval.run import DEFAULT_MODEL, EvalSettings
from actsparse.models import loading
from actsparse.models.discovery import find_linear_sites
from actsparse.selection import choose_sites

DEFAULTS = {"pattern": "8:16", "criterion": "amber", "mitigation": "none", "calib_windows": 8}  # this command's own


def add_sensitivity_command(commands) -> None:
    se = commands.add_parser(
        "sensitivity", help="per-layer sensitivity to activation sparsity (Amber Pruner)",
        description="e_q = ||Y - Y'|| / (||Y|| + eps) of every decoder linear layer with only its own input sparsified, "
        "on calibration text; prints a roles x layers heat map, writes JSON (and PNG when matplotlib is installed).",
    )  # fmt: skip
    se.add_argument("--model", default=DEFAULT_MODEL, help=f"alias, local directory or hub id (default: {DEFAULT_MODEL})")
    se.add_argument("--pattern", default=DEFAULTS["pattern"], help=f"N:M or unstructured:S (default: {DEFAULTS['pattern']})")
    se.add_argument(
        "--criterion", default=DEFAULTS["criterion"], help=f"which features survive (default: {DEFAULTS['criterion']})"
    )
    se.add_argument("--mitigation", default=DEFAULTS["mitigation"], help=f"error mitigation (default: {DEFAULTS['mitigation']})")
    se.add_argument(
        "--calib-data", default=EVALUATION["calib_data"], help=f"calibration text (default: {EVALUATION['calib_data']})"
    )
    se.add_argument(
        "--calib-windows",
        type=whole(1),
        default=DEFAULTS["calib_windows"],
        help=f"calibration windows (default: {DEFAULTS['calib_windows']})",
    )
    se.add_argument(
        "--seqlen", type=whole(2), default=EVALUATION["seqlen"], help=f"window length in tokens (default: {EVALUATION['seqlen']})"
    )
    add_dtype_option(se)
    add_device_option(se)
    add_placement_options(se)
    se.add_argument(
        "--target-fraction",
        type=real(0.0, 1.0),
        default=None,
        help="also choose layers to keep dense so this share of linear FLOPs runs sparse, e.g. 0.55",
    )
    se.add_argument("--order", default=ORDERS[0], choices=list(ORDERS), help=f"greedy order of the budget (default: {ORDERS[0]})")
    se.add_argument("--out", default="sensitivity.json", help="JSON record, written atomically (default: sensitivity.json)")
    se.add_argument("--png", default=None, help="heat map PNG (default: beside --out; needs matplotlib)")
    se.add_argument("--no-progress", action="store_true", help="hide progress bars")
    se.set_defaults(func=cmd_sensitivity)


def cmd_sensitivity(args) -> None:
    """The Amber Pruner paper's layer sensitivity e_q on calibration text: text heat map, JSON (and PNG with matplotlib)."""
    parse_pattern(args.pattern)  # validate before the slow model load
    criterion, mitigation = get_criterion(args.criterion), get_mitigation(args.mitigation)
    if args.target_fraction is not None and not 0.0 <= args.target_fraction <= 1.0:
        raise ActsparseError(f"--target-fraction must be in [0, 1], got {args.target_fraction}")
    calib = load_text(args.calib_data)  # a bad text is refused before the model loads
    settings = EvalSettings(model=args.model, calib_data=args.calib_data, calib_windows=args.calib_windows, seqlen=args.seqlen,
                            dtype=args.dtype, device=args.device)  # fmt: skip
    skeleton = loading.model_skeleton(args.model)
    if skeleton is not None:
        choose_sites(
            SparsityConfig(pattern=args.pattern, criterion=args.criterion, mitigation=args.mitigation),
            find_linear_sites(skeleton),
        )
    start = time.perf_counter()
    device = settings.resolved_device()
    model, tokenizer = loading.load_model(args.model, dtype=args.dtype, device=device, **placement_from(args))
    bos_id = tokenizer.bos_token_id if loading.tokenizer_adds_bos(tokenizer) else None
    windows = make_windows(encode(tokenizer, calib.text), args.seqlen)[: args.calib_windows]
    stats = None
    if criterion.needs_calibration or mitigation.needs_calibration:
        stats = collect_input_stats(model, windows, bos_id=bos_id, progress=not args.no_progress)
    result = measure_sensitivity(
        model, windows, args.pattern, args.criterion, args.mitigation, stats=stats, bos_id=bos_id, progress=not args.no_progress
    )
    record = {
        "model": args.model, "calibration": {"data": calib.spec, "windows": len(windows), "seqlen": args.seqlen},
        "config": {"pattern": args.pattern, "criterion": args.criterion, "mitigation": args.mitigation, "dtype": args.dtype,
                   "device": device, "eps": result.settings["eps"]},
        "versions": versions(), **result.to_dict(),
    }  # fmt: skip
    print(f"model      {args.model}")
    print(f"calibrate  {calib.spec}  {len(windows)} windows x {args.seqlen} tokens")
    print(f"e_q = ||Y - Y'|| / (||Y|| + eps), {args.pattern} {args.criterion} + {args.mitigation}, one layer sparse at a time")
    print(result.heatmap_text())
    if args.target_fraction is not None:
        choice = budget_skip(result.sites, result.scores, args.target_fraction, order=args.order)
        record["budget"] = choice.to_dict()
        status = "met" if choice.met else "nearest achievable"
        print(
            f"budget     target {args.target_fraction:.1%} of linear FLOPs sparse, reached {choice.fraction:.2%} ({status}), order {args.order}"
        )
        print(f"skip       {','.join(choice.skip) or '(none)'}")
    record["total_seconds"] = time.perf_counter() - start
    out = Path(args.out)
    write_json_atomic(out, record)
    print(f"wrote      {out}")
    png = Path(args.png) if args.png else out.with_suffix(".png")
    note = result.save_png(png)
    print(f"note       {note}" if note else f"wrote      {png}")
