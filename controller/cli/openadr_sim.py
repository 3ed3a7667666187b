"""A simulated OpenADR 3.1 VTN beside the simulated farm: `rigd sim --vtn` and
`rigd demo --grid openadr` (docs/openadr.md).

The VTN (simulators/openadr_vtn.py) serves its REST API on loopback and publishes its
notifications on the MQTT broker the daemon uses. It knows two OAuth2 clients: the
utility's business logic (`bl`) and the site's VEN (`ven-<site>`), each with a secret
made for the run. The demo's script plays the utility: it creates a program at start and,
a third of the way in, an IMPORT_CAPACITY_LIMIT event, over the VTN's REST API as a
business-logic client would.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import structlog

from simulators.openadr_vtn import SimVtn

log = structlog.get_logger(__name__)

PROGRAM_NAME = "rigd-curtailment"


def make_vtn(site_id: str, broker_url: str, *, now: Callable[[], float], port: int = 0) -> SimVtn:
    p = urlsplit(broker_url)
    return SimVtn(
        {
            "bl": (secrets.token_urlsafe(12), "bl"),
            f"ven-{site_id}": (secrets.token_urlsafe(12), "ven"),
        },
        broker=(p.hostname or "127.0.0.1", p.port or 1883),
        port=port,
        now=now,
    )


def openadr_toml(
    vtn: SimVtn, site_id: str, *, report_interval_s: float = 60.0, respond_within_s: float = 60.0
) -> str:
    """The daemon's [openadr] section for this VTN."""
    cid = f"ven-{site_id}"
    secret, _ = vtn.clients[cid]
    return (
        "\n[openadr]\n"
        f"vtn_url = {json.dumps(vtn.base_url)}\n"
        f"client_id = {json.dumps(cid)}\n"
        f"client_secret = {json.dumps(secret)}  # a sim's secret; use a credential in production\n"
        f"ven_name = {json.dumps(f'rigd-{site_id}')}\n"
        f"respond_within_s = {respond_within_s:g}\n"
        f"report_interval_s = {report_interval_s:g}\n"
    )


class UtilityScript:
    """The utility's business logic, for the demo: REST calls with a BL token."""

    def __init__(self, vtn: SimVtn) -> None:
        self.vtn = vtn
        self.token: str | None = None
        self.program_id: str | None = None

    async def _call(self, method: str, path: str, doc: dict[str, Any] | None = None) -> Any:
        secret, _ = self.vtn.clients["bl"]
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as s:
            if self.token is None:
                async with s.post(
                    f"{self.vtn.base_url}/auth/token",
                    data={
                        "grant_type": "client_credentials",
                        "client_id": "bl",
                        "client_secret": secret,
                    },
                ) as r:
                    self.token = (await r.json())["access_token"]
            async with s.request(
                method,
                f"{self.vtn.base_url}{path}",
                json=doc,
                headers={"Authorization": f"Bearer {self.token}"},
            ) as r:
                body = await r.json()
                if r.status >= 400:
                    raise OSError(f"VTN answered {r.status} to {method} {path}: {body}")
                return body

    async def program(self) -> str:
        doc = await self._call("POST", "/programs", {"programName": PROGRAM_NAME})
        self.program_id = str(doc["id"])
        return self.program_id

    async def curtail(self, kw: float, duration_s: float, name: str) -> dict[str, Any]:
        """An IMPORT_CAPACITY_LIMIT event starting now, asking for usage, demand and
        operating-state reports as rigd's configured cadence allows (frequency 0)."""
        if self.program_id is None:
            await self.program()
        doc = {
            "programID": self.program_id,
            "eventName": name,
            "priority": 0,
            "payloadDescriptors": [
                {
                    "objectType": "EVENT_PAYLOAD_DESCRIPTOR",
                    "payloadType": "IMPORT_CAPACITY_LIMIT",
                    "units": "KW",
                }
            ],
            "reportDescriptors": [
                {"payloadType": t, "frequency": 0, "repeat": -1}
                for t in ("USAGE", "DEMAND", "OPERATING_STATE", "BASELINE")
            ],
            "intervalPeriod": {
                "start": "0001-01-01T00:00:00Z",
                "duration": f"PT{round(duration_s)}S",
            },
            "intervals": [
                {"id": 0, "payloads": [{"type": "IMPORT_CAPACITY_LIMIT", "values": [kw]}]}
            ],
        }
        ev: dict[str, Any] = await self._call("POST", "/events", doc)
        return ev
