"""Finding miners on a network: probe addresses concurrently, identify what answers.

A probe is one CGMiner-API `version` request on the miner port with a short
timeout, so a farm subnet of a thousand addresses, most of them empty, is scanned
in seconds: refused connections fail at once and silent addresses cost one
timeout, all in parallel up to a bound.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from controller.config import expand_range, parse_config
from drivers.cgminer import CGMinerClient, parse_identity
from drivers.errors import DeviceError

MAX_ADDRESSES = 65_536


@dataclass(frozen=True, slots=True)
class Found:
    host: str
    port: int
    make: str
    model: str
    firmware: str
    firmware_version: str

    @property
    def driver(self) -> str:
        """The rigd driver for this firmware."""
        return "luxos" if self.firmware == "LuxOS" else "cgminer"

    def as_dict(self) -> dict[str, object]:
        return {
            "host": self.host,
            "port": self.port,
            "make": self.make,
            "model": self.model,
            "firmware": self.firmware,
            "firmware_version": self.firmware_version,
            "driver": self.driver,
        }


def addresses(specs: Iterable[str]) -> list[str]:
    """Every address of CIDRs or ranges ("10.0.2.0/24", "10.0.2.10-60"), in order, once."""
    out: dict[str, None] = {}
    for spec in specs:
        try:
            for a in expand_range(spec):
                out[str(a)] = None
        except ValueError as e:
            raise ValueError(f"bad address range {spec!r}: {e}") from e
        if len(out) > MAX_ADDRESSES:
            raise ValueError(f"more than {MAX_ADDRESSES} addresses: scan smaller ranges")
    return list(out)


async def probe(host: str, port: int, wait_s: float) -> Found | None:
    """What answers at host:port, or None (nothing, or not a miner)."""
    client = CGMinerClient(host, port, timeout=wait_s, retries=0, device=host)
    try:
        reply = await client.command("version")
    except DeviceError:
        return None
    ident = parse_identity(reply)
    if not (ident.model or ident.firmware):
        return None
    return Found(host, port, ident.make, ident.model, ident.firmware, ident.firmware_version)


async def scan(
    hosts: list[str],
    *,
    port: int = 4028,
    concurrency: int = 256,
    wait_s: float = 1.0,
    progress: Callable[[], None] | None = None,
) -> list[Found]:
    sem = asyncio.Semaphore(concurrency)

    async def one(h: str) -> Found | None:
        async with sem:
            try:
                return await probe(h, port, wait_s)
            finally:
                if progress is not None:
                    progress()

    results = await asyncio.gather(*(one(h) for h in hosts))
    found = [f for f in results if f is not None]
    return sorted(found, key=lambda f: ipaddress.IPv4Address(f.host))


def add_to_config(path: Path, found: list[Found], *, id_prefix: str = "rig") -> list[str]:
    """Append [[miners]] for what the config does not have yet; return the new rig ids.

    The file is appended to (comments and layout stay), validated as a whole, and
    replaced atomically: a config that would not load is never written.
    """
    text = path.read_text(encoding="utf-8")
    cfg = parse_config(text, source=str(path))
    known = {(r.host, r.miner.port) for r in cfg.rigs()}
    ids = {r.id for r in cfg.rigs()}
    blocks, added = [], []
    for f in found:
        if (f.host, f.port) in known:
            continue
        _a, _b, c, d = ipaddress.IPv4Address(f.host).packed
        rid = f"{id_prefix}-{c}-{d}"
        n = 2
        while rid in ids:
            rid, n = f"{id_prefix}-{c}-{d}-{n}", n + 1
        ids.add(rid)
        added.append(rid)
        blocks.append(
            f"\n[[miners]]  # found by rigctl scan: {f.model or f.make} {f.firmware} "
            f"{f.firmware_version}\nid = {json.dumps(rid)}\nhost = {json.dumps(f.host)}\n"
            f"port = {f.port}\ndriver = {json.dumps(f.driver)}\n"
        )
    if not blocks:
        return []
    new_text = text.rstrip("\n") + "\n" + "".join(blocks)
    parse_config(new_text, source=str(path))  # raises ConfigError: nothing written
    tmp = path.with_name(path.name + ".rigctl-tmp")
    tmp.write_text(new_text, encoding="utf-8")
    tmp.replace(path)
    return added
