"""The simulated VTN speaks OpenADR 3.1 as the official OpenAPI document says, to a
third-party business-logic client, and publishes its notifications on a real broker."""

from __future__ import annotations

import asyncio
import json

import aiomqtt
import httpx

from simulators.openadr_vtn import KINDS, WRITE_SCOPES, SimVtn
from tests.conftest import Mosquitto
from tests.openadr_helpers import Bl, cap_event, check_exchanges, check_notifications, spec_dict

CLIENTS = {"bl": ("bl-secret", "bl"), "ven-1": ("ven-secret", "ven")}


def _ven_token(vtn: SimVtn) -> str:
    r = httpx.post(
        vtn.url("/auth/token"),
        data={
            "grant_type": "client_credentials",
            "client_id": "ven-1",
            "client_secret": "ven-secret",
        },
    )
    assert r.status_code == 200
    return str(r.json()["access_token"])


async def test_bl_client_and_ven_traffic_validates_and_notifies(mosquitto: Mosquitto) -> None:
    async with SimVtn(CLIENTS, broker=(mosquitto.host, mosquitto.port)) as vtn:
        bl = Bl(vtn)
        token = await asyncio.to_thread(_ven_token, vtn)
        h = {"Authorization": f"Bearer {token}"}

        def ven_calls() -> tuple[str, dict[str, str]]:
            with httpx.Client(base_url=vtn.base_url, headers=h) as c:
                ven = c.post("/vens", json={"objectType": "VEN_VEN_REQUEST", "venName": "rigd-a"})
                assert ven.status_code == 201, ven.text
                ven_id = ven.json()["id"]
                res = c.post(
                    "/resources",
                    json={
                        "objectType": "VEN_RESOURCE_REQUEST",
                        "resourceName": "site-a",
                        "venID": ven_id,
                    },
                )
                assert res.status_code == 201, res.text
                assert c.get("/vens", params={"venName": "rigd-a"}).json()[0]["id"] == ven_id
                n = c.get("/notifiers").json()
                assert n["MQTT"]["authentication"] == {"method": "ANONYMOUS"}
                topics = c.get(f"/notifiers/mqtt/topics/vens/{ven_id}/events").json()["topics"]
                assert c.get("/notifiers/mqtt/topics/events").status_code == 403  # BL only
                assert c.post("/events", json={"programID": "x"}).status_code == 403
                return ven_id, topics

        ven_id, topics = await asyncio.to_thread(ven_calls)
        async with aiomqtt.Client(mosquitto.host, mosquitto.port, identifier="t-ven") as sub:
            await sub.subscribe(topics["ALL"], qos=1)
            prog = await bl.program()
            mine = await bl.event(cap_event(prog["id"], 40.0, targets=["site-a"]))
            theirs = await bl.event(cap_event(prog["id"], 40.0, targets=["elsewhere"]))
            got = await asyncio.wait_for(anext(aiter(sub.messages)), 5)
            note = json.loads(got.payload if isinstance(got.payload, bytes) else b"")
            assert str(got.topic) == f"openadr3/events/vens/{ven_id}/create"
            assert note["operation"] == "CREATE" and note["object"]["id"] == mine["id"]

        def ven_reads() -> None:
            with httpx.Client(base_url=vtn.base_url, headers=h) as c:
                ids = [e["id"] for e in c.get("/events").json()]
                assert ids == [mine["id"]]  # the other VEN's event stays private
                assert c.get(f"/events/{theirs['id']}").status_code == 404
                r = c.post(
                    "/reports",
                    json={
                        "eventID": mine["id"],
                        "clientName": "rigd-a",
                        "resources": [
                            {
                                "resourceName": "site-a",
                                "intervals": [
                                    {"id": 0, "payloads": [{"type": "USAGE", "values": [1.5]}]}
                                ],
                            }
                        ],
                    },
                )
                assert r.status_code == 201, r.text
                assert c.get("/events", headers={"Authorization": "Bearer nope"}).status_code == 401

        await asyncio.to_thread(ven_reads)
        assert [r["eventID"] for r in await bl.reports()] == [mine["id"]]
        await bl.delete_event(mine["id"])
        bl.close()
        assert check_exchanges(vtn) >= 15
        assert check_notifications(vtn) >= 3


async def test_injected_faults_and_expired_tokens() -> None:
    async with SimVtn(CLIENTS) as vtn:
        token = await asyncio.to_thread(_ven_token, vtn)

        def calls() -> list[int]:
            with httpx.Client(
                base_url=vtn.base_url, headers={"Authorization": f"Bearer {token}"}
            ) as c:
                vtn.fail_next(500, path_prefix="/events")
                codes = [c.get("/events").status_code, c.get("/events").status_code]
                vtn.expire_tokens()
                codes.append(c.get("/events").status_code)
                return codes

        assert await asyncio.to_thread(calls) == [500, 200, 401]
        assert await asyncio.to_thread(c_notifiers, vtn) == {
            "WEBHOOK": True
        }  # no broker: no MQTT binding
        check_exchanges(vtn)


def c_notifiers(vtn: SimVtn) -> object:
    token = _ven_token(vtn)
    return httpx.get(vtn.url("/notifiers"), headers={"Authorization": f"Bearer {token}"}).json()


def test_write_scopes_are_the_documents() -> None:
    """Every create, update and delete asks for the scope the 3.1 document's security
    requirement names (a subscription's update once asked for write_vens)."""
    seen = 0
    for path, ops in spec_dict("http://127.0.0.1").get("paths", {}).items():
        kind = path.strip("/").split("/")[0]
        if kind not in KINDS:
            continue
        for method in ("post", "put", "delete"):
            if method not in ops:
                continue
            wanted = [s["oAuth2ClientCredentials"] for s in ops[method]["security"]
                      if "oAuth2ClientCredentials" in s]  # fmt: skip
            assert wanted == [[WRITE_SCOPES[kind]]], (method, path)
            seen += 1
    assert seen == 3 * len(KINDS)
