"""A whole simulated site on loopback: farm model, miners, PDUs and meter, and its config.

`rigd sim`, `rigd demo` and the end-to-end tests all start farms through this,
so the config a user tries by hand is the very one the tests run.
"""

from __future__ import annotations

import ipaddress
import json
from pathlib import Path
from typing import Literal

from simulators.clock import ManualClock, ScaledClock
from simulators.farm import Farm
from simulators.meter_modbus import MeterServer
from simulators.miner_server import MinerFleet
from simulators.pdu_snmp import PduAgent

MeterProtocol = Literal["sdm630", "sunspec"]


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
    ) -> None:
        if subnet is not None:
            check_loopback_subnet(subnet)
        self.clock = clock if clock is not None else ScaledClock(speed)
        self.farm = Farm.build(self.clock, rigs=rigs, pdus=pdus, seed=seed, models=models)
        self.subnet = subnet
        self.meter_protocol: MeterProtocol = meter_protocol
        self.fleet = MinerFleet(self.farm, subnet=subnet)
        self.pdu_agents = {
            pid: PduAgent(self.farm, pid, community="public", write_community="private")
            for pid in self.farm.pdus
        }
        self.meter = MeterServer(self.farm, model=meter_protocol)
        self._started = False

    async def start(self) -> None:
        await self.fleet.start()
        for agent in self.pdu_agents.values():
            await agent.start()
        await self.meter.start()
        self._started = True

    async def stop(self) -> None:
        if not self._started:
            return
        self._started = False
        await self.meter.stop()
        for agent in self.pdu_agents.values():
            await agent.stop()
        await self.fleet.stop()

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
    ) -> str:
        """A daemon config pointing at this running site (call after `start`).

        Timeouts default to what fits the interval (see `poll_timeouts`)."""
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
        for pid, pdu in self.farm.pdus.items():
            agent = self.pdu_agents[pid]
            outlets = ", ".join(
                f"{n} = {_q(o.rig.id)}" for n, o in pdu.outlets.items() if o.rig is not None
            )
            out += [
                "",
                "[[pdus]]",
                f"id = {_q(pid)}",
                f"host = {_q(agent.host)}",
                f"port = {agent.port}",
                'snmp_version = "2c"',
                'community = "public"',
                'write_community = "private"',
                f"outlets = {{ {outlets} }}",
            ]
        for rig in self.farm.rigs.values():
            host, port = self.fleet.address_of(rig.id)
            driver = "luxos" if rig.firmware == "luxos" else "cgminer"
            out += [
                "",
                "[[miners]]",
                f"id = {_q(rig.id)}",
                f"host = {_q(host)}",
                f"port = {port}",
                f"driver = {_q(driver)}",
            ]
        if extra:
            out += ["", extra.strip()]
        return "\n".join(out) + "\n"

    def nominal_import_kw(self) -> float:
        """What the meter reads with every rig at full power: sizes caps for demos and tests."""
        m = self.farm.meter
        rigs_w = sum(r.model.nominal_w for r in self.farm.rigs.values())
        return (m.overhead_base_w + rigs_w * (1.0 + m.overhead_frac)) / 1000.0
