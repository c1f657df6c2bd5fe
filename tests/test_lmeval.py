"""The offline proxy tasks and the lm-evaluation-harness bridge, end to end on a tiny model."""

import json
import math
import sys

import pytest
import torch

from actsparse.data.sources import TextSource
from actsparse.errors import ActsparseError
from actsparse.eval import proxy_tasks
from actsparse.eval.lmeval import TaskSettings, evaluate_tasks, prepare_tasks, require_lm_eval
from conftest import save_tiny_model_dir, vocab_text


def _source(text, spec="file:/data/eval text.txt"):
    return TextSource(spec, text, frozenset({spec}))


def _items(directory, name):
    return [json.loads(line) for line in (directory / f"{name}.jsonl").read_text().splitlines()]


def test_names_follow_the_text():
    assert proxy_tasks.corpus_slug("brown:news") == "brown_news"
    assert proxy_tasks.corpus_slug("brown:learned+belles_lettres") == "brown_learned_belles_lettres"
    assert proxy_tasks.corpus_slug("file:/some/where/My Notes.v2.txt") == "file_my_notes_v2"
    assert proxy_tasks.task_name("actsparse_lastword", "wikitext2:test") == "actsparse_lastword_wikitext2_test"
    with pytest.raises(ActsparseError, match="unknown proxy task"):
        proxy_tasks.task_name("actsparse_cloze", "brown:news")


def test_proxy_tasks_are_seeded_and_built_from_the_evaluation_text_only(tmp_path):
    text = vocab_text(documents=8, sentences=20, seed=3)
    a = proxy_tasks.write_proxy_tasks(_source(text), tmp_path / "a", seed=0, count=20)
    b = proxy_tasks.write_proxy_tasks(_source(text), tmp_path / "b", seed=0, count=20)
    c = proxy_tasks.write_proxy_tasks(_source(text), tmp_path / "c", seed=1, count=20)  # noqa: F841  (built for its side effects)
    last, cont = a.names["actsparse_lastword"], a.names["actsparse_continuation"]
    assert (last, cont) == ("actsparse_lastword_file_eval_text", "actsparse_continuation_file_eval_text")
    for name in (last, cont):
        assert (tmp_path / "a" / f"{name}.jsonl").read_bytes() == (tmp_path / "b" / f"{name}.jsonl").read_bytes()
    assert (tmp_path / "a" / f"{cont}.jsonl").read_bytes() != (tmp_path / "c" / f"{cont}.jsonl").read_bytes()
    assert a.manifest["tasks"] == b.manifest["tasks"] and a.manifest["source"] == "file:/data/eval text.txt"

    flat = " ".join(text.split())
    words = _items(tmp_path / "a", last)
    assert len(words) == a.manifest["tasks"][last]["items"] > 0
    for item in words:
        target = item["target"].strip()
        assert item["target"] == " " + target and (item["context"] + item["target"]) in flat
        assert target in item["context"].split()  # LAMBADA-style: the context can tell the word
    choices = _items(tmp_path / "a", cont)
    assert len(choices) == 20  # a seeded choice among more candidates
    for item in choices:
        assert len(item["endings"]) == 4 and len(set(item["endings"])) == 4
        true = item["endings"][item["label"]]
        assert f"{item['context']} {true}" in flat  # the true ending really follows the context
        assert all(ending in flat for ending in item["endings"])  # distractors are evaluation text too
    assert len({item["label"] for item in choices}) > 1


def test_brown_news_gives_enough_items(tmp_path):
    from actsparse.data.sources import load_text

    try:
        source = load_text("brown:news")
    except ActsparseError:
        pytest.skip("Brown corpus not fetched")
    written = proxy_tasks.write_proxy_tasks(source, tmp_path, seed=0, count=1000)
    items = {entry["kind"]: entry["items"] for entry in written.manifest["tasks"].values()}
    assert items["actsparse_lastword"] >= 500 and items["actsparse_continuation"] == 1000
    assert written.names["actsparse_lastword"] == "actsparse_lastword_brown_news"


def test_proxy_names_must_match_the_evaluation_text(tmp_path):
    source = _source(vocab_text(documents=4, sentences=20))
    prepared = prepare_tasks(
        TaskSettings(tasks=("actsparse_lastword", "actsparse_continuation_file_eval_text"), task_dir=str(tmp_path)), source
    )
    assert prepared.names == ("actsparse_lastword_file_eval_text", "actsparse_continuation_file_eval_text")
    assert prepared.include == str(tmp_path) and set(prepared.proxies) == set(prepared.names)
    with pytest.raises(ActsparseError, match="not built from the evaluation text"):
        prepare_tasks(TaskSettings(tasks=("actsparse_lastword_brown_news",), task_dir=str(tmp_path)), source)


def test_missing_lm_eval_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)
    with pytest.raises(ActsparseError, match=r"pip install 'actsparse\[eval\]'"):
        require_lm_eval()


@torch.no_grad()
def _own_scores(model, tokenizer, directory, last, cont, limit):
    """acc / perplexity of the last-word task and acc of the continuation task, computed directly."""

    def loglikelihood(context, continuation):
        context_ids = tokenizer(context)["input_ids"]
        whole = tokenizer(context + continuation)["input_ids"]
        targets = whole[len(context_ids) :]
        logits = model(torch.tensor([whole])).logits[0].log_softmax(-1)
        rows = logits[len(context_ids) - 1 : len(whole) - 1]
        ll = sum(rows[i, t].item() for i, t in enumerate(targets))
        greedy = all(rows[i].argmax().item() == t for i, t in enumerate(targets))
        return ll, greedy

    scored = [loglikelihood(item["context"], item["target"]) for item in _items(directory, last)[:limit]]
    lastword = {
        "acc": sum(g for _, g in scored) / len(scored),
        "perplexity": math.exp(-sum(ll for ll, _ in scored) / len(scored)),
    }
    right = 0
    for item in _items(directory, cont)[:limit]:
        lls = [loglikelihood(item["context"], " " + ending)[0] for ending in item["endings"]]
        right += max(range(len(lls)), key=lambda i: lls[i]) == item["label"]
    return lastword, right / limit


@pytest.mark.parametrize("sparse", [False, True])
def test_generated_tasks_run_through_lm_eval_end_to_end(tmp_path, sparse):
    """lm-eval reads our task YAML + JSONL and scores the model as it is (dense or sparsified); we check its numbers."""
    pytest.importorskip("lm_eval")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import actsparse

    model_dir = save_tiny_model_dir(tmp_path / "tiny")
    model, tokenizer = AutoModelForCausalLM.from_pretrained(model_dir).eval(), AutoTokenizer.from_pretrained(model_dir)
    source = _source(vocab_text(documents=8, sentences=20, seed=5))
    settings = TaskSettings(
        tasks=("actsparse_lastword", "actsparse_continuation"), task_dir=str(tmp_path / "tasks"), batch_size=4, limit=12
    )
    prepared = prepare_tasks(settings, source)
    if sparse:
        actsparse.sparsify_(model, actsparse.SparsityConfig(pattern="2:4", criterion="amber"))
    result = evaluate_tasks(model, tokenizer, prepared)
    last, cont = prepared.names
    assert result["lm_eval"]["version"] == "0.4.13" and result["lm_eval"]["batch_size"] == 4 and result["lm_eval"]["limit"] == 12
    assert result["lm_eval"]["add_bos_token"] is True and result["lm_eval"]["num_fewshot"] == 0
    scores = result["tasks"]
    assert scores[last]["documents"] == scores[cont]["documents"] == 12
    assert scores[last]["proxy"]["kind"] == "actsparse_lastword" and scores[cont]["proxy"]["source"] == source.spec
    own_last, own_cont = _own_scores(model, tokenizer, tmp_path / "tasks", last, cont, 12)
    assert scores[last]["acc"] == pytest.approx(own_last["acc"])
    assert scores[last]["perplexity"] == pytest.approx(own_last["perplexity"], rel=1e-4)
    assert scores[cont]["acc"] == pytest.approx(own_cont) and 0.0 <= scores[cont]["acc_norm"] <= 1.0


def test_eval_cli_with_tasks_and_generation(tmp_path, capsys):
    pytest.importorskip("lm_eval")
    from actsparse.cli.main import main

    model_dir = save_tiny_model_dir(tmp_path / "tiny")
    (tmp_path / "eval.txt").write_text(vocab_text(documents=8, sentences=20, seed=5))
    argv = ["eval", "--model", str(model_dir), "--data", str(tmp_path / "eval.txt"), "--calib-data", str(model_dir / "text.txt"),
            "--seqlen", "16", "--max-tokens", "64", "--pattern", "2:4", "--tasks", "actsparse_continuation", "--task-dir",
            str(tmp_path / "tasks"), "--task-limit", "6", "--task-batch-size", "2", "--generate", "3", "--json", "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    record = json.loads(capsys.readouterr().out)
    name = "actsparse_continuation_file_eval"
    assert set(record["tasks"]) == set(record["dense"]["tasks"]) == {name}
    assert record["tasks"][name]["documents"] == 6 and record["lm_eval"]["batch_size"] == 2
    assert len(record["generation"]["outputs"]) == len(record["dense"]["generation"]["outputs"]) == 5
    assert record["versions"]["lm_eval"] == "0.4.13"
    assert main(argv[:-2] + ["--no-progress"]) == 0  # the table form names the proxy as ours
    out = capsys.readouterr().out
    assert f"{name} (actsparse proxy) acc" in out and "prompt     'The capital of France is'" in out
