"""Recording results: package versions, and JSON written atomically (kept here for old imports;
the code lives in :mod:`actsparse.artifacts`)."""

from actsparse.artifacts import append_jsonl_atomic, read_jsonl, versions, write_json_atomic, write_text_atomic

__all__ = ["append_jsonl_atomic", "read_jsonl", "versions", "write_json_atomic", "write_text_atomic"]
