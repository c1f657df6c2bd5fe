"""``actsparse export``: a sparse model as a Hugging Face checkpoint (thin layer over actsparse.hf.export)."""

from __future__ import annotations

from actsparse.calibration.mitigations import ensure_mitigation
from actsparse.calibration.state import read_state_meta, state_config
from actsparse.cli.checks import check_state_options, preflight
from actsparse.cli.options import (
    add_eval_options,
    add_sparsity_options,
    config_from,
    placement_from,
    settings_from,
    weight_config_from,
)
from actsparse.errors import ActsparseError
from actsparse.hf.export import export


def add_export_command(commands) -> None:
    ex = commands.add_parser(
        "export", help="save a sparse model as a Hugging Face checkpoint with a model card",
        description="Sparsify a model (or apply a calibrated --state, or prune its weights with --prune weights), measure dense and "
        "sparse perplexity, and write a save_pretrained checkpoint with a README.md model card. Activation sparsity loads back with "
        "AutoModelForCausalLM.from_pretrained once actsparse is imported; pruned weights are a plain dense checkpoint.",
    )  # fmt: skip
    add_sparsity_options(ex)
    add_eval_options(ex)
    ex.add_argument(
        "--state", default=None, metavar="DIR", help="export a calibrated state written by `actsparse calibrate` (its own config)"
    )
    ex.add_argument("--out", required=True, metavar="DIR", help="checkpoint directory (written whole, then renamed into place)")
    ex.set_defaults(func=cmd_export)


def cmd_export(args) -> None:
    state, config = None, None
    if args.state:
        if args.prune == "weights" or args.method is not None:
            raise ActsparseError(
                "--state exports a calibrated activation-sparsity state; it cannot be combined with --prune weights / --method"
            )
        preflight(
            args, check_state_options(args, state_config(read_state_meta(args.state))), calibrated=False
        )  # options given must match the state
        state = args.state
    elif args.prune == "weights":
        config = weight_config_from(args)
    else:
        if args.method is not None:
            raise ActsparseError(
                "--method chooses a weight pruning method and needs --prune weights; for activations use --criterion"
            )
        ensure_mitigation(args.mitigation)
        config = config_from(args)
    if config is not None:
        preflight(args, config)  # everything checked before the model loads
    record = export(
        settings_from(args), args.out, config=config, state=state, progress=not args.no_progress, placement=placement_from(args)
    )
    label = "pruned" if record["target"] == "weights" else "sparse"
    print(f"model      {record['model']}")
    print(f"data       {record['data']}  {record['tokens']} tokens")
    print(f"dense ppl  {record['dense_ppl']:.3f}")
    print(f"{label:<10} {record['sparse_ppl']:.3f}  ({record['sparse_flop_fraction']:.1%} of linear FLOPs)")
    print(f"wrote      {record['checkpoint']}")
