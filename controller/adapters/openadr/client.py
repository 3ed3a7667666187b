"""The VEN's REST client for an OpenADR 3.1 VTN: OAuth2 client credentials, the calls
rigd makes, and errors a service can act on.

Why not a library: openadr3-client (ElaadNL, Apache-2.0), the client the issue names,
speaks 3.0.1 and 3.1 but requires Python 3.12 or newer (rigd supports Debian 12's 3.11),
and its HTTP is synchronous (requests), which would block the control loop or need a
thread per call. rigd needs a dozen calls; they are written here on aiohttp, which rigd
already uses, and every request and response is checked in the tests against the
official 3.1.0 OpenAPI document.

Tokens are fetched from the VTN's token endpoint (configured, or found with
`GET /auth/server`) and renewed before they expire (at 80 % of their lifetime, at least
30 s before). A 401 on a call renews the token once and retries the call.
"""

from __future__ import annotations

import asyncio
import json as _json
import ssl
from collections.abc import Callable
from typing import Any, Literal

import aiohttp
import structlog

from controller.config.openadr import OpenADRConfig
from controller.errors import RigdError

log = structlog.get_logger(__name__)

ErrorKind = Literal["unreachable", "auth", "server", "refused", "bad_answer"]
PAGE = 50  # the schema's maximum `limit`
MAX_PAGES = 40


class VtnError(RigdError):
    """A VTN call that failed: why (`kind`), and the HTTP status when there was one."""

    def __init__(self, kind: ErrorKind, detail: str, status: int | None = None) -> None:
        super().__init__(detail)
        self.kind = kind
        self.status = status
        self.detail = detail


class VtnClient:
    def __init__(self, cfg: OpenADRConfig, *, now: Callable[[], float]) -> None:
        self.cfg = cfg
        self.base = cfg.vtn_url
        self.now = now
        self._session: aiohttp.ClientSession | None = None
        self._token: str | None = None
        self.token_expires_at = 0.0
        self._token_lock = asyncio.Lock()
        self.tokens_fetched = 0

    # -- session and token ------------------------------------------------------------

    def _ssl(self) -> ssl.SSLContext | bool:
        if self.cfg.ca_file is None:
            return True
        return ssl.create_default_context(cafile=str(self.cfg.ca_file))

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self.cfg.timeout_s),
                connector=aiohttp.TCPConnector(ssl=self._ssl()),
            )
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _renew_at(self, ttl: float) -> float:
        return self.now() + max(0.0, min(ttl * 0.8, ttl - 30.0))

    async def token(self, *, fresh: bool = False) -> str:
        """A valid access token, fetched again when close to expiry (or when `fresh`)."""
        async with self._token_lock:
            if not fresh and self._token is not None and self.now() < self.token_expires_at:
                return self._token
            url = self.cfg.token_url or await self._token_url()
            form = {
                "grant_type": "client_credentials",
                "client_id": self.cfg.client_id,
                "client_secret": self.cfg.client_secret.get_secret_value(),
            }
            if self.cfg.scope:
                form["scope"] = self.cfg.scope
            doc = await self._send("POST", url, data=form, auth=False, what="token")
            if not isinstance(doc, dict) or not isinstance(doc.get("access_token"), str):
                raise VtnError("bad_answer", "the token endpoint sent no access_token")
            ttl = doc.get("expires_in", 3600)
            ttl = float(ttl) if isinstance(ttl, int | float) and ttl > 0 else 3600.0
            self._token = doc["access_token"]
            self.token_expires_at = self._renew_at(ttl)
            self.tokens_fetched += 1
            log.info(
                "openadr_token_fetched",
                expires_in_s=ttl,
                renew_in_s=round(self.token_expires_at - self.now(), 1),
            )
            return self._token

    async def _token_url(self) -> str:
        doc = await self._send("GET", f"{self.base}/auth/server", auth=False, what="auth/server")
        url = doc.get("tokenURL") if isinstance(doc, dict) else None
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise VtnError("bad_answer", "GET /auth/server gave no tokenURL")
        return url

    # -- requests ---------------------------------------------------------------------

    async def _send(
        self,
        method: str,
        url: str,
        *,
        params: dict[str, Any] | None = None,
        body_json: Any = None,
        data: dict[str, str] | None = None,
        auth: bool = True,
        what: str = "",
        missing_ok: bool = False,
    ) -> Any:
        headers = {"Accept": "application/json"}
        if auth:
            headers["Authorization"] = f"Bearer {await self.token()}"
        try:
            async with self._http().request(
                method, url, params=params, json=body_json, data=data, headers=headers
            ) as resp:
                body = await resp.read()
                status = resp.status
        except (aiohttp.ClientError, TimeoutError, OSError) as e:
            raise VtnError("unreachable", f"{what or url}: {type(e).__name__}: {e}") from e
        if status == 404 and missing_ok:
            return None
        if status >= 400:
            detail = _problem(body)
            kind: ErrorKind = (
                "auth" if status in (401, 403) else "server" if status >= 500 else "refused"
            )
            raise VtnError(kind, f"{method} {what or url}: HTTP {status} {detail}".strip(), status)
        if not body:
            return None
        try:
            return _json.loads(body)
        except ValueError as e:
            raise VtnError("bad_answer", f"{what or url}: the answer is not JSON") from e

    async def call(
        self,
        method: str,
        path: str,
        *,
        params: dict[str, Any] | None = None,
        json: Any = None,
        missing_ok: bool = False,
    ) -> Any:
        """One REST call; a 401 renews the token once (it may have been revoked)."""
        url = f"{self.base}{path}"
        try:
            return await self._send(
                method, url, params=params, body_json=json, what=path, missing_ok=missing_ok
            )
        except VtnError as e:
            if e.status != 401:
                raise
        await self.token(fresh=True)
        return await self._send(
            method, url, params=params, body_json=json, what=path, missing_ok=missing_ok
        )

    # -- what the VEN does --------------------------------------------------------------

    async def ven(self, name: str) -> dict[str, Any]:
        """This VEN's ven object: found by name, else registered."""
        found = await self.call("GET", "/vens", params={"venName": name})
        for v in found if isinstance(found, list) else []:
            if isinstance(v, dict) and v.get("venName") == name and isinstance(v.get("id"), str):
                return v
        try:
            made = await self.call(
                "POST", "/vens", json={"objectType": "VEN_VEN_REQUEST", "venName": name}
            )
        except VtnError as e:
            if e.status != 409:
                raise
            raise VtnError(
                "refused", f"venName {name!r} is registered to another client", 409
            ) from e
        if not isinstance(made, dict) or not isinstance(made.get("id"), str):
            raise VtnError("bad_answer", "POST /vens returned no id")
        log.info("openadr_ven_registered", ven_name=name, ven_id=made["id"])
        return made

    async def resource(self, ven_id: str, name: str) -> dict[str, Any]:
        found = await self.call("GET", "/resources", params={"venID": ven_id, "resourceName": name})
        for r in found if isinstance(found, list) else []:
            if isinstance(r, dict) and r.get("resourceName") == name and r.get("venID") == ven_id:
                return r
        made = await self.call(
            "POST",
            "/resources",
            json={"objectType": "VEN_RESOURCE_REQUEST", "resourceName": name, "venID": ven_id},
        )
        if not isinstance(made, dict) or not isinstance(made.get("id"), str):
            raise VtnError("bad_answer", "POST /resources returned no id")
        log.info("openadr_resource_registered", resource_name=name, resource_id=made["id"])
        return made

    async def notifiers(self) -> dict[str, Any]:
        doc = await self.call("GET", "/notifiers")
        if not isinstance(doc, dict):
            raise VtnError("bad_answer", "GET /notifiers is not an object")
        return doc

    async def ven_event_topics(self, ven_id: str) -> dict[str, str]:
        doc = await self.call("GET", f"/notifiers/mqtt/topics/vens/{ven_id}/events")
        topics = doc.get("topics") if isinstance(doc, dict) else None
        if not isinstance(topics, dict) or not all(isinstance(v, str) for v in topics.values()):
            raise VtnError("bad_answer", "the MQTT topic names are not a topics object")
        return {str(k): str(v) for k, v in topics.items()}

    async def events(self) -> list[Any]:
        """Every event the VTN lets this VEN read, page by page."""
        out: list[Any] = []
        for page in range(MAX_PAGES):
            got = await self.call("GET", "/events", params={"skip": page * PAGE, "limit": PAGE})
            if not isinstance(got, list):
                raise VtnError("bad_answer", "GET /events is not a list")
            out.extend(got)
            if len(got) < PAGE:
                return out
        log.warning("openadr_events_truncated", read=len(out))
        return out

    async def event(self, event_id: str) -> Any:
        """The event as the VTN has it now; None when it does not exist (deleted)."""
        return await self.call("GET", f"/events/{event_id}", missing_ok=True)

    async def post_report(self, doc: dict[str, Any]) -> dict[str, Any]:
        made = await self.call("POST", "/reports", json=doc)
        if not isinstance(made, dict):
            raise VtnError("bad_answer", "POST /reports returned no report")
        return made


def _problem(body: bytes) -> str:
    """The detail of a problem+json answer, short."""
    try:
        doc = _json.loads(body)
    except ValueError:
        return body[:120].decode("utf-8", "replace")
    if isinstance(doc, dict):
        parts = [
            str(doc[k]) for k in ("title", "detail", "error", "error_description") if doc.get(k)
        ]
        return ": ".join(parts)[:200]
    return ""
