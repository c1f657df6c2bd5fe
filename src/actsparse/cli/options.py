"""What several subcommands share: argument types, the option groups, and the objects built from them.

Choices and defaults come from where they are defined: the backends from ``core.dispatch``,
the dtypes from ``models.loading``, the sparsity defaults from ``SparsityConfig``'s fields and
the evaluation defaults from ``EvalSettings``'s (and ``WeightPruneConfig``'s calibration windows).
Only the command line's own default pattern (8:16) is written here.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import MISSING, fields
from pathlib import Path

from actsparse.baselines import PRUNERS, WeightPruneConfig
from actsparse.cli.placement import add_placement_options as add_placement_options
from actsparse.cli.placement import placement_from as placement_from
from actsparse.config import SENSITIVITIES, SparsityConfig
from actsparse.core.dispatch import BACKENDS
from actsparse.errors import ActsparseError
from actsparse.eval.lmeval import TaskSettings
from actsparse.eval.run import DEFAULT_MODEL, EvalSettings
from actsparse.models.loading import DTYPES

DEFAULT_PATTERN = "8:16"  # the command line's default; SparsityConfig's own is 2:4
TARGETS = ("activations", "weights")  # what --prune removes
# options that --prune weights refuses
ACTIVATIONS_ONLY = ("criterion", "mitigation", "prefill_only", "backend", "allocation", "sensitivity")


def defaults(cls) -> dict:
    """A dataclass's field defaults by name (fields without a plain default left out)."""
    return {f.name: f.default for f in fields(cls) if f.default is not MISSING}


SPARSITY = defaults(SparsityConfig)
EVALUATION = defaults(EvalSettings)
TASKS = defaults(TaskSettings)
WEIGHTS = defaults(WeightPruneConfig)


class Parser(argparse.ArgumentParser):
    """argparse with its errors as one line (rc 2, through ``main``), not a usage block."""

    def error(self, message):
        raise ActsparseError(f"{message} (see `{self.prog} --help`)")


# ---- argument types ------------------------------------------------------------------------------


def whole(minimum: int, what: str | None = None):
    """argparse type: a whole number >= ``minimum``; ``what`` (e.g. "a positive integer") words every refusal as
    "expected WHAT, got 'TEXT'"."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected {what}, got '{text}'" if what else f"expected a whole number >= {minimum}, got {text!r}"
            ) from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected {what}, got '{text}'" if what else f"must be >= {minimum}, got {value}")
        return value

    parse.__name__ = what or f"whole number >= {minimum}"
    return parse


def real(low: float, high: float | None = None, open_low: bool = False):
    """argparse type: a finite number in [low, high] ((low, high] with ``open_low``)."""

    def parse(text: str) -> float:
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


def csv(text: str) -> tuple[str, ...]:
    """argparse type: comma-separated names, blanks dropped."""
    return tuple(part.strip() for part in text.split(",") if part.strip())


def whole_list(minimum: int, example: str, what: str = "whole numbers", bounded: str | None = None):
    """argparse type: comma-separated whole numbers >= ``minimum``, at least one (layer indices, batch sizes, ...).

    Refused: "expected comma-separated WHAT like EXAMPLE" for what is not a number, "... BOUNDED like
    EXAMPLE" for an empty list or one below ``minimum`` (``bounded`` defaults to "WHAT >= MINIMUM")."""
    bounded = bounded or f"{what} >= {minimum}"

    def parse(text: str) -> tuple[int, ...]:
        try:
            values = tuple(int(part) for part in csv(text))
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated {what} like {example}, got '{text}'") from None
        if not values or min(values) < minimum:
            raise argparse.ArgumentTypeError(f"expected comma-separated {bounded} like {example}, got '{text}'")
        return values

    parse.__name__ = f"list of {what}"
    return parse


layer_indices = whole_list(0, "0,1,2", "layer indices")
positive_int = whole(1, "a positive integer")  # what cli/bench.py's _whole reads
positive_ints = whole_list(1, "512,1024", "positive integers", "positive integers")  # and its _positive_list


# ---- option groups -------------------------------------------------------------------------------


def add_dtype_option(group, default: str = EVALUATION["dtype"]) -> None:
    group.add_argument("--dtype", default=default, choices=list(DTYPES), help=f"model dtype (default: {default})")


def add_device_option(group) -> None:
    group.add_argument("--device", default=EVALUATION["device"], help="cpu, cuda, cuda:1 ... (default: cuda if available)")


def add_sparsity_options(parser: argparse.ArgumentParser, weights: bool = True) -> None:
    """The sparsity options; ``weights``: also --prune / --method (``eval`` and ``export``)."""
    group = parser.add_argument_group("sparsity")
    group.add_argument(
        "--pattern", default=DEFAULT_PATTERN, help=f"N:M (e.g. 2:4, 8:16), unstructured:S, or dense (default: {DEFAULT_PATTERN})"
    )
    group.add_argument(
        "--criterion",
        default=SPARSITY["criterion"],
        help=f"which features survive; see `actsparse methods` (default: {SPARSITY['criterion']})",
    )
    group.add_argument(
        "--mitigation",
        default=SPARSITY["mitigation"],
        help=f"error mitigation; see `actsparse methods` (default: {SPARSITY['mitigation']})",
    )
    group.add_argument("--roles", type=csv, default=None, help="sparsify only these roles, e.g. q,gate,down (default: all)")
    group.add_argument(
        "--layers", type=layer_indices, default=None, help="sparsify only these decoder layers, e.g. 0,1,2 (default: all)"
    )
    group.add_argument("--skip", type=csv, default=(), help="skip entries ROLE, ROLE@LAYERS or @LAYERS, e.g. k,v,q@19,21")
    seed_help = (
        "seed of the random criterion, or with --prune weights of the calibration windows chosen"
        if weights
        else "seed of the random criterion and of the calibration windows chosen"
    )
    group.add_argument("--seed", type=int, default=SPARSITY["seed"], help=f"{seed_help} (default: {SPARSITY['seed']})")
    group.add_argument(
        "--backend",
        default=SPARSITY["backend"],
        choices=list(BACKENDS),
        help="auto: Triton kernels on CUDA where supported (default)",
    )
    group.add_argument(
        "--allocation",
        default="uniform",
        metavar="uniform|sensitivity|FILE.json",
        help="N per layer, M fixed: uniform (default); sensitivity (chosen from loss curves, --sensitivity, on --calib-data, --calib-windows "
        'windows, with --pattern the FLOP-weighted average); or a JSON file holding a map {"ROLE@LAYER": "N:M" or "dense"} '
        "(or a result record / state description whose config has one)",
    )
    group.add_argument(
        "--sensitivity",
        default=SPARSITY["sensitivity"],
        choices=list(SENSITIVITIES),
        help="what --allocation sensitivity minimises: fisher, the Fisher estimate of the loss increase from one forward "
        "and backward pass on the calibration windows (default); eq, the sum of e_q^2 (docs/methods.md)",
    )
    if weights:
        group.add_argument(
            "--prune",
            default=TARGETS[0],
            choices=list(TARGETS),
            help="prune the inputs of the linear layers (default) or, as a baseline, their weights",
        )
        others = [name for name in PRUNERS if name != WEIGHTS["method"]]
        group.add_argument(
            "--method",
            default=None,
            help=f"with --prune weights: {WEIGHTS['method']} (default), {', '.join(others[:-1])} or {others[-1]}",
        )
    group.add_argument(
        "--prefill-only", action="store_true", help="single-token decode steps run dense (perplexity is all prefill)"
    )


def add_eval_options(parser: argparse.ArgumentParser, evaluation: bool = True) -> None:
    """The model, text and window options; ``evaluation``: also --max-tokens / --batch-size (perplexity only)."""
    group = parser.add_argument_group("evaluation")
    group.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help=f"alias (smollm2-135m, gemma3-270m), local directory or hub id (default: {DEFAULT_MODEL})",
    )
    group.add_argument(
        "--data",
        default=EVALUATION["data"],
        help=f"evaluation text: brown:CATEGORY[+...], wikitext2, or a text file (default: {EVALUATION['data']})",
    )
    group.add_argument(
        "--calib-data",
        default=EVALUATION["calib_data"],
        help=f"calibration text, never overlapping --data (default: {EVALUATION['calib_data']})",
    )
    windows_help = (f"calibration windows for criteria/mitigations that need statistics (default: {EVALUATION['calib_windows']}), "
                    f"or for wanda/sparsegpt weight pruning (default: {WEIGHTS['calib_windows']})"
                    if evaluation else f"calibration windows (default: {EVALUATION['calib_windows']})")  # fmt: skip
    group.add_argument("--calib-windows", type=whole(1), default=None, help=windows_help)
    group.add_argument(
        "--seqlen", type=whole(2), default=EVALUATION["seqlen"], help=f"window length in tokens (default: {EVALUATION['seqlen']})"
    )
    if evaluation:
        group.add_argument("--max-tokens", type=whole(1), default=None, help="evaluate only the first N tokens' worth of windows")
        group.add_argument(
            "--batch-size",
            type=whole(1),
            default=EVALUATION["batch_size"],
            help=f"windows per forward pass (default: {EVALUATION['batch_size']})",
        )
    add_dtype_option(group)
    add_device_option(group)
    add_placement_options(group)
    group.add_argument("--no-progress", action="store_true", help="hide progress bars")


def add_task_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("zero-shot tasks and generation (lm-evaluation-harness: pip install 'actsparse[eval]')")
    group.add_argument(
        "--tasks",
        type=csv,
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
        "--task-batch-size",
        type=whole(1),
        default=TASKS["batch_size"],
        help=f"lm-eval batch size (results depend on it; recorded) (default: {TASKS['batch_size']})",
    )
    group.add_argument("--task-limit", type=whole(1), default=None, help="only the first N documents of each task (default: all)")
    group.add_argument(
        "--proxy-count",
        type=whole(1),
        default=TASKS["proxy_count"],
        help=f"items per proxy task (default: {TASKS['proxy_count']})",
    )
    group.add_argument(
        "--proxy-seed", type=int, default=TASKS["proxy_seed"], help=f"seed of the proxy tasks (default: {TASKS['proxy_seed']})"
    )
    group.add_argument(
        "--generate",
        type=whole(1),
        default=None,
        metavar="N",
        help="also greedy-continue the fixed prompts by N tokens, dense and sparse",
    )


# ---- objects from the options --------------------------------------------------------------------


def given(args) -> frozenset[str]:
    """The options the user typed (``main`` records them), whatever their values."""
    return getattr(args, "given", frozenset())


def task_settings_from(args) -> TaskSettings:
    return TaskSettings(
        tasks=tuple(getattr(args, "tasks", ()) or ()), task_dir=getattr(args, "task_dir", None),
        batch_size=getattr(args, "task_batch_size", TASKS["batch_size"]), limit=getattr(args, "task_limit", None),
        proxy_seed=getattr(args, "proxy_seed", TASKS["proxy_seed"]), proxy_count=getattr(args, "proxy_count", TASKS["proxy_count"]),
    )  # fmt: skip


def calib_windows_from(args) -> int:
    if args.calib_windows is not None:
        return args.calib_windows
    return WEIGHTS["calib_windows"] if getattr(args, "prune", TARGETS[0]) == "weights" else EVALUATION["calib_windows"]


def settings_from(args) -> EvalSettings:
    return EvalSettings(
        model=args.model, data=args.data, calib_data=args.calib_data, calib_windows=calib_windows_from(args), seqlen=args.seqlen,
        max_tokens=getattr(args, "max_tokens", None), batch_size=getattr(args, "batch_size", EVALUATION["batch_size"]),
        dtype=args.dtype, device=args.device,
    )  # fmt: skip


def allocation_from(text: str):
    """``--allocation``: ``uniform``, ``sensitivity``, or the map in a JSON file (a map, or a record with ``config.allocation``)."""
    if text in ("uniform", "sensitivity"):
        return text
    path = Path(text)
    if not path.is_file():
        raise ActsparseError(
            f"--allocation {text!r} is neither uniform, sensitivity nor an existing JSON file; give one of those "
            '(a file holds {"ROLE@LAYER": "N:M"}, e.g. the config of an earlier --json record)'
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ActsparseError(f"--allocation {text}: cannot read it as JSON ({error}); fix the file") from error
    if isinstance(data, dict) and isinstance(data.get("config"), dict):
        data = data["config"].get("allocation", "uniform")
    return data


def config_from(args) -> SparsityConfig:
    allocation = allocation_from(getattr(args, "allocation", "uniform"))
    if "sensitivity" in given(args) and allocation == "uniform":
        raise ActsparseError("--sensitivity chooses N per layer; give it with --allocation sensitivity")
    return SparsityConfig(
        pattern=args.pattern, criterion=args.criterion, mitigation=args.mitigation, roles=args.roles, layers=args.layers,
        skip=tuple(args.skip), seed=args.seed, backend=args.backend, prefill_only=getattr(args, "prefill_only", False),
        allocation=allocation,
        sensitivity=getattr(args, "sensitivity", SPARSITY["sensitivity"]),
    )  # fmt: skip


def weight_config_from(args) -> WeightPruneConfig:
    if set(ACTIVATIONS_ONLY) & given(args):
        raise ActsparseError(
            "--criterion, --mitigation, --backend, --prefill-only, --sensitivity and --allocation choose activation sparsity; with --prune weights use --method "
            f"({', '.join(PRUNERS)})"
        )
    return WeightPruneConfig(
        pattern=args.pattern, method=args.method or WEIGHTS["method"], roles=args.roles, layers=args.layers,
        skip=tuple(args.skip), calib_windows=calib_windows_from(args), seed=args.seed,
    )  # fmt: skip
