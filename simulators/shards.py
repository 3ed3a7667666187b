"""A simulated farm served by several processes: slices of rigs in workers, the meter in one.

Why: one process cannot serve a 10,000-rig farm on a host whose hard limit of open files
is 20,000 (a listening socket or more per rig, one more per connection the daemon keeps),
nor answer a 10,000-rig curtailment burst on one core. So `SimSite(processes=N)` starts N
workers (`python -m simulators.shards`), each serving a slice of the rigs with the PDUs
that feed them (an outlet switched off takes its rig's power away in the same process),
while the meter stays in the parent: each worker reports its rigs' draw every `REPORT_S`
over its stdout, and the parent's meter reads the sum (its energy integrated from those
reports). A worker exits when its stdin closes, so no worker outlives its parent.

Every process builds the same farm from the same seed and shares one clock (the host's
monotonic clock, see `ScaledClock`), so the n-th rig has the same model, firmware and
address wherever it is served, and the config the parent writes is the one-process one.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import signal
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, BinaryIO, Final

import structlog

from simulators.clock import ScaledClock
from simulators.farm import Farm

log = structlog.get_logger(__name__)

REPORT_S: Final = 0.5  # wall seconds between a worker's power reports: the meter's lag
RIGS_PER_PROCESS: Final = 2_500  # what `default_processes` gives each worker
START_TIMEOUT_S: Final = 600.0  # a hung worker; one that fails exits, and says why, at once
STOP_TIMEOUT_S: Final = 10.0


class ShardError(OSError):
    """A worker of a multi-process farm failed to start or died."""


def default_processes(rigs: int) -> int:
    """One process for a small farm; one per `RIGS_PER_PROCESS` rigs above that."""
    return max(1, math.ceil(rigs / RIGS_PER_PROCESS))


def slices(farm: Farm, processes: int) -> list[tuple[list[str], list[str]]]:
    """(rig ids, PDU ids) of each worker: contiguous runs of the farm, cut only between
    PDUs, so a rig and the PDU feeding it are always served by the same process.
    Fewer slices than `processes` when the farm has fewer PDUs (or rigs) than that."""
    fed: set[str] = set()
    groups: list[tuple[list[str], list[str]]] = []
    for pid, pdu in farm.pdus.items():
        rigs = [o.rig.id for o in pdu.outlets.values() if o.rig is not None]
        fed.update(rigs)
        groups.append((rigs, [pid]))
    groups += [([rid], []) for rid in farm.rigs if rid not in fed]
    total = sum(len(r) for r, _ in groups) or 1
    n = max(1, min(processes, len(groups)))
    out: list[tuple[list[str], list[str]]] = [([], []) for _ in range(n)]
    seen = 0
    for rigs, pdus in groups:
        k = min(n - 1, (seen + len(rigs) // 2) * n // total)
        out[k][0].extend(rigs)
        out[k][1].extend(pdus)
        seen += len(rigs)
    return [s for s in out if s[0] or s[1]]


@dataclass
class RemotePower:
    """The rigs' draw as the workers last reported it, and their energy integrated from
    those reports (trapezoids between reports, flat after the last): a `RigPower`."""

    _last: dict[int, tuple[float, float]] = field(default_factory=dict)  # worker: (t, W)
    _energy_j: dict[int, float] = field(default_factory=dict)  # worker: J up to its last t

    def report(self, worker: int, t: float, watts: float, energy_j: float | None = None) -> None:
        prev = self._last.get(worker)
        if energy_j is not None:
            self._energy_j[worker] = energy_j
        elif prev is not None and t > prev[0]:
            self._energy_j[worker] = self._energy_j.get(worker, 0.0) + (
                (prev[1] + watts) / 2.0 * (t - prev[0])
            )
        if prev is None or t >= prev[0]:
            self._last[worker] = (t, watts)

    def power_w(self, t: float) -> float:
        return sum(w for _, w in self._last.values())

    def energy_j(self, t: float) -> float:
        return sum(
            self._energy_j.get(k, 0.0) + w * max(0.0, t - t0) for k, (t0, w) in self._last.items()
        )


@dataclass
class WorkerSpec:
    """What a worker needs to build the same farm and serve its slice (sent as JSON)."""

    index: int
    count: int
    rigs: int
    pdus: int
    speed: float
    start: float  # the clock's anchor, shared by every process
    mono_origin: float
    boot_id: str
    subnet: str | None
    meter_protocol: str
    seed: int
    models: dict[str, float] | None
    mix: list[str] | str
    braiins_release: str
    log_level: str = "warning"

    def to_json(self) -> str:
        return json.dumps(self.__dict__)

    @classmethod
    def from_json(cls, text: str) -> WorkerSpec:
        return cls(**json.loads(text))


@dataclass
class Served:
    """What a worker serves, where: each rig's `[[miners]]` rows and address, each PDU's."""

    rows: dict[str, list[str]]
    addresses: dict[str, tuple[str, int]]
    pdus: dict[str, tuple[str, int]]


class Worker:
    """One worker process, seen from the parent: started, read, stopped."""

    def __init__(self, spec: WorkerSpec, power: RemotePower) -> None:
        self.spec = spec
        self.power = power
        self.proc: asyncio.subprocess.Process | None = None
        self._reader: asyncio.Task[None] | None = None

    async def start(self) -> Served:
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "simulators.shards",
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            limit=1 << 26,  # the ready line holds a slice's config rows
        )
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(self.spec.to_json().encode() + b"\n")
        await self.proc.stdin.drain()
        try:
            line = await asyncio.wait_for(self.proc.stdout.readline(), START_TIMEOUT_S)
        except TimeoutError:
            line = b""
        if not line:
            raise ShardError(f"farm worker {self.spec.index} did not start (see its stderr)")
        ready = json.loads(line)
        self.power.report(self.spec.index, ready["t"], ready["w"], ready["j"])
        self._reader = asyncio.create_task(self._read())
        return Served(
            rows=ready["rows"],
            addresses={r: (h, p) for r, (h, p) in ready["addresses"].items()},
            pdus={pid: (h, p) for pid, (h, p) in ready["pdus"].items()},
        )

    async def _read(self) -> None:
        """Power reports, "t watts" a line, until the worker's stdout closes."""
        assert self.proc is not None and self.proc.stdout is not None
        proc, out = self.proc, self.proc.stdout
        while line := await out.readline():
            t, w = line.split()
            self.power.report(self.spec.index, float(t), float(w))
        if self.proc is proc:  # not stopped by us: its rigs are dark, its draw frozen
            log.error("farm_worker_exited", worker=self.spec.index, pid=proc.pid)

    async def stop(self) -> None:
        """Close its stdin (it stops its servers and exits), killed if it lingers."""
        proc = self.proc
        if proc is None:
            return
        self.proc = None
        if proc.stdin is not None:
            with contextlib.suppress(OSError, RuntimeError):
                proc.stdin.close()
        try:
            await asyncio.wait_for(proc.wait(), STOP_TIMEOUT_S)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None


def worker_specs(
    *,
    count: int,
    rigs: int,
    pdus: int,
    clock: ScaledClock,
    subnet: str | None,
    meter_protocol: str,
    seed: int,
    models: dict[str, float] | None,
    mix: str | Sequence[str],
    braiins_release: str,
    log_level: str = "warning",
) -> list[WorkerSpec]:
    start, mono0 = clock.anchor
    return [
        WorkerSpec(
            index=i,
            count=count,
            rigs=rigs,
            pdus=pdus,
            speed=clock.speed,
            start=start,
            mono_origin=mono0,
            boot_id=clock.boot_id,
            subnet=subnet,
            meter_protocol=meter_protocol,
            seed=seed,
            models=models,
            mix=mix if isinstance(mix, str) else list(mix),
            braiins_release=braiins_release,
            log_level=log_level,
        )
        for i in range(count)
    ]


# -- the worker process ------------------------------------------------------------------

_REPORTS: BinaryIO = sys.stdout.buffer  # the pipe to the parent (see `main`)


async def _serve(spec: WorkerSpec) -> None:
    from simulators.site import SimSite  # site imports this module

    clock = ScaledClock(spec.speed, spec.start, mono_origin=spec.mono_origin, boot_id=spec.boot_id)
    site = SimSite(
        rigs=spec.rigs,
        pdus=spec.pdus,
        subnet=spec.subnet,
        meter_protocol="sunspec" if spec.meter_protocol == "sunspec" else "sdm630",
        seed=spec.seed,
        clock=clock,
        models=spec.models,
        mix=spec.mix,
        braiins_release=spec.braiins_release,
        shard=(spec.index, spec.count),
    )
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    await site.start()
    try:
        meter = site.farm.meter
        t = clock.now()
        ready: dict[str, Any] = {
            "t": t,
            "w": meter.rigs_power_w(t),
            "j": meter.rigs_energy_j(t),
            "rows": {r: site.miner_rows(r) for r in site.farm.rigs},
            "addresses": {r: site.address_of(r) for r in site.farm.rigs},
            "pdus": {p: (a.host, a.port) for p, a in site.pdu_agents.items()},
        }
        out = _REPORTS
        out.write(json.dumps(ready).encode() + b"\n")
        out.flush()

        async def eof() -> None:
            while await reader.read(4096):
                pass
            stop.set()

        watch = asyncio.create_task(eof())
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), REPORT_S)
            t = clock.now()
            out.write(f"{t:.3f} {meter.rigs_power_w(t):.1f}\n".encode())
            out.flush()
        watch.cancel()
    except BrokenPipeError:
        pass  # the parent is gone: stop serving
    finally:
        await site.stop()


def main() -> None:
    """`python -m simulators.shards`: the spec on stdin's first line; serve until EOF."""
    global _REPORTS
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a terminal's Ctrl-C: the parent stops us
    # Reports on the pipe alone: anything a library prints goes to stderr.
    _REPORTS = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    spec = WorkerSpec.from_json(sys.stdin.buffer.readline().decode())
    level = logging.getLevelName(spec.log_level.upper())
    structlog.configure(
        wrapper_class=structlog.make_filtering_bound_logger(
            level if isinstance(level, int) else logging.WARNING
        )
    )
    try:
        import uvloop  # as the daemon's own loop, where installed
    except ImportError:
        asyncio.run(_serve(spec))
    else:
        uvloop.run(_serve(spec))


if __name__ == "__main__":
    main()
