"""Offline zero-shot proxy tasks for lm-evaluation-harness, built from the evaluation text.

No copy of LAMBADA, HellaSwag & co. can be reached on these machines, so actsparse writes two
tasks of the same kind from the evaluation text itself, as lm-eval task files (a YAML per
task and the JSONL it reads); lm-eval loads and scores them, not actsparse:

- ``actsparse_lastword_<corpus>`` (LAMBADA-style): a passage of whole sentences of one
  document, at least ``MIN_WORDS`` words; predict its last word, which must also occur
  earlier in the passage (so the context can tell it). Metrics: acc (greedy match), perplexity.
- ``actsparse_continuation_<corpus>`` (HellaSwag-style): ``CONTEXT_SENTENCES`` sentences of a
  document; pick the sentence that really follows among ``CHOICES`` candidates, the others
  drawn from other passages at a similar length. Metrics: acc, acc_norm.

Both are ours — proxies, not the benchmarks — and are named as such wherever reported.
Everything is a pure function of the text, the seed and the count, so the same call writes
the same bytes. Only evaluation text goes in; calibration text is a different split
(``actsparse.data.sources``).
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from dataclasses import dataclass
from pathlib import Path

import yaml

from actsparse.data.sources import TextSource
from actsparse.errors import ActsparseError

PREFIX = "actsparse_"
LASTWORD = "actsparse_lastword"
CONTINUATION = "actsparse_continuation"
KINDS = (LASTWORD, CONTINUATION)
TAG = "actsparse_proxy"
FORMAT = 1  # bump when the generated items change for the same text, seed and count

MIN_WORDS, MAX_WORDS = 40, 120  # lastword passage length in words
CONTEXT_SENTENCES, CHOICES = 2, 4
MIN_CONTEXT_WORDS, ENDING_WORDS = 15, (6, 50)
FAR = 20  # distractors from the same document are at least this many sentences away

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|(?<=[.!?][\"')\]])\s+")
_WORD = re.compile(r"^[A-Za-z]{3,}$")
_TRAILING = ".,;:!?\"')]"


def corpus_slug(spec: str) -> str:
    """A task-name-safe name of a text spec: ``brown:news`` -> ``brown_news``; a file -> ``file_<stem>``."""
    scheme, _, arg = spec.partition(":")
    if scheme == "file":
        spec = "file_" + Path(arg).stem
    return re.sub(r"[^a-z0-9]+", "_", spec.lower()).strip("_")


def task_name(kind: str, spec: str) -> str:
    """``actsparse_lastword`` + ``brown:news`` -> ``actsparse_lastword_brown_news``."""
    if kind not in KINDS:
        raise ActsparseError(f"unknown proxy task '{kind}'; proxies are: {', '.join(KINDS)}")
    return f"{kind}_{corpus_slug(spec)}"


def documents(text: str) -> list[list[str]]:
    """The text's documents (split at blank lines), each a list of sentences."""
    docs = []
    for block in re.split(r"\n\s*\n", text):
        sentences = [s.strip() for s in _SENTENCE_END.split(" ".join(block.split())) if s.strip()]
        if sentences:
            docs.append(sentences)
    return docs


def _last_word(passage: str) -> tuple[str, str] | None:
    """(context, word) when the passage ends in a word of 3+ letters that also occurs before it.

    Punctuation after the word (attached, or as separate tokens) is dropped, as in LAMBADA.
    """
    words = passage.split()
    while words and not words[-1].strip(_TRAILING):
        words.pop()
    if len(words) < 2:
        return None
    word = words[-1].rstrip(_TRAILING)
    if not _WORD.match(word) or word.lower() not in {w.strip(_TRAILING + "\"'(`").lower() for w in words[:-1]}:
        return None
    return " ".join(words[:-1]), word


def lastword_items(docs: list[list[str]]) -> list[dict]:
    """Every non-overlapping LAMBADA-style passage of the documents, in text order."""
    items = []
    for d, sentences in enumerate(docs):
        lengths = [len(s.split()) for s in sentences]
        start = 0
        while start < len(sentences):
            end, words = start, 0
            while end < len(sentences) and words < MIN_WORDS:
                words, end = words + lengths[end], end + 1
            found = None
            while words >= MIN_WORDS and words <= MAX_WORDS:
                found = _last_word(" ".join(sentences[start:end]))
                if found or end >= len(sentences):
                    break
                words, end = words + lengths[end], end + 1
            if found:
                items.append({"id": f"d{d}s{start}", "context": found[0], "target": " " + found[1]})
                start = end
            else:
                start += 1
    return items


def continuation_items(docs: list[list[str]], rng: random.Random) -> list[dict]:
    """Every non-overlapping HellaSwag-style item: context sentences, the true next one and distractors.

    Distractors are distinct sentences from other passages — another document, or more than
    ``FAR`` sentences away in the same one — whose length is within [2/3, 3/2] of the true one's.
    """
    low, high = ENDING_WORDS
    by_length: dict[int, list[tuple[int, int, str]]] = {}
    for d, sentences in enumerate(docs):
        for i, s in enumerate(sentences):
            by_length.setdefault(len(s.split()), []).append((d, i, s))
    items = []
    for d, sentences in enumerate(docs):
        start = 0
        while start + CONTEXT_SENTENCES < len(sentences):
            at = start + CONTEXT_SENTENCES
            context, ending = " ".join(sentences[start:at]), sentences[at]
            size = len(ending.split())
            if len(context.split()) >= MIN_CONTEXT_WORDS and low <= size <= high:
                lengths = range(-(-2 * size // 3), 3 * size // 2 + 1)
                others = list(dict.fromkeys(
                    s for n in lengths for od, i, s in by_length.get(n, ()) if (od != d or abs(i - at) > FAR) and s != ending
                ))  # fmt: skip
                if len(others) >= CHOICES - 1:
                    endings = rng.sample(others, CHOICES - 1)
                    label = rng.randrange(CHOICES)
                    endings.insert(label, ending)
                    items.append({"id": f"d{d}s{start}", "context": context, "endings": endings, "label": label})
                    start = at + 1
                    continue
            start += 1
    return items


def _choose(items: list[dict], count: int, rng: random.Random) -> list[dict]:
    """A seeded choice of ``count`` items, kept in text order (all of them when there are fewer)."""
    if count >= len(items):
        return items
    return [items[i] for i in sorted(rng.sample(range(len(items)), count))]


def _task_yaml(name: str, kind: str, data: Path, source: str, seed: int, items: int) -> dict:
    what = "LAMBADA-style last word" if kind == LASTWORD else "HellaSwag-style true continuation"
    task = {
        "task": name,
        "tag": [TAG],
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data.resolve())}},
        "test_split": "test",
        "doc_to_text": "context",
        "metadata": {"version": FORMAT, "proxy": f"actsparse proxy ({what}) built from {source}, seed {seed}, {items} items"},
    }
    if kind == LASTWORD:
        task.update(
            output_type="loglikelihood", doc_to_target="target",
            metric_list=[{"metric": "perplexity", "aggregation": "perplexity", "higher_is_better": False},
                         {"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
        )  # fmt: skip
    else:
        task.update(
            output_type="multiple_choice", doc_to_choice="endings", doc_to_target="label",
            metric_list=[{"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                         {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}],
        )  # fmt: skip
    return task


def _write_if_changed(path: Path, text: str) -> None:
    """Write ``text`` (atomically) unless the file already holds it, so caches keyed on mtime stay valid."""
    if path.exists() and path.read_text(encoding="utf-8") == text:
        return
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


@dataclass(frozen=True)
class ProxyTasks:
    """The proxy tasks written for one text: their directory (an lm-eval include path) and names."""

    directory: Path
    names: dict  # kind -> task name
    manifest: dict


def write_proxy_tasks(source: TextSource, directory, seed: int = 0, count: int = 1000) -> ProxyTasks:
    """Write both proxy tasks of ``source`` (evaluation text) into ``directory``: YAML + JSONL + manifest.json.

    ``count`` items per task at most (a seeded choice among all candidates, in text order).
    """
    if count < 1:
        raise ActsparseError(f"proxy task count must be >= 1, got {count}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    docs = documents(source.text)
    built = {
        LASTWORD: _choose(lastword_items(docs), count, random.Random(f"{seed}:lastword")),
        CONTINUATION: _choose(
            continuation_items(docs, random.Random(f"{seed}:continuation")), count, random.Random(f"{seed}:choose")
        ),
    }
    manifest = {
        "format": FORMAT, "source": source.spec, "source_parts": sorted(source.parts), "seed": seed, "count": count,
        "source_sha256": hashlib.sha256(source.text.encode("utf-8")).hexdigest(), "tasks": {},
    }  # fmt: skip
    names = {}
    for kind, items in built.items():
        if not items:
            raise ActsparseError(f"the text {source.spec} is too short to build any {kind} item; use a longer evaluation text")
        name = names[kind] = task_name(kind, source.spec)
        data = directory / f"{name}.jsonl"
        lines = "".join(json.dumps(item, sort_keys=True, ensure_ascii=False) + "\n" for item in items)
        _write_if_changed(data, lines)
        _write_if_changed(
            directory / f"{name}.yaml",
            yaml.safe_dump(_task_yaml(name, kind, data, source.spec, seed, len(items)), sort_keys=False),
        )
        manifest["tasks"][name] = {"kind": kind, "items": len(items), "sha256": hashlib.sha256(lines.encode("utf-8")).hexdigest()}
    _write_if_changed(directory / "manifest.json", json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return ProxyTasks(directory, names, manifest)
