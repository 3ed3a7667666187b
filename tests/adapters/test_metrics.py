"""Prometheus metrics: scraped over HTTP from a running daemon and parsed with the Prometheus
text (and OpenMetrics) parsers; the values a cycle gives; the cardinality switch; the
demo's --metrics; and the Grafana dashboard built on them."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import math
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import promql_parser
import pytest
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as openmetrics_families,
)
from prometheus_client.parser import text_string_to_metric_families

import controller.adapters.metrics
from bench.sim_harness import SimHarness
from controller.adapters.grid.sign import send
from controller.adapters.metrics import (
    CAP_SOURCES,
    METRICS,
    PER_RIG,
    POLL_HISTOGRAM,
    Context,
    exported_names,
    samples,
)
from controller.config import ConfigError, MetricsConfig, parse_config
from controller.runtime.daemon import Daemon
from simulators.clock import ScaledClock
from simulators.site import SimSite
from tests.conftest import Mosquitto, watch
from tests.grid_helpers import order, plain

SPEED = 20.0
ROOT = Path(__file__).resolve().parent.parent.parent
DASHBOARD = ROOT / "config" / "grafana-dashboard.json"

Series = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def parse(text: str) -> Series:
    """Every sample of a text exposition: (name, sorted labels) -> value."""
    out: Series = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(series: Series, name: str, **labels: str) -> float:
    """The one sample of `name` whose labels include `labels`."""
    hits = [
        v
        for (n, ls), v in series.items()
        if n == name and all(dict(ls).get(k) == x for k, x in labels.items())
    ]
    assert len(hits) == 1, f"{name}{labels}: {len(hits)} samples"
    return hits[0]


def names(series: Series) -> set[str]:
    return {n for n, _ in series}


async def scrape(url: str, accept: str = "") -> tuple[str, str]:
    headers = {"Accept": accept} if accept else {}
    async with aiohttp.ClientSession() as http, http.get(url, headers=headers) as resp:
        assert resp.status == 200
        return await resp.text(), resp.headers["Content-Type"]


# -- from a running daemon, over HTTP ----------------------------------------------------------


def daemon_config(site: SimSite, broker: Mosquitto, tmp_path: Path, port: int) -> str:
    full = site.nominal_import_kw()
    return site.config_toml(
        broker_url=broker.url,
        state_dir=tmp_path / "state",
        interval_s=0.5 * SPEED,
        timeout_s=0.4,
        retries=0,
        extra=f"""
[control]
max_import_kw = {math.ceil(full * 1.1)}
min_on_s = 60
min_off_s = 60

[budget]
period = "month"
kwh = 1000000

[grid]
allow_unsigned = true

[metrics]
enabled = true
listen = "127.0.0.1:{port}"
""",
    )


@contextlib.asynccontextmanager
async def running(daemon: Daemon) -> AsyncIterator[Daemon]:
    stop = asyncio.Event()
    task = asyncio.create_task(daemon.run(stop))
    try:
        yield daemon
    finally:
        stop.set()
        await asyncio.wait_for(task, 15)


async def consistent_scrape(daemon: Daemon, url: str) -> tuple[Series, dict[str, Any]]:
    """A scrape and the document of the very cycle it shows (a cycle may land in between)."""
    for _ in range(50):
        text, _ = await scrape(url)
        series = parse(text)
        last = daemon.last
        if last is not None and value(series, "rigd_cycles_total") == last.document["cycle"]:
            return series, last.document
    raise AssertionError("never caught a scrape and its cycle together")


async def test_scrape_matches_the_published_state(mosquitto: Mosquitto, tmp_path: Path) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}/metrics"
    # The interval below is timed on a 20x clock: a full collection of the test process's
    # heap (matplotlib and all, 50-90 ms) during the first cycles would shift one by seconds.
    gc.collect()
    async with SimSite(rigs=8, pdus=2, clock=ScaledClock(SPEED)) as site:
        cfg = parse_config(daemon_config(site, mosquitto, tmp_path, port), environ={})
        daemon = Daemon(cfg, clock=site.clock)
        async with watch(mosquitto.host, mosquitto.port) as w, running(daemon):
            await w.wait_json("rigd/sim/state", lambda d: d["cycle"] >= 2 and d["meter_ok"])
            text, ctype = await scrape(url)
            assert ctype.startswith("text/plain")
            series, doc = await consistent_scrape(daemon, url)

            assert value(series, "rigd_import_watts") == pytest.approx(doc["import_kw"] * 1000)
            assert value(series, "rigd_cap_watts") == pytest.approx(doc["cap_kw"] * 1000)
            assert value(series, "rigd_cap_source", source=doc["cap_source"]) == 1
            assert sum(value(series, "rigd_cap_source", source=s) for s in CAP_SOURCES) == 1
            assert value(series, "rigd_rigs_total") == 8
            for state, n in doc["rigs"].items():
                assert value(series, "rigd_rigs", state=state) == n
            assert value(series, "rigd_hashrate_ths") == pytest.approx(doc["hashrate_ths"])
            assert value(series, "rigd_budget_used_kwh", period="month") == pytest.approx(
                doc["budget"]["used_kwh"]
            )
            assert value(series, "rigd_import_energy_kwh_total") == pytest.approx(doc["import_kwh"])
            assert value(series, "rigd_mqtt_connected") == 1
            assert value(series, "rigd_meter_ok") == 1
            assert value(series, "rigd_device_up", kind="meter", device="meter-main") == 1
            assert value(series, "rigd_grid_orders", status="active") == 0
            assert value(series, "rigd_poll_duration_seconds_count") >= 2
            # loop timing in the daemon's own time base (farm seconds here, as the interval)
            assert value(series, "rigd_poll_interval_seconds") == 0.5 * SPEED
            # 10 farm s; at 20x a pause of the test process is stretched 20-fold, and on a busy
            # machine the cycle after an overrun comes early (the loop catches up). In wall
            # seconds it would be about 0.5.
            assert 1.0 < value(series, "rigd_cycle_interval_seconds") <= 16
            # per rig: every rig, its state and power, as the rig's own topic says
            rig_doc = json.loads(w.latest["rigd/sim/rigs/rig-001/state"])
            states = {dict(ls)["rig"] for n, ls in series if n == "rigd_rig_state"}
            assert states == set(site.farm.rigs)
            assert value(series, "rigd_rig_state", rig="rig-001", state=rig_doc["state"]) == 1
            assert value(series, "rigd_rig_temperature_celsius", rig="rig-001", sensor="chip") > 0
            assert names(series) <= exported_names()

            # a grid order shows: the cap, its source, the order and its cap
            target = round(doc["import_kw"] * 0.6, 1)
            msg = order(
                site="sim",
                now=site.clock.now(),
                order_id="m-1",
                target={"max_import_kw": target},
                duration_s=600,
            )
            ack = await send(cfg.mqtt, "sim", plain(msg), wait_s=10)
            assert ack is not None and ack["status"] == "accepted", ack
            await w.wait_json("rigd/sim/state", lambda d: d["cap_source"] == "grid")
            series, doc = await consistent_scrape(daemon, url)
            assert value(series, "rigd_cap_source", source="grid") == 1
            assert value(series, "rigd_grid_orders", status="active") == 1
            assert value(series, "rigd_grid_order_cap_watts", order_id="m-1") == pytest.approx(
                target * 1000
            )
            assert value(series, "rigd_cap_limit_watts", source="grid") == pytest.approx(
                target * 1000
            )

            # OpenMetrics for scrapers that ask for it
            text, ctype = await scrape(url, "application/openmetrics-text; version=1.0.0")
            assert ctype.startswith("application/openmetrics-text")
            fams = {f.name: f for f in openmetrics_families(text)}
            assert fams["rigd_cycles"].type == "counter"
            assert fams["rigd_import_watts"].type == "gauge"


async def test_busy_port_is_logged_and_the_daemon_goes_on(tmp_path: Path) -> None:
    h = SimHarness.create(tmp_path, rigs=4, pdus=1, control={})
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        metrics = MetricsConfig(enabled=True, listen=f"127.0.0.1:{port}")
        h.cfg = h.cfg.model_copy(update={"metrics": metrics})
        h.daemon = h._new_daemon()
        await h.daemon.exports.start()
        assert h.daemon.exports.server is None  # not listening, and no exception
        result = await h.step()
        assert result.snapshot.cycle == 1
        assert h.daemon.exports.metrics is not None
        assert h.daemon.exports.metrics.collector.samples  # still measured
        await h.daemon.exports.stop()
    await h.close()


async def test_samples_are_built_by_scrapes_in_their_thread_not_by_cycles(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Eight samples a rig, every cycle, on the event loop, cost a large farm 0.1 s a cycle
    whether anyone scrapes or not: cycles hand over their result, scrapes build from it."""
    built_in: list[int] = []
    real = controller.adapters.metrics.samples

    def spy(result: Any, ctx: Context) -> Any:
        built_in.append(threading.get_ident())
        return real(result, ctx)

    monkeypatch.setattr(controller.adapters.metrics, "samples", spy)
    port = free_port()
    h = SimHarness.create(tmp_path, rigs=4, pdus=1, control={})
    h.cfg = h.cfg.model_copy(
        update={"metrics": MetricsConfig(enabled=True, listen=f"127.0.0.1:{port}")}
    )
    h.daemon = h._new_daemon()
    await h.daemon.exports.start()
    url = f"http://127.0.0.1:{port}/metrics"
    try:
        for _ in range(3):
            await h.step()
        assert built_in == []  # nobody scraped: nothing built
        series = parse((await scrape(url))[0])
        assert value(series, "rigd_cycles_total") == 3
        assert value(series, "rigd_rig_state", rig="rig-002", state="mining") == 1
        assert len(built_in) == 1 and built_in[0] != threading.get_ident()  # not the loop
        assert parse((await scrape(url))[0]) == series  # the same cycle: built once
        assert len(built_in) == 1
        await h.step()
        assert len(built_in) == 1
        assert value(parse((await scrape(url))[0]), "rigd_cycles_total") == 4
        assert len(built_in) == 2
    finally:
        await h.daemon.exports.stop()
        await h.close()


# -- the values of one cycle (pure) -------------------------------------------------------------


async def test_samples_of_a_cycle_and_the_cardinality_switch(tmp_path: Path) -> None:
    h = SimHarness.create(
        tmp_path, rigs=6, pdus=2, control={}, budget={"period": "day", "kwh": 5000}
    )
    low = round(h.true_import_kw() * 0.4, 1)
    h.set_override(low, 3600, reason="test")
    await h.run_for(120)
    result = await h.step()
    status = result.control
    assert status is not None
    full = samples(result, Context(per_rig=True, interval_s=10.0))
    lean = samples(result, Context(per_rig=False, interval_s=10.0))
    by = {(s.name, s.labels[1:]): s.value for s in full}
    assert by[("rigd_cap_watts", ())] == pytest.approx(low * 1000)
    assert by[("rigd_cap_source", ("override",))] == 1
    assert by[("rigd_cap_source", ("max_import",))] == 0
    assert by[("rigd_cap_limit_watts", ("override",))] == pytest.approx(low * 1000)
    assert by[("rigd_cap_limit_watts", ("max_import",))] == pytest.approx(
        h.cfg.control.max_import_kw * 1000 if h.cfg.control else 0
    )
    assert by[("rigd_budget_kwh", ("day",))] == 5000
    assert by[("rigd_budget_used_kwh", ("day",))] == pytest.approx(status.budget["used_kwh"])
    assert by[("rigd_target_watts", ())] == pytest.approx(status.plan.target_kw * 1000)  # type: ignore[union-attr]
    sleeping = sum(1 for r in result.snapshot.rigs.values() if r.state.value == "sleeping")
    assert sleeping > 0 and by[("rigd_rigs", ("sleeping",))] == sleeping
    # every label set matches the table's label names
    for s in full:
        assert len(s.labels) == len(METRICS[s.name][2]), s
    # per_rig=false: nothing per rig, and the site's figures unchanged
    assert {s.name for s in full} & PER_RIG
    assert not {s.name for s in lean} & PER_RIG
    assert not [s for s in lean if s.name == "rigd_device_up" and s.labels[1] == "miner"]
    assert [s for s in full if s.name == "rigd_device_up" and s.labels[1] == "miner"]
    site_only = [s for s in full if s.name not in PER_RIG and not _is_miner(s)]
    assert sorted(site_only, key=repr) == sorted(lean, key=repr)
    per_rig_count = len(full) - len(lean)
    assert 6 * 4 <= per_rig_count <= 6 * 8  # a handful of series per rig, no more
    await h.close()


def _is_miner(s: Any) -> bool:
    return bool(s.name == "rigd_device_up" and s.labels[1] == "miner")


def test_metrics_are_off_by_default_and_listen_is_checked() -> None:
    base = '[site]\nid = "x"\n'
    cfg = parse_config(base, environ={})
    assert cfg.metrics.enabled is False and cfg.metrics.listen == "127.0.0.1:9108"
    ok = parse_config(base + '[metrics]\nenabled = true\nlisten = "[::1]:9200"\n', environ={})
    assert (ok.metrics.host, ok.metrics.port) == ("::1", 9200)
    for bad in ("9108", ":9108", "127.0.0.1:0", "127.0.0.1:70000", "a b:1", "host:"):
        with pytest.raises(ConfigError) as e:
            parse_config(base + f'[metrics]\nlisten = "{bad}"\n', environ={})
        assert "metrics.listen" in str(e.value)
    with pytest.raises(ConfigError, match="unknown setting"):
        parse_config(base + "[metrics]\nper_rigs = false\n", environ={})


# -- the demo -----------------------------------------------------------------------------------


def test_demo_serves_metrics_while_it_runs() -> None:
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "controller.cli.rigd",
            "demo",
            "--headless",
            "--duration",
            "12",
            "--rigs",
            "6",
            "--pdus",
            "1",
            "--speed",
            "20",
            "--metrics",
            f"127.0.0.1:{port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        series: Series = {}
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                text = asyncio.run(scrape(f"http://127.0.0.1:{port}/metrics"))[0]
            except (aiohttp.ClientError, OSError):
                time.sleep(0.2)
                continue
            series = parse(text)
            if ("rigd_rigs_total", (("site", "demo"),)) in series:
                break
            time.sleep(0.2)
        assert value(series, "rigd_rigs_total") == 6
        assert value(series, "rigd_rigs", state="off") == 1  # the staged spare
        assert value(series, "rigd_cap_source", source="max_import") == 1
        assert proc.wait(40) == 0, proc.stderr.read() if proc.stderr else ""
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# -- the Grafana dashboard ------------------------------------------------------------------------


def selectors(node: Any) -> list[tuple[str, set[str]]]:
    """(metric name, label names matched) of every selector in a parsed PromQL query, and
    ("", grouping labels) for every `by`/`on`/`group_left` clause."""
    out: list[tuple[str, set[str]]] = []
    if isinstance(node, promql_parser.VectorSelector):
        return [(node.name or "", {m.name for m in node.matchers.matchers})]
    if isinstance(node, promql_parser.MatrixSelector):
        return selectors(node.vector_selector)
    modifier = getattr(node, "modifier", None)
    for attr in ("labels",):
        labels = getattr(modifier, attr, None)
        if labels:
            out.append(("", set(labels)))
    matching = getattr(modifier, "matching", None)
    if matching is not None and getattr(matching, "labels", None):
        out.append(("", set(matching.labels)))
    if getattr(modifier, "group_labels", None):  # group_left (...)
        out.append(("", set(modifier.group_labels)))  # type: ignore[union-attr]
    for attr in ("lhs", "rhs", "expr"):
        child = getattr(node, attr, None)
        if child is not None:
            out += selectors(child)
    for arg in getattr(node, "args", None) or []:
        out += selectors(arg)
    return out


def parse_promql(expr: str) -> Any:
    """Grafana's variables as Grafana substitutes them, then a real PromQL parser."""
    return promql_parser.parse(expr.replace("$__rate_interval", "5m").replace("$site", "x"))


def labels_of(series_name: str) -> tuple[str, ...]:
    """The labels of an exported series (counters' _total, the histogram's parts)."""
    for name, (_, _, labels) in METRICS.items():
        if series_name in (name, f"{name}_total"):
            return labels
    if series_name.startswith(POLL_HISTOGRAM):
        return ("site", "le")
    raise KeyError(series_name)


def _panels(dash: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for p in dash["panels"]:
        out.append(p)
        out.extend(p.get("panels", []))  # a collapsed row holds its panels
    return out


def test_grafana_dashboard_imports_and_queries_only_exported_metrics() -> None:
    dash = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    # what Grafana's import needs: identity, schema, a datasource input, panels on a grid
    assert dash["uid"] and dash["title"] and isinstance(dash["schemaVersion"], int)
    assert dash["schemaVersion"] >= 36
    inputs = {i["name"]: i for i in dash["__inputs"]}
    assert inputs["DS_PROMETHEUS"]["type"] == "datasource"
    assert inputs["DS_PROMETHEUS"]["pluginId"] == "prometheus"
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert "site" in variables and "rigd_info" in variables["site"]["definition"]
    exported = exported_names()
    all_labels = {lbl for _, _, labels in METRICS.values() for lbl in labels} | {"le"}
    for ann in dash["annotations"]["list"]:
        if "expr" in ann:
            assert {n for n, _ in selectors(parse_promql(ann["expr"])) if n} <= exported
    panels = _panels(dash)
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    queried: set[str] = set()
    cells: dict[tuple[int, int], int] = {}
    for p in panels:
        g = p["gridPos"]
        assert {"x", "y", "w", "h"} <= set(g) and g["x"] >= 0 and g["x"] + g["w"] <= 24
        if p["type"] == "row":
            continue
        if p in dash["panels"]:  # panels of the open layout must not overlap
            for dx in range(g["w"]):
                for dy in range(g["h"]):
                    cell = (g["x"] + dx, g["y"] + dy)
                    assert cell not in cells, f"panel {p['id']} overlaps panel {cells[cell]}"
                    cells[cell] = p["id"]
        assert p["datasource"]["uid"] == "${DS_PROMETHEUS}"
        assert p["targets"], p["title"]
        for t in p["targets"]:
            assert t["datasource"]["uid"] == "${DS_PROMETHEUS}" and t["refId"]
            sels = selectors(parse_promql(t["expr"]))  # valid PromQL, or this raises
            found = {name for name, _ in sels if name}
            assert found, t["expr"]
            missing = found - exported
            assert not missing, f"panel {p['title']!r} queries {missing}, not exported"
            for name, labels in sels:
                known = set(labels_of(name)) if name else all_labels
                assert labels <= known | {"le"}, (t["expr"], labels - known)
                if name:
                    assert "site" in labels, f"{t['expr']}: not filtered by $site"
            queried |= found
    # the dashboard covers what the issue asks to watch
    for m in (
        "rigd_import_watts",
        "rigd_cap_watts",
        "rigd_cap_source",
        "rigd_budget_used_kwh",
        "rigd_rigs",
        "rigd_hashrate_ths",
        "rigd_rig_temperature_celsius",
        "rigd_device_up",
        "rigd_poll_duration_seconds_bucket",
        "rigd_grid_order_cap_watts",
        "rigd_grid_order_compliant",
        "rigd_mqtt_connected",
    ):
        assert m in queried, m
