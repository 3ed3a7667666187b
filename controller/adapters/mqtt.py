"""The daemon's MQTT link: keeps a connection, publishes what the farm looks like.

Polling must never wait on the broker, so publishing only records the latest
document per retained topic; a separate task flushes whatever changed while it
is connected, and on every (re)connect republishes availability and every
retained topic, since a broker restarted without persistence has lost them.
A retained topic set with `keep=False` (one per rig: 10,000 documents of 1 KB) is held
only until sent; on a reconnect the `refill` hooks set such topics again from what the
daemon knows now, instead of the link keeping a second copy of the farm.
Events (not retained) wait in a bounded queue: if the broker is gone for long,
the oldest are dropped and the count of dropped ones is logged.

Grid orders come in on the same connection. It is an MQTT 5 (or 3.1.1) *persistent*
session with a fixed client id, so QoS 1 orders published while rigd was away are
queued by the broker and delivered on reconnect. Incoming QoS 1 messages are
acknowledged (PUBACK) only after the handler returns, i.e. after the order is in the
state database: a daemon killed in between gets the message again, and the grid
service recognises the redelivery by its jti. What the grid service must publish
(acks, final reports) goes out first, before any telemetry; progress reports keep only
the latest per order while disconnected (each carries cumulative figures) and count
the ones they replaced.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import ssl
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

import aiomqtt
import orjson
import paho.mqtt.client as paho
import structlog
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from controller.config import MqttConfig

log = structlog.get_logger(__name__)

ONLINE = b"online"
OFFLINE = b"offline"


def topic_base(site: str) -> str:
    return f"rigd/{site}"


def encode(doc: Any) -> bytes:
    """A document as compact JSON. orjson (already rigd's JSON decoder, drivers/jsonwire.py)
    encodes a rig's document in about 3 us where `json.dumps` took 29: at 10,000 rigs,
    thousands of documents a cycle. A NaN or infinity becomes null (valid JSON, where
    `json.dumps` wrote NaN or, as here before, refused the whole document)."""
    return orjson.dumps(doc, option=orjson.OPT_NON_STR_KEYS)


MessageHandler = Callable[[aiomqtt.Message], Awaitable[None]]
Done = Callable[[], None]


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
        # Retained topics whose payload is made when sent (`set_retained_later`).
        self._later: dict[str, Callable[[], bytes]] = {}
        # Topics whose payload is dropped once sent (`set_retained(keep=False)`); `refill`
        # hooks set them again on every (re)connect.
        self._volatile: set[str] = set()
        self.refill: list[Callable[[], None]] = []
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
        self.offline_sent = False  # the retained `offline` went out at a stop
        self.subscriptions: dict[str, int] = {}  # full topic -> QoS
        self.on_message: MessageHandler | None = None
        self._urgent: deque[tuple[str, bytes, bytes | None, Done | None]] = deque()
        self._latest: dict[str, tuple[str, dict[str, Any]]] = {}  # key -> (topic, doc)

    # -- what the rest of the daemon calls ---------------------------------------------

    def set_retained(self, subtopic: str, doc: Any, *, keep: bool = True) -> None:
        """Record the latest document for a retained topic; published when connected.
        `keep` False: forget the payload once sent (a `refill` hook sets it again after a
        reconnect); the caller then decides itself what is worth sending again."""
        self.set_retained_raw(f"{self.base}/{subtopic}", encode(doc), keep=keep)

    def set_retained_later(self, subtopic: str, make: Callable[[], Any]) -> None:
        """`set_retained(keep=False)` for a document made when it is sent, not now: a
        farm's first cycle (or a reconnect's refill) queues a document per rig, and
        10,000 of them encoded at once were 10 MB held until the broker took them; made in
        the link's batches, a few hundred are. `make` must give the document as it is to
        be sent (a frozen view's, as the daemon's rigs are)."""
        topic = f"{self.base}/{subtopic}"
        self._retained.pop(topic, None)
        self._later[topic] = lambda: encode(make())
        self._volatile.add(topic)
        self._dirty[topic] = None
        self._idle.clear()
        self._wake.set()

    def set_retained_raw(self, topic: str, payload: bytes, *, keep: bool = True) -> None:
        """`set_retained` for a full topic, possibly outside rigd/<site>/ (Home Assistant
        discovery), and a ready payload; b"" clears a retained message."""
        self._later.pop(topic, None)
        if keep:
            self._volatile.discard(topic)
            if self._retained.get(topic) == payload:
                return
        else:
            self._volatile.add(topic)
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

    def send(
        self,
        topic: str,
        payload: bytes,
        *,
        correlation: bytes | None = None,
        done: Done | None = None,
    ) -> None:
        """Queue a message that must not be dropped (acks, final reports), sent before all
        else; `done` runs once the broker has it. `topic` is full (a response topic may lie
        outside rigd/<site>)."""
        self._urgent.append((topic, payload, correlation, done))
        self._idle.clear()
        self._wake.set()

    def set_latest(self, key: str, subtopic: str, doc: dict[str, Any]) -> None:
        """Queue a progress message of which only the newest matters; one replaced before
        it could be sent is counted in the newer one's `missed_reports`."""
        prev = self._latest.get(key)
        if prev is not None:
            doc = {**doc, "missed_reports": int(prev[1].get("missed_reports", 0)) + 1}
        self._latest[key] = (f"{self.base}/{subtopic}", doc)
        self._idle.clear()
        self._wake.set()

    def subscribe(self, topic: str, qos: int = 1) -> None:
        """Subscribe now and after every reconnect."""
        self.subscriptions[topic] = qos

    def used_topic(self, topic: str) -> bool:
        """Whether rigd subscribes to `topic` or publishes it retained: such a topic is
        never a grid response topic (controller/grid/topics.py)."""
        return (
            topic in self._retained
            or topic in self._later
            or topic in self._volatile
            or any(paho.topic_matches_sub(f, topic) for f in self.subscriptions)
        )

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
        v5 = cfg.protocol == "5"
        connect_props: Properties | None = None
        if v5:
            connect_props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            connect_props.SessionExpiryInterval = cfg.session_expiry_s
        client = aiomqtt.Client(
            cfg.host,
            cfg.port,
            username=cfg.username,
            password=cfg.password.get_secret_value() if cfg.password else None,
            identifier=self.client_id,
            will=aiomqtt.Will(self.status_topic, OFFLINE, qos=1, retain=True),
            keepalive=cfg.keepalive_s,
            tls_context=tls_context,
            timeout=10.0,
            protocol=aiomqtt.ProtocolVersion.V5 if v5 else aiomqtt.ProtocolVersion.V311,
            # Persistent session: the broker queues QoS 1 orders while we are away.
            clean_start=False if v5 else paho.MQTT_CLEAN_START_FIRST_ONLY,
            clean_session=None if v5 else False,
            properties=connect_props,
        )
        # PUBACK only once the handler has stored the order (see the module docstring).
        # aiomqtt has no switch for it; paho's manual-ack mode is on its wrapped client.
        client._client.manual_ack_set(True)
        return client

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
                    self._dirty = dict.fromkeys([*self._retained, *self._later])
                    for hook in self.refill:
                        try:
                            hook()
                        except Exception:  # a hook's bug must not keep the link down
                            log.exception("mqtt_refill_failed")
                    for topic, qos in self.subscriptions.items():
                        await client.subscribe(topic, qos=qos)
                    self.connected.set()
                    try:
                        await self._serve(client)
                    except asyncio.CancelledError:
                        # Stopped without `close` (the daemon's stop failed on its way, or
                        # the loop is being torn down): leaving the `async with` sends a
                        # clean DISCONNECT, so the broker would not publish the Last Will.
                        await self._say_offline(client)
                        raise
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

    async def _serve(self, client: aiomqtt.Client) -> None:
        """Publish and receive until either side fails; the failure ends the connection."""
        tasks = [
            asyncio.create_task(self._flush_forever(client), name="mqtt-flush"),
            asyncio.create_task(_disconnection(client), name="mqtt-watch"),
        ]
        if self.subscriptions:
            tasks.append(asyncio.create_task(self._receive(client), name="mqtt-receive"))
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for t in done:
                t.result()  # re-raise the MqttError that ended it
        finally:
            for t in tasks:
                t.cancel()
            for t in tasks:
                with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
                    await t

    async def _receive(self, client: aiomqtt.Client) -> None:
        async for message in client.messages:
            if self.on_message is not None:
                try:
                    await self.on_message(message)
                except Exception:  # a handler bug must not take the link down
                    log.exception("mqtt_handler_failed", topic=str(message.topic))
            if message.qos > 0:
                client._client.ack(message.mid, message.qos)

    async def _flush_forever(self, client: aiomqtt.Client) -> None:
        while True:
            await self._flush(client)
            if self._dropped_events:
                log.warning("mqtt_events_dropped", count=self._dropped_events)
                self._dropped_events = 0
            self._wake.clear()
            if not self._dirty and not self._events and not self._urgent and not self._latest:
                self._idle.set()
                await self._wake.wait()

    def _payload(self, topic: str) -> bytes:
        make = self._later.get(topic)
        return self._retained[topic] if make is None else make()

    async def _flush(self, client: aiomqtt.Client) -> None:
        await self._flush_urgent(client)
        while self._latest:
            key = next(iter(self._latest))
            topic, doc = self._latest[key]
            await client.publish(topic, encode(doc), qos=1, retain=False)
            if self._latest.get(key, (None, None))[1] is doc:
                del self._latest[key]
        while self._dirty:
            topics = list(itertools.islice(self._dirty, self._batch))
            for t in topics:
                del self._dirty[t]
            sent = False
            try:
                await _publish_batch(client, [(t, self._payload(t), True) for t in topics])
                sent = True
            finally:
                if not sent:  # failed, or cancelled (the broker went away): again later
                    for t in topics:
                        self._dirty.setdefault(t, None)
            for t in topics:  # sent: a volatile payload is not kept (unless set again since)
                if t in self._volatile and t not in self._dirty:
                    self._retained.pop(t, None)
                    self._later.pop(t, None)
            await self._flush_urgent(client)  # grid acks do not wait for a long flush
        while self._events:
            # In batches, like retained topics: one PUBACK awaited at a time would let a
            # burst (a grid order sleeping thousands of rigs) overflow the queue.
            batch = [self._events.popleft() for _ in range(min(self._batch, len(self._events)))]
            sent = False
            try:
                await _publish_batch(client, [(t, p, False) for t, p in batch])
                sent = True
            finally:
                if not sent:  # not all sent: again on reconnect, oldest first
                    cap = self._events.maxlen
                    if cap is not None:  # a full queue gives way at its newest end: count
                        self._dropped_events += max(0, len(self._events) + len(batch) - cap)
                    self._events.extendleft(reversed(batch))
            await self._flush_urgent(client)

    async def _flush_urgent(self, client: aiomqtt.Client) -> None:
        while self._urgent:
            topic, payload, correlation, done = self._urgent[0]
            props: Properties | None = None
            if correlation is not None and self.cfg.protocol == "5":
                props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
                props.CorrelationData = correlation
            await client.publish(topic, payload, qos=1, retain=False, properties=props)
            self._urgent.popleft()
            if done is not None:
                done()

    async def _say_offline(self, client: aiomqtt.Client) -> None:
        """Publish the retained `offline` (once): what the Last Will would have said."""
        if self.offline_sent:
            return
        with contextlib.suppress(aiomqtt.MqttError, TimeoutError):
            await asyncio.wait_for(
                client.publish(self.status_topic, OFFLINE, qos=1, retain=True), 3.0
            )
            self.offline_sent = True
            log.info("mqtt_offline_published", topic=self.status_topic)

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
            await self._say_offline(client)
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


async def _publish_batch(client: aiomqtt.Client, msgs: list[tuple[str, bytes, bool]]) -> None:
    """QoS 1 messages in one go, awaiting only the last one's PUBACK: a broker acknowledges
    QoS 1 messages in the order it received them (MQTT 3.1.1 and 5.0, section 4.6), so that
    one means all are in. aiomqtt awaits each message on its own, at a cost per message that
    grows with the number in flight: too much for 10,000 rig topics every cycle."""
    if not msgs:
        return
    *head, (topic, payload, retain) = msgs
    for t, p, r in head:
        info = client._client.publish(t, p, qos=1, retain=r)
        if info.rc != paho.MQTT_ERR_SUCCESS:
            raise aiomqtt.MqttCodeError(info.rc, "Could not publish message")
    await client.publish(topic, payload, qos=1, retain=retain)


async def _disconnection(client: aiomqtt.Client) -> None:
    """Raise as soon as the connection drops: a publish awaiting its PUBACK from a broker
    that died would otherwise wait out aiomqtt's timeout (10 s) before anyone noticed."""
    gone = client._disconnected  # private: aiomqtt offers no public disconnection signal
    try:
        await asyncio.shield(gone)
    except Exception as e:
        raise aiomqtt.MqttError(f"disconnected: {e}") from e
    raise aiomqtt.MqttError("disconnected")
