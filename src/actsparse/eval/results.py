"""Recording results: package versions, and JSON written atomically."""

from __future__ import annotations

import json
import os
import platform
import sys
import tempfile
from importlib import metadata
from pathlib import Path


def versions() -> dict[str, str]:
    """Versions of Python and of the packages a number depends on."""
    found = {"python": sys.version.split()[0], "platform": platform.platform()}
    import actsparse
    import torch

    found["actsparse"] = actsparse.__version__
    found["device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu"
    for package in ("torch", "transformers", "tokenizers", "gguf", "lm_eval"):
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            found[package] = "not installed"
    return found


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write text to a temporary file beside ``path`` and rename it over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())  # on disk before it replaces the old file
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_json_atomic(path: str | Path, record) -> Path:
    """Write JSON to a temporary file beside ``path`` and rename it over ``path``."""
    return write_text_atomic(path, json.dumps(record, indent=2, sort_keys=True) + "\n")


def append_jsonl_atomic(path: str | Path, record: dict) -> None:
    """Append one JSON line; the file is rewritten atomically so a kill never leaves half a line."""
    path = Path(path)
    old = path.read_text(encoding="utf-8") if path.exists() else ""
    if old and not old.endswith("\n"):
        old += "\n"
    write_text_atomic(path, old + json.dumps(record, sort_keys=True) + "\n")


def read_jsonl(path: str | Path) -> list[dict]:
    """The JSON records of a JSONL file; a damaged line (a truncated last line) is skipped with a warning."""
    from actsparse.sweep.store import read_records

    return read_records(path)
