"""What the library writes down: package versions, atomic writes, JSON lines, sha256 of files,
the fingerprint of the model an artifact belongs to, and the one checked directory format
(safetensors + a checksummed JSON manifest) of calibrated states and pruned weights.

At the bottom of the package (it imports nothing of actsparse but the version and the error type), so that
the library's layers can record their results without reaching up into ``eval``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import shutil
import sys
import tempfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from actsparse._version import __version__
from actsparse.errors import ActsparseError


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


# ---- the model a saved artifact belongs to -----------------------------------------------------

CHECKPOINT_KEYS = ("num_params", "embedding_shape", "embedding_mean", "embedding_abs_mean", "embedding_sq_mean")


def model_kind(model) -> dict:
    """The architecture part of a model's fingerprint: its class name and ``config.model_type``
    (nothing is read from the weights, so a skeleton on the meta device answers too)."""
    return {"architecture": type(model).__name__, "model_type": getattr(getattr(model, "config", None), "model_type", None)}


def model_fingerprint(model, exclude=()) -> dict:
    """What a saved artifact must be loaded back into: ``model_kind`` (the architecture) and the
    checkpoint's parameter count and input-embedding shape and moments (``CHECKPOINT_KEYS``).

    ``exclude``: tensors not counted among the parameters (the ones a mitigation adds to a
    sparsified model), so a calibrated model has the fingerprint of its dense checkpoint.
    """
    embed = model.get_input_embeddings().weight.detach().double()
    skip = {id(t) for t in exclude}
    return {
        **model_kind(model),
        "num_params": sum(p.numel() for p in model.parameters() if id(p) not in skip),
        "embedding_shape": list(embed.shape),
        "embedding_mean": embed.mean().item(),
        "embedding_abs_mean": embed.abs().mean().item(),
        "embedding_sq_mean": embed.square().mean().item(),
    }


def _close(a, b) -> bool:
    return isinstance(a, (int, float)) and isinstance(b, (int, float)) and math.isclose(a, b, rel_tol=1e-3, abs_tol=1e-6)


def checkpoint_differs(saved: dict, here: dict) -> bool:
    """Whether fingerprint ``here`` is of another checkpoint than the recorded ``saved``: every
    checkpoint key ``saved`` records must agree (counts and shapes exactly, embedding moments
    to 1e-3 relative); older files record fewer keys, a record of none differs."""
    keys = [key for key in CHECKPOINT_KEYS if key in saved]
    if not keys:
        return True
    exact = ("num_params", "embedding_shape")
    return not all(saved[k] == here.get(k) if k in exact else _close(saved[k], here.get(k)) for k in keys)


# ---- one checked directory format: a safetensors file and its JSON manifest ---------------------


def manifest_digest(manifest: dict) -> str:
    """sha256 of a manifest without its ``meta_sha256`` field, as compact sorted JSON."""
    body = {key: value for key, value in manifest.items() if key != "meta_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


@dataclass(frozen=True)
class SavedDirectory:
    """A directory format: ``tensors`` (safetensors) and the JSON ``manifest`` that describes it.

    The manifest carries ``format`` (``marker``) and ``format_version``, the package versions,
    the model's fingerprint under ``"model"`` (written by the caller), the tensor file's
    ``sha256`` and ``bytes``, and ``meta_sha256`` over its own content, so an edited manifest
    is refused like an altered tensor file. Versions in ``unchecked`` (written before the
    checksums) are read without them. The other fields word the refusals.
    """

    marker: str
    manifest: str
    tensors: str
    version: int
    kind: str  # "calibrated-state": "DIR is not a calibrated-state directory"
    written_by: str  # "actsparse calibrate"
    subject: str  # "state": "state in DIR is for a different model"
    listing: str  # the manifest key that lists the tensors
    again: str  # what to do about a damaged directory: "calibrate again"
    bad_json: str  # what to say about a manifest that is not JSON
    home: str  # "load it into the model it was calibrated on"
    plural: bool = False  # "pruned weights ... are"
    version_note: str = ""  # after "this actsparse reads version V"
    unchecked: tuple[int, ...] = ()
    replace: bool = True  # write the whole directory and rename it into place; else write the two files into it

    def write(self, directory: str | Path, tensors: dict[str, torch.Tensor], manifest: dict) -> Path:
        """Save ``tensors`` and ``manifest`` (completed with the format, versions and checksums)."""
        directory = Path(directory)
        if self.replace:
            directory.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}.", suffix=".tmp"))
            try:
                self._write_files(tmp, tensors, manifest)
                umask = os.umask(0)
                os.umask(umask)
                os.chmod(tmp, 0o777 & ~umask)
                for name in (self.tensors, self.manifest):
                    os.chmod(tmp / name, 0o666 & ~umask)
                old = None
                if directory.exists():
                    old = directory.with_name(f".{directory.name}.old.{os.getpid()}")
                    os.replace(directory, old)
                os.replace(tmp, directory)
                if old is not None:
                    shutil.rmtree(old, ignore_errors=True)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
        else:
            directory.mkdir(parents=True, exist_ok=True)
            self._write_files(directory, tensors, manifest)
        return directory

    def _write_files(self, directory: Path, tensors: dict[str, torch.Tensor], manifest: dict) -> None:
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{self.tensors}.", suffix=".tmp")
        os.close(fd)
        try:
            save_file(tensors, tmp, metadata={"format": self.marker})
            digest, size = sha256_file(tmp), Path(tmp).stat().st_size
            os.replace(tmp, directory / self.tensors)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        meta = {**manifest, "format": self.marker, "format_version": self.version, "sha256": digest, "bytes": size}
        meta.setdefault("versions", versions())
        meta = json.loads(json.dumps(meta))  # as it will read back (tuples as lists), before it is hashed
        meta["meta_sha256"] = manifest_digest(meta)
        write_text_atomic(directory / self.manifest, json.dumps(meta, indent=1, sort_keys=True) + "\n")  # last

    def read_manifest(self, directory: str | Path, verify: bool = True) -> dict:
        """The manifest, its format, version and own checksum checked; with ``verify`` the
        tensor file's size and sha256 too (no model needed)."""
        directory = Path(directory)
        meta_path, tensors_path = directory / self.manifest, directory / self.tensors
        if not meta_path.is_file() or not tensors_path.is_file():
            raise ActsparseError(
                f"{directory} is not a {self.kind} directory written by {self.written_by} (needs {self.manifest} and {self.tensors})"
            )
        try:
            meta = json.loads(meta_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ActsparseError(f"{meta_path} is not valid JSON ({error}); {self.bad_json}") from error
        if not isinstance(meta, dict) or meta.get("format") != self.marker:
            raise ActsparseError(f"{meta_path} is not an actsparse {self.kind} description (format is not '{self.marker}')")
        readable = (*self.unchecked, self.version)
        if meta.get("format_version") not in readable:
            raise ActsparseError(
                f"{meta_path} has format version {meta.get('format_version')}; this actsparse reads version "
                f"{' or '.join(map(str, readable))}{self.version_note}"
            )
        if meta["format_version"] in self.unchecked:
            return meta
        if meta.get("meta_sha256") != manifest_digest(meta):
            raise ActsparseError(
                f"{meta_path} does not match its own checksum (meta_sha256): the description was altered; {self.again}"
            )
        if verify and (tensors_path.stat().st_size != meta.get("bytes") or sha256_file(tensors_path) != meta.get("sha256")):
            raise ActsparseError(
                f"{tensors_path} does not match the checksum recorded in {self.manifest} (truncated or altered); {self.again}"
            )
        return meta

    def read_tensors(self, directory: str | Path, meta: dict) -> dict[str, torch.Tensor]:
        """The saved tensors, refused unless they are the ones the manifest lists."""
        path = Path(directory) / self.tensors
        try:
            tensors = load_file(path)
        except (SafetensorError, OSError) as error:
            raise ActsparseError(f"cannot read {path} ({error}); {self.again}") from error
        if set(tensors) != set(meta[self.listing]):
            raise ActsparseError(
                f"{path} and {self.manifest} do not list the same {self.listing}; the directory is damaged, {self.again}"
            )
        return tensors

    def check_architecture(self, saved: dict, here: dict, directory, here_is: str = "here") -> None:
        """Refuse a model whose ``model_kind`` differs from the recorded fingerprint ``saved``."""
        for key in ("architecture", "model_type"):
            if saved.get(key) != here[key]:
                raise ActsparseError(
                    f"{self.subject} in {directory} {'are' if self.plural else 'is'} for a different model: "
                    f"{key} is {saved.get(key)!r} there, {here[key]!r} {here_is}"
                )

    def check_checkpoint(self, saved: dict, here: dict, directory) -> None:
        """Refuse a fingerprint ``here`` of another checkpoint than the recorded ``saved``."""
        if checkpoint_differs(saved, here):
            raise ActsparseError(
                f"{self.subject} in {directory} {'come' if self.plural else 'comes'} from a different checkpoint of "
                f"{here['architecture']} (its parameter count or input embeddings differ); {self.home}, or pass check_model=False"
            )
