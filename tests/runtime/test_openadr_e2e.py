"""rigd as an OpenADR 3.1 VEN, end to end: a utility's business logic creates events on
the simulated VTN through a third-party client; they reach rigd over the VTN's MQTT
notifier on a real mosquitto; rigd obeys them before the deadline and posts its reports.
Every REST exchange is checked against the official 3.1.0 OpenAPI document. Farm, VTN
and daemon share a scaled clock (SPEED farm seconds per wall second)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

from controller.config import Config, parse_config
from controller.core.grid.openadr_events import rfc3339
from simulators.clock import ScaledClock
from simulators.openadr_vtn import SimVtn
from simulators.site import SimSite
from tests.conftest import Mosquitto, Watcher, running, watch
from tests.openadr_helpers import Bl, cap_event, check_exchanges, check_notifications

SPEED = 20.0
RESPOND_S = 120.0
CLIENTS = {"bl": ("bl-secret", "bl"), "ven-sim": ("ven-secret", "ven")}


def openadr_toml(vtn: SimVtn, **extra: Any) -> str:
    settings: dict[str, Any] = {
        "vtn_url": vtn.base_url,
        "client_id": "ven-sim",
        "client_secret": "ven-secret",
        "ven_name": "rigd-sim",
        "respond_within_s": RESPOND_S,
        "report_interval_s": 20,
        "poll_interval_s": 30,
        "resync_interval_s": 600,
        "timeout_s": 5,
        **extra,
    }
    return "[openadr]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in settings.items())


def make_config(site: SimSite, broker: Mosquitto, tmp_path: Path, vtn: SimVtn, **kw: Any) -> Config:
    full = site.nominal_import_kw()
    control = f"""
[control]
max_import_kw = {math.ceil(full * 1.1)}
min_on_s = 60
min_off_s = 60
escalate_after_s = 60
ramp_kw_per_interval = {math.ceil(full * 0.25)}
"""
    text = site.config_toml(
        broker_url=broker.url,
        state_dir=tmp_path / "state",
        interval_s=0.5 * SPEED,
        timeout_s=0.4,
        retries=0,
        extra=control + openadr_toml(vtn, **kw),
    )
    (tmp_path / "rigd.toml").write_text(text)
    return parse_config(text, environ={})


async def openadr_ok(w: Watcher, *, mqtt: str = "connected", within: float = 20) -> Any:
    return await w.wait_json(
        "rigd/sim/state",
        lambda d: (
            d.get("openadr", {}).get("status") == "ok"
            and d["openadr"]["mqtt"] == mqtt
            and d["rigs"]["mining"] > 0
        ),
        within=within,
    )


async def metered_kw(w: Watcher, within: float = 10) -> float:
    """The site's import as last metered (a state document whose meter read)."""
    doc = await w.wait_json("rigd/sim/state", lambda d: d["import_kw"] is not None, within=within)
    return float(doc["import_kw"])


def reports_for(vtn: SimVtn, event_id: str, payload: str) -> list[Any]:
    out = []
    for r in vtn.reports(event_id):
        for res in r["resources"]:
            for iv in res["intervals"]:
                for p in iv["payloads"]:
                    if p["type"] == payload:
                        out.append((iv["id"], p["values"][0]))
    return out


async def wait_until(pred: Any, within: float, what: str) -> None:
    for _ in range(int(within / 0.1)):
        if pred():
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"not within {within} s: {what}")


async def test_event_from_a_bl_client_reaches_rigd_over_mqtt_and_is_obeyed_and_reported(
    mosquitto: Mosquitto, tmp_path: Path
) -> None:
    async with (
        SimSite(rigs=16, pdus=2, clock=ScaledClock(SPEED)) as site,
        SimVtn(CLIENTS, broker=(mosquitto.host, mosquitto.port), now=site.clock.now) as vtn,
    ):
        bl = Bl(vtn)
        program = await bl.program()
        cfg = make_config(site, mosquitto, tmp_path, vtn)
        async with watch(mosquitto.host, mosquitto.port) as w, running(cfg, site) as d:
            state = await openadr_ok(w)
            await w.wait_json("rigd/sim/state", lambda s: s["rigs"]["mining"] == 16)
            ven_id = state["openadr"]["ven_id"]
            assert [v["venName"] for v in vtn.objects["vens"].values()] == ["rigd-sim"]
            target = round(await metered_kw(w) * 0.5, 1)
            created_at = site.clock.now()
            event = await bl.event(
                cap_event(
                    program["id"],
                    target,
                    duration="PT10M",
                    reports=["USAGE", "OPERATING_STATE", "DEMAND", "BASELINE"],
                    report_every=0,
                )
            )
            # It came over MQTT: rigd read that event back over REST to confirm it
            # (only a notification makes rigd GET one event by id).
            await w.wait_json(
                "rigd/sim/state",
                lambda s: (
                    s["cap_source"] == "grid"
                    and f"oadr.{event['id']}.0" in (s.get("cap_detail") or "")
                ),
                within=5,
            )
            assert any(x.path == f"/events/{event['id']}" for x in vtn.exchanges)
            await w.wait_json(
                "rigd/sim/state",
                lambda s: s["import_kw"] is not None and s["import_kw"] <= target,
                within=RESPOND_S / SPEED,
            )
            assert site.clock.now() < created_at + RESPOND_S
            assert site.farm.meter.true_power_w(site.clock.now()) / 1000 <= target
            grid = w.json("rigd/sim/state")["grid"]
            assert [o["order_id"] for o in grid["active"]] == [f"oadr.{event['id']}.0"]
            # usage and operating-state reports, tied to the event's interval 0
            await wait_until(
                lambda: (
                    "RUNNING_CURTAILED"
                    in [v for _, v in reports_for(vtn, event["id"], "OPERATING_STATE")]
                ),
                60 / SPEED * 10,
                "an OPERATING_STATE report saying RUNNING_CURTAILED",
            )
            usage = reports_for(vtn, event["id"], "USAGE")
            assert usage and all(i == 0 and v >= 0 for i, v in usage)
            assert reports_for(vtn, event["id"], "DEMAND")
            baseline = [v for _, v in reports_for(vtn, event["id"], "BASELINE")]
            assert baseline and baseline[-1] > target  # import before the cut
            # A later event asks what the site could shed: reported ahead of its start.
            later = await bl.event(
                cap_event(
                    program["id"],
                    target,
                    start=rfc3339(site.clock.now() + 1800),
                    duration="PT30M",
                    reports=["LOAD_SHED_DELTA_AVAILABLE"],
                )
            )
            await wait_until(
                lambda: bool(reports_for(vtn, later["id"], "LOAD_SHED_DELTA_AVAILABLE")),
                5,
                "LOAD_SHED_DELTA_AVAILABLE ahead of the event",
            )
            await bl.delete_event(later["id"])
            # The utility deletes the event: the cap is lifted.
            await bl.delete_event(event["id"])
            await w.wait_json("rigd/sim/state", lambda s: s["cap_source"] != "grid", within=5)
            assert d.grid is not None
            assert d.grid.book.orders[f"oadr.{event['id']}.0"].status == "cancelled"
            assert ven_id in {
                x.path.split("/")[-2]
                for x in vtn.exchanges
                if x.path.startswith("/notifiers/mqtt/topics/vens/")
            }
        bl.close()
        assert check_exchanges(vtn) > 10
        assert check_notifications(vtn) > 0


async def test_broker_outage_event_recovered_over_rest_on_reconnect(
    mosquitto: Mosquitto, tmp_path: Path
) -> None:
    """The broker goes away; the utility creates an event meanwhile, whose notification
    is lost. On reconnect rigd reads the events over REST, obeys before the deadline and
    reports."""
    async with (
        SimSite(rigs=12, pdus=2, clock=ScaledClock(SPEED)) as site,
        SimVtn(CLIENTS, broker=(mosquitto.host, mosquitto.port), now=site.clock.now) as vtn,
    ):
        bl = Bl(vtn)
        program = await bl.program()
        cfg = make_config(site, mosquitto, tmp_path, vtn)
        async with running(cfg, site) as d:
            async with watch(mosquitto.host, mosquitto.port) as w:
                await openadr_ok(w)
                await w.wait_json("rigd/sim/state", lambda s: s["rigs"]["mining"] == 12)
                target = round(await metered_kw(w) * 0.5, 1)
            mosquitto.stop()
            await asyncio.sleep(0.5)
            lost_before = vtn.lost_notifications
            start = site.clock.now() + 60
            event = await bl.event(
                cap_event(
                    program["id"],
                    target,
                    start=rfc3339(start),
                    duration="PT10M",
                    reports=["USAGE", "OPERATING_STATE"],
                    report_every=0,
                )
            )
            await asyncio.sleep(1.0)
            assert vtn.lost_notifications > lost_before  # nobody heard it
            assert d.openadr is not None and d.openadr.summary()["events"] == []
            mosquitto.start()
            async with watch(mosquitto.host, mosquitto.port) as w:
                await w.wait_json(
                    "rigd/sim/state",
                    lambda s: event["id"] in s.get("openadr", {}).get("events", []),
                    within=40,
                )
                await w.wait_json(
                    "rigd/sim/state",
                    lambda s: (
                        s["cap_source"] == "grid"
                        and s["import_kw"] is not None
                        and s["import_kw"] <= target
                    ),
                    within=(start + RESPOND_S - site.clock.now()) / SPEED,
                )
                assert site.clock.now() < start + RESPOND_S
                await wait_until(
                    lambda: (
                        "RUNNING_CURTAILED"
                        in [v for _, v in reports_for(vtn, event["id"], "OPERATING_STATE")]
                    ),
                    10,
                    "operating-state reports after the outage",
                )
        bl.close()
        check_exchanges(vtn)


async def test_daemon_killed_mid_event_resumes_under_the_cap_and_catches_up(
    mosquitto: Mosquitto, tmp_path: Path
) -> None:
    """kill -9 mid-event: the restarted daemon applies the event's cap from its state
    database before the VTN answers (the VTN is down at restart), and when the VTN is
    back it reads the event's update made while rigd was dead, and reports again."""
    speed = 1.0  # the daemon is a separate process, on the wall clock
    async with (
        SimSite(rigs=6, pdus=1, clock=ScaledClock(speed)) as site,
        SimVtn(CLIENTS, broker=(mosquitto.host, mosquitto.port), now=site.clock.now) as vtn,
    ):
        bl = Bl(vtn)
        program = await bl.program()
        vtn_port = vtn.port
        text = site.config_toml(
            broker_url=mosquitto.url,
            state_dir=tmp_path / "state",
            interval_s=1.0 * speed,
            timeout_s=0.4,
            retries=0,
            extra=f"""
[control]
max_import_kw = {math.ceil(site.nominal_import_kw() * 1.1)}
min_on_s = 60
min_off_s = 60
"""
            + openadr_toml(vtn, report_interval_s=8),
        )
        cfg_path = tmp_path / "rigd.toml"
        cfg_path.write_text(text)
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        async with watch(mosquitto.host, mosquitto.port) as w:
            daemon = await _start_daemon(cfg_path, tmp_path / "rigd-1.log", env)
            try:
                await openadr_ok(w, within=60)
                await w.wait_json("rigd/sim/state", lambda s: s["rigs"]["mining"] == 6, within=60)
                target = round(await metered_kw(w, within=30) * 0.5, 1)
                event = await bl.event(
                    cap_event(
                        program["id"],
                        target,
                        duration="PT30M",
                        reports=["USAGE", "OPERATING_STATE"],
                        report_every=0,
                    )
                )
                await w.wait_json("rigd/sim/state", lambda s: s["cap_source"] == "grid")
                await wait_until(lambda: bool(vtn.reports(event["id"])), 30, "a first report")
                daemon.send_signal(signal.SIGKILL)
                await daemon.wait()
                await w.wait_for("rigd/sim/status", lambda p: p == b"offline")
                # while rigd is dead: the utility lowers the cap, and then the VTN goes down
                lower = round(target * 0.7, 1)
                changed = {
                    k: v
                    for k, v in event.items()
                    if k not in ("id", "createdDateTime", "modificationDateTime", "objectType")
                }
                changed["intervals"] = [
                    {"id": 0, "payloads": [{"type": "IMPORT_CAPACITY_LIMIT", "values": [lower]}]}
                ]
                await bl.update_event(event["id"], changed)
                await vtn.stop(broker=False)
                restarted_at = time.time()
                daemon = await _start_daemon(cfg_path, tmp_path / "rigd-2.log", env)
                first = await w.wait_json(
                    "rigd/sim/state", lambda s: s["ts"] > restarted_at, within=30
                )
                # the cap in force before anything was heard from the VTN
                assert first["cap_source"] == "grid"
                assert f"oadr.{event['id']}.0" in first["cap_detail"]
                assert first["openadr"]["status"] != "ok"
                await w.wait_json(
                    "rigd/sim/state",
                    lambda s: s["openadr"]["status"] == "unreachable",
                    within=30,
                )
                vtn.port = vtn_port
                await vtn.start()
                await w.wait_json(
                    "rigd/sim/state",
                    lambda s: (
                        s["openadr"]["status"] == "ok"
                        and s["cap_kw"] is not None
                        and s["cap_kw"] <= lower
                    ),
                    within=60,
                )
                n = len(vtn.reports(event["id"]))
                await wait_until(
                    lambda: len(vtn.reports(event["id"])) > n, 30, "reports after the restart"
                )
            finally:
                if daemon.returncode is None:
                    daemon.send_signal(signal.SIGTERM)
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(daemon.wait(), 15)
                    if daemon.returncode is None:
                        daemon.kill()
                        await daemon.wait()
        bl.close()
        check_exchanges(vtn)
        log2 = [
            json.loads(line)["event"]
            for line in (tmp_path / "rigd-2.log").read_text().splitlines()
            if line.startswith("{")
        ]
        assert log2.index("grid_orders_loaded") < log2.index("openadr_vtn_failed")


async def _start_daemon(
    cfg_path: Path, log_path: Path, env: dict[str, str]
) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "controller.cli.rigd",
        "run",
        "-c",
        str(cfg_path),
        stderr=log_path.open("wb"),
        env=env,
    )
