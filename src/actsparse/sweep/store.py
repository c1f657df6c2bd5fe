"""The results store: one JSON record per line, each with the ``key`` of its run.

Several processes may share one store (two ``actsparse sweep`` commands on one file, or the
workers of one sweep). Everything that changes the store happens under an exclusive lock on
``STORE.lock``:

- ``append(record)`` rewrites the file beside itself and renames it over it
  (``append_jsonl_atomic``), so a killed process never leaves half a line; a record whose key
  the store already holds is not written again (``append`` returns False), so a run is never
  stored twice, whoever ran it.
- ``claim(key, worker=None)`` reserves a run before it starts, so that no two processes
  spend time on it: True when this worker got it (or already held it); False when the run
  is already stored or another live worker holds it. ``append`` of the record releases the
  claim; ``release(key, worker=None)`` gives it back without a record (a failed run).
  Claims live in ``STORE.claims`` (JSON), one per key with its worker name, host, process id
  and time. A claim whose process has died (same host, pid gone) is stale and is taken over
  by the next ``claim``; claims of other hosts go stale after ``stale_after`` seconds when
  that is given (default: never, since their processes cannot be checked from here).
  ``worker`` defaults to ``default_worker()``, ``"<host>:<pid>"`` of this process; give each
  worker of one process its own name (e.g. ``f"{default_worker()}/2"``) when they run side by
  side.

Reading never fails on a damaged line: a line that is not a complete JSON record (a
truncated last line left by a non-atomic writer, for instance) is skipped with a warning.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from contextlib import contextmanager
from pathlib import Path

from actsparse.artifacts import append_jsonl_atomic, read_records, write_text_atomic
from actsparse.artifacts import warn as _warn


@contextmanager
def _locked(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def latest_by_key(records: list[dict]) -> dict[str, dict]:
    """One record per run key (the last one written wins); records without a key are keyed by position."""
    out = {}
    for index, record in enumerate(records):
        out[record.get("key") or f"#{index}"] = record
    return out


def default_worker() -> str:
    """This process's worker name: ``"<host>:<pid>"``."""
    return f"{socket.gethostname()}:{os.getpid()}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


class Store:
    """A JSONL results store of sweep runs, safe to share between processes (see the module docstring)."""

    def __init__(self, path, stale_after: float | None = None):
        self.path = Path(path)
        self.claims_path = self.path.with_name(self.path.name + ".claims")
        self.stale_after = stale_after

    def records(self) -> list[dict]:
        return read_records(self.path)

    def keys(self) -> set[str]:
        return {r["key"] for r in self.records() if "key" in r}

    # -- claims (call only under the lock) ---------------------------------------------------

    def _read_claims(self) -> dict[str, dict]:
        if not self.claims_path.exists():
            return {}
        try:
            claims = json.loads(self.claims_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            _warn(f"{self.claims_path} is damaged; its claims are dropped")
            return {}
        return claims if isinstance(claims, dict) else {}

    def _write_claims(self, claims: dict[str, dict]) -> None:
        if claims:
            write_text_atomic(self.claims_path, json.dumps(claims, indent=1, sort_keys=True) + "\n")
        else:
            self.claims_path.unlink(missing_ok=True)

    def _stale(self, claim: dict) -> bool:
        if not isinstance(claim, dict):
            return True
        if claim.get("host") == socket.gethostname():
            return not isinstance(claim.get("pid"), int) or not _alive(claim["pid"])
        if self.stale_after is not None:
            return time.time() - float(claim.get("time", 0)) > self.stale_after
        return False

    def claim(self, key: str, worker: str | None = None) -> bool:
        """Reserve the run ``key`` for ``worker``; True when it got it (see the module docstring)."""
        worker = worker or default_worker()
        with _locked(self.path):
            if key in self.keys():
                return False
            claims = self._read_claims()
            held = claims.get(key)
            if held is not None and isinstance(held, dict) and held.get("worker") == worker:
                return True
            if held is not None and not self._stale(held):
                return False
            claims[key] = {"worker": worker, "host": socket.gethostname(), "pid": os.getpid(), "time": time.time()}
            self._write_claims(claims)
            return True

    def release(self, key: str, worker: str | None = None) -> None:
        """Give back ``worker``'s claim on ``key`` (nothing happens when it holds none)."""
        worker = worker or default_worker()
        with _locked(self.path):
            claims = self._read_claims()
            if isinstance(claims.get(key), dict) and claims[key].get("worker") == worker:
                del claims[key]
                self._write_claims(claims)

    def claims(self) -> dict[str, dict]:
        """The claims held now (stale ones included), by key."""
        with _locked(self.path):
            return self._read_claims()

    # -- records -----------------------------------------------------------------------------

    def append(self, record: dict) -> bool:
        """Append ``record`` unless its key is stored already; releases the key's claim. True when written."""
        if "key" not in record:
            raise ValueError("a sweep record needs its run's key")
        with _locked(self.path):
            claims = self._read_claims()
            if record["key"] in claims:
                del claims[record["key"]]
                self._write_claims(claims)
            if record["key"] in self.keys():
                return False
            append_jsonl_atomic(self.path, record)
            return True
