"""One rigd per state directory, and state files only rigd's user can read.

A second `rigd run` on the same state directory used to start: the two knocked each other
off the broker (one client id), both completed and reported each order, and the second,
stopping, deleted the first one's admin socket. It must be refused at start, with its own
exit status, having touched nothing of the first one's.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from controller.adapters.statedir import LOCK_NAME, AlreadyRunning, InstanceLock
from controller.adapters.store import StateStore
from controller.cli.rigctl import AdminClient
from controller.cli.rigd import EXIT_ALREADY_RUNNING


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A short directory: Unix socket paths are capped at 107 bytes."""
    d = Path(tempfile.mkdtemp(prefix="one-", dir="/tmp"))
    try:
        yield d
    finally:
        subprocess.run(["rm", "-rf", str(d)], check=False)


def _config(d: Path, state: Path, sock: str = "rigd.sock") -> Path:
    cfg = d / f"rigd-{sock}.toml"
    cfg.write_text(
        f"""
[site]
id = "s"
state_dir = {json.dumps(str(state))}

[mqtt]
url = "mqtt://127.0.0.1:9"

[admin]
socket = {json.dumps(str(d / sock))}

[[miners]]
id = "rig-1"
host = "127.0.0.1"
port = 9

[control]
max_import_kw = 100
"""
    )
    return cfg


def _start(cfg: Path, umask: int | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "controller.cli.rigd", "run", "-c", str(cfg), "--log-level", "info"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        umask=-1 if umask is None else umask,
    )


def _wait_listening(proc: subprocess.Popen[str], sock: Path, within: float = 60.0) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"rigd exited {proc.returncode}: {proc.stderr.read()}")  # type: ignore[union-attr]
        if sock.exists():
            try:
                AdminClient(sock, timeout=10).call("status")
                return
            except Exception:
                pass
        time.sleep(0.1)
    raise AssertionError("rigd did not open its admin socket")


def _stop(proc: subprocess.Popen[str], sig: int = signal.SIGTERM) -> str:
    if proc.poll() is None:
        proc.send_signal(sig)
    try:
        _, err = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
    return err


def _events(stderr: str) -> list[dict[str, object]]:
    return [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]


def test_the_lock_is_per_state_directory_and_names_its_holder(tmp_path: Path) -> None:
    state = tmp_path / "state"
    lock = InstanceLock.acquire(state)
    try:
        with pytest.raises(AlreadyRunning) as e:
            InstanceLock.acquire(state)  # another open file description: refused
        assert e.value.pid == os.getpid() and str(state) in str(e.value)
        InstanceLock.acquire(tmp_path / "elsewhere").release()
    finally:
        lock.release()
    InstanceLock.acquire(state).release()  # free again once released
    assert (state / LOCK_NAME).exists()  # the file stays: the lock, not the file, counts


def test_a_second_rigd_on_the_same_state_is_refused_and_touches_nothing(
    short_tmp: Path,
) -> None:
    state = short_tmp / "state"
    cfg = _config(short_tmp, state)
    sock = short_tmp / "rigd.sock"
    first = _start(cfg)
    try:
        _wait_listening(first, sock)
        inode = sock.stat().st_ino
        # The same config, and another config (own admin socket) on the same state dir.
        for other in (cfg, _config(short_tmp, state, "other.sock")):
            t0 = time.monotonic()
            second = subprocess.run(
                [sys.executable, "-m", "controller.cli.rigd", "run", "-c", str(other)],
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert second.returncode == EXIT_ALREADY_RUNNING == 73, second.stderr
            assert f"already running on state directory {state}" in second.stderr
            assert f"pid {first.pid}" in second.stderr
            events = [e["event"] for e in _events(second.stderr)]
            assert "rigd_already_running" in events
            assert not {"rigd_starting", "admin_listening", "mqtt_connected"} & set(events)
            assert time.monotonic() - t0 < 30
            assert not (short_tmp / "other.sock").exists()
            # The first one's socket is the same file, and it still answers.
            assert sock.stat().st_ino == inode
            assert AdminClient(sock).call("status") is not None
        assert first.poll() is None
    finally:
        err = _stop(first)
    assert first.returncode == 0, err
    assert not sock.exists()  # the first one removes its own socket at its stop


def test_a_killed_rigd_does_not_block_the_next_start(short_tmp: Path) -> None:
    state = short_tmp / "state"
    cfg = _config(short_tmp, state)
    sock = short_tmp / "rigd.sock"
    first = _start(cfg)
    try:
        _wait_listening(first, sock)
    finally:
        _stop(first, signal.SIGKILL)  # the kernel drops the lock with the process
    again = _start(cfg)
    try:
        _wait_listening(again, sock)  # the stale socket is replaced
    finally:
        err = _stop(again)
    assert again.returncode == 0, err


async def test_an_admin_server_removes_only_the_socket_it_made(short_tmp: Path) -> None:
    """Whoever made the file now at the path (another daemon), it is not ours to delete."""
    from controller.adapters.admin import AdminServer

    sock = short_tmp / "a.sock"
    ours = AdminServer(None, sock)  # type: ignore[arg-type]
    await ours.start()
    sock.unlink()
    theirs = socket.socket(socket.AF_UNIX)
    theirs.bind(str(sock))
    try:
        await ours.stop()
        assert sock.exists()
    finally:
        theirs.close()
    mine = AdminServer(None, sock)  # type: ignore[arg-type]
    await mine.start()  # a stale socket from a crash is replaced
    await mine.stop()
    assert not sock.exists()


# -- 7. state files are 0600 whatever the umask -------------------------------------------------


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o277], ids=oct)
def test_state_files_are_private_whatever_the_umask(short_tmp: Path, umask: int) -> None:
    state = short_tmp / "state"
    cfg = _config(short_tmp, state)
    proc = _start(cfg, umask=umask)
    try:
        _wait_listening(proc, short_tmp / "rigd.sock")
    finally:
        err = _stop(proc)
    assert proc.returncode == 0, err
    names = {p.name: stat.S_IMODE(p.stat().st_mode) for p in state.iterdir()}
    assert {StateStore.FILENAME, LOCK_NAME} <= names.keys(), names
    assert all(mode == 0o600 for mode in names.values()), {n: oct(m) for n, m in names.items()}


def test_a_world_readable_database_from_before_is_tightened(tmp_path: Path) -> None:
    """A database an earlier rigd left 0644 (with its -wal and -shm) is made private."""
    state = tmp_path / "state"
    state.mkdir()
    old = os.umask(0o022)
    try:
        before = sqlite3.connect(state / StateStore.FILENAME, isolation_level=None)
        before.execute("PRAGMA journal_mode=WAL")
        before.execute("CREATE TABLE t (a)")
    finally:
        os.umask(old)
    try:
        modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in state.iterdir()}
        assert len(modes) == 3 and set(modes.values()) == {0o644}, modes
        s = StateStore.open(state)
        s.put("k", 1)
        s.close()
        for p in state.iterdir():
            assert stat.S_IMODE(p.stat().st_mode) == 0o600, p
    finally:
        before.close()
