"""The report: result stores in, Markdown (and PNG plots) out.

from actsparse.report import write_report
path = write_report(["results/sweeps/papers.jsonl"], "reports/papers")   # reports/papers/report.md + *.png
"""

from __future__ import annotations

import json
from pathlib import Path

from actsparse.artifacts import read_records, write_text_atomic
from actsparse.errors import ActsparseError
from actsparse.report.collect import Point, Study, studies
from actsparse.report.markdown import report_markdown
from actsparse.report.plots import write_plots


def write_report(stores, out_dir, plots: bool = True, command: str | None = None) -> Path:
    """Read the stores, write ``out_dir/report.md`` (and the plots beside it); returns the Markdown's path."""
    stores = [str(s) for s in stores]
    records = []
    for store in stores:
        if not Path(store).is_file():
            raise ActsparseError(f"no results store {store!r}; give the JSONL written by `actsparse sweep` (or a table script)")
        if store.endswith(".json"):  # one record, as `actsparse eval --out` writes it
            try:
                records.append(json.loads(Path(store).read_text(encoding="utf-8")))
            except (json.JSONDecodeError, UnicodeDecodeError) as error:
                raise ActsparseError(
                    f"{store} is not a JSON record ({error}); give a file written by `actsparse eval --out`"
                ) from error
        else:
            records += read_records(store)
    found = studies(records)
    if not found:
        raise ActsparseError(f"no result records in {', '.join(stores)}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    images = {}
    if plots:
        images = {index: write_plots(study, out_dir, f"{index + 1:02d}") for index, study in enumerate(found)}
    path = out_dir / "report.md"
    write_text_atomic(path, report_markdown(found, stores, images, command=command))
    return path


__all__ = ["Point", "Study", "studies", "report_markdown", "write_report"]
