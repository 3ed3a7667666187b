"""The local admin API: what `rigctl` talks to, on a Unix socket.

Technicians never edit files behind the daemon's back; they ask the daemon, which
applies the same checks as the control loop and records who asked (the Unix user
from the socket's peer credentials, which cannot be forged by the client) and why.

Wire format: one JSON object per line each way.
Request  {"cmd": "rigs", ...arguments}
Response {"ok": true, "result": ...} or {"ok": false, "error": {"code": "...", "message": "..."}}
"""

from __future__ import annotations

import asyncio
import contextlib
import grp
import json
import math
import os
import pwd
import socket
import struct
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from controller.config import ConfigError
from controller.core.caps import effective_cap
from controller.core.planner import ActionKind
from controller.core.status import Hold, attainment_fields
from controller.errors import ManualRefused, RigdError

if TYPE_CHECKING:
    from controller.adapters.ports import AdminView, ControlPort

log = structlog.get_logger(__name__)

MAX_REQUEST = 64 * 1024
SOCKET_PATH_MAX = 107  # sun_path is 108 bytes with the terminating NUL


RIG_ACTIONS = frozenset({"sleep", "wake", "set_power", "outlet_off", "outlet_on"})
RIGD_ACTORS = frozenset({"planner", "rigd"})  # rigd's own decisions


def is_event(entry: dict[str, Any]) -> bool:
    """An audit row `rigctl events` shows: a command to a rig or a grid happening."""
    action = str(entry.get("action"))
    return action in RIG_ACTIONS or action.startswith(("grid_", "failsafe_"))


def is_request(entry: dict[str, Any]) -> bool:
    """An audit row `rigctl audit` shows: asked for by someone other than rigd itself."""
    return str(entry.get("actor")) not in RIGD_ACTORS


class AdminError(RigdError):
    """A request refused, with the code `rigctl` maps to its message and exit status."""

    def __init__(self, code: str, message: str) -> None:
        self.code, self.message = code, message
        super().__init__(message)


def peer_user(sock: socket.socket) -> tuple[int, str]:
    """(uid, user name) of the process at the other end of a Unix socket."""
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    try:
        name = pwd.getpwuid(uid).pw_name
    except KeyError:
        name = f"uid{uid}"
    return uid, name


def _arg(req: dict[str, Any], key: str, kind: type, *, required: bool = True) -> Any:
    v = req.get(key)
    if v is None:
        if required:
            raise AdminError("bad_request", f"missing {key!r}")
        return None
    if kind is float and isinstance(v, int) and not isinstance(v, bool):
        v = float(v) if abs(v) < 1e300 else math.inf
    if not isinstance(v, kind) or (isinstance(v, bool) and kind is not bool):
        raise AdminError("bad_request", f"{key!r} must be {kind.__name__}")
    if isinstance(v, float) and not math.isfinite(v):  # JSON's NaN would become a NaN cap
        raise AdminError("bad_request", f"{key!r} must be a finite number")
    return v


class AdminServer:
    def __init__(self, daemon: AdminView, path: Path, group: str | None = None) -> None:
        if len(os.fsencode(path)) > SOCKET_PATH_MAX:
            raise ValueError(f"admin socket path is too long for a Unix socket: {path}")
        self.daemon = daemon
        self.path = path
        self.group = group
        self._server: asyncio.Server | None = None
        self._made: tuple[int, int] | None = None  # (st_dev, st_ino) of the socket we made
        self._handlers: dict[str, Callable[[dict[str, Any], str], Awaitable[Any]]] = {
            "status": self._status,
            "rigs": self._rigs,
            "rig": self._rig,
            "sleep": self._manual,
            "wake": self._manual,
            "limit": self._manual,
            "maintenance": self._maintenance,
            "budget": self._budget,
            "budget_override": self._budget_override,
            "budget_clear": self._budget_clear,
            "events": self._events,
            "audit": self._audit,
            "reload": self._reload,
            "grid": self._grid,
        }

    async def start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()  # a stale socket from a crash
        # Created private, then opened to the group: no window where anyone may connect.
        old = os.umask(0o177)
        try:
            self._server = await asyncio.start_unix_server(
                self._handle, path=str(self.path), limit=MAX_REQUEST
            )
        finally:
            os.umask(old)
        st = self.path.stat()
        self._made = (st.st_dev, st.st_ino)
        if self.group:
            try:
                gid = grp.getgrnam(self.group).gr_gid
                # Already ours when the group is the daemon's own: no chown, which the unit's
                # system call filter (~@privileged) refuses.
                if self.path.stat().st_gid != gid:
                    os.chown(self.path, -1, gid)
                os.chmod(self.path, 0o660)
            except (KeyError, OSError) as e:
                log.error("admin_socket_group", group=self.group, error=str(e))
        log.info("admin_listening", socket=str(self.path), group=self.group)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await self._server.wait_closed()
            self._server = None
        # Only the socket this server made: not one another rigd made at the same path.
        made, self._made = self._made, None
        with contextlib.suppress(FileNotFoundError):
            st = self.path.stat()
            if made == (st.st_dev, st.st_ino):
                self.path.unlink()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sock = writer.get_extra_info("socket")
        try:
            _uid, user = peer_user(sock)
        except OSError:
            user = "unknown"
        try:
            while True:
                try:
                    line = await reader.readline()
                except (ValueError, asyncio.LimitOverrunError):
                    await self._reply(writer, self._error("bad_request", "request too large"))
                    return
                if not line:
                    return
                await self._reply(writer, await self.dispatch(line, user))
        except (ConnectionError, asyncio.IncompleteReadError):
            return
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _reply(self, writer: asyncio.StreamWriter, doc: dict[str, Any]) -> None:
        writer.write(json.dumps(doc, separators=(",", ":"), default=str).encode() + b"\n")
        await writer.drain()

    @staticmethod
    def _error(code: str, message: str) -> dict[str, Any]:
        return {"ok": False, "error": {"code": code, "message": message}}

    async def dispatch(self, line: bytes, user: str) -> dict[str, Any]:
        try:
            req = json.loads(line)
        except (ValueError, RecursionError):  # not JSON, not UTF-8, nested past the decoder
            return self._error("bad_request", "request is not JSON")
        try:
            if not isinstance(req, dict) or not isinstance(req.get("cmd"), str):
                raise AdminError("bad_request", 'a request is a JSON object with a "cmd"')
            handler = self._handlers.get(req["cmd"])
            if handler is None:
                raise AdminError("unknown_command", f"unknown command {req['cmd']!r}")
            return {"ok": True, "result": await handler(req, user)}
        except AdminError as e:
            return self._error(e.code, e.message)
        except ManualRefused as e:
            return self._error("refused", str(e))
        except Exception as e:  # never let a request take the daemon down
            log.exception("admin_request_failed", user=user)
            return self._error("internal", f"{type(e).__name__}: {e}")

    # -- helpers -----------------------------------------------------------------------

    def _controller(self) -> ControlPort:
        ctl = self.daemon.controller
        if ctl is None:
            raise AdminError(
                "no_control",
                "control is off in this config: rigd only monitors. To turn it on, add a "
                "[control] section with max_import_kw (README: Control settings) and run "
                "`rigctl config reload`; `rigd sim --max-import-kw KW` writes one for a "
                "simulated farm",
            )
        return ctl

    def _now(self) -> float:
        return self.daemon.clock.now()

    def _rig_ids(self, req: dict[str, Any]) -> list[str]:
        ids = req.get("ids") or []
        group = req.get("group")
        if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
            raise AdminError("bad_request", "'ids' must be a list of rig ids")
        known = self.daemon.state.rig_info
        if group is not None:
            members = [r.id for r in known.values() if r.group == group]
            if not members:
                raise AdminError("unknown_group", f"no rigs in group {group!r}")
            ids = [*ids, *members]
        if not ids:
            raise AdminError("bad_request", "name rigs (IDs) or --group")
        unknown = [i for i in ids if i not in known]
        if unknown:
            raise AdminError("unknown_rig", f"unknown rig(s): {', '.join(unknown)}")
        return list(dict.fromkeys(ids))

    # -- reads ---------------------------------------------------------------------------

    async def _status(self, req: dict[str, Any], user: str) -> Any:
        last = self.daemon.last
        if last is None:
            raise AdminError("not_ready", "rigd has not completed its first poll yet")
        ctl = self.daemon.controller
        doc = dict(last.document)
        doc["override"] = ctl.override.as_dict() if ctl and ctl.override else None
        doc["grid_orders"] = (
            []
            if ctl is None
            else [{"name": k, "kw": v.kw, "detail": v.detail} for k, v in ctl.external.items()]
        )
        snap = last.snapshot
        doc["devices"] = {
            "meters": {k: v.health.as_dict() for k, v in snap.meters.items()},
            "pdus": {k: v.health.as_dict() for k, v in snap.pdus.items()},
        }
        doc["mqtt_connected"] = self.daemon.link.connected.is_set()
        return doc

    def _rig_docs(self) -> dict[str, dict[str, Any]]:
        last = self.daemon.last
        if last is None:
            raise AdminError("not_ready", "rigd has not completed its first poll yet")
        ctl = self.daemon.controller
        out = {}
        for rid, view in last.snapshot.rigs.items():
            d = view.as_dict()
            if ctl is not None:
                mm = ctl.memory.get(rid)
                d["control"] = {
                    "mode": mm.mode.value if mm else "run",
                    "target_w": mm.target_w if mm else None,
                    "maintenance": ctl.maintenance[rid].as_dict()
                    if rid in ctl.maintenance
                    else None,
                    "pinned": ctl.pinned[rid].as_dict() if rid in ctl.pinned else None,
                }
            out[rid] = d
        return out

    async def _rigs(self, req: dict[str, Any], user: str) -> Any:
        return list(self._rig_docs().values())

    async def _rig(self, req: dict[str, Any], user: str) -> Any:
        rid = _arg(req, "id", str)
        docs = self._rig_docs()
        if rid not in docs:
            raise AdminError("unknown_rig", f"unknown rig {rid!r}")
        d = docs[rid]
        d["history"] = [{"ts": ts, "state": st} for ts, st in self.daemon.state.history[rid]]
        store = self.daemon.store
        d["actions"] = (
            [e.as_dict() for e in store.audit_for_rig(rid, limit=20)] if store is not None else []
        )
        return d

    async def _grid(self, req: dict[str, Any], user: str) -> Any:
        grid = self.daemon.grid
        if grid is None:
            raise AdminError(
                "no_grid",
                "grid orders are not enabled in this config: add a [grid] section with the "
                "operator's key (docs/grid-protocol.md) and restart rigd; `rigd sim "
                "--max-import-kw KW --grid-key PUB` writes one for a simulated farm",
            )
        return {"summary": grid.summary(), "orders": grid.orders()}

    def _entries(self, req: dict[str, Any]) -> list[dict[str, Any]]:
        since = _arg(req, "since", float, required=False)
        store = self.daemon.store
        if store is None:
            return []
        ts = since if since is not None else self._now() - 3600
        return [e.as_dict() for e in store.audit_since(ts)]

    async def _events(self, req: dict[str, Any], user: str) -> Any:
        """What happened on the farm: every command to a rig (whoever asked), grid orders
        and their lifecycle, the heartbeat failsafe."""
        return [e for e in self._entries(req) if is_event(e)]

    async def _audit(self, req: dict[str, Any], user: str) -> Any:
        """Who asked for what: every change made by a person (rigctl), Home Assistant or
        the grid operator, with its parameters and reason; not rigd's own decisions."""
        return [e for e in self._entries(req) if is_request(e)]

    async def _budget(self, req: dict[str, Any], user: str) -> Any:
        ctl = self._controller()
        last = self.daemon.last
        doc = last.document if last else {}
        # Computed now, from the limits in force now: a technician who just set an override
        # sees it, not the cap of the last cycle.
        cap = effective_cap(ctl.limits(self._now()))
        return {
            "cap_kw": cap.kw,
            "cap_source": cap.source,
            "cap_detail": cap.detail,
            "limits": [
                {"source": lim.source, "kw": lim.kw, "detail": lim.detail} for lim in cap.limits
            ],
            "budget": doc.get("budget"),
            "override": ctl.override.as_dict() if ctl.override else None,
            "hashrate": attainment_fields(ctl.attainment) or None,
        }

    # -- changes -------------------------------------------------------------------------

    async def _manual(self, req: dict[str, Any], user: str) -> Any:
        ctl = self._controller()
        kind = {"sleep": ActionKind.SLEEP, "wake": ActionKind.WAKE, "limit": ActionKind.SET_POWER}[
            req["cmd"]
        ]
        watts = _arg(req, "watts", float) if kind is ActionKind.SET_POWER else None
        reason = _arg(req, "reason", str)
        ids = self._rig_ids(req)
        results = await ctl.manual(kind, ids, watts, reason, f"user:{user}")
        return [
            {"rig": r.action.rig_id, "ok": r.ok, "error": r.error, "attempts": r.attempts}
            for r in results
        ]

    async def _maintenance(self, req: dict[str, Any], user: str) -> Any:
        ctl = self._controller()
        on = _arg(req, "on", bool)
        reason = _arg(req, "reason", str)
        if not reason.strip():
            raise AdminError("bad_request", "a reason is required (--reason)")
        for_s = _arg(req, "for_s", float, required=False)
        if for_s is not None and for_s <= 0:
            raise AdminError("bad_request", "--for must be a positive duration")
        ids = self._rig_ids(req)
        actor = f"user:{user}"
        expires = None if for_s is None else self._now() + for_s
        for rid in ids:
            ctl.set_maintenance(rid, Hold(reason, actor, expires) if on else None)
            ctl.audit_change(
                "maintenance_on" if on else "maintenance_off",
                rid,
                {"expires_at": expires},
                reason,
                actor,
            )
        return {"rigs": ids, "maintenance": on, "expires_at": expires}

    async def _budget_override(self, req: dict[str, Any], user: str) -> Any:
        ctl = self._controller()
        kw = _arg(req, "kw", float)
        for_s = _arg(req, "for_s", float)
        reason = _arg(req, "reason", str)
        if kw < 0:
            raise AdminError("bad_request", "the override cap cannot be negative")
        if for_s <= 0:
            raise AdminError("bad_request", "--for must be a positive duration")
        if not reason.strip():
            raise AdminError("bad_request", "a reason is required (--reason)")
        actor = f"user:{user}"
        ov = ctl.set_override(kw, self._now() + for_s, reason, actor)
        ctl.audit_change(
            "budget_override", None, {"kw": kw, "expires_at": ov.expires_at}, reason, actor
        )
        return ov.as_dict()

    async def _reload(self, req: dict[str, Any], user: str) -> Any:
        try:
            notes = await self.daemon.reload()
        except ConfigError as e:
            lines = "\n".join(f"  {i}" for i in e.issues)
            raise AdminError(
                "invalid_config", f"config not reloaded, the old one stays in force:\n{lines}"
            ) from e
        ctl = self.daemon.controller
        if ctl is not None:
            ctl.audit_change(
                "config_reload", None, {"notes": notes}, "config reload", f"user:{user}"
            )
        return {"reloaded": True, "rigs": len(self.daemon.devices.miners), "notes": notes}

    async def _budget_clear(self, req: dict[str, Any], user: str) -> Any:
        ctl = self._controller()
        was = ctl.override
        ctl.clear_override()
        reason = req.get("reason") if isinstance(req.get("reason"), str) else "cleared"
        ctl.audit_change("budget_clear", None, {}, reason or "cleared", f"user:{user}")
        return {"cleared": was.as_dict() if was else None}
