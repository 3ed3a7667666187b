"""A whole simulated site on loopback: farm model, miners, PDUs and meter, and its config.

`rigd sim`, `rigd demo` and the end-to-end tests all start farms through this,
so the config a user tries by hand is the very one the tests run.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import math
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final, Literal

from simulators import antminer_web, braiins, braiins_grpc, families
from simulators.antminer_web import AntminerWebFleet
from simulators.apc_snmp import PduAgent
from simulators.braiins import BraiinsRestFleet
from simulators.braiins_grpc import BraiinsGrpcFleet, has_rest
from simulators.cgminer import MinerFleet
from simulators.clock import ManualClock, ScaledClock
from simulators.farm import Farm
from simulators.modbus_meter import MeterServer
from simulators.shards import RemotePower, Worker, slices, worker_specs
from simulators.whatsminer import WHATSMINER_MODELS, WhatsminerFleet, whatsminer_rig

MeterProtocol = Literal["sdm630", "sunspec"]
_AnyFleet = (
    MinerFleet | AntminerWebFleet | BraiinsRestFleet | BraiinsGrpcFleet | WhatsminerFleet | Any
)

# The firmware dialects a simulated farm can mix, named as the daemon's driver kinds, with
# the `SimRig.firmware` each one serves.
DIALECTS: Final = {
    "luxos": "luxos",
    "antminer": "bmminer",  # stock firmware: 4028 reads, web UI control
    "whatsminer": "btminer",  # API v2 on 4028
    "whatsminer-v3": "btminer",  # API v3 on 4433
    "braiins": "bosminer",  # 4028 reads, REST control
    **families.DIALECTS,  # avalon: simulators.families
}
# Every simulated firmware keeps its factory credentials, which the drivers default to, so
# the config (like one `rigctl scan --add` writes) needs none.
BRAIINS_USER, BRAIINS_PASSWORD = "root", "root"


def mix_weights(spec: str | Sequence[str]) -> dict[str, float]:
    """Dialect -> share, from "luxos=40,whatsminer=20,..." or the plain "luxos,antminer"
    (each name one share; a name given twice, two), checked. Shares need not add up to
    anything: they are proportions."""
    items = [d.strip().lower() for d in (spec.split(",") if isinstance(spec, str) else spec)]
    weights: dict[str, float] = {}
    for item in (i for i in items if i):
        name, eq, share = item.partition("=")
        name = name.strip()
        if name not in DIALECTS:
            raise ValueError(f"unknown firmware dialect {name!r}; known: {', '.join(DIALECTS)}")
        try:
            w = float(share) if eq else 1.0
        except ValueError:
            raise ValueError(f"the share of {name!r} is not a number: {share!r}") from None
        if not (w >= 0.0 and math.isfinite(w)):
            raise ValueError(f"the share of {name!r} must be 0 or more, got {share!r}")
        weights[name] = weights.get(name, 0.0) + w
    weights = {d: w for d, w in weights.items() if w > 0.0}
    if not weights:
        raise ValueError("a firmware mix needs at least one dialect with a share above 0")
    return weights


def parse_mix(spec: str | Sequence[str]) -> tuple[str, ...]:
    """The dialects of a mix (see `mix_weights`), each once, in the order given."""
    return tuple(mix_weights(spec))


def assign_dialects(rigs: int, weights: dict[str, float]) -> list[str]:
    """The dialect of each of `rigs` rigs in turn, in proportion to `weights` and interleaved
    (smooth weighted round robin), so any run of rigs, and so each PDU's outlets, holds the
    mix too. Equal shares take turns in the order given, as the plain list always did."""
    total = sum(weights.values())
    current = dict.fromkeys(weights, 0.0)
    out: list[str] = []
    for _ in range(rigs):
        for d, w in weights.items():
            current[d] += w
        pick = max(current, key=lambda d: current[d])  # the first of equals: order kept
        current[pick] -= total
        out.append(pick)
    return out


def _q(s: str) -> str:
    """A TOML basic string (JSON string escapes are valid TOML)."""
    return json.dumps(s)


def poll_timeouts(wall_interval_s: float) -> tuple[float, int]:
    """(timeout_s, retries) that keep a silent device well inside one poll interval."""
    timeout = round(min(2.0, max(0.1, 0.4 * wall_interval_s)), 2)
    return timeout, (1 if wall_interval_s >= 5 * timeout else 0)


def check_loopback_subnet(subnet: str) -> ipaddress.IPv4Network:
    net = ipaddress.IPv4Network(subnet, strict=False)
    if not net.subnet_of(ipaddress.IPv4Network("127.0.0.0/8")):
        raise ValueError(
            f"simulated miners listen on loopback only: {subnet} is not in 127.0.0.0/8"
        )
    return net


class SimSite:
    """A farm of `rigs` miners over `pdus` PDUs behind one import meter, all serving on loopback."""

    def __init__(
        self,
        *,
        rigs: int = 100,
        pdus: int = 4,
        speed: float = 1.0,
        subnet: str | None = None,
        meter_protocol: MeterProtocol = "sdm630",
        seed: int = 7,
        clock: ScaledClock | ManualClock | None = None,
        models: dict[str, float] | None = None,
        mix: str | Sequence[str] = ("luxos",),
        braiins_release: str = "25.07",
        processes: int = 1,
        shard: tuple[int, int] | None = None,
        log_level: str = "warning",
    ) -> None:
        """`mix` names the firmware dialects (see `DIALECTS`); rigs take them in turn, so
        "luxos,whatsminer" makes every other rig a Whatsminer, or in proportion, so
        "luxos=3,whatsminer=1" makes one rig in four a Whatsminer (see `mix_weights`).
        Each dialect is served by its own simulator on its real ports (with `subnet`), as
        on a mixed farm LAN.
        `braiins_release` is the Braiins OS release of the "braiins" rigs: every release
        serves gRPC (50051), those from 25.07 on the REST API (80) too.
        `processes` above 1 serves the rigs and PDUs from that many worker processes, this
        one keeping the meter (see `simulators.shards`); `shard` (index, processes) is what
        one worker serves, given by that module; `log_level` is the workers' (they log to
        this process's stderr)."""
        if subnet is not None:
            check_loopback_subnet(subnet)
        if processes < 1:
            raise ValueError(f"a farm is served by at least one process, got {processes}")
        self.clock = clock if clock is not None else ScaledClock(speed)
        if processes > 1 and not isinstance(self.clock, ScaledClock):
            raise ValueError("a farm over several processes needs a ScaledClock (shared time)")
        self.farm = Farm.build(self.clock, rigs=rigs, pdus=pdus, seed=seed, models=models)
        self.subnet = subnet
        self.meter_protocol: MeterProtocol = meter_protocol
        self.mix_weights = mix_weights(mix)
        self.mix = tuple(self.mix_weights)
        self.dialects: dict[str, str] = dict(
            zip(self.farm.rigs, assign_dialects(len(self.farm.rigs), self.mix_weights), strict=True)
        )
        self._make_firmware(seed)
        # What this process serves: every rig and PDU, a worker's slice, or (the parent of
        # workers) none, only the meter.
        self._workers: list[Worker] = []
        self._remote_rows: dict[str, list[str]] = {}
        self._remote_addresses: dict[str, tuple[str, int]] = {}
        self._remote_pdus: dict[str, tuple[str, int]] = {}
        serve_rigs, serve_pdus = set(self.farm.rigs), set(self.farm.pdus)
        if shard is not None:
            mine = slices(self.farm, shard[1])[shard[0]]
            serve_rigs, serve_pdus = set(mine[0]), set(mine[1])
        elif processes > 1:
            assert isinstance(self.clock, ScaledClock)
            power = RemotePower()
            self.farm.meter.rigs_from = power
            specs = worker_specs(
                count=processes,
                rigs=rigs,
                pdus=pdus,
                clock=self.clock,
                subnet=subnet,
                meter_protocol=meter_protocol,
                seed=seed,
                models=models,
                mix=mix,
                braiins_release=braiins_release,
                log_level=log_level,
            )
            n = len(slices(self.farm, processes))  # fewer when the farm has fewer PDUs
            self._workers = [Worker(spec, power) for spec in specs[:n]]
            serve_rigs, serve_pdus = set(), set()
        served = {r: d for r, d in self.dialects.items() if r in serve_rigs}
        by = {d: [r for r, rd in served.items() if rd == d] for d in DIALECTS}
        self.fleet = MinerFleet(
            self.farm,
            subnet=subnet,
            rig_ids=[
                r
                for r, d in served.items()
                if not d.startswith("whatsminer") and d not in families.DIALECTS
            ],
        )
        # Firmware delays are real seconds on real rigs: on a faster clock they shrink with it.
        speed_up = self.clock.speed if isinstance(self.clock, ScaledClock) else 1000.0
        self.antminer_web = AntminerWebFleet(
            self.farm,
            rpc=self.fleet,
            port=80 if subnet else 0,
            set_delay_s=antminer_web.SET_DELAY_S / speed_up,
            get_delay_s=antminer_web.GET_DELAY_S / speed_up,
            rpc_restart_s=antminer_web.RPC_RESTART_S / speed_up,
        )
        bos_hosts = {r: self.fleet.address_of(r)[0] for r in by["braiins"]}
        self.braiins_rest = BraiinsRestFleet(
            self.farm,
            bos_hosts if has_rest(braiins_release) else {},
            port=braiins.DEFAULT_PORT if subnet else 0,
            username=BRAIINS_USER,
            password=BRAIINS_PASSWORD,
        )
        self.braiins_grpc = BraiinsGrpcFleet(
            self.farm,
            bos_hosts,
            port=braiins_grpc.DEFAULT_PORT if subnet else 0,
            username=BRAIINS_USER,
            password=BRAIINS_PASSWORD,
            release=braiins_release,
        )
        self.whatsminers = {
            "v2": WhatsminerFleet(self.farm, subnet=subnet, api="v2", rig_ids=by["whatsminer"]),
            "v3": WhatsminerFleet(self.farm, subnet=subnet, api="v3", rig_ids=by["whatsminer-v3"]),
        }
        self.families = families.Families(self.farm, served, subnet=subnet)
        self.pdu_agents = {
            pid: PduAgent(self.farm, pid, community="public", write_community="private")
            for pid in self.farm.pdus
            if pid in serve_pdus
        }
        self.meter = MeterServer(self.farm, model=meter_protocol)
        self._serves_meter = shard is None  # a worker's farm is a slice: its parent meters
        if shard is not None:  # a worker holds its slice only: the power it reports
            self.farm.rigs = {r: rig for r, rig in self.farm.rigs.items() if r in serve_rigs}
            self.farm.pdus = {p: pdu for p, pdu in self.farm.pdus.items() if p in serve_pdus}
        self._started = False

    def _make_firmware(self, seed: int) -> None:
        """Set each rig's firmware; a Whatsminer is a rig of its own models, put in the
        place (and on the PDU outlet) of the Antminer the farm was built with."""
        rng = random.Random(seed)
        names = list(WHATSMINER_MODELS)
        outlets = {
            o.rig.id: o for p in self.farm.pdus.values() for o in p.outlets.values() if o.rig
        }
        t = self.clock.now()
        for n, (rid, dialect) in enumerate(self.dialects.items()):
            if dialect.startswith("whatsminer"):
                rig = whatsminer_rig(rid, rng.choice(names), t, seed=seed * 100_003 + n)
                self.farm.rigs[rid] = rig
                if rid in outlets:
                    outlets[rid].rig = rig
            elif own := families.make_rig(dialect, rid, t, rng, seed * 100_003 + n):
                self.farm.rigs[rid] = own
                if rid in outlets:
                    outlets[rid].rig = own
            else:
                self.farm.rigs[rid].firmware = DIALECTS[dialect]

    def _servers(self) -> list[_AnyFleet]:
        """In start order: a web UI needs its rig's 4028 server running first."""
        return [
            self.fleet,
            self.antminer_web,
            self.braiins_rest,
            self.braiins_grpc,
            *self.whatsminers.values(),
            *self.families.fleets,
        ]

    @property
    def worker_pids(self) -> list[int]:
        """The worker processes serving the rigs (none when this process serves them)."""
        return [pid for w in self._workers if (pid := w.pid) is not None]

    async def _start_workers(self) -> None:
        try:
            for served in await asyncio.gather(*(w.start() for w in self._workers)):
                self._remote_rows.update(served.rows)
                self._remote_addresses.update(served.addresses)
                self._remote_pdus.update(served.pdus)
        except BaseException:
            await asyncio.gather(*(w.stop() for w in self._workers), return_exceptions=True)
            raise

    async def start(self) -> None:
        if self._workers:
            await self._start_workers()
            try:
                await self.meter.start()
            except BaseException:
                await asyncio.gather(*(w.stop() for w in self._workers), return_exceptions=True)
                raise
            self._started = True
            return
        started: list[_AnyFleet] = []
        try:
            for fleet in self._servers():
                await fleet.start()
                started.append(fleet)
            for agent in self.pdu_agents.values():
                await agent.start()
            if self._serves_meter:
                await self.meter.start()
        except BaseException:
            for agent in self.pdu_agents.values():
                await agent.stop()
            for fleet in reversed(started):
                await fleet.stop()
            raise
        self._started = True

    async def stop(self) -> None:
        if not self._started:
            return
        self._started = False
        if self._serves_meter:
            await self.meter.stop()
        await asyncio.gather(*(w.stop() for w in self._workers), return_exceptions=True)
        for agent in self.pdu_agents.values():
            await agent.stop()
        for fleet in reversed(self._servers()):
            await fleet.stop()

    def address_of(self, rig_id: str) -> tuple[str, int]:
        """Where the daemon reaches a rig's API (4433 for an API v3 Whatsminer)."""
        if rig_id in self._remote_addresses:
            return self._remote_addresses[rig_id]
        dialect = self.dialects[rig_id]
        if dialect.startswith("whatsminer"):
            return self.whatsminers["v3" if dialect.endswith("v3") else "v2"].address_of(rig_id)
        if self.families.serves(rig_id):
            return self.families.address_of(rig_id)
        return self.fleet.address_of(rig_id)

    def miner_rows(self, rig_id: str) -> list[str]:
        """The `[[miners]]` settings for one rig, as an operator would write them."""
        if rig_id in self._remote_rows:
            return self._remote_rows[rig_id]
        host, port = self.address_of(rig_id)
        dialect = self.dialects[rig_id]
        driver = (
            "cgminer"
            if dialect == "luxos" and self.farm.rigs[rig_id].firmware != "luxos"
            else dialect
        )
        rows = [
            f"id = {_q(rig_id)}",
            f"host = {_q(host)}",
            f"port = {port}",
            f"driver = {_q(driver)}",
        ]
        if driver == "antminer":
            web = self.antminer_web.servers[rig_id]
            if web.port != 80:
                rows.append(f"web_port = {web.port}")
            if web.low_power_w is not None:
                rows.append(f"low_power_w = {web.low_power_w:g}  # measured on its outlet")
        elif driver == "braiins":
            rest = self.braiins_rest.servers.get(rig_id)  # none before BOS 25.07
            if rest is not None and rest.port != braiins.DEFAULT_PORT:
                rows.append(f"web_port = {rest.port}")
            grpc = self.braiins_grpc.servers.get(rig_id)
            if grpc is not None and grpc.port != braiins_grpc.DEFAULT_PORT:
                rows.append(f"grpc_port = {grpc.port}")
        rows += self.families.miner_rows(rig_id)
        return rows

    def pdu_address(self, pdu_id: str) -> tuple[str, int]:
        """Where the daemon reaches a PDU's SNMP agent (call after `start`)."""
        if pdu_id in self._remote_pdus:
            return self._remote_pdus[pdu_id]
        agent = self.pdu_agents[pdu_id]
        return agent.host, agent.port

    async def __aenter__(self) -> SimSite:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def config_toml(
        self,
        *,
        site_id: str = "sim",
        broker_url: str = "mqtt://127.0.0.1:1883",
        state_dir: str | Path = "./state",
        interval_s: float = 10.0,
        timeout_s: float | None = None,
        retries: int | None = None,
        extra: str = "",
        mqtt_protocol: str = "5",
        miners: bool = True,
    ) -> str:
        """A daemon config pointing at this running site (call after `start`).

        Timeouts default to what fits the interval (see `poll_timeouts`). `miners=False`
        leaves the miners out, for `rigctl scan --add` to find, and with them the PDUs,
        whose outlet maps name rigs by id."""
        auto_timeout, auto_retries = poll_timeouts(interval_s)
        timeout_s = auto_timeout if timeout_s is None else timeout_s
        retries = auto_retries if retries is None else retries
        out = [
            "# Written by `rigd sim`: a simulated farm on loopback.",
            "[site]",
            f"id = {_q(site_id)}",
            f"name = {_q(f'Simulated farm, {len(self.farm.rigs)} rigs')}",
            'timezone = "UTC"',
            f"state_dir = {_q(str(state_dir))}",
            "",
            "[mqtt]",
            f"url = {_q(broker_url)}",
            f"protocol = {_q(mqtt_protocol)}",
            "",
            "[admin]",
            f"socket = {_q(str(Path(state_dir) / 'rigd.sock'))}",
            "",
            "[poll]",
            f"interval_s = {interval_s:g}",
            f"timeout_s = {timeout_s:g}",
            f"retries = {retries}",
            "",
            "[[meters]]",
            f"id = {_q(self.farm.meter.id)}",
            f"host = {_q(self.meter.host)}",
            f"port = {self.meter.port}",
            f"protocol = {_q(self.meter_protocol)}",
            "unit_id = 1",
        ]
        for pid, pdu in self.farm.pdus.items() if miners else ():
            host, port = self.pdu_address(pid)
            outlets = ", ".join(
                f"{n} = {_q(o.rig.id)}" for n, o in pdu.outlets.items() if o.rig is not None
            )
            out += [
                "",
                "[[pdus]]",
                f"id = {_q(pid)}",
                f"host = {_q(host)}",
                f"port = {port}",
                'snmp_version = "2c"',
                'community = "public"',
                'write_community = "private"',
                f"outlets = {{ {outlets} }}",
            ]
        for rid in self.farm.rigs if miners else ():
            out += ["", "[[miners]]", *self.miner_rows(rid)]
        if extra:
            out += ["", extra.strip()]
        return "\n".join(out) + "\n"

    def nominal_import_kw(self) -> float:
        """What the meter reads with every rig at full power: sizes caps for demos and tests."""
        m = self.farm.meter
        rigs_w = sum(r.model.nominal_w for r in self.farm.rigs.values())
        return (m.overhead_base_w + rigs_w * (1.0 + m.overhead_frac)) / 1000.0
