"""The state directory: one rigd at a time, and files only rigd's user can read.

Two daemons on one state directory would each control the farm: the same MQTT client id
(the broker knocks one off whenever the other connects), each grid order completed and
reported twice, a rig woken by one that the other slept, and the admin socket of the
first deleted by the second when it stops. So `rigd run` takes an exclusive advisory lock
(`flock`) on `rigd.lock` in the state directory before it opens the state database, the
admin socket or the broker connection, and a second one is refused there, having touched
nothing. The kernel drops the lock when the process ends, however it ends (SIGKILL too),
so a crashed rigd never blocks the next start; the file itself stays (removing it would
let two processes lock two different files of that name).

The state database holds the audit log and the grid orders: a daemon started by hand
under a permissive umask must not leave it world-readable, so the state files are created
0600, whatever the umask (SQLite gives its -wal and -shm files the database's mode).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat
from pathlib import Path
from typing import Final

import structlog

log = structlog.get_logger(__name__)

LOCK_NAME: Final = "rigd.lock"
PRIVATE: Final = 0o600


class AlreadyRunning(Exception):
    """Another process (another rigd) holds the state directory's lock."""

    def __init__(self, state_dir: Path, pid: int | None) -> None:
        self.state_dir = state_dir
        self.pid = pid
        who = f"pid {pid}" if pid is not None else "another process"
        super().__init__(
            f"another rigd ({who}) is already running on state directory {state_dir}; "
            "stop it first (`systemctl stop rigd`, or the rigd started by hand)"
        )


def private_file(path: Path) -> int:
    """Open `path` read-write, creating it with mode 0600 whatever the umask, and return the
    descriptor. An existing file of ours loses any group and other permissions."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, PRIVATE)
    except FileExistsError:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        try:
            tighten(fd, path)
        except BaseException:
            os.close(fd)
            raise
    else:
        os.fchmod(fd, PRIVATE)  # the umask may have taken the owner's write bit too
    return fd


def tighten(fd: int, path: Path) -> None:
    """Take group and other permissions off an open regular file that we own (a daemon
    once started by hand under umask 022 left its database 0644); never add any."""
    st = os.fstat(fd)
    mode = stat.S_IMODE(st.st_mode)
    if stat.S_ISREG(st.st_mode) and mode & 0o077 and st.st_uid == os.geteuid():
        os.fchmod(fd, mode & 0o700)
        log.warning("state_file_mode_tightened", path=str(path), was=oct(mode))


def create_private(path: Path) -> None:
    """Make sure the SQLite database `path` exists as a 0600 file before SQLite creates it
    with the umask's mode (its -wal and -shm files then get the same), and tighten the
    three files if they are there already. Failures are left to SQLite's own open, which
    reports them in its terms."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, PRIVATE)
    except OSError:
        pass  # there already (tightened below), or SQLite will say why not
    else:
        try:
            os.fchmod(fd, PRIVATE)
        except OSError:
            pass
        finally:
            os.close(fd)
    for p in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
        try:
            fd = os.open(p, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        except OSError:
            continue
        try:
            tighten(fd, p)
        except OSError:
            pass
        finally:
            os.close(fd)


class InstanceLock:
    """The state directory's lock, held until `release` or the end of the process."""

    def __init__(self, fd: int, path: Path) -> None:
        self._fd: int | None = fd
        self.path = path

    @classmethod
    def acquire(cls, state_dir: Path) -> InstanceLock:
        """Lock `state_dir` for this process. Raises AlreadyRunning if another holds it,
        StoreError if the directory or the lock file cannot be made or opened."""
        from controller.adapters.store import StoreError, error_kind  # store.py imports this module

        path = Path(state_dir) / LOCK_NAME
        try:
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            fd = private_file(path)
        except OSError as e:
            kind = error_kind(e)
            raise StoreError(f"cannot lock state directory {state_dir}: {e}", kind=kind) from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            pid = _read_pid(fd)
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise AlreadyRunning(Path(state_dir), pid) from e
            raise StoreError(f"cannot lock {path}: {e}", kind=error_kind(e)) from e
        # Who holds it, for the refusal of the next one; the lock, not this, is what counts.
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        return cls(fd, path)

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
        return int(text) if text.isdigit() else None
    except OSError:
        return None
