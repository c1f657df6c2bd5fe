"""``actsparse recipe``: the best criterion × mitigation × allocation for a model, a pattern and a density budget."""

from __future__ import annotations

import json

from actsparse.cli.options import DEFAULT_PATTERN, add_eval_options, csv, placement_from, settings_from, whole
from actsparse.data.sources import load_text
from actsparse.errors import ActsparseError
from actsparse.sweep.recipe import ALLOCATIONS, CRITERIA, DEFAULT_SELECT, MITIGATIONS, RecipeSearch, recipe_name, search_recipe


def add_recipe_command(commands) -> None:
    re_ = commands.add_parser(
        "recipe", help="search criterion x mitigation x allocation at a density budget",
        description="Evaluate every criterion x mitigation x allocation at --pattern (the FLOP-weighted density budget) on "
        "--select-data (calibration text, never --data), then the best one on --data. Every run goes into --store; "
        "running the same command again resumes it.",
    )  # fmt: skip
    re_.add_argument("--pattern", default=DEFAULT_PATTERN, help=f"N:M, the density budget (default: {DEFAULT_PATTERN})")
    re_.add_argument("--criteria", type=csv, default=CRITERIA, help=f"default: {','.join(CRITERIA)}")
    re_.add_argument("--mitigations", type=csv, default=MITIGATIONS, help=f"default: {','.join(MITIGATIONS)}")
    re_.add_argument(
        "--allocations", type=csv, default=ALLOCATIONS, help=f"uniform, sensitivity (default: {','.join(ALLOCATIONS)})"
    )
    re_.add_argument(
        "--select-data", default=DEFAULT_SELECT, help=f"text the candidates are ranked on (default: {DEFAULT_SELECT})"
    )
    re_.add_argument("--select-tokens", type=whole(2), default=8192, help="tokens of --select-data per candidate (default: 8192)")
    re_.add_argument("--store", required=True, help="JSONL results store (resumed when it exists)")
    re_.add_argument("--json", action="store_true", help="print the winner's record as JSON")
    add_eval_options(re_)
    re_.set_defaults(func=cmd_recipe)


def cmd_recipe(args) -> None:
    if placement_from(args):
        raise ActsparseError("recipe runs through the sweep runner, which places the model on one device; drop --device-map")
    for allocation in args.allocations:
        if allocation not in ALLOCATIONS:
            raise ActsparseError(f"unknown allocation {allocation!r} in --allocations; choose from {', '.join(ALLOCATIONS)}")
    search = RecipeSearch(
        settings_from(args), args.pattern, criteria=args.criteria, mitigations=args.mitigations, allocations=args.allocations,
        select_data=args.select_data, select_tokens=args.select_tokens,
    )  # fmt: skip
    load_text(args.data)
    search.check_texts()  # before any model loads
    result = search_recipe(search, args.store, progress=not args.no_progress)
    winner = result["winner"]
    if args.json:
        print(json.dumps(winner, sort_keys=True))
        return
    print(f"selection on {args.select_data} ({args.select_tokens} tokens; dense {result['select_dense_ppl']:.3f}):")
    for record in result["candidates"]:
        print(f"  {recipe_name(record['config']):<44} ppl {record['sparse_ppl']:10.3f}  density {record['density']:.4f}")
    print(f"winner     {recipe_name(winner['config'])}")
    print(f"{'':10} {'dense':>10} {'winner':>12}   on {winner['data']}, {winner['tokens']} predicted tokens")
    print(f"{'perplexity':10} {winner['dense_ppl']:>10.3f} {winner['sparse_ppl']:>12.3f}")
    print(f"density    {winner['density']:.4f} (FLOP-weighted), sparse linear FLOPs {winner['sparse_flop_fraction']:.1%}")
    print(f"store      {args.store}")
