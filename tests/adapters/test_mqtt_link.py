"""The MQTT link against a real mosquitto: nothing queued is lost when a flush is cut off
while the broker has not acknowledged it (a broker gone silent, then the connection
dropped), and grid acks queued meanwhile are not held behind a long flush."""

from __future__ import annotations

import asyncio
import os
import signal

import aiomqtt
import pytest

from controller.adapters.mqtt import MqttLink
from controller.config import MqttConfig
from tests.conftest import Mosquitto


async def test_a_flush_cut_off_awaiting_the_broker_keeps_its_messages(
    mosquitto: Mosquitto,
) -> None:
    link = MqttLink(MqttConfig(url=mosquitto.url), "s", publish_batch=50)
    for i in range(120):
        link.event("events", {"n": i})
    for i in range(80):
        link.set_retained(f"rigs/r{i}/state", {"n": i})
    assert mosquitto.proc is not None
    async with aiomqtt.Client(mosquitto.host, mosquitto.port, identifier="t") as client:
        os.kill(mosquitto.proc.pid, signal.SIGSTOP)  # no PUBACK will come
        try:
            flush = asyncio.create_task(link._flush(client))
            await asyncio.sleep(0.3)
            assert not flush.done()  # waiting for the broker
            flush.cancel()  # what the link does when it sees the connection drop
            with pytest.raises(asyncio.CancelledError):
                await flush
        finally:
            os.kill(mosquitto.proc.pid, signal.SIGCONT)
    # Everything is still queued, in order, for the next connection.
    assert len(link._dirty) == 80
    assert [p for _, p in link._events] == [f'{{"n":{i}}}'.encode() for i in range(120)]
    assert link._dropped_events == 0


async def test_grid_acks_go_out_between_batches(mosquitto: Mosquitto) -> None:
    link = MqttLink(MqttConfig(url=mosquitto.url), "s", publish_batch=10)
    for i in range(50):
        link.set_retained(f"rigs/r{i}/state", {"n": i})
    order: list[str] = []
    async with aiomqtt.Client(mosquitto.host, mosquitto.port, identifier="w") as watch:
        await watch.subscribe("rigd/s/#", qos=1)
        async with aiomqtt.Client(mosquitto.host, mosquitto.port, identifier="t") as client:
            flush = asyncio.create_task(link._flush(client))
            await asyncio.sleep(0)  # the first batch is on its way
            link.send("rigd/s/grid/acks", b"accepted")
            await flush
        async with asyncio.timeout(5):
            async for m in watch.messages:
                order.append(str(m.topic))
                if len(order) == 51:
                    break
    assert order.index("rigd/s/grid/acks") < 20  # not after all 50 rig topics


async def test_volatile_topics_are_forgotten_once_sent_and_refilled_on_reconnect(
    mosquitto: Mosquitto,
) -> None:
    """A rig's document (keep=False) is not kept once the broker has it; a reconnect asks
    the `refill` hooks for it again, and a cleared topic (kept) stays cleared."""
    link = MqttLink(MqttConfig(url=mosquitto.url), "s", publish_batch=10)
    for i in range(25):
        link.set_retained(f"rigs/r{i}/state", {"n": i}, keep=False)
    link.set_retained("state", {"site": "s"})
    link.set_retained_raw("rigd/s/rigs/gone/state", b"")
    async with aiomqtt.Client(mosquitto.host, mosquitto.port, identifier="t") as client:
        await link._flush(client)
    assert set(link._retained) == {"rigd/s/state", "rigd/s/rigs/gone/state"}
    assert link.used_topic("rigd/s/rigs/r3/state")  # still rigd's own topic

    calls: list[int] = []

    def refill() -> None:
        calls.append(1)
        link.set_retained("rigs/r0/state", {"n": 100}, keep=False)

    link.refill.append(refill)
    run = asyncio.create_task(link.run())
    try:
        async with aiomqtt.Client(mosquitto.host, mosquitto.port, identifier="w") as watch:
            await watch.subscribe("rigd/s/rigs/r0/state", qos=1)
            async with asyncio.timeout(10):
                async for m in watch.messages:
                    if m.payload == b'{"n":100}':
                        break
        assert calls == [1]
        await link.flush(5.0)
        assert "rigd/s/rigs/r0/state" not in link._retained
    finally:
        await link.close(run)


async def test_a_document_set_later_is_made_when_sent_and_then_forgotten(
    mosquitto: Mosquitto,
) -> None:
    """`set_retained_later`: the document is made (and encoded) in the link's batch, not
    when it is set; a newer one set before the flush replaces it; once sent it is gone."""
    link = MqttLink(MqttConfig(url=mosquitto.url), "s", publish_batch=10)
    made: list[int] = []

    def doc(n: int) -> dict[str, int]:
        made.append(n)
        return {"n": n}

    link.set_retained_later("rigs/r0/state", lambda: doc(1))
    link.set_retained_later("rigs/r0/state", lambda: doc(2))
    assert made == []
    got: list[bytes] = []
    async with aiomqtt.Client(mosquitto.host, mosquitto.port, identifier="w2") as watch:
        await watch.subscribe("rigd/s/rigs/r0/state", qos=1)
        async with aiomqtt.Client(mosquitto.host, mosquitto.port, identifier="t2") as client:
            await link._flush(client)
        async with asyncio.timeout(10):
            async for m in watch.messages:
                assert isinstance(m.payload, bytes)
                got.append(m.payload)
                break
    assert made == [2]
    assert got == [b'{"n":2}']
    assert "rigd/s/rigs/r0/state" not in link._retained
    assert link.used_topic("rigd/s/rigs/r0/state")
