"""``actsparse patterns``: density and metadata cost of sparsity patterns."""

from __future__ import annotations

from actsparse.core.patterns import pattern_table


def add_patterns_command(commands) -> None:
    pa = commands.add_parser(
        "patterns", help="density and metadata cost of patterns", description="Density and metadata bits of N:M patterns."
    )
    pa.add_argument("patterns", nargs="*", help="patterns to list (default: the common ones)")
    pa.set_defaults(func=cmd_patterns)


def cmd_patterns(args) -> None:
    rows = pattern_table(args.patterns or None)
    print(f"{'pattern':>18} {'density':>8} {'index bits/group':>17} {'optimal bits/group':>19} {'optimal bits/kept':>18}")
    for row in rows:
        bits = [row.get(key) for key in ("index_bits_per_group", "optimal_bits_per_group", "optimal_bits_per_kept")]
        shown = [f"{b:g}" if b is not None else "-" for b in bits]
        print(f"{row['pattern']:>18} {row['density']:>8.3f} {shown[0]:>17} {shown[1]:>19} {shown[2]:>18}")
