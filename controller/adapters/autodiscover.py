"""Miners of `driver = "auto"` ranges: found by scanning, each given the driver it needs.

A farm subnet is configured once as a range; which addresses hold miners, and which
firmware each runs, is found by the same probes as `rigctl scan`, so re-flashing a rig or
racking a new one needs no config edit. What was found is remembered in the state
database and used from the first cycle after a restart: a rig whose outlet rigd switched
off does not answer a scan, and forgetting it would leave it off for good. So a rig once
found stays a rig until it is found again with another firmware (its driver changes) or
the range leaves the config; one that stops answering is unreachable, as any rig can be.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import structlog

from controller.adapters.discovery import Found, scan
from controller.config import Config, MinerConfig

log = structlog.get_logger(__name__)

STORE_KEY = "discovery.found"  # host -> Found.as_dict(), in the state database


def auto_entries(cfg: Config) -> list[MinerConfig]:
    return [m for m in cfg.miners if m.driver == "auto"]


def auto_hosts(cfg: Config) -> dict[str, int]:
    """Every address of the auto ranges, with the CGMiner-API port to probe it on."""
    return {host: m.port for m in auto_entries(cfg) for _rid, host in m.expand()}


def resolve(cfg: Config, found: Mapping[str, Found]) -> Config:
    """`cfg` with each auto range replaced by one entry per found miner of that range.

    The entries keep the range's ids (`id_format`), group, credentials and settings, so
    PDU outlet maps and groups written against those ids apply as to any rig. Addresses
    with nothing found are not rigs.
    """
    if not auto_entries(cfg):
        return cfg
    miners: list[MinerConfig] = []
    for m in cfg.miners:
        if m.driver != "auto":
            miners.append(m)
            continue
        for rid, host in m.expand():
            f = found.get(host)
            if f is None:
                continue
            miners.append(m.found_as(rid, host, f.driver, f.port))
    return cfg.model_copy(update={"miners": miners})


def load_found(raw: Any, cfg: Config) -> dict[str, Found]:
    """What the state database remembers, for addresses still in an auto range.

    A damaged entry is dropped with a log line rather than trusted: the next scan finds
    the rig again if it is there."""
    hosts = auto_hosts(cfg)
    out: dict[str, Found] = {}
    if not isinstance(raw, dict):
        return out
    for host, d in raw.items():
        if host not in hosts:
            continue
        try:
            f = Found(
                host=str(d["host"]),
                port=int(d["port"]),
                make=str(d.get("make", "")),
                model=str(d.get("model", "")),
                firmware=str(d.get("firmware", "")),
                firmware_version=str(d.get("firmware_version", "")),
                driver=str(d["driver"]),
            )
            MinerConfig(id="x", host=host, port=f.port, driver=f.driver)  # type: ignore[arg-type]
        except (KeyError, TypeError, ValueError) as e:
            log.warning("discovery_entry_dropped", host=host, error=str(e))
            continue
        out[host] = f
    return out


def dump_found(found: Mapping[str, Found]) -> dict[str, dict[str, object]]:
    return {h: f.as_dict() for h, f in sorted(found.items())}


def merge(known: Mapping[str, Found], fresh: Iterable[Found]) -> dict[str, Found]:
    """Known rigs stay (a silent one may be off at its outlet); what answered is updated."""
    out = dict(known)
    for f in fresh:
        out[f.host] = f
    return out


async def discover(cfg: Config, *, concurrency: int, wait_s: float) -> list[Found]:
    """Scan every auto range once (each on its own API port)."""
    by_port: dict[int, list[str]] = {}
    for host, port in auto_hosts(cfg).items():
        by_port.setdefault(port, []).append(host)
    found: list[Found] = []
    for port, hosts in by_port.items():
        found += await scan(hosts, port=port, concurrency=concurrency, wait_s=wait_s)
    return found
