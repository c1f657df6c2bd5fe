"""The results store: one JSON record per line, each with the ``key`` of its run.

Appends go through ``append_jsonl_atomic`` (the file is rewritten beside itself and renamed
over it), under an exclusive lock on ``STORE.lock``, so a killed process never leaves half a
line and two sweeps writing to one store do not lose each other's records. Reading skips any
line that is not a complete JSON record (written by something else) and says so.
"""

from __future__ import annotations

import fcntl
import json
import sys
from contextlib import contextmanager
from pathlib import Path

from actsparse.eval.results import append_jsonl_atomic


@contextmanager
def _locked(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def read_records(path, warn=None) -> list[dict]:
    """The store's records in file order; a line that is not a JSON object is skipped (and reported)."""
    path = Path(path)
    if not path.exists():
        return []
    records, bad = [], 0
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            bad += 1
            continue
        if isinstance(record, dict):
            records.append(record)
        else:
            bad += 1
    if bad:
        (warn or (lambda text: print(text, file=sys.stderr)))(f"{path}: skipped {bad} line(s) that are not complete JSON records")
    return records


def latest_by_key(records: list[dict]) -> dict[str, dict]:
    """One record per run key (the last one written wins); records without a key are keyed by position."""
    out = {}
    for index, record in enumerate(records):
        out[record.get("key") or f"#{index}"] = record
    return out


class Store:
    """A JSONL results store of sweep runs."""

    def __init__(self, path):
        self.path = Path(path)

    def records(self) -> list[dict]:
        return read_records(self.path)

    def keys(self) -> set[str]:
        return {r["key"] for r in self.records() if "key" in r}

    def append(self, record: dict) -> None:
        if "key" not in record:
            raise ValueError("a sweep record needs its run's key")
        with _locked(self.path):
            append_jsonl_atomic(self.path, record)
