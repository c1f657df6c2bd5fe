"""``actsparse sweep FILE --workers N`` (thin layer over actsparse.sweep.workers)."""

from __future__ import annotations

from actsparse.errors import ActsparseError


def run_sweep_workers(args, out: str, spec) -> None:
    from actsparse.sweep import Store
    from actsparse.sweep.workers import run_workers

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
