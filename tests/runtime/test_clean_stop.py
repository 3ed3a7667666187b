"""A clean stop always says offline, and leaves no admin socket and no SQLite -wal file.

The case from the issue: Ctrl-C on `rigd run ... 2>&1 | tee log` kills `tee` with rigd, the
next log line met a closed pipe, the stop was cut short, and the link's task, cancelled
on the way out, disconnected cleanly: the broker kept the retained `online` (a clean
DISCONNECT sends no Last Will) and the socket and -wal files stayed.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import sys
import tempfile
from pathlib import Path

from controller.adapters.mqtt import MqttLink
from controller.config import MqttConfig
from simulators.site import SimSite
from tests.conftest import Mosquitto, watch


async def test_ctrl_c_with_the_log_reader_gone_still_goes_offline_and_cleans_up(
    mosquitto: Mosquitto,
) -> None:
    state = Path(tempfile.mkdtemp(prefix="stop-", dir="/tmp"))  # short: a socket path
    try:
        await _stop_with_the_reader_gone(mosquitto, state)
    finally:
        shutil.rmtree(state, ignore_errors=True)


async def _stop_with_the_reader_gone(mosquitto: Mosquitto, state: Path) -> None:
    async with SimSite(rigs=4, pdus=0) as site:
        cfg = state / "rigd.toml"
        cfg.write_text(
            site.config_toml(
                site_id="stop",
                broker_url=mosquitto.url,
                state_dir=state,
                interval_s=1.0,
                extra="[control]\nmax_import_kw = 100\n",
            )
        )
        r_fd, w_fd = os.pipe()  # the daemon's log goes into `tee`
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "controller.cli.rigd",
            "run",
            "-c",
            str(cfg),
            stdout=w_fd,
            stderr=w_fd,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        os.close(w_fd)
        try:
            async with watch(mosquitto.host, mosquitto.port, "rigd/stop/#") as w:
                await w.wait_for("rigd/stop/status", lambda p: p == b"online", within=30)
                await w.wait_for("rigd/stop/state", lambda p: b'"cycle":2' in p, within=30)
                assert (state / "rigd.sock").exists()
                assert (state / "rigd.sqlite-wal").exists()
                os.close(r_fd)  # Ctrl-C: `tee` dies at once...
                r_fd = -1
                proc.send_signal(signal.SIGINT)  # ...and rigd stops
                rc = await asyncio.wait_for(proc.wait(), 30)
                await w.wait_for("rigd/stop/status", lambda p: p == b"offline", within=5)
        finally:
            if r_fd >= 0:
                os.close(r_fd)
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
    assert rc == 0
    assert not (state / "rigd.sock").exists()
    assert not (state / "rigd.sqlite-wal").exists()
    assert (state / "rigd.sqlite").stat().st_size > 0


async def test_a_link_cancelled_without_close_still_says_offline(mosquitto: Mosquitto) -> None:
    link = MqttLink(MqttConfig(url=mosquitto.url), "cut")
    async with watch(mosquitto.host, mosquitto.port, "rigd/cut/#") as w:
        task = asyncio.create_task(link.run())
        await w.wait_for("rigd/cut/status", lambda p: p == b"online", within=10)
        task.cancel()  # as asyncio.run does with tasks left at its end
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await w.wait_for("rigd/cut/status", lambda p: p == b"offline", within=5)
    assert link.offline_sent
