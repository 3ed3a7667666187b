"""Typed device errors.

Every driver raises only these, so the daemon can tell a rig that is off from one
that answers nonsense, and log both with the device and operation that failed.
"""

from __future__ import annotations


class DeviceError(Exception):
    """Base of every error a driver raises; carries which device and what was tried."""

    kind = "error"

    def __init__(self, message: str, *, device: str = "", operation: str = "") -> None:
        self.message = message
        self.device = device
        self.operation = operation
        super().__init__(message)

    def __str__(self) -> str:
        where = " ".join(p for p in (self.device, self.operation) if p)
        return f"{self.kind}: {self.message}" + (f" ({where})" if where else "")


class DeviceTimeout(DeviceError):
    """The device accepted the request (or the connection) but did not answer in time."""

    kind = "timeout"


class DeviceUnreachable(DeviceError):
    """The connection was refused, reset, or could not be made at all."""

    kind = "unreachable"


class DeviceAuthError(DeviceError):
    """Wrong credentials, community or session: retrying with the same ones will not help."""

    kind = "auth"


class MalformedReply(DeviceError):
    """The device answered, but not in the protocol's shape (garbage, truncated, wrong types)."""

    kind = "malformed"


class CommandRejected(DeviceError):
    """The device understood the command and refused it (an error status in the reply)."""

    kind = "rejected"


class UnsupportedOperation(DeviceError):
    """The device or its firmware cannot do what was asked (no sleep, no power target)."""

    kind = "unsupported"


def snippet(data: bytes | str, limit: int = 80) -> str:
    """The start of a bad reply for an error message: enough to recognise it, never a dump."""
    text = data[:limit].decode("utf-8", "replace") if isinstance(data, bytes) else data.strip()
    return repr(text[:limit]) + ("..." if len(data) > limit else "")
