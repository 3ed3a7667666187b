"""The floor of each dialect: what one poll of one device costs a bare client, beside rigd.

`measure(dialect, targets, rounds)` polls every target `rounds` times with the floor client
of that dialect (bench/floors/dialects.py: the same connects, requests and bytes rigd's
driver needs for one steady poll, and no parsing beyond framing), and
`measure_driver(dialect, targets, rounds)` does the same with rigd's own driver, built the
way the daemon builds it. Both run in the calling process on the loop rigd uses (uvloop
where installed), after warm-up rounds (a driver's first poll learns identity and
profiles), and report the CPU seconds of this process (time.process_time) per device-poll:
the simulators must run elsewhere (bench/floors/sim.py starts them in a child process).

Dialects are rigd's driver kinds ("luxos", "whatsminer", ...) plus "pdu" (APC over SNMP
v2c). `python -m bench.floors` prints driver versus floor for one dialect.
"""

from __future__ import annotations

import asyncio
import gc
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from bench.floors.dialects import DIALECTS, FloorClient, floor_client
from controller.runtime import eventloop

__all__ = ["DIALECTS", "FloorResult", "measure", "measure_driver", "pooled", "ratio"]

Target = tuple[str, int]
CONCURRENCY = 256  # polls in flight at once, as a daemon bounds its own


@dataclass(frozen=True)
class FloorResult:
    """One client's cost over `rounds` polls of `devices` devices."""

    dialect: str
    client: str  # "floor" or "rigd"
    devices: int
    rounds: int
    cpu_s: float  # this process's CPU over the measured rounds
    wall_s: float
    cpu_ms_per_poll: float
    requests_per_poll: float | None  # None where not counted (rigd's driver)
    bytes_per_poll: float | None  # bytes received
    errors: int  # polls that failed (a floor or driver against a broken farm)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def pooled(a: FloorResult, b: FloorResult) -> FloorResult:
    """Two runs of one client as one: `python -m bench.floors` measures floor, rigd, rigd,
    floor, because whichever client runs second in a process was seen to pay 10 to 18 %
    more CPU (a warmer heap, a busier allocator) and a busy host drifts."""
    if (a.dialect, a.client, a.devices) != (b.dialect, b.client, b.devices):
        raise ValueError(f"cannot pool {a.client} {a.dialect} with {b.client} {b.dialect}")
    rounds, cpu = a.rounds + b.rounds, a.cpu_s + b.cpu_s
    return FloorResult(
        a.dialect, a.client, a.devices, rounds, cpu, a.wall_s + b.wall_s,
        1000.0 * cpu / (rounds * a.devices),
        b.requests_per_poll if a.requests_per_poll is None else a.requests_per_poll,
        b.bytes_per_poll if a.bytes_per_poll is None else a.bytes_per_poll,
        a.errors + b.errors,
    )  # fmt: skip


def ratio(rigd: FloorResult, floor: FloorResult) -> float:
    """rigd's CPU per poll over the floor's: the issue's target is at most 2."""
    return rigd.cpu_ms_per_poll / floor.cpu_ms_per_poll if floor.cpu_ms_per_poll else float("nan")


async def _rounds(
    polls: Sequence[Callable[[], Awaitable[Any]]], rounds: int, concurrency: int
) -> int:
    sem = asyncio.Semaphore(concurrency)
    errors = 0

    async def one(poll: Callable[[], Awaitable[Any]]) -> None:
        nonlocal errors
        async with sem:
            try:
                await poll()
            except Exception:  # counted, not fatal: the figure says how many failed
                errors += 1

    for _ in range(rounds):
        await asyncio.gather(*(one(p) for p in polls))
    return errors


async def _timed(
    polls: Sequence[Callable[[], Awaitable[Any]]], rounds: int, warmup: int, concurrency: int
) -> tuple[float, float, int]:
    await _rounds(polls, warmup, concurrency)
    gc.collect()
    cpu0, wall0 = time.process_time(), time.perf_counter()
    errors = await _rounds(polls, rounds, concurrency)
    return time.process_time() - cpu0, time.perf_counter() - wall0, errors


def _run(main: Awaitable[FloorResult]) -> FloorResult:
    with asyncio.Runner(loop_factory=eventloop.loop_factory()) as runner:
        return runner.run(main)  # type: ignore[arg-type]


def measure(
    dialect: str,
    targets: list[Target],
    rounds: int,
    *,
    warmup: int = 1,
    concurrency: int = CONCURRENCY,
) -> FloorResult:
    """The floor client's CPU per device-poll over `rounds` polls of every target."""

    async def main() -> FloorResult:
        client: FloorClient = floor_client(dialect)
        await client.open(targets)
        try:
            polls = [lambda t=t: client.poll(t) for t in range(len(targets))]
            cpu, wall, errors = await _timed(polls, rounds, warmup, concurrency)
            client.requests = client.received = 0
            await _rounds(polls, 1, concurrency)  # one more round, to count its traffic
        finally:
            await client.close()
        n = len(targets)
        return FloorResult(
            dialect, "floor", n, rounds, cpu, wall, 1000.0 * cpu / (rounds * n),
            client.requests / n, client.received / n, errors,
        )  # fmt: skip

    return _run(main())


def measure_driver(
    dialect: str,
    targets: list[Target],
    rounds: int,
    *,
    warmup: int = 2,
    interval_s: float = 10.0,
    concurrency: int = CONCURRENCY,
) -> FloorResult:
    """rigd's own driver, the same way: poll k is given the daemon time k x `interval_s`,
    so what a driver does every few minutes is paid as often as in the daemon."""
    from bench.floors.drivers import make_drivers

    async def main() -> FloorResult:
        drivers = make_drivers(dialect, targets)
        clock = {"ts": 1_000.0}

        async def tick() -> None:
            clock["ts"] += interval_s

        try:
            polls = [lambda d=d: d.read(clock["ts"]) for d in drivers]
            await _rounds(polls, warmup, concurrency)
            gc.collect()
            cpu0, wall0 = time.process_time(), time.perf_counter()
            errors = 0
            for _ in range(rounds):
                await tick()
                errors += await _rounds(polls, 1, concurrency)
            cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
        finally:
            for d in drivers:
                await d.close()
            await _close_shared()
        n = len(targets)
        return FloorResult(
            dialect, "rigd", n, rounds, cpu, wall, 1000.0 * cpu / (rounds * n), None, None, errors
        )

    return _run(main())


async def _close_shared() -> None:
    from drivers.apc_snmp import close_engines

    await close_engines()
