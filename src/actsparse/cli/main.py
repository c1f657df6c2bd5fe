"""The ``actsparse`` command line: a thin layer over the library.

This module builds the parser from the subcommands (one module each under ``actsparse.cli``,
each with an ``add_<name>_command(commands)``) and dispatches to the one given. The options
several commands share are in :mod:`actsparse.cli.options`; the checks made before a model
loads in :mod:`actsparse.cli.checks`.
"""

from __future__ import annotations

import argparse
import sys

from actsparse.cli import calibrate, eval, export, fetch, layers, methods, patterns, recipe, report, sensitivity, sweep, tasks
from actsparse.cli.bench import add_bench_command
from actsparse.cli.checks import check_state_options, preflight
from actsparse.cli.options import (
    Parser,
    add_eval_options,
    add_placement_options,
    add_sparsity_options,
    add_task_options,
    calib_windows_from,
    config_from,
    placement_from,
    settings_from,
    task_settings_from,
    weight_config_from,
)
from actsparse.errors import ActsparseError

# Kept importable from here, where scripts/*.py and cli/bench.py find them.
__all__ = [
    "add_eval_options", "add_placement_options", "add_sparsity_options", "add_task_options", "build_parser", "calib_windows_from",
    "check_state_options", "config_from", "given_options", "main", "placement_from", "preflight", "settings_from",
    "task_settings_from", "weight_config_from",
]  # fmt: skip

# In the order `actsparse --help` lists them.
COMMANDS = (
    eval.add_eval_command,
    sweep.add_sweep_command,
    recipe.add_recipe_command,
    report.add_report_command,
    tasks.add_tasks_command,
    calibrate.add_calibrate_command,
    sensitivity.add_sensitivity_command,
    patterns.add_patterns_command,
    methods.add_methods_command,
    layers.add_layers_command,
    export.add_export_command,
    add_bench_command,
    fetch.add_fetch_command,
)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="actsparse", description="Post-training N:M activation sparsity for Hugging Face causal LMs.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in COMMANDS:
        add(commands)
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
