"""An MQTT broker inside the demo process, so `rigd demo` needs no external service.

Only for the demo: production uses the site's own broker (mosquitto, EMQX, ...).
It listens on loopback only.
"""

from __future__ import annotations

import contextlib
import logging
import socket
from typing import Any

from amqtt.broker import Broker


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class EmbeddedBroker:
    def __init__(self, host: str = "127.0.0.1", port: int | None = None) -> None:
        if not host.startswith("127."):
            raise ValueError("the embedded broker listens on loopback only")
        self.host = host
        self.port = port or free_port(host)
        cfg: dict[str, Any] = {
            "listeners": {"default": {"type": "tcp", "bind": f"{self.host}:{self.port}"}},
            "plugins": {
                "amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True},
            },
        }
        self._broker = Broker(cfg)
        for name in ("amqtt", "transitions"):
            logging.getLogger(name).setLevel(logging.ERROR)

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    async def start(self) -> None:
        await self._broker.start()

    async def stop(self) -> None:
        with contextlib.suppress(Exception):
            await self._broker.shutdown()
