"""``actsparse sweep FILE``: every run of a sweep file into one resumable results store (``--workers N``: N processes)."""

from __future__ import annotations

from actsparse.cli.options import csv
from actsparse.errors import ActsparseError
from actsparse.sweep import Store, load_sweep, run_sweep
from actsparse.sweep.runner import check_sweep
from actsparse.sweep.workers import run_workers


def add_sweep_command(commands) -> None:
    sw = commands.add_parser(
        "sweep", help="run a sweep file into a results store (resumable)",
        description="Expand a sweep file (models x patterns x criteria x mitigations x targets, see sweeps/) into runs and "
        "evaluate each run not yet in the store; each finished run is appended atomically, so a killed sweep resumes where it stopped.",
    )  # fmt: skip
    sw.add_argument("file", help="sweep YAML, e.g. sweeps/papers.yaml")
    sw.add_argument("--out", default=None, metavar="FILE.jsonl", help="results store (default: the file's `store:`)")
    sw.add_argument(
        "--tasks", type=csv, default=None, help="override the file's lm-eval tasks; 'none' runs perplexity (and generation) only"
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


def cmd_sweep(args) -> None:
    """Run a sweep file, appending each finished run to the store; finished runs are skipped on restart."""
    spec = load_sweep(args.file)
    if args.tasks is not None:
        spec = spec.with_tasks(() if args.tasks in ((), ("none",)) else args.tasks)
    if args.device:
        spec = spec.with_device(args.device)
    out = args.out or spec.store
    if not out:
        raise ActsparseError(f"no results store: give --out FILE.jsonl (or `store:` in {args.file})")
    if args.workers is not None and not args.dry_run:
        check_sweep(spec)  # once, before any worker starts
        return run_sweep_workers(args, out, spec)
    if args.dry_run:
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


def run_sweep_workers(args, out: str, spec) -> None:
    """``--workers N``: N child processes of this command on the one store (actsparse.sweep.workers)."""
    child = []
    if args.tasks is not None:
        child += ["--tasks", ",".join(args.tasks) or "none"]
    if args.device:
        child += ["--device", args.device]
    if args.keep_going:
        child.append("--keep-going")
    before = Store(out).keys()
    codes = run_workers(args.file, out, args.workers, child)
    stored = Store(out).keys()
    keys = {run.key for run in spec.runs}
    print(f"{len((stored - before) & keys)} runs done now by {len(codes)} workers, {len(before & keys)} were already in {out}; "
          f"{len(keys - stored)} not stored")  # fmt: skip
    failed = [index for index, code in enumerate(codes) if code != 0]
    if failed:
        raise ActsparseError(
            f"worker(s) {', '.join(f'w{i}' for i in failed)} failed (see their lines above); run the same command again to retry their runs"
        )
