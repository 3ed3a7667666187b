"""A simulated OpenADR 3.1 VTN: the REST API rigd's VEN uses, and the MQTT notifier binding.

It serves, on loopback, the 3.1.0 endpoints a business-logic (BL) client and a VEN need:
`/auth/server` and `/auth/token` (OAuth2 client credentials), programs, events, vens,
resources and reports (create, read, search, update, delete), `/notifiers`, and the MQTT
topic-name endpoints. Every object change is published as an OpenADR notification
(`{"objectType", "operation", "object"}`) on a real MQTT broker: on the all-objects topics
BL clients read (`<prefix>/events/create`), on the program's topics, and on the private
topics of each VEN the object is for (`<prefix>/events/vens/<venID>/create`), as the
notifier binding's object-privacy rules ask (targets resolved by the VTN).

A VEN reads only what is for it: events without targets, or whose targets meet its ven's
name or targets or its resources' names or targets. Tokens expire (`token_ttl_s`), and a
test may make the VTN fail (`fail_next`), stop answering (`stop`/`start`) or lose the
broker. Every request and its answer are kept in `exchanges`, so tests can check them
against the official OpenAPI document.

`rigd sim --vtn` runs one beside the simulated farm (see docs/openadr.md).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import itertools
import json
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Final
from urllib.parse import urlencode

import aiomqtt
from aiohttp import web

VEN_SCOPES = (
    "read_targets",
    "read_ven_objects",
    "write_reports",
    "write_subscriptions",
    "write_vens",
)
BL_SCOPES = (
    "read_all",
    "read_bl",
    "write_programs",
    "write_events",
    "write_subscriptions",
    "write_vens",
)
KINDS = {
    "programs": "PROGRAM",
    "events": "EVENT",
    "vens": "VEN",
    "resources": "RESOURCE",
    "reports": "REPORT",
    "subscriptions": "SUBSCRIPTION",
}


def _now_text(ts: float) -> str:
    return (
        dt.datetime.fromtimestamp(ts, dt.UTC)
        .isoformat(timespec="milliseconds")
        .replace("+00:00", "Z")
    )


# The scope a client needs to create, change or delete an object of each kind, as the 3.1
# OpenAPI document's security requirements say (VENs and their resources: write_vens;
# subscriptions: write_subscriptions, for an update or delete too).
WRITE_SCOPES: Final = {
    "programs": "write_programs",
    "events": "write_events",
    "reports": "write_reports",
    "subscriptions": "write_subscriptions",
    "vens": "write_vens",
    "resources": "write_vens",
}


@dataclass
class Exchange:
    """One request and the VTN's answer, as they went over the wire."""

    method: str
    path: str
    query: str
    content_type: str | None
    body: bytes
    headers: dict[str, str]
    status: int
    response_type: str | None
    response: bytes


@dataclass
class Client:
    client_id: str
    secret: str
    role: str  # "bl" or "ven"


@dataclass
class Token:
    client: Client
    expires_at: float


@dataclass
class Fault:
    status: int
    times: int
    path_prefix: str = "/"
    method: str | None = None


@dataclass
class _Published:
    topic: str
    payload: dict[str, Any]


@dataclass
class SimVtn:
    """The VTN. `clients`: client id -> (secret, "bl" | "ven")."""

    clients: dict[str, tuple[str, str]]
    broker: tuple[str, int] | None = None  # MQTT notifier: the broker it publishes on
    broker_url: str | None = None  # what /notifiers announces (default mqtt://host:port)
    mqtt_auth: dict[str, Any] = field(default_factory=lambda: {"method": "ANONYMOUS"})
    topic_prefix: str = "openadr3"
    host: str = "127.0.0.1"
    port: int = 0
    token_ttl_s: float = 3600.0
    now: Callable[[], float] = time.time
    exchanges: list[Exchange] = field(default_factory=list)
    published: list[_Published] = field(default_factory=list)
    lost_notifications: int = 0
    objects: dict[str, dict[str, dict[str, Any]]] = field(
        default_factory=lambda: {k: {} for k in KINDS}
    )

    def __post_init__(self) -> None:
        self._clients = {cid: Client(cid, s, r) for cid, (s, r) in self.clients.items()}
        self._tokens: dict[str, Token] = {}
        self._ids = itertools.count(1)
        self._faults: list[Fault] = []
        self._runner: web.AppRunner | None = None
        self._site: web.TCPSite | None = None
        self._mqtt: aiomqtt.Client | None = None
        self._mqtt_task: asyncio.Task[None] | None = None
        self._queue: asyncio.Queue[_Published] = asyncio.Queue()
        self.tokens_issued = 0

    # -- life ---------------------------------------------------------------------------

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    async def start(self) -> None:
        """Serve (again, on the same port after `stop`) and connect to the broker."""
        app = web.Application(middlewares=[self._record])
        r = app.router
        r.add_get("/auth/server", self._auth_server)
        r.add_post("/auth/token", self._auth_token)
        r.add_get("/notifiers", self._notifiers)
        r.add_get("/notifiers/mqtt/topics/{rest:.*}", self._topics)
        for kind in KINDS:
            r.add_get(f"/{kind}", partial_handler(self._search, kind))
            r.add_post(f"/{kind}", partial_handler(self._create, kind))
            r.add_get(f"/{kind}/{{id}}", partial_handler(self._read, kind))
            r.add_put(f"/{kind}/{{id}}", partial_handler(self._update, kind))
            r.add_delete(f"/{kind}/{{id}}", partial_handler(self._delete, kind))
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
        await self._runner.setup()
        self._site = web.TCPSite(self._runner, self.host, self.port)
        await self._site.start()
        if self.port == 0:
            server = self._site._server
            assert server is not None
            sockets = getattr(server, "sockets", None) or []
            self.port = sockets[0].getsockname()[1]
        if self.broker is not None and self._mqtt_task is None:
            self._mqtt_task = asyncio.create_task(self._publisher(), name="vtn-mqtt")

    async def stop(self, *, broker: bool = True) -> None:
        """Stop answering (the VEN then finds the VTN unreachable)."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if broker and self._mqtt_task is not None:
            self._mqtt_task.cancel()
            await asyncio.wait({self._mqtt_task}, timeout=5)
            self._mqtt_task = None

    async def __aenter__(self) -> SimVtn:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def fail_next(
        self, status: int, times: int = 1, path_prefix: str = "/", method: str | None = None
    ) -> None:
        """Answer the next `times` matching requests with `status` (401, 403, 500 ...)."""
        self._faults.append(Fault(status, times, path_prefix, method))

    def expire_tokens(self) -> None:
        for t in self._tokens.values():
            t.expires_at = 0.0

    # -- MQTT -----------------------------------------------------------------------------

    async def _publisher(self) -> None:
        assert self.broker is not None
        host, port = self.broker
        while True:
            try:
                async with aiomqtt.Client(
                    host, port, identifier=f"sim-vtn-{secrets.token_hex(4)}"
                ) as c:
                    self._mqtt = c
                    while True:
                        p = await self._queue.get()
                        await c.publish(p.topic, json.dumps(p.payload).encode(), qos=1)
                        self.published.append(p)
            except aiomqtt.MqttError:
                self._mqtt = None
                # Notifications published while the broker is away are lost, as on a real
                # broker outage: the VEN recovers the state over REST when it reconnects.
                while not self._queue.empty():
                    self._queue.get_nowait()
                    self.lost_notifications += 1
                await asyncio.sleep(0.2)
            finally:
                self._mqtt = None

    def _notify(self, kind: str, op: str, obj: dict[str, Any]) -> None:
        if self.broker is None:
            return
        if self._mqtt is None:
            self.lost_notifications += 1
            return
        doc = {"objectType": KINDS[kind], "operation": op, "object": obj}
        o = op.lower()
        topics = [f"{self.topic_prefix}/{kind}/{o}"]
        if kind == "events":
            topics.append(f"{self.topic_prefix}/events/programs/{obj['programID']}/{o}")
            for ven_id in self._vens_for(obj):
                topics.append(f"{self.topic_prefix}/events/vens/{ven_id}/{o}")
        elif kind == "programs":
            for ven_id in self._vens_for(obj):
                topics.append(f"{self.topic_prefix}/programs/vens/{ven_id}/{o}")
        elif kind == "resources":
            topics.append(f"{self.topic_prefix}/resources/vens/{obj['venID']}/{o}")
        elif kind == "vens":
            topics.append(f"{self.topic_prefix}/vens/{obj['id']}/{o}")
        for t in topics:
            self._queue.put_nowait(_Published(t, doc))

    # -- who may see what ---------------------------------------------------------------

    def _ven_targets(self, ven: dict[str, Any]) -> set[str]:
        out = {ven["venName"], *(ven.get("targets") or [])}
        for r in self.objects["resources"].values():
            if r["venID"] == ven["id"]:
                out.add(r["resourceName"])
                out.update(r.get("targets") or [])
        return out

    def _vens_for(self, obj: dict[str, Any]) -> list[str]:
        targets = obj.get("targets") or []
        return [
            v["id"]
            for v in self.objects["vens"].values()
            if not targets or self._ven_targets(v).intersection(targets)
        ]

    def _visible(self, client: Client, kind: str, obj: dict[str, Any]) -> bool:
        if client.role == "bl":
            return True
        vens = [v for v in self.objects["vens"].values() if v["clientID"] == client.client_id]
        if kind in ("vens", "resources", "reports", "subscriptions"):
            return obj.get("clientID") == client.client_id
        targets = obj.get("targets") or []
        if not targets:
            return True
        return any(self._ven_targets(v).intersection(targets) for v in vens)

    # -- plumbing -------------------------------------------------------------------------

    @web.middleware
    async def _record(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        body = await request.read()
        try:
            resp = await self._faulted(request) or await handler(request)
        except web.HTTPException as e:
            resp = e
        out = resp.body if isinstance(resp, web.Response) else b""
        self.exchanges.append(
            Exchange(
                request.method,
                request.path,
                request.query_string,
                request.headers.get("Content-Type"),
                body,
                dict(request.headers),
                resp.status,
                resp.content_type if isinstance(resp, web.Response) else None,
                out if isinstance(out, bytes) else b"",
            )
        )
        return resp

    async def _faulted(self, request: web.Request) -> web.Response | None:
        for f in self._faults:
            if (
                f.times > 0
                and request.path.startswith(f.path_prefix)
                and (f.method is None or f.method == request.method)
            ):
                f.times -= 1
                return _problem(f.status, "injected fault")
        return None

    def _client(self, request: web.Request, scope: str | None = None) -> Client:
        auth = request.headers.get("Authorization", "")
        if not auth.startswith("Bearer "):
            raise _Fail(401, "a bearer token is required")
        tok = self._tokens.get(auth[7:])
        if tok is None or tok.expires_at <= self.now():
            raise _Fail(401, "the token is unknown or has expired")
        scopes = BL_SCOPES if tok.client.role == "bl" else VEN_SCOPES
        if scope is not None and scope not in scopes:
            raise _Fail(403, f"the client lacks scope {scope}")
        return tok.client

    # -- auth -------------------------------------------------------------------------------

    async def _auth_server(self, request: web.Request) -> web.Response:
        return web.json_response({"tokenURL": f"{self.base_url}/auth/token"})

    async def _auth_token(self, request: web.Request) -> web.Response:
        form = await request.post()
        if form.get("grant_type") != "client_credentials":
            return _problem(400, "grant_type must be client_credentials")
        c = self._clients.get(str(form.get("client_id", "")))
        if c is None or not secrets.compare_digest(c.secret, str(form.get("client_secret", ""))):
            return _problem(401, "unknown client or wrong secret")
        token = secrets.token_urlsafe(24)
        self._tokens[token] = Token(c, self.now() + self.token_ttl_s)
        self.tokens_issued += 1
        return web.json_response(
            {"access_token": token, "token_type": "Bearer", "expires_in": int(self.token_ttl_s)}
        )

    # -- notifiers --------------------------------------------------------------------------

    async def _notifiers(self, request: web.Request) -> web.Response:
        try:
            self._client(request)
        except _Fail as f:
            return f.response()
        doc: dict[str, Any] = {"WEBHOOK": True}
        if self.broker is not None:
            url = self.broker_url or f"mqtt://{self.broker[0]}:{self.broker[1]}"
            doc["MQTT"] = {"URIS": [url], "serialization": "JSON", "authentication": self.mqtt_auth}
        return web.json_response(doc)

    async def _topics(self, request: web.Request) -> web.Response:
        rest = request.match_info["rest"].strip("/").split("/")
        try:
            client = self._client(request)
            if self.broker is None:
                raise _Fail(404, "this VTN has no MQTT notifier")
            p = self.topic_prefix
            create = True
            if (
                rest == ["events"]
                or rest == ["programs"]
                or rest in (["reports"], ["subscriptions"], ["vens"], ["resources"])
            ):
                if client.role != "bl":
                    raise _Fail(403, "all-objects topics are for BL clients")
                base = f"{p}/{rest[0]}"
            elif len(rest) == 2 and rest[0] == "programs":
                base, create = f"{p}/programs/{rest[1]}", False
            elif len(rest) == 3 and rest[0] == "programs" and rest[2] == "events":
                base = f"{p}/events/programs/{rest[1]}"
            elif len(rest) >= 2 and rest[0] == "vens":
                ven = self.objects["vens"].get(rest[1])
                if ven is None:
                    raise _Fail(404, f"no ven {rest[1]}")
                if client.role != "bl" and ven["clientID"] != client.client_id:
                    raise _Fail(403, "another VEN's topics")
                if len(rest) == 2:
                    base, create = f"{p}/vens/{rest[1]}", False
                elif rest[2] in ("events", "programs", "resources"):
                    base = f"{p}/{rest[2]}/vens/{rest[1]}"
                else:
                    raise _Fail(404, "no such topic endpoint")
            else:
                raise _Fail(404, "no such topic endpoint")
        except _Fail as f:
            return f.response()
        topics = {"UPDATE": f"{base}/update", "DELETE": f"{base}/delete", "ALL": f"{base}/+"}
        if create:
            topics["CREATE"] = f"{base}/create"
        return web.json_response({"topics": topics})

    # -- objects ----------------------------------------------------------------------------

    async def _search(self, kind: str, request: web.Request) -> web.Response:
        scope = {"events": "read_targets", "programs": "read_targets"}.get(kind, "read_ven_objects")
        try:
            client = self._client(request)
            if client.role == "bl":
                scope = "read_all"
            self._client(request, scope)
            q = request.query
            skip = int(q.get("skip", "0"))
            limit = int(q.get("limit", "50"))
            if skip < 0 or not 0 <= limit <= 50:
                raise _Fail(400, "skip >= 0 and 0 <= limit <= 50")
        except ValueError:
            return _problem(400, "skip and limit are integers")
        except _Fail as f:
            return f.response()
        found = [o for o in self.objects[kind].values() if self._visible(client, kind, o)]
        filters = {
            "programID": "programID",
            "venName": "venName",
            "venID": "venID",
            "resourceName": "resourceName",
            "eventID": "eventID",
            "clientName": "clientName",
        }
        for param, key in filters.items():
            if param in q:
                found = [o for o in found if o.get(key) == q[param]]
        if "targets" in q:
            wanted = set(q.getall("targets"))
            found = [o for o in found if wanted.intersection(o.get("targets") or [])]
        return web.json_response(found[skip : skip + limit])

    async def _body(self, request: web.Request) -> dict[str, Any]:
        try:
            doc = await request.json()
        except (ValueError, UnicodeDecodeError) as e:
            raise _Fail(400, f"not JSON: {e}") from None
        if not isinstance(doc, dict):
            raise _Fail(400, "a JSON object is expected")
        return doc

    def _check(self, kind: str, doc: dict[str, Any], client: Client) -> dict[str, Any]:
        """The few checks a VTN makes beyond the schema (required keys), and the server's
        own fields for vens and resources (clientID from the token)."""
        need = {
            "programs": ["programName"],
            "events": ["programID"],
            "vens": ["venName"],
            "resources": ["resourceName", "venID"],
            "reports": ["eventID", "clientName", "resources"],
            "subscriptions": ["clientName", "objectOperations"],
        }[kind]
        missing = [k for k in need if k not in doc]
        if missing:
            raise _Fail(400, f"missing {', '.join(missing)}")
        doc = dict(doc)
        if kind == "events" and doc["programID"] not in self.objects["programs"]:
            raise _Fail(400, f"no program {doc['programID']}")
        if kind == "vens":
            dup = [v for v in self.objects["vens"].values() if v["venName"] == doc["venName"]]
            if dup:
                raise _Fail(409, f"venName {doc['venName']} is taken")
            doc["objectType"] = "VEN"
            doc.setdefault("clientID", client.client_id)
        if kind == "resources":
            ven = self.objects["vens"].get(doc["venID"])
            if ven is None:
                raise _Fail(400, f"no ven {doc['venID']}")
            if client.role != "bl" and ven["clientID"] != client.client_id:
                raise _Fail(403, "another VEN's resource")
            doc["clientID"] = ven["clientID"]
        if kind in ("reports", "subscriptions"):
            doc["clientID"] = client.client_id
        return doc

    async def _create(self, kind: str, request: web.Request) -> web.Response:
        scope = WRITE_SCOPES[kind]
        try:
            client = self._client(request, scope)
            doc = self._check(kind, await self._body(request), client)
        except _Fail as f:
            return f.response()
        now = _now_text(self.now())
        obj_id = f"{kind[:-1]}-{next(self._ids)}"
        obj = {
            **doc,
            "id": obj_id,
            "createdDateTime": now,
            "modificationDateTime": now,
            "objectType": KINDS[kind],
        }
        self.objects[kind][obj_id] = obj
        self._notify(kind, "CREATE", obj)
        return web.json_response(obj, status=201)

    def _own(self, kind: str, request: web.Request, scope: str) -> tuple[Client, dict[str, Any]]:
        client = self._client(request, scope)
        obj = self.objects[kind].get(request.match_info["id"])
        if obj is None or not self._visible(client, kind, obj):
            raise _Fail(404, f"no {kind[:-1]} {request.match_info['id']}")
        return client, obj

    async def _read(self, kind: str, request: web.Request) -> web.Response:
        try:
            client = self._client(request)
            scope = (
                "read_all"
                if client.role == "bl"
                else ("read_targets" if kind in ("events", "programs") else "read_ven_objects")
            )
            _, obj = self._own(kind, request, scope)
        except _Fail as f:
            return f.response()
        return web.json_response(obj)

    async def _update(self, kind: str, request: web.Request) -> web.Response:
        scope = WRITE_SCOPES[kind]
        try:
            client, old = self._own(kind, request, scope)
            doc = (
                self._check(kind, await self._body(request), client)
                if kind != "vens"
                else (await self._body(request))
            )
        except _Fail as f:
            return f.response()
        obj = {
            **doc,
            "id": old["id"],
            "createdDateTime": old["createdDateTime"],
            "modificationDateTime": _now_text(self.now()),
            "objectType": KINDS[kind],
        }
        if kind == "vens":
            obj["clientID"] = old["clientID"]
        self.objects[kind][old["id"]] = obj
        self._notify(kind, "UPDATE", obj)
        return web.json_response(obj)

    async def _delete(self, kind: str, request: web.Request) -> web.Response:
        scope = WRITE_SCOPES[kind]
        try:
            _, obj = self._own(kind, request, scope)
        except _Fail as f:
            return f.response()
        del self.objects[kind][obj["id"]]
        self._notify(kind, "DELETE", obj)
        return web.json_response(obj)

    # -- for tests and the demo -------------------------------------------------------------

    def reports(self, event_id: str | None = None) -> list[dict[str, Any]]:
        return [
            r
            for r in self.objects["reports"].values()
            if event_id is None or r["eventID"] == event_id
        ]

    def url(self, path: str, **query: str) -> str:
        return f"{self.base_url}{path}" + (f"?{urlencode(query)}" if query else "")


class _Fail(Exception):
    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail

    def response(self) -> web.Response:
        return _problem(self.status, self.detail)


_TITLES = {
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    409: "Conflict",
    500: "Internal Server Error",
    501: "Not Implemented",
}


def _problem(status: int, detail: str) -> web.Response:
    return web.json_response(
        {
            "type": "about:blank",
            "title": _TITLES.get(status, "Error"),
            "status": status,
            "detail": detail,
        },
        status=status,
    )


def partial_handler(
    fn: Callable[[str, web.Request], Awaitable[web.Response]], kind: str
) -> Callable[[web.Request], Awaitable[web.Response]]:
    async def handler(request: web.Request) -> web.Response:
        return await fn(kind, request)

    return handler
