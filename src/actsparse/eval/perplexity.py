"""Perplexity exactly as docs/methods.md (Perplexity) defines it: non-overlapping windows, mean NLL over predicted tokens."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from actsparse.errors import ActsparseError
from actsparse.models.placement import input_device


def encode(tokenizer, text: str) -> torch.Tensor:
    """Tokenise the whole text once, without special tokens."""
    return torch.tensor(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"], dtype=torch.long)


def make_windows(tokens: torch.Tensor, seqlen: int, max_tokens: int | None = None) -> torch.Tensor:
    """Cut the token stream into non-overlapping ``[n, seqlen]`` windows; a last partial one is dropped.

    ``max_tokens`` keeps only the first ``max_tokens // seqlen`` windows.
    """
    if seqlen < 2:
        raise ActsparseError(f"seqlen must be at least 2, got {seqlen}")
    count = tokens.numel() // seqlen
    if max_tokens is not None:
        count = min(count, max_tokens // seqlen)
    if count == 0:
        raise ActsparseError(
            f"not even one window of {seqlen} tokens: the text has {tokens.numel()} tokens"
            + (f" and the budget is {max_tokens}" if max_tokens is not None else "")
            + "; use a smaller --seqlen, a larger --max-tokens, or more text"
        )
    return tokens[: count * seqlen].reshape(count, seqlen)


@dataclass(frozen=True)
class Perplexity:
    ppl: float
    nll: float  # mean NLL per predicted token
    predicted_tokens: int
    windows: int


@torch.no_grad()
def perplexity(
    model: nn.Module,
    windows: torch.Tensor,
    *,
    bos_id: int | None = None,
    batch_size: int = 1,
    progress: bool = True,
    desc: str = "perplexity",
) -> Perplexity:
    """Perplexity of ``model`` over ``windows`` ``[n, seqlen]``.

    With ``bos_id`` the input is BOS + window and every window token is predicted;
    without, the first token of each window is context only.
    """
    device = input_device(model)
    total_nll, total_tokens = 0.0, 0
    bar = tqdm(total=len(windows), desc=desc, unit="window", disable=not progress)
    for start in range(0, len(windows), batch_size):
        batch = windows[start : start + batch_size].to(device)
        if bos_id is not None:
            batch = torch.cat([batch.new_full((batch.shape[0], 1), bos_id), batch], dim=1)
        logits = model(batch, use_cache=False).logits
        targets = batch[:, 1:]
        nll = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), targets.flatten(), reduction="sum")
        total_nll += nll.item()
        total_tokens += targets.numel()
        bar.update(batch.shape[0])
        bar.set_postfix(ppl=f"{math.exp(total_nll / total_tokens):.3f}")
    bar.close()
    mean = total_nll / total_tokens
    return Perplexity(ppl=math.exp(mean), nll=mean, predicted_tokens=total_tokens, windows=len(windows))
