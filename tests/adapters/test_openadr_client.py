"""The VEN's REST client and notifier binding, against the simulated VTN."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from controller.adapters.openadr.client import VtnClient, VtnError
from controller.adapters.openadr.notifier import connect_args, parse_binding
from controller.config.openadr import OpenADRConfig
from simulators.openadr_vtn import SimVtn
from tests.openadr_helpers import check_exchanges

CLIENTS = {"ven-1": ("ven-secret", "ven"), "bl": ("bl-secret", "bl")}


class Clock:
    def __init__(self) -> None:
        self.t = 1_800_000_000.0

    def __call__(self) -> float:
        return self.t


def cfg(vtn: SimVtn, **kw: Any) -> OpenADRConfig:
    return OpenADRConfig.model_validate(
        {
            "vtn_url": vtn.base_url,
            "client_id": "ven-1",
            "client_secret": "ven-secret",
            "ven_name": "rigd-1",
            **kw,
        }
    )


async def test_enrol_find_again_token_renewal_and_401_retry() -> None:
    clock = Clock()
    async with SimVtn(CLIENTS, now=clock, token_ttl_s=600) as vtn:
        c = VtnClient(cfg(vtn), now=clock)
        try:
            ven = await c.ven("rigd-1")
            assert (await c.ven("rigd-1"))["id"] == ven["id"]  # found, not registered twice
            res = await c.resource(ven["id"], "site-1")
            assert (await c.resource(ven["id"], "site-1"))["id"] == res["id"]
            assert len(vtn.objects["vens"]) == 1 and len(vtn.objects["resources"]) == 1
            assert c.tokens_fetched == 1
            clock.t += 600 * 0.8 + 1  # past the renewal point, before expiry
            await c.events()
            assert c.tokens_fetched == 2 and not [x for x in vtn.exchanges if x.status == 401]
            vtn.expire_tokens()  # revoked behind our back: one 401, a fresh token, retried
            assert await c.events() == []
            assert c.tokens_fetched == 3
            assert await c.event("nope") is None
            vtn.fail_next(500, path_prefix="/events")
            with pytest.raises(VtnError) as e:
                await c.events()
            assert e.value.kind == "server" and e.value.status == 500
        finally:
            await c.close()
        check_exchanges(vtn)


async def test_wrong_secret_and_unreachable() -> None:
    async with SimVtn(CLIENTS) as vtn:
        c = VtnClient(cfg(vtn, client_secret="wrong"), now=Clock())
        with pytest.raises(VtnError) as e:
            await c.events()
        assert e.value.kind == "auth"
        await c.close()
        url = vtn.base_url
    c = VtnClient(cfg(vtn, vtn_url=url, timeout_s=2), now=Clock())
    with pytest.raises(VtnError) as e:
        await c.events()
    assert e.value.kind == "unreachable"
    await c.close()


async def test_binding_authentication(tmp_path: Path) -> None:
    assert parse_binding({"WEBHOOK": True}) is None
    b = parse_binding(
        {
            "MQTT": {
                "URIS": ["mqtt://127.0.0.1:1883"],
                "serialization": "JSON",
                "authentication": {"method": "OAUTH2_BEARER_TOKEN", "username": "{clientID}"},
            }
        }
    )
    assert b is not None

    async def token() -> str:
        return "tok-1"

    a = await connect_args(
        b, b.uris[0], client_id="ven-1", token=token, ca_file=None, cert_dir=tmp_path
    )
    assert (a.host, a.port, a.username, a.password, a.tls) == (
        "127.0.0.1",
        1883,
        "ven-1",
        "tok-1",
        None,
    )
    b2 = parse_binding(
        {
            "MQTT": {
                "URIS": ["mqtts://broker.example"],
                "serialization": "JSON",
                "authentication": {"method": "OAUTH2_BEARER_TOKEN", "username": "oauth2"},
            }
        }
    )
    assert b2 is not None
    a2 = await connect_args(
        b2, b2.uris[0], client_id="ven-1", token=token, ca_file=None, cert_dir=tmp_path
    )
    assert (a2.port, a2.username, a2.tls is not None) == (8883, "oauth2", True)
    for bad in (
        {"MQTT": {"URIS": [], "serialization": "JSON", "authentication": {"method": "ANONYMOUS"}}},
        {"MQTT": {"URIS": ["http://x"], "serialization": "JSON"}},
        {"MQTT": {"URIS": ["mqtt://x"], "authentication": {"method": "KERBEROS"}}},
        {"MQTT": {"URIS": ["mqtt://x"], "authentication": {"method": "CERTIFICATE"}}},
        {"MQTT": {"URIS": ["mqtt://x"], "serialization": "XML"}},
    ):
        with pytest.raises(VtnError):
            parse_binding(bad)
