"""``actsparse calibrate``: fit a mitigation decoder layer by decoder layer on calibration text and save the state."""

from __future__ import annotations

import time

import torch

from actsparse.amber.allocation import allocate
from actsparse.calibration import layerwise
from actsparse.calibration.mitigations import ensure_mitigation
from actsparse.calibration.state import save_state
from actsparse.cli.checks import preflight
from actsparse.cli.options import (
    EVALUATION,
    add_eval_options,
    add_sparsity_options,
    config_from,
    defaults,
    placement_from,
    real,
    whole,
)
from actsparse.data.sources import check_disjoint, load_text, stored_sample
from actsparse.errors import ActsparseError
from actsparse.eval.perplexity import encode, make_windows
from actsparse.eval.run import EvalSettings
from actsparse.models import loading

OPTIONS = defaults(layerwise.CalibrationOptions)


def add_calibrate_command(commands) -> None:
    ca = commands.add_parser(
        "calibrate", help="calibrate a mitigation layer by layer and save the state",
        description="Sparsify a model and calibrate its mitigation (spts, scap, rotation, lowrank, lpts, oshift, oscale, ...) "
        "decoder layer by decoder layer on calibration text; writes a state directory for `eval --state`.",
    )  # fmt: skip
    add_sparsity_options(ca, weights=False)
    add_eval_options(ca, evaluation=False)
    ca.set_defaults(calib_windows=EVALUATION["calib_windows"])
    ca.add_argument("--out", required=True, metavar="DIR", help="state directory (written atomically)")
    ca.add_argument(
        "--steps", type=whole(1), default=None, help="training steps per decoder layer (default: one pass over --calib-windows)"
    )
    ca.add_argument(
        "--lr",
        type=real(0.0, open_low=True),
        default=OPTIONS["lr"],
        help=f"AdamW learning rate of learned mitigations (default: {OPTIONS['lr']:.0e})".replace("e-0", "e-"),
    )
    ca.add_argument(
        "--offload", action="store_true",
        help="keep the calibration windows' activations in CPU memory between layers (for models whose activations do not fit beside them on the device)",
    )  # fmt: skip
    ca.set_defaults(func=cmd_calibrate)


def cmd_calibrate(args) -> None:
    """Calibrate a mitigation layer by layer on calibration text and write the state directory."""
    ensure_mitigation(args.mitigation)
    config = config_from(args)  # validate before the slow model load
    options = layerwise.CalibrationOptions(lr=args.lr, steps=args.steps, seed=args.seed)
    calib, evaluation = load_text(args.calib_data), load_text(args.data)
    check_disjoint(evaluation, calib)  # calibration text never overlaps the evaluation text
    preflight(args, config, calibrated=False)  # the texts are checked above
    start = time.perf_counter()
    device = EvalSettings(device=args.device).resolved_device()
    model, tokenizer = loading.load_model(args.model, dtype=args.dtype, device=device, **placement_from(args))
    bos_id = tokenizer.bos_token_id if loading.tokenizer_adds_bos(tokenizer) else None
    windows = make_windows(encode(tokenizer, calib.text), args.seqlen)
    if len(windows) == 0:
        raise ActsparseError(f"calibration text {calib.spec} has fewer than {args.seqlen} tokens; lower --seqlen")
    if args.calib_windows < len(windows):
        chosen = torch.randperm(len(windows), generator=torch.Generator().manual_seed(args.seed))[: args.calib_windows]
        windows = windows[chosen.sort().values]
    cache = "cpu" if args.offload else None
    if not config.resolved:  # N per layer measured on the same calibration windows, saved with the state
        config, _ = allocate(model, config, windows, bos_id=bos_id, progress=not args.no_progress)
    report = layerwise.calibrate_(
        model, config, windows, options=options, bos_id=bos_id, progress=not args.no_progress, cache_device=cache
    )
    out = save_state(model, args.out, calibration={"data": calib.spec, "data_parts": sorted(calib.parts), "model": args.model,
                                                  "fingerprints": stored_sample(calib), "excluded_eval_data": evaluation.spec,
                                                  "dtype": args.dtype, "device": device})  # fmt: skip
    print(f"model      {args.model}")
    print(
        f"calibrate  {calib.spec}  {len(windows)} windows x {args.seqlen} tokens, {config.pattern} {config.criterion} + {config.mitigation}"
    )
    for index, info in sorted(report.layers.items()):
        print(
            f"layer {index:3}  mse {info['mse']:.4e}"
            + (f"  loss {info['first_loss']:.4e} -> {info['last_loss']:.4e}" if "first_loss" in info else "")
        )
    print(f"time       {time.perf_counter() - start:.1f} s (calibration {report.seconds:.1f} s)")
    print(f"wrote      {out}")
