"""rigd's persistent state: one SQLite file under the state directory.

What must survive a restart or a power cut lives here: the energy counters, a
technician's overrides, and who was put to sleep by rigd and when (so a restart
never wakes a rig that must stay asleep), plus the audit log of every action.
SQLite in WAL mode with synchronous=NORMAL keeps each write to a fraction of a
millisecond and the file consistent after a crash.

A disk that fills up or turns read-only while rigd runs must not stop the farm's
control, so state and audit writes are *write-behind on failure*: a write that fails
is kept in memory (the newest value per key, and audit rows up to a bound), the failure
is logged once and shown by `health()`, and every later write, at most every
`RETRY_S` (on the monotonic clock: a wall-clock step must not stop the retries), tries to
write everything still pending, in order. Values are serialised when they are given, so one
that cannot be is refused there and never stays pending. The control loop goes on
from its in-memory state meanwhile; reads see the pending values. What cannot be opened
or read at start raises `StoreError`, whose `kind` tells the daemon how to exit.
"""

from __future__ import annotations

import errno
import json
import sqlite3
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal, TypeVar

import structlog

from controller.adapters.statedir import create_private
from controller.errors import RigdError

log = structlog.get_logger(__name__)

T = TypeVar("T")

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

ErrorKind = Literal["full", "readonly", "corrupt", "unavailable", "busy", "io"]

RETRY_S: Final = 5.0  # while failing, a write retries what is pending at most this often
MAX_PENDING_AUDIT: Final = 10_000  # audit rows kept while the disk fails; older are dropped
_DELETED: Final = object()

# SQLite primary result codes (the low byte of an extended code).
_KINDS: Final[dict[int, ErrorKind]] = {
    3: "readonly",  # SQLITE_PERM
    5: "busy",  # SQLITE_BUSY
    6: "busy",  # SQLITE_LOCKED
    8: "readonly",  # SQLITE_READONLY
    10: "io",  # SQLITE_IOERR
    11: "corrupt",  # SQLITE_CORRUPT
    13: "full",  # SQLITE_FULL
    14: "unavailable",  # SQLITE_CANTOPEN
    23: "readonly",  # SQLITE_AUTH
    26: "corrupt",  # SQLITE_NOTADB
}


class StoreError(RigdError):
    """The state database cannot be opened, read or written.

    `kind`: "full" (disk or quota), "readonly" (permissions, read-only filesystem),
    "corrupt" (not a database, damaged, or state this rigd cannot read), "unavailable"
    (cannot be opened: a missing directory, a directory where the file should be),
    "busy" (locked by another process), "io" (anything else).
    """

    def __init__(self, message: str, *, kind: ErrorKind = "io") -> None:
        super().__init__(message)
        self.kind: ErrorKind = kind


def error_kind(e: BaseException) -> ErrorKind:
    """What kind of failure an sqlite3 or OS error is."""
    if isinstance(e, StoreError):
        return e.kind
    if isinstance(e, sqlite3.Error):
        code = getattr(e, "sqlite_errorcode", None)
        if isinstance(code, int):
            return _KINDS.get(code & 0xFF, "io")
        return "corrupt" if isinstance(e, sqlite3.DatabaseError) and "malformed" in str(e) else "io"
    if isinstance(e, ValueError):  # json
        return "corrupt"
    if isinstance(e, OSError):
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            return "full"
        if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            return "readonly"
        return "io"
    return "io"


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


AuditRow = tuple[float, str, str, str | None, str, str, str, str | None, int]


def _dumps(key: str, value: Any) -> str:
    """`value` as the JSON text stored for `key`; the error names the key."""
    try:
        return json.dumps(value, separators=(",", ":"))
    except (TypeError, ValueError) as e:
        e.add_note(f"state key {key!r}: not saved")
        raise


def audit_row(
    ts: float,
    actor: str,
    action: str,
    rig_id: str | None,
    params: dict[str, Any],
    reason: str,
    result: str,
    error: str | None = None,
    dry_run: bool = False,
) -> AuditRow:
    """One audit entry as stored, for `StateStore.audit_many`."""
    return (
        ts,
        actor,
        action,
        rig_id,
        json.dumps(params, separators=(",", ":")),
        reason,
        result,
        error,
        int(dry_run),
    )


class StateStore:
    FILENAME = "rigd.sqlite"

    def __init__(
        self,
        path: Path,
        *,
        now: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        """`now` stamps when a failure began (the daemon's clock); `monotonic` paces the
        retries (the daemon's monotonic clock)."""
        self.path = path
        self.now = now
        self.monotonic = monotonic
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            create_private(path)  # 0600 whatever the umask: it holds the audit log
            self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
            try:
                self._db.execute("PRAGMA journal_mode=WAL")
                self._db.execute("PRAGMA synchronous=NORMAL")
                self._db.executescript(SCHEMA)
            except BaseException:
                self._db.close()
                raise
        except (OSError, sqlite3.Error) as e:
            kind = error_kind(e)
            raise StoreError(f"cannot open state database {path}: {e} ({kind})", kind=kind) from e
        self._lock = threading.Lock()
        # key -> newest value not yet written, as JSON text (or _DELETED)
        self._pending: dict[str, str | object] = {}
        self._pending_audit: deque[AuditRow] = deque()
        self._dropped_audit = 0
        self._failure: tuple[ErrorKind, str, float] | None = None  # kind, message, since
        self._failing_since = 0.0  # monotonic, while failing
        self._last_try = -float("inf")  # monotonic

    @classmethod
    def open(
        cls,
        state_dir: Path,
        *,
        now: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> StateStore:
        return cls(Path(state_dir) / cls.FILENAME, now=now, monotonic=monotonic)

    def close(self) -> None:
        """Write what is pending one last time (a stop is a good moment), then close."""
        with self._lock:
            if self._pending or self._pending_audit:
                self._flush_locked()
            if self._pending or self._pending_audit:
                log.error(
                    "state_db_unsaved_at_exit",
                    path=str(self.path),
                    keys=sorted(self._pending),
                    audit_rows=len(self._pending_audit),
                )
            try:
                # Everything into the database file itself, and the -wal file emptied: a
                # stopped rigd leaves one file to back up or copy, readable read-only.
                self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            except sqlite3.Error as e:
                log.warning("state_db_checkpoint_failed", path=str(self.path), error=str(e))
            self._db.close()

    # -- health and write-behind -------------------------------------------------------

    @property
    def ok(self) -> bool:
        return self._failure is None

    def health(self) -> dict[str, Any]:
        """The `state_db` part of the `state` document."""
        f = self._failure
        return {
            "ok": f is None,
            "error": None if f is None else f[1],
            "error_kind": None if f is None else f[0],
            "since": None if f is None else f[2],
            "unsaved": len(self._pending) + len(self._pending_audit),
            "audit_dropped": self._dropped_audit,
        }

    def flush(self) -> bool:
        """Try now to write whatever is pending; True when nothing is left."""
        with self._lock:
            self._flush_locked()
            return not self._pending and not self._pending_audit

    def _rollback(self) -> None:
        # SQLite may have rolled the transaction back itself (disk full, I/O error).
        if self._db.in_transaction:
            self._db.execute("ROLLBACK")

    def _failed(self, e: BaseException, what: str) -> StoreError:
        """Record a failure (logged when it begins) and return it as a StoreError."""
        kind = error_kind(e)
        msg = f"cannot write {what} to {self.path}: {e}"
        if self._failure is None:
            self._failure = (kind, msg, self.now())
            self._failing_since = self.monotonic()
            log.error(
                "state_db_write_failed",
                path=str(self.path),
                error=str(e),
                kind=kind,
                unsaved=len(self._pending) + len(self._pending_audit),
                note="control goes on from memory; writes are retried",
            )
        elif self._failure[0] != kind or self._failure[1] != msg:
            self._failure = (kind, msg, self._failure[2])
        return StoreError(msg, kind=kind)

    def _recovered(self, written: int) -> None:
        if self._failure is not None:
            kind = self._failure[0]
            self._failure = None
            log.warning(
                "state_db_recovered",
                path=str(self.path),
                was=kind,
                failing_s=round(self.monotonic() - self._failing_since, 1),
                written=written,
                audit_dropped=self._dropped_audit,
            )

    def _flush_locked(self, *, force: bool = True) -> None:
        """Write every pending key and audit row in one transaction (caller holds the lock).
        While failing, only every RETRY_S unless `force`."""
        if not self._pending and not self._pending_audit:
            return
        now = self.monotonic()
        if not force and self._failure is not None and now - self._last_try < RETRY_S:
            return
        self._last_try = now
        puts = [(k, v) for k, v in self._pending.items() if isinstance(v, str)]
        dels = [(k,) for k, v in self._pending.items() if v is _DELETED]
        rows = list(self._pending_audit)
        try:
            self._db.execute("BEGIN")
            try:
                if puts:
                    self._db.executemany(
                        "INSERT INTO kv (key, value) VALUES (?, ?) "
                        "ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                        puts,
                    )
                if dels:
                    self._db.executemany("DELETE FROM kv WHERE key = ?", dels)
                if rows:
                    self._db.executemany(
                        "INSERT INTO audit (ts, actor, action, rig_id, params, reason, result,"
                        " error, dry_run) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        rows,
                    )
                self._db.execute("COMMIT")
            except BaseException:
                self._rollback()
                raise
        except sqlite3.Error as e:
            self._failed(e, "state")
            return
        self._pending.clear()
        self._pending_audit.clear()
        self._recovered(len(puts) + len(dels) + len(rows))

    # -- key/value ---------------------------------------------------------------------

    def get(self, key: str, default: Any = None) -> Any:
        """The value, as last written (pending writes included)."""
        with self._lock:
            if key in self._pending:
                v = self._pending[key]
                return json.loads(v) if isinstance(v, str) else default
            try:
                row = self._db.execute("SELECT value FROM kv WHERE key = ?", (key,)).fetchone()
                return default if row is None else json.loads(row[0])
            except (sqlite3.Error, ValueError) as e:
                kind = error_kind(e)
                raise StoreError(
                    f"cannot read {key!r} from state database {self.path}: {e} ({kind})", kind=kind
                ) from e

    def put_many(self, items: dict[str, Any]) -> None:
        """Write several keys in one transaction: all or none land. If the disk fails, they
        are kept pending (see the module docstring) and this does not raise. A value that
        JSON cannot hold raises TypeError or ValueError here, and none of `items` is kept."""
        texts = {k: _dumps(k, v) for k, v in items.items()}
        with self._lock:
            self._pending.update(texts)
            self._flush_locked(force=False)

    def put(self, key: str, value: Any) -> None:
        self.put_many({key: value})

    def transact(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run `fn` on the database in one transaction, under the store's lock: the hook
        for modules that keep tables of their own (controller/adapters/history.py)."""
        try:
            with self._lock:
                self._db.execute("BEGIN")
                try:
                    out = fn(self._db)
                    self._db.execute("COMMIT")
                except BaseException:
                    self._rollback()
                    raise
        except sqlite3.Error as e:
            raise StoreError(f"cannot write to {self.path}: {e}", kind=error_kind(e)) from e
        return out

    def delete(self, key: str) -> None:
        with self._lock:
            self._pending[key] = _DELETED
            self._flush_locked(force=False)

    # -- grid messages: replay protection and the outbox of what must be published -----------

    def grid_seen(self, jti: str) -> tuple[str, dict[str, Any]] | None:
        """(digest, ack) of a message already answered, or None."""
        try:
            with self._lock:
                row = self._db.execute(
                    "SELECT digest, ack FROM grid_seen WHERE jti = ?", (jti,)
                ).fetchone()
            return None if row is None else (row[0], json.loads(row[1]))
        except (sqlite3.Error, ValueError) as e:
            raise StoreError(
                f"cannot read grid state from {self.path}: {e}", kind=error_kind(e)
            ) from e

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
        be published queued; so a crash leaves either all of it or none. On failure the
        book is kept pending like any state write, and StoreError is raised."""
        book = None if state is None else _dumps("grid.book", state)
        with self._lock:
            try:
                self._db.execute("BEGIN")
                try:
                    self._db.execute(
                        "INSERT OR REPLACE INTO grid_seen (jti, digest, exp, ack) VALUES (?,?,?,?)",
                        (jti, digest, exp, json.dumps(ack, separators=(",", ":"))),
                    )
                    self._db.execute("DELETE FROM grid_seen WHERE exp < ?", (prune_before,))
                    if book is not None:
                        self._db.execute(
                            "INSERT INTO kv (key, value) VALUES ('grid.book', ?) "
                            "ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                            (book,),
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
                    self._rollback()
                    raise
            except sqlite3.Error as e:
                if book is not None:
                    self._pending["grid.book"] = book
                raise self._failed(e, "grid state") from e
            if book is not None:
                self._pending.pop("grid.book", None)  # an older book must not land after it
        return ids

    def outbox_add(self, topic: str, payload: bytes, correlation: bytes | None = None) -> int:
        with self._lock:
            try:
                cur = self._db.execute(
                    "INSERT INTO grid_outbox (topic, payload, correlation) VALUES (?,?,?)",
                    (topic, payload, correlation),
                )
                return int(cur.lastrowid or 0)
            except sqlite3.Error as e:
                raise self._failed(e, "grid outbox") from e

    def outbox(self) -> list[tuple[int, str, bytes, bytes | None]]:
        try:
            with self._lock:
                rows = self._db.execute(
                    "SELECT id, topic, payload, correlation FROM grid_outbox ORDER BY id"
                ).fetchall()
        except sqlite3.Error as e:
            raise StoreError(
                f"cannot read grid outbox from {self.path}: {e}", kind=error_kind(e)
            ) from e
        return [
            (int(r[0]), str(r[1]), bytes(r[2]), None if r[3] is None else bytes(r[3])) for r in rows
        ]

    def outbox_done(self, row_id: int) -> None:
        with self._lock:
            try:
                self._db.execute("DELETE FROM grid_outbox WHERE id = ?", (row_id,))
            except sqlite3.Error as e:
                raise self._failed(e, "grid outbox") from e

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
        """Append an entry; its id, or 0 while the disk fails (the entry is then pending,
        and the oldest pending ones beyond MAX_PENDING_AUDIT are dropped and counted)."""
        row = audit_row(ts, actor, action, rig_id, params, reason, result, error, dry_run)
        with self._lock:
            if not self._pending and not self._pending_audit:
                try:
                    cur = self._db.execute(
                        "INSERT INTO audit (ts, actor, action, rig_id, params, reason, result,"
                        " error, dry_run) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        row,
                    )
                    self._recovered(1)
                    return int(cur.lastrowid or 0)
                except sqlite3.Error as e:
                    self._failed(e, "the audit log")
                    self._last_try = self.monotonic()
            if len(self._pending_audit) >= MAX_PENDING_AUDIT:
                self._pending_audit.popleft()
                self._dropped_audit += 1
            self._pending_audit.append(row)
            self._flush_locked(force=False)
            return 0

    def audit_many(self, rows: list[AuditRow]) -> None:
        """Append many entries (`audit_row`s) in one transaction: a burst's worth of
        commands booked one insert at a time would hold the event loop for a second."""
        if not rows:
            return
        with self._lock:
            self._dropped_audit += max(0, len(rows) - MAX_PENDING_AUDIT)  # as `audit` would
            for row in rows[-MAX_PENDING_AUDIT:]:
                if len(self._pending_audit) >= MAX_PENDING_AUDIT:
                    self._pending_audit.popleft()
                    self._dropped_audit += 1
                self._pending_audit.append(row)
            self._flush_locked(force=self._failure is None)

    _COLUMNS = "id, ts, actor, action, rig_id, params, reason, result, error, dry_run"

    def _entries(self, where: str, args: tuple[Any, ...]) -> list[AuditEntry]:
        try:
            with self._lock:
                rows = self._db.execute(
                    f"SELECT {self._COLUMNS} FROM audit {where}", args
                ).fetchall()
            return [
                AuditEntry(
                    r[0], r[1], r[2], r[3], r[4], json.loads(r[5]), r[6], r[7], r[8], bool(r[9])
                )
                for r in rows
            ]
        except (sqlite3.Error, ValueError) as e:
            raise StoreError(
                f"cannot read the audit log from {self.path}: {e}", kind=error_kind(e)
            ) from e

    def audit_since(self, since: float, *, limit: int = 10_000) -> list[AuditEntry]:
        return self._entries("WHERE ts >= ? ORDER BY id LIMIT ?", (since, limit))

    def audit_for_rig(self, rig_id: str, *, limit: int = 20) -> list[AuditEntry]:
        """The rig's most recent entries, oldest first."""
        newest = self._entries("WHERE rig_id = ? ORDER BY id DESC LIMIT ?", (rig_id, limit))
        return newest[::-1]


def backup(db: Path, out: Path) -> int:
    """Copy the state database `db` to `out` with SQLite's online backup: a consistent
    copy even while rigd runs and writes (what the -wal file holds is included), checked,
    as one self-contained file (no -wal). Returns its size in bytes.

    `out` is written next to itself and renamed into place, so a failed backup never
    leaves a half-written file under the name of a good one."""
    if not db.is_file():
        raise StoreError(f"no state database at {db}", kind="unavailable")
    tmp = out.with_name(f".{out.name}.partial")
    try:
        src = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
        try:
            tmp.unlink(missing_ok=True)
            dst = sqlite3.connect(tmp)
            try:
                src.backup(dst)
                dst.execute("PRAGMA journal_mode=DELETE")
                (check,) = dst.execute("PRAGMA integrity_check").fetchone()
                if check != "ok":
                    raise StoreError(f"the copy of {db} fails its check: {check}", kind="corrupt")
            finally:
                dst.close()
        finally:
            src.close()
        tmp.chmod(0o600)  # who slept which rig, and who asked: as private as the original
        tmp.replace(out)
    except (OSError, sqlite3.Error) as e:
        tmp.unlink(missing_ok=True)
        raise StoreError(f"cannot back up {db} to {out}: {e}", kind=error_kind(e)) from e
    except StoreError:
        tmp.unlink(missing_ok=True)
        raise
    return out.stat().st_size
