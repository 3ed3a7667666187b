"""Prometheus metrics: the farm as the daemon saw it at the end of its last cycle.

`samples()` is a pure function from one cycle's result to metric values, so what a
scrape shows is exactly what the cycle published on MQTT, and is testable without a
server. `FarmCollector` turns the last cycle's result into samples at scrape time: a
rig that left the config (reload) leaves the exposition with it, and there are no
stale label sets to clean up.

The endpoint is a small aiohttp handler on the daemon's own event loop (aiohttp is
already a dependency), not prometheus_client's threaded server. Once per cycle the
loop hands the collector that cycle's result, frozen (an immutable snapshot, and a
document and status nobody changes after the cycle), swapped in whole; so a scrape
can never see half of one cycle and half of the next. Nothing more is done per cycle:
a large farm's samples (eight per rig) are built, and the exposition rendered, only
when Prometheus scrapes, in the scrape's worker thread. That thread still holds the
GIL while it runs Python, so a scrape takes the loop's time in the interpreter's
switch intervals (5 ms) rather than in one block; a daemon nobody scrapes pays nothing.

Units follow Prometheus practice (watts, seconds), except energy, kept in kWh like the
contract it is counted against, and hashrate in TH/s like the rest of rigd.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

import structlog
from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder

from drivers.telemetry import RigState

if TYPE_CHECKING:
    from aiohttp import web

    from controller.core.status import CycleResult

log = structlog.get_logger(__name__)

CAP_SOURCES = ("max_import", "schedule", "budget", "grid", "override", "zone")
BASES = ("meter", "estimate", "safe")
GAUGE, COUNTER = "gauge", "counter"

# name -> (type, help, label names). Every metric rigd exports is listed here; the
# Grafana dashboard test checks its queries against this table.
METRICS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "rigd_info": (GAUGE, "rigd's version (always 1)", ("site", "version")),
    "rigd_cycles": (COUNTER, "poll cycles completed", ("site",)),
    "rigd_last_cycle_timestamp_seconds": (GAUGE, "farm time of the last cycle", ("site",)),
    "rigd_poll_interval_seconds": (GAUGE, "configured poll interval", ("site",)),
    "rigd_cycle_interval_seconds": (
        GAUGE,
        "time between the last two cycles (compare with the poll interval)",
        ("site",),
    ),
    "rigd_poll_last_duration_seconds": (
        GAUGE,
        "time the last cycle took to read every device",
        ("site",),
    ),
    "rigd_meter_ok": (GAUGE, "1 while the import meter answers", ("site",)),
    "rigd_import_watts": (
        GAUGE,
        "import at the grid connection (absent while the meter does not answer)",
        ("site",),
    ),
    "rigd_import_energy_kwh": (COUNTER, "the import meter's energy register", ("site",)),
    "rigd_cap_watts": (GAUGE, "the effective cap: the lowest limit in force", ("site",)),
    "rigd_cap_source": (
        GAUGE,
        "1 for the source that sets the effective cap, 0 for the others",
        ("site", "source"),
    ),
    "rigd_cap_limit_watts": (GAUGE, "the lowest limit of each source in force", ("site", "source")),
    "rigd_target_watts": (GAUGE, "the cap less the headroom: what control aims under", ("site",)),
    "rigd_measured_import_watts": (
        GAUGE,
        "import the planner decided on (metered or estimated)",
        ("site",),
    ),
    "rigd_predicted_import_watts": (
        GAUGE,
        "import once the commands in flight have taken effect",
        ("site",),
    ),
    "rigd_control_basis": (
        GAUGE,
        "1 for what the planner based its decision on: meter, estimate or safe",
        ("site", "basis"),
    ),
    "rigd_control_dry_run": (GAUGE, "1 when control plans but sends nothing", ("site",)),
    "rigd_control_inflight_actions": (GAUGE, "commands sent and not yet settled", ("site",)),
    "rigd_rigs_held": (GAUGE, "rigs excluded from control by technicians", ("site", "hold")),
    "rigd_control_cannot_shed": (
        GAUGE,
        "1 while import stays over the target with nothing left that control may shed",
        ("site",),
    ),
    "rigd_control_shortfall_watts": (
        GAUGE,
        "how far import will stay over the target once every command has landed",
        ("site",),
    ),
    "rigd_rigs_sleeping_min_off": (
        GAUGE,
        "rigs rigd slept that stay asleep for min_off_s although there is room",
        ("site",),
    ),
    "rigd_budget_kwh": (GAUGE, "the energy budget of the current period", ("site", "period")),
    "rigd_budget_used_kwh": (GAUGE, "energy used in the current period", ("site", "period")),
    "rigd_budget_remaining_kwh": (GAUGE, "energy left in the current period", ("site", "period")),
    "rigd_budget_period_end_timestamp_seconds": (
        GAUGE,
        "when the current budget period ends",
        ("site", "period"),
    ),
    "rigd_rigs": (GAUGE, "rigs by state", ("site", "state")),
    "rigd_rigs_total": (GAUGE, "rigs configured", ("site",)),
    "rigd_hashrate_ths": (GAUGE, "hashrate of rigs mining or waking, TH/s", ("site",)),
    "rigd_rigs_power_watts": (GAUGE, "sum of every rig's best power figure", ("site",)),
    "rigd_devices_unreachable": (
        GAUGE,
        "devices not answering (miners behind an outlet that is off excluded)",
        ("site", "kind"),
    ),
    "rigd_device_up": (
        GAUGE,
        "1 if the device answered its last poll (miners only with per_rig)",
        ("site", "kind", "device"),
    ),
    "rigd_grid_orders": (GAUGE, "grid-operator orders by status", ("site", "status")),
    "rigd_grid_order_cap_watts": (GAUGE, "the cap each open order sets", ("site", "order_id")),
    "rigd_grid_order_compliant": (
        GAUGE,
        "1 if import is under the order's cap, 0 if not (absent before its deadline)",
        ("site", "order_id"),
    ),
    "rigd_grid_failsafe": (GAUGE, "1 while the heartbeat failsafe caps import", ("site",)),
    "rigd_grid_heartbeat_age_seconds": (
        GAUGE,
        "age of the operator's last heartbeat",
        ("site",),
    ),
    "rigd_grid_orders_rejected": (COUNTER, "grid messages refused since start", ("site",)),
    "rigd_mqtt_connected": (GAUGE, "1 while connected to the broker", ("site",)),
    "rigd_mqtt_connects": (COUNTER, "connections made to the broker since start", ("site",)),
    # per rig (metrics.per_rig)
    "rigd_rig_info": (
        GAUGE,
        "a rig's static facts (always 1)",
        ("site", "rig", "group", "driver", "model", "firmware"),
    ),
    "rigd_rig_state": (GAUGE, "1 for the rig's current state", ("site", "rig", "state")),
    "rigd_rig_power_watts": (GAUGE, "the rig's best power figure", ("site", "rig")),
    "rigd_rig_hashrate_ths": (GAUGE, "the rig's hashrate while mining, TH/s", ("site", "rig")),
    "rigd_rig_temperature_celsius": (
        GAUGE,
        "the rig's hottest board and chip temperatures",
        ("site", "rig", "sensor"),
    ),
    "rigd_rig_efficiency_j_per_th": (GAUGE, "the rig's measured efficiency", ("site", "rig")),
}
POLL_HISTOGRAM = "rigd_poll_duration_seconds"
PER_RIG = frozenset(n for n in METRICS if n.startswith("rigd_rig_"))


def exported_names() -> set[str]:
    """Every series name a scrape can show (counters with _total, histogram parts)."""
    names = {f"{n}_total" if t == COUNTER else n for n, (t, _, _) in METRICS.items()}
    names |= {f"{POLL_HISTOGRAM}_{s}" for s in ("bucket", "sum", "count", "created")}
    names |= {f"{n}_created" for n, (t, _, _) in METRICS.items() if t == COUNTER}
    return names


def _version() -> str:
    try:
        return version("rigd")
    except PackageNotFoundError:
        return "unknown"


VERSION = _version()


@dataclass(frozen=True, slots=True)
class Sample:
    name: str  # a key of METRICS
    labels: tuple[str, ...]  # values, in the order METRICS names them
    value: float


@dataclass(frozen=True, slots=True)
class Context:
    """What a cycle result does not carry: settings and the state of the link."""

    per_rig: bool = True
    interval_s: float = 10.0
    cycle_interval_s: float | None = None
    mqtt_connected: bool = False
    mqtt_connects: int = 0
    grid_rejected: int | None = None  # None: no [grid]


def _kw(v: Any) -> float | None:
    return None if v is None else float(v) * 1000.0


def samples(result: CycleResult, ctx: Context) -> list[Sample]:
    """Metric values for one cycle: pure, from the snapshot, control status and document."""
    snap, doc, status = result.snapshot, result.document, result.control
    site = snap.site
    out: list[Sample] = []

    def add(name: str, value: float | None, *labels: str) -> None:
        if value is not None:
            out.append(Sample(name, (site, *labels), float(value)))

    add("rigd_info", 1, VERSION)
    add("rigd_cycles", snap.cycle)
    add("rigd_last_cycle_timestamp_seconds", snap.ts)
    add("rigd_poll_interval_seconds", ctx.interval_s)
    add("rigd_cycle_interval_seconds", ctx.cycle_interval_s)
    add("rigd_poll_last_duration_seconds", snap.poll_duration_s)
    add("rigd_meter_ok", 1 if doc.get("meter_ok") else 0)
    add("rigd_import_watts", _kw(doc.get("import_kw")))
    add("rigd_import_energy_kwh", doc.get("import_kwh"))
    if status is not None:
        cap = status.cap
        add("rigd_cap_watts", cap.kw * 1000.0)
        for src in CAP_SOURCES:
            add("rigd_cap_source", 1 if cap.source == src else 0, src)
        lowest: dict[str, float] = {}
        for lim in cap.limits:
            lowest[lim.source] = min(lim.kw, lowest.get(lim.source, lim.kw))
        for src, kw in lowest.items():
            add("rigd_cap_limit_watts", kw * 1000.0, src)
        plan = status.plan
        if plan is not None:
            add("rigd_target_watts", plan.target_kw * 1000.0)
            add("rigd_measured_import_watts", _kw(plan.measured_kw))
            add("rigd_predicted_import_watts", _kw(plan.predicted_kw))
            for basis in BASES:
                add("rigd_control_basis", 1 if plan.basis == basis else 0, basis)
        add("rigd_control_dry_run", 1 if status.dry_run else 0)
        add("rigd_control_inflight_actions", status.inflight)
        for hold, n in status.held.items():
            add("rigd_rigs_held", n, hold)
        short = status.cannot_shed
        add("rigd_control_cannot_shed", 1 if short else 0)
        add("rigd_control_shortfall_watts", float(short["over_kw"]) * 1000.0 if short else 0.0)
        wait = status.min_off_wait
        add("rigd_rigs_sleeping_min_off", int(wait["rigs"]) if wait else 0)
        b = status.budget
        if b is not None:
            period = str(b["period"])
            add("rigd_budget_kwh", b["budget_kwh"], period)
            add("rigd_budget_used_kwh", b["used_kwh"], period)
            add("rigd_budget_remaining_kwh", b["remaining_kwh"], period)
            add("rigd_budget_period_end_timestamp_seconds", b["period_end"], period)
    for state, n in snap.rig_counts().items():
        add("rigd_rigs", n, state)
    add("rigd_rigs_total", len(snap.rigs))
    add("rigd_hashrate_ths", doc.get("hashrate_ths"))
    add("rigd_rigs_power_watts", _kw(doc.get("rig_power_kw")))
    for kind, n in (doc.get("unreachable") or {}).items():
        add("rigd_devices_unreachable", n, kind)
    for kind, views in (("meter", snap.meters), ("pdu", snap.pdus)):
        for dev_id, view in views.items():
            if view.health.reachable is not None:
                add("rigd_device_up", 1 if view.health.reachable else 0, kind, dev_id)
    grid = doc.get("grid")
    if grid is not None:
        add("rigd_grid_orders", len(grid.get("active") or []), "active")
        add("rigd_grid_orders", len(grid.get("pending") or []), "pending")
        for order in [*(grid.get("active") or []), *(grid.get("pending") or [])]:
            oid = str(order.get("order_id"))
            add("rigd_grid_order_cap_watts", _kw(order.get("cap_kw")), oid)
            compliant = order.get("compliant")
            if compliant is not None:
                add("rigd_grid_order_compliant", 1 if compliant else 0, oid)
        add("rigd_grid_failsafe", 1 if grid.get("failsafe") else 0)
        add("rigd_grid_heartbeat_age_seconds", grid.get("heartbeat_age_s"))
    add("rigd_grid_orders_rejected", ctx.grid_rejected)
    add("rigd_mqtt_connected", 1 if ctx.mqtt_connected else 0)
    add("rigd_mqtt_connects", ctx.mqtt_connects)
    if ctx.per_rig:
        _rig_samples(result, add)
    return out


def _rig_samples(result: CycleResult, add: Any) -> None:
    for rid, rig in result.snapshot.rigs.items():
        t = rig.telemetry
        info = rig.info
        add(
            "rigd_rig_info",
            1,
            rid,
            info.group or "",
            info.driver,
            t.identity.model if t else "",
            t.identity.firmware if t else "",
        )
        add("rigd_rig_state", 1, rid, rig.state.value)
        if rig.health.reachable is not None:
            add("rigd_device_up", 1 if rig.health.reachable else 0, "miner", rid)
        add("rigd_rig_power_watts", rig.power_w, rid)
        add("rigd_rig_hashrate_ths", rig.hashrate_ths, rid)
        if t is not None and rig.health.reachable:
            add("rigd_rig_temperature_celsius", t.temp_c, rid, "board")
            add("rigd_rig_temperature_celsius", t.chip_temp_c, rid, "chip")
            if rig.state is RigState.MINING:
                add("rigd_rig_efficiency_j_per_th", t.efficiency_j_per_th, rid)


class FarmCollector:
    """Turns the last cycle's result into metric families at scrape time."""

    def __init__(self) -> None:
        # Each replaced whole, never mutated: safe across threads without a lock.
        self.cycle: tuple[CycleResult, Context] | None = None
        self._built: tuple[tuple[CycleResult, Context], list[Sample]] | None = None

    def update(self, result: CycleResult, ctx: Context) -> None:
        """A new cycle (on the loop): kept as it is, its samples built when scraped."""
        self.cycle = (result, ctx)
        self._built = None  # let the last cycle's samples go

    @property
    def samples(self) -> list[Sample]:
        """The last cycle's samples: built by the first scrape of each cycle, then kept."""
        cycle = self.cycle
        if cycle is None:
            return []
        built = self._built
        if built is not None and built[0] is cycle:
            return built[1]
        out = samples(*cycle)
        self._built = (cycle, out)  # two scrapes at once may both build: the same list
        return out

    def collect(self) -> Iterator[Metric]:
        current = self.samples  # the scrape's worker thread (MetricsServer._scrape)
        by_name: dict[str, list[Sample]] = {}
        for s in current:
            by_name.setdefault(s.name, []).append(s)
        for name, group in by_name.items():
            kind, doc, labels = METRICS[name]
            fam: GaugeMetricFamily | CounterMetricFamily
            if kind == COUNTER:
                fam = CounterMetricFamily(name, doc, labels=list(labels))
            else:
                fam = GaugeMetricFamily(name, doc, labels=list(labels))
            for s in group:
                fam.add_metric(list(s.labels), s.value)
            yield fam

    def describe(self) -> Iterable[Metric]:
        return ()  # families vary with the farm; described at scrape


class Metrics:
    """The registry rigd exports, fed once per cycle."""

    def __init__(
        self,
        site: str,
        *,
        per_rig: bool,
        interval_s: float,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.site = site
        self.monotonic = monotonic  # the daemon's clock: the interval's own time base
        self.per_rig = per_rig
        self.interval_s = interval_s
        self.registry = CollectorRegistry(auto_describe=False)
        self.collector = FarmCollector()
        self.registry.register(self.collector)
        self.poll_duration = Histogram(
            POLL_HISTOGRAM,
            "time each cycle took to read every device",
            ["site"],
            registry=self.registry,
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 3, 5, 10, 30),
        )
        self._last_mono: float | None = None

    def observe(
        self,
        result: CycleResult,
        *,
        mqtt_connected: bool,
        mqtt_connects: int,
        grid_rejected: int | None,
    ) -> None:
        mono = self.monotonic()
        ctx = Context(
            per_rig=self.per_rig,
            interval_s=self.interval_s,
            cycle_interval_s=None if self._last_mono is None else mono - self._last_mono,
            mqtt_connected=mqtt_connected,
            mqtt_connects=mqtt_connects,
            grid_rejected=grid_rejected,
        )
        self._last_mono = mono
        self.collector.update(result, ctx)
        self.poll_duration.labels(self.site).observe(result.snapshot.poll_duration_s)

    def render(self, accept: str = "") -> tuple[bytes, str]:
        """(body, content type) of a scrape, in the format the scraper asked for."""
        encoder, content_type = choose_encoder(accept)
        return encoder(self.registry), content_type


class MetricsServer:
    """GET /metrics on the configured address, served from the daemon's loop."""

    def __init__(self, metrics: Metrics, host: str, port: int) -> None:
        self.metrics = metrics
        self.host, self.port = host, port
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        # Imported here: aiohttp's server costs ~20 MB a daemon without [metrics] saves.
        from aiohttp import web

        app = web.Application()
        app.router.add_get("/metrics", self._scrape)
        app.router.add_get("/", self._index)
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        try:
            await web.TCPSite(runner, self.host, self.port).start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        log.info("metrics_listening", listen=f"{self.host}:{self.port}", path="/metrics")

    async def _scrape(self, request: web.Request) -> web.Response:
        from aiohttp import web

        body, ctype = await asyncio.to_thread(
            self.metrics.render, request.headers.get("Accept", "")
        )
        return web.Response(body=body, headers={"Content-Type": ctype})

    async def _index(self, request: web.Request) -> web.Response:
        from aiohttp import web

        return web.Response(
            text='<html><body><a href="/metrics">rigd metrics</a></body></html>',
            content_type="text/html",
        )

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
