"""rigd's persistent state: one SQLite file under the state directory.

What must survive a restart or a power cut lives here: the energy counters, a
technician's overrides, and who was put to sleep by rigd and when (so a restart
never wakes a rig that must stay asleep), plus the audit log of every action.
SQLite in WAL mode with synchronous=NORMAL keeps each write to a fraction of a
millisecond and the file consistent after a crash.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SCHEMA = """
CREATE TABLE IF NOT EXISTS kv (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS audit (
    id      INTEGER PRIMARY KEY AUTOINCREMENT,
    ts      REAL NOT NULL,
    actor   TEXT NOT NULL,
    action  TEXT NOT NULL,
    rig_id  TEXT,
    params  TEXT NOT NULL,
    reason  TEXT NOT NULL,
    result  TEXT NOT NULL,
    error   TEXT,
    dry_run INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS audit_ts ON audit (ts);
CREATE TABLE IF NOT EXISTS grid_seen (
    jti     TEXT PRIMARY KEY,
    digest  TEXT NOT NULL,
    exp     REAL NOT NULL,
    ack     TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS grid_outbox (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    topic       TEXT NOT NULL,
    payload     BLOB NOT NULL,
    correlation BLOB
);
"""


class StoreError(Exception):
    """The state database cannot be opened or written (permissions, disk full, corruption)."""


@dataclass(frozen=True, slots=True)
class AuditEntry:
    id: int
    ts: float
    actor: str
    action: str
    rig_id: str | None
    params: dict[str, Any]
    reason: str
    result: str
    error: str | None
    dry_run: bool

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "ts": self.ts,
            "actor": self.actor,
            "action": self.action,
            "rig": self.rig_id,
            "params": self.params,
            "reason": self.reason,
            "result": self.result,
            "error": self.error,
            "dry_run": self.dry_run,
        }


class StateStore:
    FILENAME = "rigd.sqlite"

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(SCHEMA)
        except (OSError, sqlite3.Error) as e:
            raise StoreError(f"cannot open state database {path}: {e}") from e
        self._lock = threading.Lock()

    @classmethod
    def open(cls, state_dir: Path) -> StateStore:
        return cls(Path(state_dir) / cls.FILENAME)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # -- key/value ---------------------------------------------------------------------

    def get(self, key: str, default: Any = None) -> Any:
        with self._lock:
            row = self._db.execute("SELECT value FROM kv WHERE key = ?", (key,)).fetchone()
        return default if row is None else json.loads(row[0])

    def put_many(self, items: dict[str, Any]) -> None:
        """Write several keys in one transaction: all or none land."""
        rows = [(k, json.dumps(v, separators=(",", ":"))) for k, v in items.items()]
        try:
            with self._lock:
                self._db.execute("BEGIN")
                try:
                    self._db.executemany(
                        "INSERT INTO kv (key, value) VALUES (?, ?) "
                        "ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                        rows,
                    )
                    self._db.execute("COMMIT")
                except BaseException:
                    self._db.execute("ROLLBACK")
                    raise
        except sqlite3.Error as e:
            raise StoreError(f"cannot write state to {self.path}: {e}") from e

    def put(self, key: str, value: Any) -> None:
        self.put_many({key: value})

    def delete(self, key: str) -> None:
        try:
            with self._lock:
                self._db.execute("DELETE FROM kv WHERE key = ?", (key,))
        except sqlite3.Error as e:
            raise StoreError(f"cannot write state to {self.path}: {e}") from e

    # -- grid messages: replay protection and the outbox of what must be published -----------

    def grid_seen(self, jti: str) -> tuple[str, dict[str, Any]] | None:
        """(digest, ack) of a message already answered, or None."""
        with self._lock:
            row = self._db.execute(
                "SELECT digest, ack FROM grid_seen WHERE jti = ?", (jti,)
            ).fetchone()
        return None if row is None else (row[0], json.loads(row[1]))

    def grid_accept(
        self,
        *,
        jti: str,
        digest: str,
        exp: float,
        ack: dict[str, Any],
        state: dict[str, Any] | None,
        outbox: list[tuple[str, bytes, bytes | None]],
        prune_before: float,
    ) -> list[int]:
        """One transaction: the message is seen, the book (if changed) saved, and what must
        be published queued; so a crash leaves either all of it or none."""
        try:
            with self._lock:
                self._db.execute("BEGIN")
                try:
                    self._db.execute(
                        "INSERT OR REPLACE INTO grid_seen (jti, digest, exp, ack) VALUES (?,?,?,?)",
                        (jti, digest, exp, json.dumps(ack, separators=(",", ":"))),
                    )
                    self._db.execute("DELETE FROM grid_seen WHERE exp < ?", (prune_before,))
                    if state is not None:
                        self._db.execute(
                            "INSERT INTO kv (key, value) VALUES ('grid.book', ?) "
                            "ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                            (json.dumps(state, separators=(",", ":")),),
                        )
                    ids = [
                        int(
                            self._db.execute(
                                "INSERT INTO grid_outbox (topic, payload, correlation) "
                                "VALUES (?,?,?)",
                                row,
                            ).lastrowid
                            or 0
                        )
                        for row in outbox
                    ]
                    self._db.execute("COMMIT")
                except BaseException:
                    self._db.execute("ROLLBACK")
                    raise
        except sqlite3.Error as e:
            raise StoreError(f"cannot write grid state to {self.path}: {e}") from e
        return ids

    def outbox_add(self, topic: str, payload: bytes, correlation: bytes | None = None) -> int:
        try:
            with self._lock:
                cur = self._db.execute(
                    "INSERT INTO grid_outbox (topic, payload, correlation) VALUES (?,?,?)",
                    (topic, payload, correlation),
                )
                return int(cur.lastrowid or 0)
        except sqlite3.Error as e:
            raise StoreError(f"cannot write grid outbox in {self.path}: {e}") from e

    def outbox(self) -> list[tuple[int, str, bytes, bytes | None]]:
        with self._lock:
            rows = self._db.execute(
                "SELECT id, topic, payload, correlation FROM grid_outbox ORDER BY id"
            ).fetchall()
        return [
            (int(r[0]), str(r[1]), bytes(r[2]), None if r[3] is None else bytes(r[3])) for r in rows
        ]

    def outbox_done(self, row_id: int) -> None:
        try:
            with self._lock:
                self._db.execute("DELETE FROM grid_outbox WHERE id = ?", (row_id,))
        except sqlite3.Error as e:
            raise StoreError(f"cannot write grid outbox in {self.path}: {e}") from e

    # -- audit log ---------------------------------------------------------------------

    def audit(
        self,
        *,
        ts: float,
        actor: str,
        action: str,
        rig_id: str | None,
        params: dict[str, Any],
        reason: str,
        result: str,
        error: str | None = None,
        dry_run: bool = False,
    ) -> int:
        try:
            with self._lock:
                cur = self._db.execute(
                    "INSERT INTO audit (ts, actor, action, rig_id, params, reason, result, error,"
                    " dry_run) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        ts,
                        actor,
                        action,
                        rig_id,
                        json.dumps(params, separators=(",", ":")),
                        reason,
                        result,
                        error,
                        int(dry_run),
                    ),
                )
                return int(cur.lastrowid or 0)
        except sqlite3.Error as e:
            raise StoreError(f"cannot write the audit log in {self.path}: {e}") from e

    _COLUMNS = "id, ts, actor, action, rig_id, params, reason, result, error, dry_run"

    def _entries(self, where: str, args: tuple[Any, ...]) -> list[AuditEntry]:
        with self._lock:
            rows = self._db.execute(f"SELECT {self._COLUMNS} FROM audit {where}", args).fetchall()
        return [
            AuditEntry(r[0], r[1], r[2], r[3], r[4], json.loads(r[5]), r[6], r[7], r[8], bool(r[9]))
            for r in rows
        ]

    def audit_since(self, since: float, *, limit: int = 10_000) -> list[AuditEntry]:
        return self._entries("WHERE ts >= ? ORDER BY id LIMIT ?", (since, limit))

    def audit_for_rig(self, rig_id: str, *, limit: int = 20) -> list[AuditEntry]:
        """The rig's most recent entries, oldest first."""
        newest = self._entries("WHERE rig_id = ? ORDER BY id DESC LIMIT ?", (rig_id, limit))
        return newest[::-1]
