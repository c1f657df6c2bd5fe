"""The one exception type the library raises for bad input.

Every message names the problem and the fix, so the CLI can print it as is
instead of a traceback.
"""


class ActsparseError(Exception):
    """Bad input or a missing asset; the message says what to do about it."""
