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
