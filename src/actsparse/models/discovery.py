"""Find a causal LM's decoder layers and give each of their linear layers a role.

Roles: ``q k v o gate up down`` plus the fused ``qkv`` (GPT-2 ``c_attn``, Falcon/NeoX
``query_key_value``, Phi-3 ``qkv_proj``) and ``gate_up`` (Phi-3). Roles come from the
module's own name, and for the ambiguous ``c_proj``/``dense``/``proj`` names from whether it
sits under an attention or an MLP block. Only modules inside the decoder layers are ever
considered, so ``lm_head`` and the embeddings are never touched.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from actsparse.errors import ActsparseError
from actsparse.modules import io_features, is_conv1d

ROLES = ("q", "k", "v", "o", "gate", "up", "down", "qkv", "gate_up")

LEAF_ROLES = {
    "q_proj": "q", "query": "q", "wq": "q", "q": "q",
    "k_proj": "k", "key": "k", "wk": "k", "k": "k",
    "v_proj": "v", "value": "v", "wv": "v", "v": "v",
    "o_proj": "o", "out_proj": "o", "wo": "o", "o": "o",
    "gate_proj": "gate", "w1": "gate",
    "up_proj": "up", "w3": "up", "fc1": "up", "c_fc": "up", "dense_h_to_4h": "up", "fc_in": "up",
    "down_proj": "down", "w2": "down", "fc2": "down", "dense_4h_to_h": "down", "fc_out": "down",
    "c_attn": "qkv", "qkv_proj": "qkv", "query_key_value": "qkv", "wqkv": "qkv",
    "gate_up_proj": "gate_up",
}  # fmt: skip
# Roles of one decoder block that read the same input (the attention input; the MLP input).
SHARED_INPUT_ROLES = (("q", "k", "v"), ("gate", "up"))
# Names whose role depends on the block they sit in: output of attention, or of the MLP.
CONTEXT_LEAVES = {"c_proj", "dense", "proj", "out", "output"}
ATTENTION_WORDS = ("attn", "attention")
MLP_WORDS = ("mlp", "ffn", "feed_forward", "feedforward")


@dataclass(frozen=True)
class LinearSite:
    """One linear layer inside a decoder layer."""

    name: str  # full module name in the model
    layer: int  # decoder layer index
    role: str | None  # one of ROLES, or None when not recognised
    in_features: int
    out_features: int

    @property
    def flops_per_token(self) -> int:
        return 2 * self.in_features * self.out_features


def is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or is_conv1d(module)


def role_of(relative_name: str) -> str | None:
    """Role of a linear layer from its name relative to its decoder layer."""
    parts = relative_name.lower().split(".")
    leaf = parts[-1]
    if leaf in CONTEXT_LEAVES:
        path = parts[:-1]
        if any(word in part for part in path for word in ATTENTION_WORDS):
            return "o"
        if any(word in part for part in path for word in MLP_WORDS):
            return "down"
        return None
    return LEAF_ROLES.get(leaf)


def find_decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The ``ModuleList`` of repeated blocks holding the most linear parameters."""
    best, best_size = None, 0
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if len({type(child) for child in module}) != 1:
            continue
        size = sum(sub.weight.numel() for child in module for sub in child.modules() if is_linear(sub))
        if size > best_size:
            best, best_size = (name, module), size
    if best is None:
        raise ActsparseError(
            f"{type(model).__name__} has no list of decoder layers holding linear layers; "
            "actsparse needs a transformer with its blocks in an nn.ModuleList (as every Hugging Face causal LM has)"
        )
    return best


def find_linear_sites(model: nn.Module) -> list[LinearSite]:
    """Every linear layer of every decoder layer, with its role (None if unrecognised)."""
    prefix, layers = find_decoder_layers(model)
    sites = []
    for index, block in enumerate(layers):
        for relative, module in block.named_modules():
            if relative and is_linear(module):
                inp, out = io_features(module)
                sites.append(LinearSite(f"{prefix}.{index}.{relative}", index, role_of(relative), inp, out))
    if not any(site.role for site in sites):
        names = sorted({site.name.split(".")[-1] for site in sites})
        raise ActsparseError(
            f"{type(model).__name__}: no linear layer has a recognisable role (found names: {', '.join(names) or 'none'}); "
            "add the names to actsparse.models.discovery.LEAF_ROLES"
        )
    return sites
