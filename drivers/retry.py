"""Retrying a request, the one way every driver does it.

Only what can be transient on a farm LAN is retried: a timeout or an unreachable host. A
rejection or a malformed reply would be the same the second time, so those raise at once,
and so does a write that must not be repeated blindly (its caller simply does not use
this). The backoff doubles from `backoff_s` so that a rack coming back from a power cut is
not hammered by every poll at once.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TypeVar

import structlog

from drivers.errors import DeviceTimeout, DeviceUnreachable

log = structlog.get_logger(__name__)

T = TypeVar("T")


def check_timing(timeout: float, retries: int) -> None:
    """Refuse a timeout or retry count no request could be made with."""
    if not timeout > 0:
        raise ValueError(f"timeout must be positive, got {timeout}")
    if retries < 0:
        raise ValueError(f"retries must be >= 0, got {retries}")


async def with_retries(
    attempt: Callable[[], Awaitable[T]],
    *,
    retries: int,
    backoff_s: float,
    device: str,
    operation: str,
) -> T:
    """`attempt()`, tried again up to `retries` times while it times out or finds the
    host unreachable; the last failure is raised as it came."""
    for n in range(retries + 1):
        try:
            return await attempt()
        except (DeviceTimeout, DeviceUnreachable) as exc:
            if n >= retries:
                raise
            log.debug(
                "device.retry", device=device, operation=operation, attempt=n + 1, error=str(exc)
            )
            await asyncio.sleep(backoff_s * (2**n))
    raise AssertionError("unreachable")  # pragma: no cover - the loop returns or raises
