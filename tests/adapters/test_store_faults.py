"""The state database failing: a full disk while rigd runs, and a database that cannot be
opened or read at start.

A full disk is made real with SQLite's own limit (`PRAGMA max_page_count` on the store's
connection, then a scratch table filled until SQLite answers SQLITE_FULL), so it works
the same as root and as a user, and without mounting anything. At start, a directory in
the database's place, a file that is no database, and state this rigd cannot read are
all things a real host can have.
"""

from __future__ import annotations

import io
import json
import os
import sqlite3
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console
from structlog.testing import capture_logs

from bench.sim_harness import SimHarness
from controller.adapters import store as store_mod
from controller.adapters.store import StateStore, StoreError
from controller.cli.rigctl import _when, print_status
from controller.core.status import CycleResult, Hold
from simulators.farm import RigMode

HOUR = 3600.0


class Clock:
    def __init__(self) -> None:
        self.t = 1_764_000_000.0

    def __call__(self) -> float:
        return self.t


FILLER = "test-filler"


def fill_disk(store: StateStore) -> None:
    """Make the database full: no page may be added, and the pages of the audit and kv
    tables are full too (rows marked FILLER), so the next audit row or new key fails the
    way it does on a full disk. Rewriting a value in place may still succeed, as it does
    there."""
    db = store._db
    with store._lock:
        db.execute("CREATE TABLE IF NOT EXISTS test_filler (x BLOB)")
        pages = int(db.execute("PRAGMA page_count").fetchone()[0])
        db.execute(f"PRAGMA max_page_count = {pages}")
        fills = (
            ("INSERT INTO test_filler VALUES (zeroblob(512))", ()),
            (
                "INSERT INTO audit (ts, actor, action, params, reason, result)"
                " VALUES (0, ?, 'fill', '{}', '', 'ok')",
                (FILLER,),
            ),
            ("INSERT INTO kv (key, value) VALUES (?, '0')", None),
        )
        for n, (sql, args) in enumerate(fills):
            with pytest.raises(sqlite3.OperationalError, match="full"):
                for i in range(100_000):
                    db.execute(sql, (f"{FILLER}.{n}.{i}",) if args is None else args)
            if db.in_transaction:
                db.execute("ROLLBACK")


def free_disk(store: StateStore) -> None:
    with store._lock:
        store._db.execute("PRAGMA max_page_count = 1073741823")


def on_disk(path: Path, key: str) -> Any:
    """What a fresh reader (a restarted rigd) would find."""
    with sqlite3.connect(path) as db:
        row = db.execute("SELECT value FROM kv WHERE key = ?", (key,)).fetchone()
    return None if row is None else json.loads(row[0])


def test_writes_wait_in_memory_while_the_disk_is_full_and_land_when_it_frees(
    tmp_path: Path,
) -> None:
    now = Clock()
    s = StateStore.open(tmp_path, now=now, monotonic=now)
    s.put("a", 1)
    fill_disk(s)
    with capture_logs() as logs:
        s.put("a", {"big": "x" * 20_000})  # must not raise: control goes on
        s.put_many({"b": [1, 2, 3], "c": "y" * 10_000})
        s.delete("b")
        rows = [
            s.audit(
                ts=now.t + i,
                actor="planner",
                action="sleep",
                rig_id=f"r{i}",
                params={},
                reason="over target",
                result="ok",
            )
            for i in range(50)
        ]
    assert rows == [0] * 50
    h = s.health()
    assert h["ok"] is False and h["error_kind"] == "full" and "full" in h["error"]
    assert h["since"] == now.t and h["unsaved"] == 3 + 50
    # Reads see what was written, pending or not; the disk still has the old state.
    assert s.get("a") == {"big": "x" * 20_000} and s.get("b") is None
    assert on_disk(s.path, "a") == 1
    failed = [e for e in logs if e["event"] == "state_db_write_failed"]
    assert len(failed) == 1, "logged once when it begins, not at every write"
    assert failed[0]["kind"] == "full" and failed[0]["path"] == str(s.path)

    # Still full: retried at most every RETRY_S, and still failing.
    now.t += store_mod.RETRY_S
    s.put("d", 4)
    assert s.health()["ok"] is False and s.health()["unsaved"] == 54

    free_disk(s)
    now.t += store_mod.RETRY_S
    with capture_logs() as logs:
        s.put("e", 5)
    assert s.health() == {
        "ok": True,
        "error": None,
        "error_kind": None,
        "since": None,
        "unsaved": 0,
        "audit_dropped": 0,
    }
    assert [e["event"] for e in logs] == ["state_db_recovered"]
    assert logs[0]["written"] == 3 + 1 + 1 + 50  # a, c, d, e; the delete of b; 50 rows
    assert on_disk(s.path, "a") == {"big": "x" * 20_000}
    assert on_disk(s.path, "b") is None and on_disk(s.path, "e") == 5
    audit = [e for e in s.audit_since(0) if e.actor != FILLER]
    assert [e.rig_id for e in audit] == [f"r{i}" for i in range(50)], "in order, none lost"
    s.close()


def test_retries_are_paced_on_the_monotonic_clock_not_the_wall_clock(tmp_path: Path) -> None:
    """The wall clock put back an hour (NTP, a mis-set clock corrected) while the disk is
    full must not hold the retries back for that hour, nor a step forward hurry them."""
    wall, mono = Clock(), Clock()
    s = StateStore.open(tmp_path, now=wall, monotonic=mono)
    fill_disk(s)
    s.put("a", {"big": "x" * 20_000})
    assert s.health()["ok"] is False and s.health()["since"] == wall.t
    free_disk(s)
    wall.t += HOUR  # a step forward is no reason to retry early
    mono.t += 1.0
    s.put("b", 2)
    assert s.health()["unsaved"] == 2 and on_disk(s.path, "a") is None
    wall.t -= 2 * HOUR  # and a step back none to wait an hour
    mono.t += store_mod.RETRY_S
    with capture_logs() as logs:
        s.put("c", 3)
    assert s.health()["ok"] is True and s.health()["unsaved"] == 0
    assert on_disk(s.path, "a") == {"big": "x" * 20_000} and on_disk(s.path, "c") == 3
    assert [(e["event"], e["failing_s"]) for e in logs] == [
        ("state_db_recovered", 1.0 + store_mod.RETRY_S)
    ]
    s.close()


def test_a_value_json_cannot_hold_is_refused_and_nothing_is_queued(tmp_path: Path) -> None:
    """A value that cannot be serialised raises to its caller, and none of the values given
    with it is kept: it must not stay pending and fail every later write."""
    s = StateStore.open(tmp_path, now=Clock())
    s.put("a", 1)
    with pytest.raises(TypeError, match="not JSON serializable") as e:
        s.put_many({"a": 2, "bad": {"rigs": {"r1", "r2"}}})
    assert s.get("a") == 1 and s.get("bad") is None, "all or none"
    assert "state key 'bad': not saved" in getattr(e.value, "__notes__", [])
    # Every later write goes on as before (the daemon writes its clock mark every cycle).
    s.put("clock.mark", {"wall": 1.0})
    s.delete("a")
    assert s.flush() and s.health()["ok"] is True
    assert on_disk(s.path, "clock.mark") == {"wall": 1.0} and on_disk(s.path, "a") is None
    # The same while the disk fails and writes wait in memory.
    fill_disk(s)
    s.put("c", "y" * 10_000)
    with pytest.raises(ValueError, match="Circular reference"):
        loop: dict[str, Any] = {}
        loop["self"] = loop
        s.put("d", loop)
    assert s.get("d") is None and s.health()["unsaved"] == 1
    free_disk(s)
    assert s.flush() and on_disk(s.path, "c") == "y" * 10_000
    s.close()


def test_audit_rows_kept_while_failing_are_bounded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(store_mod, "MAX_PENDING_AUDIT", 10)
    s = StateStore.open(tmp_path, now=Clock())
    fill_disk(s)
    for i in range(25):
        s.audit(
            ts=float(i),
            actor="a",
            action="x",
            rig_id=None,
            params={"n": i},
            reason="r",
            result="ok",
        )
    assert s.health()["audit_dropped"] == 15 and s.health()["unsaved"] == 10
    free_disk(s)
    assert s.flush()
    kept = [e.params["n"] for e in s.audit_since(0) if e.actor != FILLER]
    assert kept == list(range(15, 25)), "the newest are kept"
    s.close()


def test_a_grid_order_write_that_fails_raises_and_keeps_the_book(tmp_path: Path) -> None:
    s = StateStore.open(tmp_path, now=Clock())
    fill_disk(s)
    book = {"orders": [{"order_id": "o" * 20_000}]}
    with pytest.raises(StoreError) as e:
        s.grid_accept(
            jti="j1",
            digest="d",
            exp=1.0,
            ack={"ok": True},
            state=book,
            outbox=[("t", b"x" * 10_000, None)],
            prune_before=0.0,
        )
    assert e.value.kind == "full"
    assert s.get("grid.book") == book  # what rigd obeys is kept, and written later
    free_disk(s)
    assert s.flush() and on_disk(s.path, "grid.book") == book
    s.close()


# -- the daemon with a full disk ---------------------------------------------------------------


async def test_a_full_disk_mid_curtailment_changes_nothing_on_the_farm(
    harness: Callable[..., SimHarness],
) -> None:
    """The disk fills while rigs are curtailed and a deeper cut comes: rigd goes on shedding
    from memory, wakes nothing, says so in the `state` document, and once the disk has
    space again everything it could not write is there, as a restart would read it."""
    h = harness(
        rigs=24,
        pdus=2,
        control={"min_off_s": 600, "power_targets": False},
        budget={"period": "day", "kwh": 1e6},
    )
    ctl = h.cfg.control
    assert ctl is not None
    t0 = h.now
    h.at(t0 + 303, lambda: h.set_override(0.6 * ctl.max_import_kw, 2 * HOUR, "first cut"))
    await h.run_until(t0 + 1200)
    asleep = {rid for rid, r in h.farm.rigs.items() if r.mode is RigMode.SLEEPING}
    assert asleep

    fill_disk(h.store)
    t_full = h.now
    h.at(t0 + 1500, lambda: h.set_override(0.35 * ctl.max_import_kw, 2 * HOUR, "deeper cut"))
    h.at(
        t0 + 1600,
        lambda: h.controller.set_maintenance(next(iter(h.farm.rigs)), Hold("fan swap", "tech")),
    )
    docs: list[dict[str, Any]] = []

    def each(r: CycleResult) -> None:
        docs.append(r.document["state_db"])
        assert r.control is not None
        for a in r.control.plan.actions if r.control.plan else ():
            assert a.kind.value not in ("wake", "outlet_on"), f"woke {a.rig_id} while full"

    with capture_logs() as logs:
        await h.run_until(t0 + 3000, each)
    bad = docs[-1]
    assert bad["ok"] is False and bad["error_kind"] == "full" and bad["unsaved"] > 0
    assert bad["since"] is not None and bad["since"] >= t_full
    events = [e["event"] for e in logs]
    assert events.count("state_db_write_failed") == 1
    assert "state_write_failed" not in events  # no line per cycle
    # Control went on: the deeper cut was obeyed.
    rep = h.recorder.report(t0 + 1500 + 200, t0 + 3000)
    assert rep.over_frac == 0.0, rep
    assert asleep <= {rid for rid, r in h.farm.rigs.items() if r.mode is RigMode.SLEEPING}
    memory = {k: v.as_dict() for k, v in h.controller.memory.items()}
    assert on_disk(h.store.path, "planner.memory") != memory, "the disk is behind"
    # What `rigctl status` shows a technician.
    out = io.StringIO()
    print_status(h.daemon.last.document if h.daemon.last else {}, Console(file=out, width=200))
    assert f"state database failing (full) since {_when(bad['since'])}" in out.getvalue()

    free_disk(h.store)
    await h.run_for(3 * h.interval_s, each)
    assert docs[-1] == {
        "ok": True,
        "error": None,
        "error_kind": None,
        "since": None,
        "unsaved": 0,
        "audit_dropped": 0,
    }
    assert on_disk(h.store.path, "planner.memory") == {
        k: v.as_dict() for k, v in h.controller.memory.items()
    }
    assert set(on_disk(h.store.path, "control.maintenance")) == set(h.controller.maintenance)
    e = h.controller.energy
    assert e is not None and on_disk(h.store.path, "budget.energy") == e.as_dict()
    during = [x for x in h.audit() if t_full < x.ts < t0 + 3000]
    assert any(x.action == "sleep" for x in during), "actions during the outage were audited"
    # A restart now reads exactly the state the running daemon had.
    before = dict(h.controller.memory)
    await h.restart()
    assert h.controller.memory == before


# -- at start -----------------------------------------------------------------------------


def _config(tmp_path: Path, state_dir: Path) -> Path:
    cfg = tmp_path / "rigd.toml"
    cfg.write_text(
        f"""
[site]
id = "s"
state_dir = {json.dumps(str(state_dir))}

[mqtt]
url = "mqtt://127.0.0.1:9"

[admin]
socket = {json.dumps(str(tmp_path / "rigd.sock"))}

[[miners]]
id = "rig-1"
host = "127.0.0.1"
port = 9

[control]
max_import_kw = 100
"""
    )
    return cfg


def _run(cfg: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "controller.cli.rigd", "run", "-c", str(cfg)],
        capture_output=True,
        text=True,
        timeout=60,
    )


def _logged(stderr: str, event: str) -> dict[str, Any]:
    for line in stderr.splitlines():
        if line.startswith("{"):
            doc = json.loads(line)
            if doc.get("event") == event:
                return dict(doc)
    raise AssertionError(f"no {event!r} in:\n{stderr}")


def test_a_directory_where_the_database_should_be_exits_74(tmp_path: Path) -> None:
    state = tmp_path / "state"
    (state / StateStore.FILENAME).mkdir(parents=True)
    r = _run(_config(tmp_path, state))
    assert r.returncode == 74, r.stderr
    doc = _logged(r.stderr, "state_db_unusable")
    assert doc["kind"] == "unavailable" and doc["level"] == "critical"
    assert f"cannot open state database {state / StateStore.FILENAME}" in r.stderr
    assert "Traceback" not in r.stderr


def test_a_file_that_is_no_database_exits_65(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    (state / StateStore.FILENAME).write_bytes(b"\x00garbage, not SQLite\n" * 400)
    r = _run(_config(tmp_path, state))
    assert r.returncode == 65, r.stderr
    assert _logged(r.stderr, "state_db_unusable")["kind"] == "corrupt"
    assert "Traceback" not in r.stderr


def test_state_this_rigd_cannot_read_exits_65(tmp_path: Path) -> None:
    state = tmp_path / "state"
    s = StateStore.open(state)
    s.put("planner.memory", {"rig-1": {"mode": "hibernate"}})
    s.close()
    r = _run(_config(tmp_path, state))
    assert r.returncode == 65, r.stderr
    doc = _logged(r.stderr, "state_db_unusable")
    assert doc["kind"] == "corrupt" and "hibernate" in doc["error"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through file permissions")
def test_a_read_only_state_directory_exits_74(tmp_path: Path) -> None:
    state = tmp_path / "state"
    StateStore.open(state).close()
    for p in state.iterdir():
        p.unlink() if p.name != StateStore.FILENAME else None
    state.chmod(0o555)
    (state / StateStore.FILENAME).chmod(0o444)
    try:
        r = _run(_config(tmp_path, state))
    finally:
        state.chmod(0o755)
    assert r.returncode == 74, r.stderr
    assert _logged(r.stderr, "state_db_unusable")["kind"] in ("readonly", "unavailable")


def test_the_unit_restarts_on_74_but_not_on_65() -> None:
    unit = (Path(__file__).parent.parent.parent / "systemd" / "rigd.service").read_text()
    prevent = next(
        line.split("=", 1)[1].split()
        for line in unit.splitlines()
        if line.startswith("RestartPreventExitStatus=")
    )
    assert "65" in prevent and "78" in prevent and "74" not in prevent
    assert "Restart=on-failure" in unit
