"""The errors rigd raises, under one root."""

from __future__ import annotations


class RigdError(Exception):
    """The root of every error rigd raises, so a caller can catch rigd's own failures
    without also catching its bugs."""
