"""The one exception type eelab raises for bad input; the CLI prints it as one line."""
from __future__ import annotations


class EelabWarning(UserWarning):
    """A one-line warning about the user's input (e.g. a class with few cal images); the CLI prints it as one line."""


class EelabError(Exception):
    """A user-facing error: its message names the problem and the fix, on one line."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))
