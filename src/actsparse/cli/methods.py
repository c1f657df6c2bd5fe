"""``actsparse methods``: the registered criteria, mitigations and weight pruners."""

from __future__ import annotations

import actsparse.amber  # noqa: F401  (registers the W8A8 mitigations)
import actsparse.calibration.mitigations  # noqa: F401  (registers the calibrated and learned mitigations)
from actsparse.baselines import PRUNERS
from actsparse.core.mitigation import MITIGATIONS
from actsparse.core.scoring import CRITERIA


def add_methods_command(commands) -> None:
    me = commands.add_parser(
        "methods", help="list criteria and mitigations", description="List the registered criteria and mitigations."
    )
    me.set_defaults(func=cmd_methods)


def cmd_methods(args) -> None:
    for title, registry in (("criteria", CRITERIA), ("mitigations", MITIGATIONS)):
        print(f"{title}:")
        for name, entry in registry.items():
            flags = [
                flag for flag, on in (("needs calibration", entry.needs_calibration), ("non-causal", not entry.causal)) if on
            ]
            print(f"  {name:14} {entry.description}{'  [' + ', '.join(flags) + ']' if flags else ''}")
    print("weight pruning methods (eval --prune weights --method NAME):")
    for name, pruner in PRUNERS.items():
        print(f"  {name:14} {pruner.description}{'  [needs calibration]' if pruner.needs_calibration else ''}")
