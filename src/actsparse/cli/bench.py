"""``actsparse bench``: does this config make my model faster? Dense and sparse in one process."""

from __future__ import annotations

import argparse

import torch

from actsparse.artifacts import write_json_atomic
from actsparse.cli.options import add_sparsity_options, config_from, positive_int, positive_ints
from actsparse.errors import ActsparseError
from actsparse.eval.speed import DTYPES, MODES, PRESETS, BenchOptions, preset_model, run_bench
from actsparse.models.loading import load_model

DEFAULTS = BenchOptions()


def _modes(text: str) -> tuple[str, ...]:
    modes = tuple(part.strip() for part in text.split(",") if part.strip())
    bad = [m for m in modes if m not in MODES]
    if bad or not modes:
        raise argparse.ArgumentTypeError(f"unknown mode '{bad[0] if bad else text}'; use {', '.join(MODES)}")
    return modes


def _sizes(text: str) -> tuple[int, ...]:
    """Comma-separated positive integers, or ``none`` (that phase is not timed)."""
    return () if text.strip().lower() == "none" else tuple(positive_ints(text))


def _listed(values) -> str:
    return ",".join(str(v) for v in values)


def add_bench_command(commands) -> None:
    be = commands.add_parser(
        "bench", help="prefill latency and decode tokens/s, dense against sparse",
        description="Time the model dense and then sparsified with the given config, in one process: prefill latency at each "
        "--prefill length and decode tokens/s at each --batch after a prompt, in eager mode and as CUDA graphs (static KV cache), and optionally through torch.compile. "
        "Every sparse layer's fast path is checked against the PyTorch reference first. Prints a table; --json writes the "
        "measurements with the config, GPU and versions.",
    )  # fmt: skip
    add_sparsity_options(be, weights=False)
    be.add_argument(
        "--model",
        default="tiny-llama",
        help=f"a shape preset with random weights ({', '.join(PRESETS)}), an alias, a local directory or a hub id (default: tiny-llama)",
    )
    be.add_argument("--dtype", default="bfloat16", choices=list(DTYPES), help="(default: bfloat16)")
    be.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    be.add_argument(
        "--prefill",
        type=_sizes,
        default=None,
        help=f"prompt lengths to time, or none (default: {_listed(DEFAULTS.prefill)} on CUDA, 32,128 on the CPU)",
    )
    be.add_argument(
        "--batch",
        type=_sizes,
        default=DEFAULTS.batches,
        help=f"decode batch sizes, or none (default: {_listed(DEFAULTS.batches)})",
    )
    be.add_argument(
        "--prompt", type=positive_int, default=DEFAULTS.prompt, help=f"prompt tokens before decoding (default: {DEFAULTS.prompt})"
    )
    be.add_argument("--steps", type=positive_int, default=DEFAULTS.steps, help=f"decode steps timed (default: {DEFAULTS.steps})")
    be.add_argument(
        "--modes",
        type=_modes,
        default=DEFAULTS.modes,
        help=f"comma-separated, of {', '.join(MODES)} (default: {_listed(DEFAULTS.modes)}; graph needs CUDA; compile = "
        "torch.compile(fullgraph=True) then a CUDA graph, compiled once per case)",
    )
    be.add_argument(
        "--repeats",
        type=positive_int,
        default=DEFAULTS.repeats,
        help=f"timed repeats, median reported (default: {DEFAULTS.repeats})",
    )
    be.add_argument("--num-layers", type=positive_int, default=None, help="presets only: fewer decoder layers, for a quick run")
    be.add_argument("--json", default=None, metavar="FILE", help="write the results here (atomically)")
    be.add_argument(
        "--no-tune",
        dest="tune",
        action="store_false",
        help="skip timing the fast paths per layer shape before the bench (then the built-in defaults decide)",
    )
    be.add_argument(
        "--tune-table",
        default=None,
        metavar="FILE",
        help="keep the fast-path measurements in this JSON file, per GPU and versions: later runs reuse them",
    )
    be.add_argument(
        "--no-share-selection",
        dest="share_selection",
        action="store_false",
        help="every sparse layer selects its own inputs, also q/k/v and gate/up that read one input and keep the same "
        "features (by default those select once: one launch per group); for comparison",
    )
    be.add_argument(
        "--pdl",
        action="store_true",
        help="programmatic dependent launch (Hopper and later) for torch.compile's kernels and the one-token GEMV, "
        "dense and sparse alike: each kernel starts while the one before it finishes",
    )
    be.set_defaults(func=cmd_bench)


def cmd_bench(args) -> None:
    config = config_from(args)  # checked before anything loads
    device = torch.device(
        "cuda" if args.device == "auto" and torch.cuda.is_available() else ("cpu" if args.device == "auto" else args.device)
    )
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ActsparseError(f"--device {args.device} but no CUDA device is available; fix: use --device cpu")
    if args.prefill is None:
        prefill = DEFAULTS.prefill if device.type == "cuda" else (32, 128)
    else:
        prefill = args.prefill
    if not prefill and not args.batch:
        raise ActsparseError("--prefill none and --batch none leave nothing to time; fix: give lengths or batch sizes")
    options = BenchOptions(
        prefill=prefill,
        batches=args.batch,
        prompt=args.prompt,
        steps=args.steps,
        modes=args.modes,
        repeats=args.repeats,
        layers=args.num_layers,
        seed=args.seed,
        tune=args.tune,
        tune_table=args.tune_table,
        share_selection=args.share_selection,
        pdl=args.pdl,
    )
    if args.model in PRESETS:
        model = preset_model(args.model, DTYPES[args.dtype], device, layers=args.num_layers, seed=args.seed)
    else:
        if args.num_layers is not None:
            raise ActsparseError("--num-layers applies to the shape presets only; fix: drop it or use a preset")
        model, _ = load_model(args.model, dtype=args.dtype, device=str(device))
    result = run_bench(model, args.model, config, options)
    print(result.table())
    if args.json:
        write_json_atomic(args.json, result.to_dict())
        print(f"wrote {args.json}")
