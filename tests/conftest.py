"""Tiny random-weight models of each supported family (for code paths, never accuracy)."""

import pytest
import torch
import transformers as tf

VOCAB = 96


def tiny_model(family: str) -> torch.nn.Module:
    torch.manual_seed(0)
    common = dict(vocab_size=VOCAB)
    if family == "llama":
        config = tf.LlamaConfig(
            hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, **common
        )
        model = tf.LlamaForCausalLM(config)
    elif family == "qwen2":
        config = tf.Qwen2Config(
            hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, **common
        )
        model = tf.Qwen2ForCausalLM(config)
    elif family == "gemma3":
        config = tf.Gemma3TextConfig(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=1,
            head_dim=16,
            sliding_window=8,
            **common,
        )
        model = tf.Gemma3ForCausalLM(config)
    elif family == "gpt2":
        config = tf.GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=0, **common)
        model = tf.GPT2LMHeadModel(config)
    elif family == "opt":
        config = tf.OPTConfig(
            hidden_size=64,
            ffn_dim=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=64,
            word_embed_proj_dim=64,
            **common,
        )
        model = tf.OPTForCausalLM(config)
    else:
        raise ValueError(family)
    return model.eval()


FAMILIES = ["llama", "qwen2", "gemma3", "gpt2", "opt"]


@pytest.fixture(params=FAMILIES)
def family_model(request):
    return request.param, tiny_model(request.param)


@pytest.fixture
def llama():
    return tiny_model("llama")


TEXT = (
    "the cat sat on the mat . the dog ran to the park and the cat ran after it . "
    "a bird sang in the tree while the sun rose over the hill . "
) * 12


def save_tiny_model_dir(path, family="llama", bos=True):
    """A tiny model plus a word-level tokenizer saved as a local directory."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = sorted(set(TEXT.split()))
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{w: i + 3 for i, w in enumerate(words)}}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if bos:
        core.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    model = tiny_model(family)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    (path / "text.txt").write_text(TEXT)
    return path


@pytest.fixture
def tiny_dir(tmp_path):
    return save_tiny_model_dir(tmp_path / "tiny")


# Triton kernels run under the interpreter on machines without a GPU (before triton is imported).
if not torch.cuda.is_available():
    import os

    os.environ.setdefault("TRITON_INTERPRET", "1")


def vocab_text(documents=6, sentences=12, seed=0) -> str:
    """Random sentences over the tiny tokenizer's words, documents separated by blank lines (no <unk>)."""
    import random

    words = sorted(set(TEXT.split()) - {"."})
    rng = random.Random(seed)
    docs = []
    for _ in range(documents):
        docs.append(" ".join(" ".join(rng.choice(words) for _ in range(rng.randint(6, 14))) + " ." for _ in range(sentences)))
    return "\n\n".join(docs) + "\n"
