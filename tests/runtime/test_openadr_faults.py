"""OpenADR faults and bad input: a VTN that fails (5xx, 401/403, unreachable), an event
that does not validate, a notification the REST API does not confirm, token renewal
before expiry, and a VTN without an MQTT binding (polling). In each, what is in force
stays in force and the state document says what is wrong."""

from __future__ import annotations

import asyncio
import io
import json
from pathlib import Path
from typing import Any

import aiomqtt
from rich.console import Console

from controller.cli.rigctl import AdminClient, print_status
from simulators.clock import ScaledClock
from simulators.openadr_vtn import SimVtn
from simulators.site import SimSite
from tests.conftest import Mosquitto, Watcher, running, watch
from tests.openadr_helpers import Bl, cap_event, check_exchanges
from tests.runtime.test_openadr_e2e import CLIENTS, SPEED, make_config, metered_kw, openadr_ok


def oadr(w: Watcher) -> Any:
    return w.json("rigd/sim/state")["openadr"]


async def test_vtn_failures_invalid_events_and_forged_notifications_change_nothing(
    mosquitto: Mosquitto, tmp_path: Path
) -> None:
    async with (
        SimSite(rigs=6, pdus=1, clock=ScaledClock(SPEED)) as site,
        SimVtn(
            CLIENTS,
            broker=(mosquitto.host, mosquitto.port),
            now=site.clock.now,
            token_ttl_s=200.0,  # farm seconds: renewed at 80 %, i.e. every 8 wall seconds
        ) as vtn,
    ):
        bl = Bl(vtn)
        program = await bl.program()
        cfg = make_config(site, mosquitto, tmp_path, vtn)  # resync 600 s; 30 s while failing
        async with watch(mosquitto.host, mosquitto.port) as w, running(cfg, site) as d:
            state = await openadr_ok(w)
            ven_id = state["openadr"]["ven_id"]
            target = round(await metered_kw(w) * 0.6, 1)
            event = await bl.event(cap_event(program["id"], target, duration="PT2H"))
            order = f"oadr.{event['id']}.0"
            await w.wait_json("rigd/sim/state", lambda s: order in (s.get("cap_detail") or ""))

            # 1. an update that does not validate: logged, counted, the old cap stays
            bad = {
                k: v
                for k, v in event.items()
                if k not in ("id", "createdDateTime", "modificationDateTime", "objectType")
            }
            bad["intervals"] = [
                {"id": 0, "payloads": [{"type": "IMPORT_CAPACITY_LIMIT", "values": ["forty"]}]}
            ]
            await bl.update_event(event["id"], bad)
            await w.wait_json("rigd/sim/state", lambda s: s["openadr"]["invalid_events"] >= 1)
            assert d.grid is not None and d.grid.book.orders[order].cap_kw == target
            assert d.grid.book.orders[order].status == "active"

            # 2. a forged notification for an event the VTN does not have: not acted on
            forged = {
                "objectType": "EVENT",
                "operation": "CREATE",
                "object": {
                    **event,
                    "id": "forged-1",
                    "intervals": [
                        {"id": 0, "payloads": [{"type": "IMPORT_CAPACITY_LIMIT", "values": [0.0]}]}
                    ],
                },
            }
            async with aiomqtt.Client(mosquitto.host, mosquitto.port, identifier="forger") as c:
                await c.publish(
                    f"openadr3/events/vens/{ven_id}/create", json.dumps(forged).encode(), qos=1
                )
            await w.wait_json(
                "rigd/sim/state", lambda s: s["openadr"]["unconfirmed_notifications"] >= 1
            )
            assert not any(o.startswith("oadr.forged-1") for o in d.grid.book.orders)
            assert any(x.path == "/events/forged-1" and x.status == 404 for x in vtn.exchanges)

            # 3. the VTN answers 500, then 403: health says so, the cap stays
            vtn.fail_next(500, times=1000, path_prefix="/events", method="GET")
            await bl.update_event(event["id"], {**bad, "intervals": event["intervals"]})
            await w.wait_json("rigd/sim/state", lambda s: s["openadr"]["status"] == "vtn_error")
            assert "HTTP 500" in oadr(w)["error"]
            # the technician sees it (rigctl status) and the order in force (rigctl grid status)
            client = AdminClient(cfg.admin.socket)
            doc = await asyncio.to_thread(client.call, "status")
            out = Console(file=io.StringIO(), width=200)
            print_status(doc, out)
            text = out.file.getvalue()  # type: ignore[attr-defined]
            assert "OpenADR VTN" in text and "vtn_error" in text and "HTTP 500" in text
            got = await asyncio.to_thread(client.call, "grid")
            assert [o["order_id"] for o in got["orders"]] == [order]
            vtn._faults.clear()
            vtn.fail_next(403, times=1000, path_prefix="/events", method="GET")
            await w.wait_json(
                "rigd/sim/state", lambda s: s["openadr"]["status"] == "auth_failed", within=20
            )
            assert d.grid.book.orders[order].status == "active"
            assert w.json("rigd/sim/state")["cap_source"] == "grid"
            vtn._faults.clear()

            # 4. unreachable: stopped; then back on the same port
            port = vtn.port
            await vtn.stop(broker=False)
            await w.wait_json(
                "rigd/sim/state", lambda s: s["openadr"]["status"] == "unreachable", within=40
            )
            assert w.json("rigd/sim/state")["cap_source"] == "grid"
            # reports wait in the outbox meanwhile, and go when the VTN is back
            await w.wait_json(
                "rigd/sim/state", lambda s: s["openadr"]["reports_waiting"] >= 2, within=20
            )
            sent_before = len(vtn.reports(event["id"]))
            vtn.port = port
            await vtn.start()
            await w.wait_json(
                "rigd/sim/state",
                lambda s: s["openadr"]["status"] == "ok" and s["openadr"]["reports_waiting"] == 0,
                within=40,
            )
            assert len(vtn.reports(event["id"])) >= sent_before + 2

            # 5. tokens renewed before they expire: no call was refused for an old token
            for _ in range(200):
                if vtn.tokens_issued >= 3:  # the BL's one, the VEN's first, a renewal
                    break
                await asyncio.sleep(0.1)
            assert vtn.tokens_issued >= 3
            ven_401 = [x for x in vtn.exchanges if x.status == 401]
            assert ven_401 == [], [(x.method, x.path) for x in ven_401]
        bl.close()
        check_exchanges(vtn)


async def test_without_an_mqtt_binding_rigd_polls(mosquitto: Mosquitto, tmp_path: Path) -> None:
    async with (
        SimSite(rigs=4, pdus=1, clock=ScaledClock(SPEED)) as site,
        SimVtn(
            CLIENTS,
            now=site.clock.now,  # no broker: GET /notifiers offers only WEBHOOK
        ) as vtn,
    ):
        bl = Bl(vtn)
        program = await bl.program()
        cfg = make_config(site, mosquitto, tmp_path, vtn, poll_interval_s=10)
        async with watch(mosquitto.host, mosquitto.port) as w, running(cfg, site):
            await openadr_ok(w, mqtt="polling")
            target = round(await metered_kw(w) * 0.6, 1)
            event = await bl.event(
                cap_event(program["id"], target, duration="PT1H", targets=["rigd-sim"])
            )
            await w.wait_json(
                "rigd/sim/state",
                lambda s: f"oadr.{event['id']}.0" in (s.get("cap_detail") or ""),
                within=3 * 10 / SPEED,
            )
            # an event for another site is not read (the VTN keeps it private) nor obeyed
            other = await bl.event(cap_event(program["id"], 0.0, targets=["elsewhere"]))
            await asyncio.sleep(3 * 10 / SPEED)
            assert other["id"] not in w.json("rigd/sim/state")["openadr"]["events"]
        bl.close()
        check_exchanges(vtn)
