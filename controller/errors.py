"""The root of every error rigd raises on purpose.

One root lets an entry point tell "rigd refused this, and says why" (print the message,
exit with the documented code) from a bug (a traceback). Each room derives its own errors
from it and gives them the context a reader needs: the device, the file and line, the
order id, the rig.
"""

from __future__ import annotations


class RigdError(Exception):
    """The root of every error rigd raises on purpose."""


class ManualRefused(RigdError):
    """A technician's request that the safety checks refuse; the message says why."""
