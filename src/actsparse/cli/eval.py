"""``actsparse eval``: dense vs sparse perplexity (and tasks, generation) of one config, a calibrated state or weight pruning."""

from __future__ import annotations

import json
import time

from actsparse.artifacts import model_kind, write_json_atomic
from actsparse.calibration.mitigations import ensure_mitigation
from actsparse.calibration.state import DIRECTORY as STATE_DIRECTORY
from actsparse.calibration.state import check_state_text, read_state_meta, state_config
from actsparse.cli.checks import check_state_options, preflight
from actsparse.cli.options import (
    add_eval_options,
    add_sparsity_options,
    add_task_options,
    config_from,
    given,
    placement_from,
    settings_from,
    task_settings_from,
    weight_config_from,
)
from actsparse.data.sources import load_text
from actsparse.errors import ActsparseError
from actsparse.eval.generate import GenerateSettings
from actsparse.eval.lmeval import prepare_tasks, require_lm_eval
from actsparse.eval.measure import measure
from actsparse.eval.methods import Dense, FromState, Weights
from actsparse.eval.run import Evaluator


def add_eval_command(commands) -> None:
    ev = commands.add_parser(
        "eval", help="dense vs sparse perplexity of a model",
        description="Dense vs sparse perplexity (docs/methods.md, Perplexity); --prune weights evaluates weight pruning at the same pattern instead.",
    )  # fmt: skip
    add_sparsity_options(ev)
    add_eval_options(ev)
    ev.add_argument("--json", action="store_true", help="print one JSON record on stdout instead of the table")
    ev.add_argument("--out", default=None, help="also write the JSON record to this file (atomically)")
    ev.add_argument(
        "--state",
        default=None,
        metavar="DIR",
        help="evaluate a calibrated state written by `actsparse calibrate` (its own config)",
    )
    add_task_options(ev)
    ev.set_defaults(func=cmd_eval)


def cmd_eval(args) -> None:
    if getattr(args, "state", None):
        return cmd_eval_state(args)
    if args.prune == "weights":
        return cmd_eval_weights(args)
    ensure_mitigation(args.mitigation)
    if "method" in given(args):
        raise ActsparseError(
            "--method chooses a weight pruning method and needs --prune weights; for activations use --criterion"
        )
    config = config_from(args)  # validate before the slow model load
    preflight(args, config)
    record = _evaluate(args, config, lambda evaluator, c, extra: evaluator.run(c, extra=extra))
    if record is None:
        return
    _print_table(args, record, f"{config.pattern} {config.criterion} + {config.mitigation}")
    print(
        f"sparse linear FLOPs {record['sparse_flop_fraction']:.1%} ({record['sparse_layers']} layers sparse, {record['dense_layers']} dense)"
    )
    patterns = ", ".join(f"{count} at {pattern}" for pattern, count in record["layer_patterns"].items())
    print(f"density    {record['density']:.4f} of linear-layer inputs kept, FLOP-weighted ({patterns})")
    if "allocation" in record:
        info = record["allocation"]
        print(
            f"allocation N per layer from {info['settings']['objective']} on {info['data']} ({info['settings']['windows']} windows, {info['seconds']:.1f} s): "
            f"target {info['target_density']:.4f}, reached {info['density']:.4f}{'' if info['met'] else ' (nearest achievable)'}"
        )
    if not record["causal"]:
        print("note: this criterion/mitigation looks at every token of the batch (non-causal)")
    print(
        f"time       {record['total_seconds']:.1f} s (load {record['load_seconds']:.1f} s, dense {record['dense_seconds']:.1f} s, sparse {record['sparse_seconds']:.1f} s)"
    )
    if args.out:
        print(f"wrote      {args.out}")


def cmd_eval_weights(args) -> None:
    config = weight_config_from(args)  # validate before the slow model load
    preflight(args, config)
    record = _evaluate(args, config, lambda evaluator, c, extra: evaluator.run(Weights(c), extra=extra))
    if record is None:
        return
    _print_table(args, record, f"{config.pattern} weights {config.method}")
    print(
        f"pruned weights in {record['sparse_flop_fraction']:.1%} of linear FLOPs ({record['sparse_layers']} layers pruned, "
        f"{record['dense_layers']} dense); {record['removed_flop_fraction']:.1%} of linear FLOPs multiply a zero weight"
    )
    print(
        f"time       {record['total_seconds']:.1f} s (load {record['load_seconds']:.1f} s, dense {record['dense_seconds']:.1f} s, "
        f"prune {record['prune_seconds']:.1f} s, pruned {record['sparse_seconds'] - record['prune_seconds']:.1f} s)"
    )
    if args.out:
        print(f"wrote      {args.out}")


def cmd_eval_state(args) -> None:
    meta = read_state_meta(args.state)  # format, both checksums, the config: before the slow model load
    config = check_state_options(args, state_config(meta))
    skeleton = preflight(args, config, calibrated=False)
    check_state_text(meta, load_text(args.data))  # the state's calibration text never overlaps --data
    if skeleton is not None:
        STATE_DIRECTORY.check_architecture(meta["model"], model_kind(skeleton), args.state, here_is=f"for {args.model}")
    backend = args.backend if "backend" in given(args) else None
    record = _evaluate(
        args, config, lambda evaluator, c, extra: evaluator.run(FromState(args.state, backend=backend), extra=extra)
    )
    if record is None:
        return
    _print_table(args, record, f"{config.pattern} {config.criterion} + {config.mitigation}")
    print(f"state      {args.state}")
    print(
        f"time       {record['total_seconds']:.1f} s (load {record['load_seconds']:.1f} s, dense {record['dense_seconds']:.1f} s, sparse {record['sparse_seconds']:.1f} s)"
    )
    if args.out:
        print(f"wrote      {args.out}")


def _extra_from(args, evaluator):
    """The ``extra`` measurement of ``eval``: lm-eval tasks and the generation check, or None."""
    tasks = task_settings_from(args)
    generate = GenerateSettings(max_new_tokens=args.generate) if getattr(args, "generate", None) else None
    prepared = prepare_tasks(tasks, evaluator.source) if tasks.tasks else None
    return measure(prepared, generate)


def _evaluate(args, config, run) -> dict | None:
    """Load, evaluate one config with ``run(evaluator, config)``, write/print the record.

    Returns the record when the caller should print the human-readable table, else None.
    """
    start = time.perf_counter()
    task_settings_from(args)  # validate before the slow model load
    if getattr(args, "tasks", None):
        require_lm_eval()
    evaluator = Evaluator(settings_from(args), progress=not args.no_progress, placement=placement_from(args))
    extra = _extra_from(args, evaluator)
    dense = evaluator.run(Dense(), extra=extra) if extra is not None else None  # tasks and generation on the dense model first
    record = run(evaluator, config, extra)
    if dense is not None:
        record["dense"] = {key: dense[key] for key in ("tasks", "generation", "lm_eval") if key in dense}
    record["total_seconds"] = time.perf_counter() - start
    if args.out:
        write_json_atomic(args.out, record)
    if args.json:
        print(json.dumps(record, sort_keys=True))
        return None
    return record


def _print_table(args, record: dict, label: str) -> None:
    print(f"model      {record['model']}  ({record['model_info']['architecture']})")
    print(f"data       {record['data']}  {record['windows']} windows x {args.seqlen} tokens, {record['tokens']} predicted")
    if "calibration" in record:
        print(f"calibrate  {record['calibration']['data']}  {record['calibration']['windows']} windows x {args.seqlen} tokens")
    print(f"{'':10} {'dense':>10} {label:>30}")
    print(f"{'perplexity':10} {record['dense_ppl']:>10.3f} {record['sparse_ppl']:>30.3f}")
    dense = record.get("dense", {})
    for name, scores in record.get("tasks", {}).items():
        for metric in ("acc", "acc_norm"):
            if metric in scores:
                before = dense.get("tasks", {}).get(name, {}).get(metric, float("nan"))
                proxy = " (actsparse proxy)" if "proxy" in scores else ""
                print(f"{name}{proxy} {metric}")
                print(f"{'':10} {before:>10.4f} {scores[metric]:>30.4f}")
    if record.get("lm_eval"):
        info = record["lm_eval"]
        print(
            f"lm-eval    {info['version']}, 0-shot, batch size {info['batch_size']}"
            + (f", first {info['limit']} documents" if info["limit"] else "")
        )
    sparse_outputs = record.get("generation", {}).get("outputs", [])
    dense_outputs = {o["prompt"]: o["continuation"] for o in dense.get("generation", {}).get("outputs", [])}
    for output in sparse_outputs:
        print(f"prompt     {output['prompt']!r}")
        print(f"  dense    {dense_outputs.get(output['prompt'], '')!r}")
        print(f"  sparse   {output['continuation']!r}")
