"""The daemon's MQTT link: keeps a connection, publishes what the farm looks like.

Polling must never wait on the broker, so publishing only records the latest
document per retained topic; a separate task flushes whatever changed while it
is connected, and on every (re)connect republishes availability and every
retained topic, since a broker restarted without persistence has lost them.
Events (not retained) wait in a bounded queue: if the broker is gone for long,
the oldest are dropped and the count of dropped ones is logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import ssl
from collections import deque
from typing import Any

import aiomqtt
import structlog

from controller.config import MqttConfig

log = structlog.get_logger(__name__)

ONLINE = b"online"
OFFLINE = b"offline"


def topic_base(site: str) -> str:
    return f"rigd/{site}"


def encode(doc: Any) -> bytes:
    return json.dumps(doc, separators=(",", ":"), allow_nan=False).encode()


class MqttLink:
    """One long-lived connection to the broker, with reconnect and backoff."""

    def __init__(
        self,
        cfg: MqttConfig,
        site: str,
        *,
        max_backoff_s: float = 30.0,
        max_events: int = 10_000,
        publish_batch: int = 200,
    ) -> None:
        self.cfg = cfg
        self.base = topic_base(site)
        self.status_topic = f"{self.base}/status"
        self.client_id = cfg.client_id or f"rigd-{site}"
        self._retained: dict[str, bytes] = {}
        self._dirty: dict[str, None] = {}  # insertion-ordered set
        self._events: deque[tuple[str, bytes]] = deque(maxlen=max_events)
        self._dropped_events = 0
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()  # set while connected with nothing left to send
        self._max_backoff = max_backoff_s
        self._batch = publish_batch
        self._client: aiomqtt.Client | None = None
        self.connected = asyncio.Event()
        self.connects = 0
        self._stopping = False

    # -- what the rest of the daemon calls ---------------------------------------------

    def set_retained(self, subtopic: str, doc: Any) -> None:
        """Record the latest document for a retained topic; published when connected."""
        topic = f"{self.base}/{subtopic}"
        payload = encode(doc)
        if self._retained.get(topic) == payload:
            return
        self._retained[topic] = payload
        self._dirty[topic] = None
        self._idle.clear()
        self._wake.set()

    def event(self, subtopic: str, doc: Any) -> None:
        """Queue a non-retained message (actions, alerts)."""
        if len(self._events) == self._events.maxlen:
            self._dropped_events += 1
        self._events.append((f"{self.base}/{subtopic}", encode(doc)))
        self._idle.clear()
        self._wake.set()

    # -- connection management -----------------------------------------------------------

    def _make_client(self) -> aiomqtt.Client:
        cfg = self.cfg
        tls_context: ssl.SSLContext | None = None
        if cfg.tls:
            tls_context = ssl.create_default_context(
                cafile=str(cfg.ca_file) if cfg.ca_file else None
            )
            if cfg.cert_file:
                tls_context.load_cert_chain(
                    str(cfg.cert_file), str(cfg.key_file) if cfg.key_file else None
                )
            if cfg.tls_insecure:
                tls_context.check_hostname = False
        return aiomqtt.Client(
            cfg.host,
            cfg.port,
            username=cfg.username,
            password=cfg.password.get_secret_value() if cfg.password else None,
            identifier=self.client_id,
            will=aiomqtt.Will(self.status_topic, OFFLINE, qos=1, retain=True),
            keepalive=cfg.keepalive_s,
            tls_context=tls_context,
            timeout=10.0,
        )

    async def run(self) -> None:
        """Stay connected until cancelled; publishes on every connect and on every change."""
        backoff = 1.0
        while not self._stopping:
            try:
                async with self._make_client() as client:
                    self._client = client
                    self.connects += 1
                    log.info("mqtt_connected", broker=self.cfg.url, client_id=self.client_id)
                    backoff = 1.0
                    await client.publish(self.status_topic, ONLINE, qos=1, retain=True)
                    # Republish everything: the broker may have lost retained state.
                    self._dirty = dict.fromkeys(self._retained)
                    self.connected.set()
                    await self._flush_forever(client)
            except (aiomqtt.MqttError, OSError, ssl.SSLError, ValueError) as e:
                # OSError/SSLError/ValueError: unreadable CA or client key, bad TLS material.
                # Publishing must never die for good while the daemon keeps polling.
                if self._stopping:
                    break
                self.connected.clear()
                self._client = None
                log.warning(
                    "mqtt_disconnected",
                    broker=self.cfg.url,
                    error=str(e) or type(e).__name__,
                    error_type=type(e).__name__,
                    retry_in_s=backoff,
                )
                await asyncio.sleep(backoff)
                backoff = min(self._max_backoff, backoff * 2)
            finally:
                self.connected.clear()
                self._idle.clear()
                self._client = None

    async def _flush_forever(self, client: aiomqtt.Client) -> None:
        while True:
            await self._flush(client)
            if self._dropped_events:
                log.warning("mqtt_events_dropped", count=self._dropped_events)
                self._dropped_events = 0
            self._wake.clear()
            if not self._dirty and not self._events:
                self._idle.set()
                await self._wake.wait()

    async def _flush(self, client: aiomqtt.Client) -> None:
        while self._dirty:
            topics = list(self._dirty)[: self._batch]
            for t in topics:
                del self._dirty[t]
            try:
                await asyncio.gather(
                    *(client.publish(t, self._retained[t], qos=1, retain=True) for t in topics)
                )
            except aiomqtt.MqttError:
                for t in topics:  # not sent: send again after reconnect
                    self._dirty[t] = None
                raise
        while self._events:
            topic, payload = self._events[0]
            await client.publish(topic, payload, qos=1, retain=False)
            self._events.popleft()

    async def flush(self, within_s: float = 5.0) -> bool:
        """Wait until everything recorded so far is sent; False if that took too long."""
        try:
            await asyncio.wait_for(self._idle.wait(), within_s)
            return True
        except TimeoutError:
            return False

    async def close(self, task: asyncio.Task[None] | None) -> None:
        """Say offline on purpose (a clean stop does not fire the Last Will), then disconnect.

        Lets the running flush task drain what is queued first, so nothing is in
        flight when the connection closes.
        """
        self._stopping = True
        if self.connected.is_set():
            await self.flush(within_s=3.0)
        client = self._client
        if client is not None and self.connected.is_set():
            with contextlib.suppress(aiomqtt.MqttError, TimeoutError):
                await asyncio.wait_for(
                    client.publish(self.status_topic, OFFLINE, qos=1, retain=True), 3.0
                )
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
