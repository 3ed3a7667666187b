"""One site, several rigd instances: each owns a zone, and the site's import cap is shared.

Past a few thousand rigs, or where halls have their own networks, a site runs several
daemons. Each owns a zone (its rigs, PDUs and sub-meter) and they meet on a shared broker.
The site's maximum import is divided between them so that the zones' sum never exceeds it,
without a coordinator that could fail:

- Every cycle each zone publishes, retained, `rigd/<group>/zones/<zone>`: the cap it holds
  itself to, its load (its sub-meter), its demand (the load with every rig it holds back
  at full power) and `reserved_kw`, the larger of its cap and its load. Peers count a zone
  at its reserved power, so a zone that lowered its cap is counted at its real load until
  it has actually shed, and nobody grows into power not yet freed.
- A zone that falls silent (no fresh report for `stale_s`) is counted at its last known
  load: its daemon may be gone while its rigs run on. A zone that cannot hear the broker
  freezes: it may lower its cap but never raise it, and holds at most the load it last
  reported (so the others, who count it so, are right). Before it has heard anything it
  holds `fallback_kw`, which the operator sizes so all fallbacks fit the site.
- Fair shares are max-min fair (water-filling) over the fresh zones' demands, within the
  site cap less the silent zones' loads. A zone above its share gives back while another
  zone is short; a zone short of its share grows into unreserved power, each short zone
  taking a slice proportional to its shortfall, so zones growing in the same cycle from
  the same reports cannot together take more than is free.

The allocation is a pure function of the reports (`allocate`); `ZoneService` is the edge
that reads and writes MQTT and feeds the controller a `zone` limit. Reports are trusted as
far as the broker's ACLs make them trustworthy: see docs/zones.md.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import aiomqtt
import structlog
from pydantic import ValidationError

from controller.adapters.mqtt import MqttLink
from controller.adapters.ports import ExternalLimits
from controller.config import Config, ZoneConfig
from controller.core.caps import ZONE, Limit
from controller.core.planner import PlanInput
from controller.core.zone_allocation import Allocation, ZoneReport, allocate, demand_kw

log = structlog.get_logger(__name__)

MAX_REPORT_BYTES = 4096


class ZoneService:
    """Publishes this zone's report, hears the others', and sets the controller's `zone`
    limit after every cycle."""

    def __init__(self, cfg: Config, link: MqttLink, *, now: Callable[[], float]) -> None:
        assert cfg.zone is not None
        self.zcfg: ZoneConfig = cfg.zone
        self.me = cfg.zone.id or cfg.site.id
        self.link = link
        self.now = now
        self.prefix = f"rigd/{cfg.zone.group}/zones/"
        self.topic = self.prefix + self.me
        self.peers: dict[str, tuple[ZoneReport, float]] = {}  # zone -> (report, heard at)
        self.cap_kw: float | None = None
        self.allocation: Allocation | None = None
        self.mine: ZoneReport | None = None  # our last published report
        self.controller: ExternalLimits | None = None
        link.subscribe(self.prefix + "+", 1)
        self._next = link.on_message  # handlers chain: each passes on what is not its own
        link.on_message = self.on_message

    def attach(self, controller: ExternalLimits | None) -> None:
        self.controller = controller
        self._apply()

    async def on_message(self, message: aiomqtt.Message) -> None:
        topic = str(message.topic)
        if not topic.startswith(self.prefix):
            if self._next is not None:
                await self._next(message)
            return
        zone = topic[len(self.prefix) :]
        if zone == self.me or "/" in zone:
            return  # our own report, retained, coming back
        payload = message.payload
        if not isinstance(payload, bytes | bytearray) or not payload:
            self.peers.pop(zone, None)  # a cleared retained report: the zone left the site
            return
        try:
            if len(payload) > MAX_REPORT_BYTES:
                raise ValueError(f"{len(payload)} bytes, more than {MAX_REPORT_BYTES}")
            report = ZoneReport.model_validate_json(bytes(payload))
            if report.zone != zone:
                raise ValueError(f"report names zone {report.zone!r} on zone {zone!r}'s topic")
        except (ValueError, ValidationError) as e:
            log.warning("zone_report_refused", zone=zone, error=str(e)[:300])
            return
        if report.site_max_import_kw != self.zcfg.site_max_import_kw:
            log.warning(
                "zone_site_cap_differs",
                zone=zone,
                theirs=report.site_max_import_kw,
                ours=self.zcfg.site_max_import_kw,
            )
        self.peers[zone] = (report, self.now())

    def _split(self, now: float) -> tuple[dict[str, ZoneReport], dict[str, ZoneReport]]:
        """Peers by freshness: heard recently, and their own clock agrees it is recent."""
        fresh: dict[str, ZoneReport] = {}
        silent: dict[str, ZoneReport] = {}
        for z, (r, heard) in self.peers.items():
            stale = now - heard > self.zcfg.stale_s or abs(now - r.ts) > self.zcfg.stale_s
            (silent if stale else fresh)[z] = r
        return fresh, silent

    def after_step(self, load_kw: float | None, inp: PlanInput | None) -> None:
        """Decide the cap for the next cycle and publish this cycle's report."""
        now = self.now()
        fresh, silent = self._split(now)
        connected = self.link.connected.is_set()
        load = (self.mine.load_kw if self.mine else None) if load_kw is None else max(0.0, load_kw)
        demand = demand_kw(load or 0.0, inp)
        alloc = allocate(
            self.me,
            mine=self.mine,
            my_demand_kw=demand,
            fresh=fresh,
            silent=silent,
            site_kw=self.zcfg.site_max_import_kw,
            connected=connected,
            fallback_kw=self.zcfg.fallback_kw,
        )
        if self.allocation is None or not math.isclose(
            alloc.cap_kw, self.allocation.cap_kw, abs_tol=0.5
        ):
            log.info(
                "zone_cap",
                zone=self.me,
                cap_kw=round(alloc.cap_kw, 2),
                why=alloc.why,
                fresh=sorted(fresh),
                silent=sorted(silent),
            )
        self.cap_kw, self.allocation = alloc.cap_kw, alloc
        self._apply()
        if load is None:
            return  # nothing measured yet: no report peers could count on
        report = ZoneReport(
            zone=self.me,
            ts=now,
            cap_kw=round(alloc.cap_kw, 3),
            load_kw=round(load, 3),
            demand_kw=round(demand, 3),
            reserved_kw=round(max(alloc.cap_kw, load), 3),
            site_max_import_kw=self.zcfg.site_max_import_kw,
        )
        if connected or self.mine is None:
            self.mine = report  # what the others count us at (once they have it)
        self.link.set_retained_raw(self.topic, report.encode())

    def _apply(self) -> None:
        if self.controller is None:
            return
        kw = self.cap_kw if self.cap_kw is not None else self.zcfg.fallback_kw
        why = self.allocation.why if self.allocation is not None else "fallback"
        self.controller.set_external("zone", Limit(ZONE, kw, f"zone {self.me}: {why}"))

    def summary(self) -> dict[str, Any]:
        now = self.now()
        fresh, silent = self._split(now)
        return {
            "zone": self.me,
            "cap_kw": None if self.cap_kw is None else round(self.cap_kw, 3),
            "fair_kw": None
            if self.allocation is None or self.allocation.fair_kw is None
            else round(self.allocation.fair_kw, 3),
            "why": None if self.allocation is None else self.allocation.why,
            "site_max_import_kw": self.zcfg.site_max_import_kw,
            "peers": {
                z: {"silent": z in silent, **r.model_dump()} for z, r in {**fresh, **silent}.items()
            },
        }
