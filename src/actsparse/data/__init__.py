"""Text for evaluation and calibration: the Brown corpus, WikiText-2, local files."""

from actsparse.data.brown import brown_text, fetch_brown
from actsparse.data.sources import DEFAULT_CALIB, DEFAULT_EVAL, TextSource, check_disjoint, load_text

__all__ = [
    "load_text",
    "TextSource",
    "check_disjoint",
    "DEFAULT_EVAL",
    "DEFAULT_CALIB",
    "fetch_brown",
    "brown_text",
]
