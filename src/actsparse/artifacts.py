"""What the library writes down: package versions, atomic writes, JSON lines, sha256 of files.

At the bottom of the package (it imports nothing of actsparse but the version), so that
the library's layers can record their results without reaching up into ``eval``.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import sys
import tempfile
from importlib import metadata
from pathlib import Path

import torch

from actsparse._version import __version__


def versions() -> dict[str, str]:
    """Versions of Python and of the packages a number depends on."""
    found = {"python": sys.version.split()[0], "platform": platform.platform()}
    found["actsparse"] = __version__
    found["device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu"
    for package in ("torch", "transformers", "tokenizers", "gguf", "lm_eval"):
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            found[package] = "not installed"
    return found


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file's bytes, read a MiB at a time."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


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


def warn(text: str) -> None:
    print(f"actsparse: warning: {text}", file=sys.stderr)


def read_records(path, warn=None) -> list[dict]:
    """The JSON records of a JSONL file in file order; a line that is not a JSON object is skipped (and reported)."""
    path = Path(path)
    if not path.exists():
        return []
    records, bad, last_bad = [], 0, False
    lines = [line for line in path.read_text(encoding="utf-8", errors="replace").splitlines() if line.strip()]
    for index, line in enumerate(lines):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if isinstance(record, dict):
            records.append(record)
        else:
            bad += 1
            last_bad = index == len(lines) - 1
    if bad:
        where = " (the last one truncated)" if last_bad else ""
        (warn or _warn)(f"{path}: skipped {bad} line(s) that are not complete JSON records{where}")
    return records


_warn = warn


def read_jsonl(path: str | Path) -> list[dict]:
    """The JSON records of a JSONL file; a damaged line (a truncated last line) is skipped with a warning."""
    return read_records(path)
