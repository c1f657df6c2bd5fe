"""What the linear layers can give a whole model's decode: the step with them dense, at half
their inputs (cuBLAS on the first K/2 features and a K/2-row weight: the ideal 50% density with
dense-GEMV efficiency and no selection), and with no product at all (the rest of the step).

CUDA graph per decode step, HF static cache, the ``actsparse bench`` decoder and timer, bf16::

    PYTHONPATH=src python3 benchmarks/decode_bound.py --model llama3-8b --batch 1
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch import nn

from actsparse.eval.speed import BenchOptions, decode_tokens_per_s, preset_model
from actsparse.models.discovery import find_linear_sites
from actsparse.modules import set_module
from actsparse.timing import Timer


class HalfInput(nn.Module):
    """``x[..., :K/2] W[:, :K/2]ᵀ``: the bytes and FLOPs of a 50%-dense input, with nothing selected."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.half = linear.in_features // 2
        self.weight = nn.Parameter(linear.weight[:, : self.half].contiguous(), requires_grad=False)
        self.bias = linear.bias

    def forward(self, x):
        return F.linear(x[..., : self.half], self.weight, self.bias)


class NoProduct(nn.Module):
    """An output of the right shape and no work (``empty``: no kernel)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.out_features = linear.out_features

    def forward(self, x):
        return x.new_empty(*x.shape[:-1], self.out_features)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="llama3-8b")
    parser.add_argument("--batch", type=int, nargs="+", default=[1])
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    device = torch.device("cuda")
    model = preset_model(args.model, torch.bfloat16, device)
    options = BenchOptions(steps=args.steps, repeats=args.repeats)
    timer = Timer(device, options.warmup, options.repeats)
    sites = find_linear_sites(model)
    originals = {site.name: model.get_submodule(site.name) for site in sites}
    print(f"{args.model}, {len(sites)} decoder linear layers, graph decode, {args.steps} steps, median of {args.repeats}")
    print(f"{'batch':>5} {'dense':>12} {'half input':>12} {'no product':>12}  bound at 50%")
    for batch in args.batch:
        rates = {}
        for label, make in (("dense", None), ("half", HalfInput), ("none", NoProduct)):
            for name, linear in originals.items():
                set_module(model, name, linear if make is None else make(linear))
            rates[label] = decode_tokens_per_s(model, batch, options, "graph", timer, torch.Generator().manual_seed(0))
            torch.cuda.empty_cache()
        for name, linear in originals.items():
            set_module(model, name, linear)
        print(
            f"{batch:>5} {rates['dense']:>8.1f} t/s {rates['half']:>8.1f} t/s {rates['none']:>8.1f} t/s"
            f"  {rates['half'] / rates['dense']:.2f}x (no product: {rates['none'] / rates['dense']:.2f}x)"
        )


if __name__ == "__main__":
    main()
