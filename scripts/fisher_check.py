"""How well each per-layer sensitivity predicts the loss: estimates against the measured increase of the NLL.

    OMP_NUM_THREADS=1 .venv/bin/python scripts/fisher_check.py --model smollm2-135m --calib-windows 4 --out results/fisher-check-smollm2-135m.jsonl

On calibration windows only (never the evaluation text): one dense forward and backward pass
gives, for every layer and N, the estimates (``measure_loss_terms``); then, for a spread of
(layer, N) pairs, that layer alone is sparsified and the mean NLL on the same windows measured.
Printed: the rank correlation (Spearman) and the correlation of the logarithms of each estimate
with the measured increase, over the pairs, and the estimates' total against the measured one.

- ``eq2``: ``e_q²`` (the default objective's cost; relative, so not in NLL units);
- ``fisher``: ``½ E_t Σ_j g_tj² d_tj²`` (the diagonal Fisher, token by token);
- ``channel``: ``½ Σ_j E_t[g_j²] E_t[d_j²]`` (gradient and error averaged separately per channel);
- ``rank1``: ``½ E_t (Σ_j g_tj d_tj)²`` (the empirical Fisher's quadratic form, token by token);
- ``first``: ``E_t Σ_j g_tj d_tj`` (the first-order term).
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import numpy as np

from actsparse.amber.sensitivity import measure_loss_terms
from actsparse.artifacts import append_jsonl_atomic, read_jsonl
from actsparse.cli.options import add_eval_options, settings_from
from actsparse.config import SparsityConfig
from actsparse.eval.perplexity import perplexity
from actsparse.eval.run import Evaluator
from actsparse.models.discovery import ROLES, find_linear_sites
from actsparse.sparsify import sparsify_, unsparsify_

ESTIMATES = ("eq2", "fisher", "channel", "rank1", "first")


def estimates(t, tokens: int) -> dict[str, float]:
    channel = float((t.channel_grad * t.channel_error).sum()) / (2 * tokens * tokens)
    return {
        "eq2": t.error / t.reference, "fisher": t.diagonal / (2 * tokens), "channel": channel,
        "rank1": t.rank_one / (2 * tokens), "first": t.first_order / tokens,
    }  # fmt: skip


def ranks(values) -> np.ndarray:
    order = np.argsort(values, kind="stable")
    out = np.empty(len(values))
    out[order] = np.arange(len(values))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_eval_options(parser)
    parser.set_defaults(calib_windows=4)
    parser.add_argument("--criterion", default="amber")
    parser.add_argument("--mitigation", default="none")
    parser.add_argument("--ns", default="4,8,12", help="the N (of M = 16) the pairs cycle through")
    parser.add_argument("--layers", default=None, help="decoder layers of the pairs (default: 7 spread over the depth)")
    parser.add_argument("--out", required=True, help="JSONL store of the pairs (resumed if it exists)")
    args = parser.parse_args()
    store = Path(args.out)
    ev = Evaluator(settings_from(args), progress=not args.no_progress)
    windows, calib = ev.calibration_windows(ev.settings.calib_windows)
    ns = [int(n) for n in args.ns.split(",")]
    sites = [s for s in find_linear_sites(ev.model) if s.role is not None]
    depth = 1 + max(s.layer for s in sites)
    layers = [int(i) for i in args.layers.split(",")] if args.layers else sorted({round(i * (depth - 1) / 6) for i in range(7)})
    start = time.perf_counter()
    terms, tokens = measure_loss_terms(
        ev.model,
        windows,
        [f"{n}:16" for n in ns],
        args.criterion,
        args.mitigation,
        bos_id=ev.bos_id,
        progress=not args.no_progress,
    )
    terms_seconds = time.perf_counter() - start
    dense = perplexity(ev.model, windows, bos_id=ev.bos_id, progress=False).nll
    print(f"{calib}: {len(windows)} windows, {tokens} tokens, dense NLL {dense:.4f}; loss terms {terms_seconds:.0f} s")
    done = {(r["criterion"], r["mitigation"], r["name"], r["n"]) for r in read_jsonl(store)} if store.exists() else set()
    roles = [r for r in ROLES if any(s.role == r for s in sites)]
    for i, role in enumerate(roles):
        for j, layer in enumerate(layers):
            site = next((s for s in sites if s.role == role and s.layer == layer), None)
            n = ns[(i + j) % len(ns)]
            if site is None or (args.criterion, args.mitigation, site.name, n) in done:
                continue
            begin = time.perf_counter()
            config = SparsityConfig(
                pattern=f"{n}:16", criterion=args.criterion, mitigation=args.mitigation, roles=(role,), layers=(layer,)
            )
            sparsify_(ev.model, config)
            try:
                sparse = perplexity(ev.model, windows, bos_id=ev.bos_id, progress=False).nll
            finally:
                unsparsify_(ev.model)
            record = {
                "model": args.model, "data": calib, "windows": len(windows), "tokens": tokens, "criterion": args.criterion,
                "mitigation": args.mitigation, "name": site.name, "role": role, "layer": layer, "n": n,
                "measured": sparse - dense, **estimates(terms[f"{n}:16"][site.name], tokens),
                "seconds": time.perf_counter() - begin, "terms_seconds": terms_seconds,
            }  # fmt: skip
            append_jsonl_atomic(store, record)
            print(
                f"{role}@{layer} {n}:16  measured {record['measured']:+.5f}  fisher {record['fisher']:.5f}  eq2 {record['eq2']:.5f}"
            )
    records = [r for r in read_jsonl(store) if r["mitigation"] == args.mitigation and r["criterion"] == args.criterion]
    measured = np.array([r["measured"] for r in records])
    print(f"{len(records)} pairs; measured total {measured.sum():.4f}")
    for key in ESTIMATES:
        values = np.array([r[key] for r in records])
        spearman = np.corrcoef(ranks(values), ranks(measured))[0, 1]
        positive = (values > 0) & (measured > 0)
        logs = np.corrcoef(np.log(values[positive]), np.log(measured[positive]))[0, 1] if positive.sum() > 2 else math.nan
        print(
            f"  {key:<8} Spearman {spearman:+.3f}  log-log Pearson {logs:+.3f} ({positive.sum()} pairs > 0)  total {values.sum():.4f}"
        )


if __name__ == "__main__":
    main()
