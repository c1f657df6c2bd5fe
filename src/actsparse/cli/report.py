"""``actsparse report``: Markdown (and PNG plots) from results stores."""

from __future__ import annotations

from actsparse.report import write_report


def add_report_command(commands) -> None:
    re_ = commands.add_parser(
        "report", help="Markdown report (and PNG plots) from results stores",
        description="Turn results stores (sweep stores, table-script stores) into report.md with perplexity and task scores per "
        "pattern and method, the headline ratio to 2:4, activation vs weight pruning and the generation check.",
    )  # fmt: skip
    re_.add_argument("stores", nargs="+", help="JSONL results stores")
    re_.add_argument("--out", required=True, metavar="DIR", help="directory for report.md and the PNGs")
    re_.add_argument("--no-plots", action="store_true", help="Markdown only (no matplotlib needed)")
    re_.set_defaults(func=cmd_report)


def cmd_report(args) -> None:
    """Markdown (and PNG plots) from one or more results stores."""
    command = "actsparse report " + " ".join(args.stores) + f" --out {args.out}" + (" --no-plots" if args.no_plots else "")
    path = write_report(args.stores, args.out, plots=not args.no_plots, command=command)
    print(f"wrote      {path}")
