"""Sweeps: a YAML file expands into runs (models × patterns × criteria × mitigations × targets);
each finished run is appended to one JSONL store, and a restarted sweep skips what is done."""

from actsparse.sweep.runner import SweepSummary, execute, run_sweep
from actsparse.sweep.spec import Run, SweepSpec, load_sweep, parse_sweep
from actsparse.sweep.store import Store, latest_by_key, read_records

__all__ = [
    "Run",
    "Store",
    "SweepSpec",
    "SweepSummary",
    "execute",
    "latest_by_key",
    "load_sweep",
    "parse_sweep",
    "read_records",
    "run_sweep",
]
