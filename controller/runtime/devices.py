"""Builds the drivers a config describes; the only place that knows config -> driver."""

from __future__ import annotations

import asyncio
from collections.abc import Collection
from dataclasses import dataclass, field

import structlog

from controller.config import Config
from controller.core.snapshot import RigInfo
from drivers.apc_snmp import ApcPdu, close_engines
from drivers.base import MeterDriver, MinerDriver, PduDriver
from drivers.luxos import LuxOSDriver
from drivers.modbus_meter import ModbusMeter
from drivers.registry import MinerAccess, make_miner_driver

log = structlog.get_logger(__name__)

CLOSE_S = 5.0
CLOSE_CONCURRENCY = 256


def _secret(v: object) -> str:
    get = getattr(v, "get_secret_value", None)
    return str(get()) if get is not None else ("" if v is None else str(v))


@dataclass
class Devices:
    rigs: list[RigInfo]
    miners: dict[str, MinerDriver] = field(default_factory=dict)
    meters: dict[str, MeterDriver] = field(default_factory=dict)
    pdus: dict[str, PduDriver] = field(default_factory=dict)
    import_meter: str | None = None

    def hold_sessions(self, on: bool, *, except_for: Collection[str] = ()) -> None:
        """Let LuxOS rigs keep their write session (`on`: the daemon sends commands), but
        for `except_for` (rigs in maintenance: a technician's tools must be able to log on)."""
        for rid, d in self.miners.items():
            if isinstance(d, LuxOSDriver):
                d.hold_session = on and rid not in except_for

    def adopt_sessions(self, old: Devices) -> None:
        """After a reload: the new drivers take over the sessions the old ones hold."""
        for rid, d in self.miners.items():
            prev = old.miners.get(rid)
            if isinstance(d, LuxOSDriver) and isinstance(prev, LuxOSDriver):
                d.adopt_session(prev)

    async def close_drivers(self) -> None:
        """Close these drivers only (a reload: the shared SNMP engine stays in use).

        Concurrently and within CLOSE_S: closing a LuxOS driver logs off its session, one
        request per rig, and a stop must not take minutes on a big farm (a session not
        logged off lapses by itself within 60 s)."""
        sem = asyncio.Semaphore(CLOSE_CONCURRENCY)

        async def close(d: MinerDriver | MeterDriver | PduDriver) -> None:
            async with sem:
                try:
                    await d.close()
                except Exception as e:  # a device gone: its driver is closed all the same
                    log.info("driver_close_failed", error=str(e) or type(e).__name__)

        drivers = [d for group in (self.miners, self.meters, self.pdus) for d in group.values()]
        tasks = [asyncio.ensure_future(close(d)) for d in drivers]
        if tasks:
            _, late = await asyncio.wait(tasks, timeout=CLOSE_S)
            for t in late:
                t.cancel()
            if late:
                await asyncio.wait(late)
                log.info("drivers_close_cut_short", left=len(late))

    async def close(self) -> None:
        await self.close_drivers()
        await close_engines()  # the SNMP engine shared by all PDUs on this loop


def build_devices(cfg: Config) -> Devices:
    timeout, retries = cfg.poll.timeout_s, cfg.poll.retries
    rigs: list[RigInfo] = []
    devs = Devices(rigs)
    for r in cfg.rigs():
        m = r.miner
        if m.driver == "auto":
            continue  # an unscanned range: controller/adapters/autodiscover.py resolves it first
        rigs.append(RigInfo(r.id, r.host, m.port, m.driver, m.group, r.outlet))
        access = MinerAccess(
            r.host,
            m.port,
            username=m.username,
            password=_secret(m.password),
            timeout=timeout,
            retries=retries,
        )
        devs.miners[r.id] = make_miner_driver(
            m.driver, r.id, access, m.driver_settings(cfg.poll.interval_s)
        )
    for mc in cfg.meters:
        devs.meters[mc.id] = ModbusMeter(
            mc.id,
            mc.host,
            mc.port,
            model=mc.protocol,
            unit_id=mc.unit_id,
            timeout=timeout,
            retries=retries,
        )
        if mc.role == "import":
            devs.import_meter = mc.id
    for p in cfg.pdus:
        devs.pdus[p.id] = ApcPdu(
            p.id,
            p.host,
            p.port,
            version=p.snmp_version,
            community=_secret(p.community),
            write_community=_secret(p.write_community),
            user=p.user,
            auth_key=_secret(p.auth_key),
            priv_key=_secret(p.priv_key),
            auth_protocol=p.auth_protocol,
            priv_protocol=p.priv_protocol,
            timeout=min(timeout, 2.0),
            retries=retries,
        )
    return devs
