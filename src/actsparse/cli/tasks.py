"""``actsparse tasks``: write the offline proxy zero-shot tasks of an evaluation text (lm-eval task YAML + JSONL)."""

from __future__ import annotations

from actsparse.cli.options import EVALUATION, TASKS, whole
from actsparse.data.sources import load_text
from actsparse.eval.proxy_tasks import write_proxy_tasks


def add_tasks_command(commands) -> None:
    ta = commands.add_parser(
        "tasks", help="write the offline proxy zero-shot tasks of a text",
        description="Write actsparse's proxy tasks (LAMBADA-style last word, HellaSwag-style continuation) built from an "
        "evaluation text, as lm-eval task YAML + JSONL.",
    )  # fmt: skip
    ta.add_argument("--data", default=EVALUATION["data"], help=f"evaluation text (default: {EVALUATION['data']})")
    ta.add_argument("--out", required=True, metavar="DIR", help="task directory (an lm-eval include path)")
    ta.add_argument("--seed", type=int, default=TASKS["proxy_seed"], help=f"seed (default: {TASKS['proxy_seed']})")
    ta.add_argument(
        "--count", type=whole(1), default=TASKS["proxy_count"], help=f"items per task at most (default: {TASKS['proxy_count']})"
    )
    ta.set_defaults(func=cmd_tasks)


def cmd_tasks(args) -> None:
    """Write the offline proxy tasks of an evaluation text (lm-eval task YAML + JSONL)."""
    written = write_proxy_tasks(load_text(args.data), args.out, seed=args.seed, count=args.count)
    for name, entry in written.manifest["tasks"].items():
        print(f"{name:45} {entry['items']:5} items  sha256 {entry['sha256'][:16]}")
    print(
        f"wrote      {written.directory}  (lm_eval --include_path {written.directory} --tasks {','.join(written.names.values())})"
    )
