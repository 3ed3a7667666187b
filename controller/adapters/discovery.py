"""Finding miners on a network: probe addresses concurrently, identify what answers.

Each firmware is recognised by its own probe (btminer's `devdetails` Driver "bitmicro" or
its v3 API on 4433, BOS markers in `version`, the stock web UI's digest realm on port 80,
Avalon's PROD or VNish's name in `version`, ePIC's HTTP API on the same port,
LuxOS/cgminer in `version`), and one rig may answer several of them, since they all speak
cgminer on 4028. So every probe of a host runs at once and the most specific answer wins:
the driver is then right for the firmware, not merely for the protocol it imitates.

Probes are short, so a farm subnet of a thousand addresses, most of them empty, is
scanned in seconds: refused connections fail at once and silent addresses cost one
timeout, all in parallel up to a bound.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import resource
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import structlog

from controller.adapters import patience
from controller.config import expand_range, parse_config
from controller.config.credentials import Credentials
from drivers.cgminer import CGMinerClient, parse_identity
from drivers.errors import DeviceError
from drivers.registry import KINDS, PROBES
from drivers.telemetry import RigIdentity

log = structlog.get_logger(__name__)

MAX_ADDRESSES = 65_536
# Connections one host's probes may hold at once (4028 x7, 4433, port 80 x2), to keep a
# wide scan inside the process's file-descriptor limit.
SOCKETS_PER_HOST = 10


@dataclass(frozen=True, slots=True)
class Found:
    host: str
    port: int  # the API port the driver talks to (4433 for an API v3 Whatsminer)
    make: str
    model: str
    firmware: str
    firmware_version: str
    driver: str = ""  # the rigd driver kind; empty: guessed from the firmware

    def __post_init__(self) -> None:
        if not self.driver:
            object.__setattr__(self, "driver", "luxos" if self.firmware == "LuxOS" else "cgminer")

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
    """What answers the CGMiner-API `version` at host:port, or None (nothing, or not a miner)."""
    client = CGMinerClient(host, port, timeout=wait_s, retries=0, device=host)
    try:
        reply = await client.command("version")
    except DeviceError:
        return None
    ident = parse_identity(reply)
    if not (ident.model or ident.firmware):
        return None
    return Found(host, port, ident.make, ident.model, ident.firmware, ident.firmware_version)


def _found(host: str, port: int, ident: RigIdentity, driver: str) -> Found:
    return Found(
        host, port, ident.make, ident.model, ident.firmware, ident.firmware_version, driver
    )


async def _listening(host: str, port: int, wait_s: float) -> bool:
    """Whether anything accepts a TCP connection at host:port within `wait_s` of loop time
    (adapters/patience.py: a busy host's starved loop must not make a miner look absent)."""
    try:
        _reader, writer = await patience.within(
            asyncio.open_connection(host, port), wait_s, discard=lambda rw: rw[1].close()
        )
    except (TimeoutError, OSError):
        return False
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return True


async def identify(host: str, port: int, wait_s: float) -> Found | None:
    """The host's firmware and the driver kind for it, or None, within about 4 x `wait_s`.

    A host that accepts neither the API port nor 4433 is empty and costs two connects, so
    a wide scan does not flood its own event loop. On one that does, every probe runs at
    once; a probe that errs or overruns counts as "not this firmware", so one slow surface
    (the stock web UI is slow) cannot hide what the others found.
    Precedence goes from the most specific probe to the least: Whatsminer and Braiins
    answer cgminer's `version` too, and a stock Antminer is "cgminer" without its web UI.
    """
    if not await _screen(host, port, wait_s):
        return None
    return await _probe(host, port, wait_s)


async def _screen(host: str, port: int, wait_s: float) -> bool:
    """Whether anything listens on the API port or 4433: most addresses of a farm subnet
    are empty, and two connects tell, before seven probes."""
    api, v3 = await asyncio.gather(
        _listening(host, port, wait_s),
        _listening(host, KINDS["whatsminer-v3"].default_port, wait_s),
    )
    return api or v3


async def _probe(host: str, port: int, wait_s: float) -> Found | None:
    """Every firmware's probe of a host that listens; the most specific answer."""
    budget = wait_s * 3 + 0.5

    async def bounded(aw: Awaitable[RigIdentity | Found | None]) -> RigIdentity | Found | None:
        try:
            return await patience.within(aw, budget)
        except (TimeoutError, DeviceError, OSError):
            return None

    *specific, cg = await asyncio.gather(
        *(bounded(p.identify(host, port, wait_s)) for p in PROBES),
        bounded(probe(host, port, wait_s)),
    )
    for p, ident in zip(PROBES, specific, strict=True):
        if isinstance(ident, RigIdentity):
            kind = KINDS[p.kind_for(ident)]
            return _found(host, kind.port_found_on(port), ident, kind.name)
    return cg if isinstance(cg, Found) else None


def _fd_bound(concurrency: int) -> int:
    """Hosts probed at once, lowered if the open-files limit could not hold their sockets."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = concurrency * SOCKETS_PER_HOST + 64
    if soft != resource.RLIM_INFINITY and soft < want:
        target = want if hard == resource.RLIM_INFINITY else min(want, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    if soft == resource.RLIM_INFINITY:
        return concurrency
    return max(1, min(concurrency, (soft - 64) // SOCKETS_PER_HOST))


def _rank(f: Found | None) -> int:
    """How specific an identification is (identify's precedence): a probe that timed out
    leaves a less specific one, or none."""
    if f is None:
        return 0
    return {"whatsminer": 4, "whatsminer-v3": 4, "braiins": 3, "antminer": 2}.get(f.driver, 1)


async def scan(
    hosts: list[str],
    *,
    port: int = 4028,
    concurrency: int = 256,
    wait_s: float = 1.0,
    progress: Callable[[], None] | None = None,
) -> list[Found]:
    """Every miner among `hosts`, identified, in address order.

    The probes' timeouts are the drivers' own, counted in wall time: on a busy host (both
    cores taken by other processes, or this loop flooded by the scan itself and a control
    cycle) a miner can miss them, and so can a busy miner. A host that listens and was
    probed while the loop ran more than a quarter of `wait_s` late, or that listens and
    answered no probe, is probed again afterwards with twice the time, a few at a time,
    and the more specific of the two answers kept."""
    bound = _fd_bound(concurrency)
    sem = asyncio.Semaphore(bound)
    starved: dict[str, float] = {}  # listening host -> loop lateness during its probes

    async def one(h: str, lag: patience.LoopLag) -> Found | None:
        async with sem:
            try:
                if not await _screen(h, port, wait_s):
                    return None
                before = lag.late_s
                f = await _probe(h, port, wait_s)
                if (lag.late_s - before > wait_s / 4 and _rank(f) < 4) or f is None:
                    starved[h] = lag.late_s - before
                return f
            finally:
                if progress is not None:
                    progress()

    async with patience.LoopLag() as lag:
        results = dict(zip(hosts, await asyncio.gather(*(one(h, lag) for h in hosts)), strict=True))
    if starved:
        log.info(
            "scan_probes_repeated",
            hosts=len(starved),
            why="listening but not identified, or probed while the event loop was starved",
            late_s=round(max(starved.values()), 3),
        )
        few = asyncio.Semaphore(min(16, bound))

        async def again(h: str) -> None:
            async with few:
                f = await _probe(h, port, 2 * wait_s)
            if _rank(f) > _rank(results[h]):
                results[h] = f

        await asyncio.gather(*(again(h) for h in starved))
    found = [f for f in results.values() if f is not None]
    return sorted(found, key=lambda f: ipaddress.IPv4Address(f.host))


def add_to_config(path: Path, found: list[Found], *, id_prefix: str = "rig") -> list[str]:
    """Append [[miners]] for what the config does not have yet; return the new rig ids.

    The file is appended to (comments and layout stay), validated as a whole, and
    replaced atomically: a config that would not load is never written.
    """
    text = path.read_text(encoding="utf-8")
    # Validated, not used to talk to devices: credentials stay unread (rigd's, not ours).
    cfg = parse_config(text, source=str(path), credentials=Credentials(None, read=False))
    known = {(r.host, r.miner.port) for r in cfg.rigs()}
    # A Whatsminer listens on 4028 and 4433; whichever port it is configured on, it is known.
    whatsminers = {r.host for r in cfg.rigs() if r.miner.driver.startswith("whatsminer")}
    ids = {r.id for r in cfg.rigs()}
    blocks, added = [], []
    for f in found:
        if (f.host, f.port) in known or (
            f.driver.startswith("whatsminer") and f.host in whatsminers
        ):
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
    # Raises ConfigError: nothing written.
    parse_config(new_text, source=str(path), credentials=Credentials(None, read=False))
    tmp = path.with_name(path.name + ".rigctl-tmp")
    tmp.write_text(new_text, encoding="utf-8")
    tmp.replace(path)
    return added
