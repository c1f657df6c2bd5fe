"""Generation check: greedy continuations of a fixed prompt set, to read dense and sparse side by side.

Greedy decoding, one prompt at a time (no padding), BOS as the tokenizer adds it by default,
so a continuation is a function of the model alone. Sparse layers run on the prompt and on
every decode step (unless the config is ``prefill_only``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

import actsparse.validate as validate
from actsparse.errors import ActsparseError
from actsparse.models.placement import input_device

PROMPTS = (
    "The capital of France is",
    "Once upon a time, in a small village by the sea,",
    "The three primary colors are",
    "To make a cup of tea, first",
    "The most important thing about learning a language is",
)


@dataclass(frozen=True)
class GenerateSettings:
    """Which prompts and how many new tokens (greedy)."""

    prompts: tuple[str, ...] = PROMPTS
    max_new_tokens: int = 32

    def __post_init__(self):
        validate.whole("max_new_tokens", self.max_new_tokens)
        object.__setattr__(self, "prompts", validate.names("prompts", self.prompts))
        if not self.prompts:
            raise ActsparseError("the generation check needs at least one prompt")

    def to_dict(self) -> dict:
        return asdict(self)


@torch.no_grad()
def greedy_continuations(model, tokenizer, settings: GenerateSettings = GenerateSettings()) -> list[dict]:
    """``[{"prompt": ..., "continuation": ...}]``: each prompt's greedy continuation, decoded without special tokens."""
    device = input_device(model)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out = []
    for prompt in settings.prompts:
        encoded = tokenizer(prompt, return_tensors="pt").to(device)
        tokens = model.generate(
            **encoded, do_sample=False, max_new_tokens=settings.max_new_tokens, pad_token_id=pad,
            temperature=None, top_p=None, top_k=None,
        )  # fmt: skip
        new = tokens[0, encoded["input_ids"].shape[1] :]
        out.append({"prompt": prompt, "continuation": tokenizer.decode(new, skip_special_tokens=True), "ids": new.tolist()})
    return out
