"""config/mosquitto/acl.example on a real mosquitto: each party reaches its topics and no
other's (a forged order, zone report or state never arrives)."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import Mosquitto

ROOT = Path(__file__).resolve().parent.parent.parent
ACL = ROOT / "config" / "mosquitto" / "acl.example"
USERS = ("rigd-chui-01", "rigd-chui-02", "grid-operator", "homeassistant")


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Mosquitto]:
    passwd = tmp_path / "passwd"
    tool = shutil.which("mosquitto_passwd") or "/usr/bin/mosquitto_passwd"
    for i, user in enumerate(USERS):
        flags = ["-c"] if i == 0 else []
        subprocess.run([tool, *flags, "-b", str(passwd), user, f"pw-{user}"], check=True)
    m = Mosquitto(tmp_path, listener=f"password_file {passwd}\nacl_file {ACL}")
    m.start()
    try:
        yield m
    finally:
        m.stop()


def pub(m: Mosquitto, user: str, topic: str, payload: str) -> None:
    subprocess.run(
        [
            "mosquitto_pub",
            "-h",
            m.host,
            "-p",
            str(m.port),
            "-u",
            user,
            "-P",
            f"pw-{user}",
            "-q",
            "1",
            "-r",
            "-t",
            topic,
            "-m",
            payload,
        ],
        check=True,
        timeout=10,
    )


def read(m: Mosquitto, user: str, topic: str) -> str | None:
    """The retained message `user` reads on `topic`, or None."""
    r = subprocess.run(
        [
            "mosquitto_sub",
            "-h",
            m.host,
            "-p",
            str(m.port),
            "-u",
            user,
            "-P",
            f"pw-{user}",
            "-t",
            topic,
            "-C",
            "1",
            "-W",
            "1",
        ],
        capture_output=True,
        text=True,
        timeout=10,
    )
    return r.stdout.strip() if r.returncode == 0 else None


def test_each_party_reaches_its_topics_and_no_others(broker: Mosquitto) -> None:
    m = broker
    # rigd publishes its state; Home Assistant and the operator read it
    pub(m, "rigd-chui-01", "rigd/kg-chui-01/state", "genuine")
    assert read(m, "homeassistant", "rigd/kg-chui-01/state") == "genuine"
    assert read(m, "grid-operator", "rigd/kg-chui-01/state") == "genuine"
    # nobody else can put words in its mouth
    for forger in ("grid-operator", "homeassistant", "rigd-chui-02"):
        pub(m, forger, "rigd/kg-chui-01/state", f"forged by {forger}")
    assert read(m, "homeassistant", "rigd/kg-chui-01/state") == "genuine"

    # orders: from the operator only, read by rigd; acks and reports back to the operator
    pub(m, "grid-operator", "rigd/kg-chui-01/grid/orders", "order")
    assert read(m, "rigd-chui-01", "rigd/kg-chui-01/grid/orders") == "order"
    pub(m, "homeassistant", "rigd/kg-chui-01/grid/orders", "forged order")
    pub(m, "rigd-chui-02", "rigd/kg-chui-01/grid/orders", "forged order")
    assert read(m, "rigd-chui-01", "rigd/kg-chui-01/grid/orders") == "order"
    pub(m, "rigd-chui-01", "rigd/kg-chui-01/grid/acks", "ack")
    pub(m, "rigd-chui-01", "dispatch/acks/evt-1", "ack5")
    assert read(m, "grid-operator", "rigd/kg-chui-01/grid/acks") == "ack"
    assert read(m, "grid-operator", "dispatch/acks/evt-1") == "ack5"
    pub(m, "grid-operator", "operator/kg-grid/heartbeat", "beat")
    assert read(m, "rigd-chui-01", "operator/kg-grid/heartbeat") == "beat"

    # zones: each writes its own report only, and reads everyone's
    pub(m, "rigd-chui-01", "rigd/chui/zones/hall-1", "hall-1 report")
    pub(m, "rigd-chui-02", "rigd/chui/zones/hall-2", "hall-2 report")
    pub(m, "rigd-chui-02", "rigd/chui/zones/hall-1", "forged by hall-2")
    assert read(m, "rigd-chui-02", "rigd/chui/zones/hall-1") == "hall-1 report"
    assert read(m, "rigd-chui-01", "rigd/chui/zones/hall-2") == "hall-2 report"

    # Home Assistant's commands reach rigd; the operator's do not
    pub(m, "homeassistant", "rigd/kg-chui-01/rigs/rig-1/set", "OFF")
    pub(m, "grid-operator", "rigd/kg-chui-01/override/set", "0")
    assert read(m, "rigd-chui-01", "rigd/kg-chui-01/rigs/rig-1/set") == "OFF"
    assert read(m, "rigd-chui-01", "rigd/kg-chui-01/override/set") is None
