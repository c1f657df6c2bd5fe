"""Where fetched assets and converted models are cached."""

import os
from pathlib import Path


def cache_dir() -> Path:
    """Root of the actsparse cache: $ACTSPARSE_CACHE, else ~/.cache/actsparse."""
    root = os.environ.get("ACTSPARSE_CACHE") or Path.home() / ".cache" / "actsparse"
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path
