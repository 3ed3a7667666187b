"""OpenADR test helpers: the official 3.1.0 OpenAPI document as a validator, and a
business-logic client that is not rigd's code.

`spec_api(base_url)` loads tests/fixtures/openadr-3.1/openadr3.yaml (committed verbatim)
and corrects in memory the three defects of the published 3.1.0 document that make some
valid traffic impossible to validate (see tests/fixtures/README.md):

1. `BlVenRequest.targets` has `default: "null          -"` (a YAML slip), which fails
   the document's own schema check.
2. `ven` and `resource` are `allOf` `objectMetadata` (objectType one of PROGRAM, EVENT,
   ... VEN, RESOURCE) and `BlVenRequest`/`BlResourceRequest` (objectType BL_VEN_REQUEST /
   BL_RESOURCE_REQUEST): no object can satisfy both, so the Bl* enum is widened to accept
   the metadata's VEN / RESOURCE.
3. `notification.object` has a `discriminator` on `objectType` without a mapping, so the
   values objects carry (EVENT, PROGRAM, ...) would name schemas that do not exist; the
   mapping to `event`, `program`, ... is added.

`check_exchanges` validates every request and response a simulated VTN saw with
openapi-core. `Bl` wraps the openadr3 package's business-logic client (grid-coordination
/python-oa3, MIT), run in a thread since it is synchronous.
"""

from __future__ import annotations

import asyncio
import copy
from pathlib import Path
from typing import Any

import yaml
from openadr3 import create_bl_client
from openapi_core import Config, OpenAPI
from openapi_core.testing import MockRequest, MockResponse
from openapi_schema_validator import OAS30Validator
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT4

from simulators.openadr_vtn import Exchange, SimVtn

SPEC = Path(__file__).parent / "fixtures" / "openadr-3.1" / "openadr3.yaml"
_RAW: dict[str, Any] | None = None


def spec_dict(base_url: str) -> dict[str, Any]:
    global _RAW
    if _RAW is None:
        _RAW = yaml.safe_load(SPEC.read_text())
    spec: dict[str, Any] = copy.deepcopy(_RAW)
    spec["servers"] = [{"url": base_url}]
    schemas = spec["components"]["schemas"]
    schemas["BlVenRequest"]["properties"]["targets"]["default"] = None
    schemas["BlVenRequest"]["properties"]["objectType"]["enum"].append("VEN")
    schemas["BlResourceRequest"]["properties"]["objectType"]["enum"].append("RESOURCE")
    obj = schemas["notification"]["properties"]["object"]
    obj["discriminator"]["mapping"] = {
        k.upper(): f"#/components/schemas/{k}"
        for k in ("program", "report", "event", "subscription", "ven", "resource")
    }
    return spec


_CHECKED = False


def spec_api(base_url: str) -> OpenAPI:
    """The document as a validator; the document itself is checked once per session."""
    global _CHECKED
    if _CHECKED:
        return OpenAPI.from_dict(spec_dict(base_url), config=Config(spec_validator_cls=None))
    api = OpenAPI.from_dict(spec_dict(base_url))
    _CHECKED = True
    return api


def check_exchanges(vtn: SimVtn, exchanges: list[Exchange] | None = None) -> int:
    """Validate every request and response against the 3.1.0 document; the count checked.

    Raises AssertionError naming the first exchange that does not validate."""
    api = spec_api(vtn.base_url)
    n = 0
    for x in exchanges if exchanges is not None else vtn.exchanges:
        args: dict[str, Any] = {}
        for part in filter(None, x.query.split("&")):
            k, _, v = part.partition("=")
            args[k] = v
        req = MockRequest(
            vtn.base_url,
            x.method.lower(),
            x.path,
            args=args,
            data=x.body or None,
            headers={k: v for k, v in x.headers.items() if k.lower() == "authorization"},
            content_type=(x.content_type or "application/json").split(";")[0],
        )
        if x.path != "/auth/token":  # its form body is checked below, as the schema says
            try:
                api.validate_request(req)
            except Exception as e:
                raise AssertionError(f"request {x.method} {x.path}?{x.query}: {e!r}") from e
        resp = MockResponse(
            x.response,
            status_code=x.status,
            content_type=(x.response_type or "application/json").split(";")[0],
        )
        try:
            api.validate_response(req, resp)
        except Exception as e:
            raise AssertionError(
                f"response {x.status} to {x.method} {x.path}: {e!r}\n{x.response[:500]!r}"
            ) from e
        n += 1
    return n


def check_notifications(vtn: SimVtn) -> int:
    """Validate every notification the VTN published on MQTT against the document's
    `notification` schema; the count checked."""
    spec = spec_dict(vtn.base_url)
    registry: Registry[Any] = Registry().with_resource(
        "urn:oadr", Resource.from_contents(spec, default_specification=DRAFT4)
    )
    v = OAS30Validator({"$ref": "urn:oadr#/components/schemas/notification"}, registry=registry)
    for p in vtn.published:
        errors = [e.message[-300:] for e in v.iter_errors(p.payload)]
        assert not errors, (p.topic, errors)
    return len(vtn.published)


class Bl:
    """The utility's business logic, through a third-party OpenADR 3 client."""

    def __init__(self, vtn: SimVtn, client_id: str = "bl", secret: str = "bl-secret") -> None:
        self.vtn = vtn
        self.client_id, self.secret = client_id, secret
        self._c: Any = None

    async def _call(self, name: str, *args: Any) -> Any:
        def run() -> Any:
            if self._c is None:
                self._c = create_bl_client(self.vtn.base_url, token="")
                self._c.fetch_token(self.client_id, self.secret)
            resp = getattr(self._c, name)(*args)
            if resp.status_code == 401:  # expired: a fresh token, once
                self._c.fetch_token(self.client_id, self.secret)
                resp = getattr(self._c, name)(*args)
            assert 200 <= resp.status_code < 300, (name, resp.status_code, resp.text)
            return resp.json()

        return await asyncio.to_thread(run)

    async def program(self, name: str = "rigd-curtail", **kw: Any) -> dict[str, Any]:
        return dict(await self._call("create_program", {"programName": name, **kw}))

    async def event(self, doc: dict[str, Any]) -> dict[str, Any]:
        return dict(await self._call("create_event", doc))

    async def update_event(self, event_id: str, doc: dict[str, Any]) -> dict[str, Any]:
        return dict(await self._call("update_event", event_id, doc))

    async def delete_event(self, event_id: str) -> dict[str, Any]:
        return dict(await self._call("delete_event", event_id))

    async def reports(self) -> list[dict[str, Any]]:
        return list(await self._call("get_reports"))

    def close(self) -> None:
        if self._c is not None:
            self._c.close()


def cap_event(
    program_id: str,
    kw: float,
    *,
    start: str = "0001-01-01T00:00:00Z",
    duration: str = "PT10M",
    name: str = "curtail",
    reports: list[str] | None = None,
    report_every: int = -1,
    **extra: Any,
) -> dict[str, Any]:
    """An IMPORT_CAPACITY_LIMIT event of one interval, as a utility would send it."""
    doc: dict[str, Any] = {
        "programID": program_id,
        "eventName": name,
        "payloadDescriptors": [
            {
                "objectType": "EVENT_PAYLOAD_DESCRIPTOR",
                "payloadType": "IMPORT_CAPACITY_LIMIT",
                "units": "KW",
            }
        ],
        "intervalPeriod": {"start": start, "duration": duration},
        "intervals": [{"id": 0, "payloads": [{"type": "IMPORT_CAPACITY_LIMIT", "values": [kw]}]}],
        **extra,
    }
    if reports:
        doc["reportDescriptors"] = [
            {"payloadType": r, "frequency": report_every, "repeat": -1} for r in reports
        ]
    return doc
