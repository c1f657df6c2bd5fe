"""``actsparse layers``: a model's linear layers and the roles they are recognised as."""

from __future__ import annotations

from actsparse.models import loading
from actsparse.models.discovery import find_linear_sites


def add_layers_command(commands) -> None:
    la = commands.add_parser(
        "layers",
        help="list a model's linear layers and their roles",
        description="Show how a model's linear layers are recognised.",
    )
    la.add_argument("--model", required=True, help="alias, local directory or hub id")
    la.set_defaults(func=cmd_layers)


def cmd_layers(args) -> None:
    model, _ = loading.load_model(args.model)
    for site in find_linear_sites(model):
        print(f"{site.layer:4} {site.role or '-':8} {site.in_features:>6} -> {site.out_features:<6} {site.name}")
