"""`rigctl`: the technician's command line on the edge host.

It talks to the running daemon over the local admin API (a Unix socket whose path
comes from the same config file as the daemon), never by editing files behind its
back. Every read command takes `--json` for scripts.

Exit codes: 0 done; 1 the daemon refused or the request failed (the message says
why); 2 the daemon cannot be reached (not running, or no permission on its socket),
or bad usage.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import re
import socket
import sys
import time
import tomllib
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from controller.cli import grid as grid_cli
from controller.cli.common import (
    cmd_check_config,
    credentials_arg,
    default_config_path,
    missing_config,
    print_config_error,
    version_arg,
)
from controller.config import AdminConfig, ConfigError, load_config
from controller.config.credentials import Credentials
from controller.errors import RigdError

EXIT_REFUSED = 1
EXIT_UNREACHABLE = 2

_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*([smhd])")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> float:
    """Seconds in "90s", "30m", "2h", "1d" or "1h30m"."""
    t = text.strip().lower()
    parts = _DURATION.findall(t)
    if not parts or _DURATION.sub("", t).strip():
        raise argparse.ArgumentTypeError(
            f"bad duration {text!r}: use e.g. 90s, 30m, 2h, 1d or 1h30m"
        )
    total = sum(float(n) * _UNIT_S[u] for n, u in parts)
    if total <= 0:
        raise argparse.ArgumentTypeError(f"duration must be positive, got {text!r}")
    return total


class Unreachable(RigdError):
    """The daemon's admin socket cannot be reached or read; the message names the path."""


class Refused(RigdError):
    """The daemon refused the request; `code` is its reason (docs: rigctl exit codes)."""

    def __init__(self, code: str, message: str) -> None:
        self.code = code
        super().__init__(message)


class AdminClient:
    def __init__(self, path: Path, timeout: float = 60.0) -> None:
        self.path = path
        self.timeout = timeout

    def call(self, cmd: str, **args: Any) -> Any:
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.settimeout(self.timeout)
                s.connect(str(self.path))
                s.sendall(json.dumps({"cmd": cmd, **args}).encode() + b"\n")
                buf = b""
                while not buf.endswith(b"\n"):
                    chunk = s.recv(1 << 16)
                    if not chunk:
                        break
                    buf += chunk
        except (FileNotFoundError, ConnectionRefusedError) as e:
            raise Unreachable(
                f"rigd is not running (no admin socket at {self.path}); "
                "check `systemctl status rigd`"
            ) from e
        except PermissionError as e:
            raise Unreachable(
                f"permission denied on {self.path}: you need to be in the group the daemon's "
                "[admin] group names (or run as the rigd user)"
            ) from e
        except (TimeoutError, OSError) as e:
            raise Unreachable(f"cannot talk to rigd at {self.path}: {e}") from e
        try:
            reply = json.loads(buf)
        except json.JSONDecodeError as e:
            raise Unreachable(f"rigd sent an unreadable reply on {self.path}") from e
        if not reply.get("ok"):
            err = reply.get("error") or {}
            raise Refused(str(err.get("code", "error")), str(err.get("message", "refused")))
        return reply.get("result")


# -- rendering --------------------------------------------------------------------------------


def _fmt(v: Any, nd: int = 1, unit: str = "") -> str:
    if v is None:
        return "-"
    if isinstance(v, float | int):
        return f"{v:,.{nd}f}{unit}"
    return str(v)


def _when(ts: float | None) -> str:
    if ts is None:
        return "-"
    return dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y-%m-%d %H:%M:%S")


def _span(seconds: float) -> str:
    """A countdown for people: 45s, 4m10s, 2h05m."""
    s = max(0, round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


_HELD_WHY = {
    "maintenance": "in maintenance",
    "pinned": "pinned by a technician",
    "unreachable": "unreachable (counted at their last power)",
    "command_in_flight": "with a command in flight",
    "command_failed": "whose last command failed (retried later)",
    "no_means": "with neither API sleep nor a switchable outlet",
}


def cannot_shed_line(ctl: dict[str, Any], ts: float) -> str | None:
    """The `cannot shed enough` episode, for people (None when there is none)."""
    cs = ctl.get("cannot_shed")
    if not cs:
        return None
    held = cs.get("held") or {}
    parts = [f"{n} rig(s) {_HELD_WHY.get(why, why)}" for why, n in held.items()]
    why = "still drawing: " + ", ".join(parts) if parts else "every rig control may command is down"
    nonrig = cs.get("nonrig_kw")
    load = "" if nonrig is None else f"; load other than rigs {nonrig:,.1f} kW"
    return (
        f"CANNOT SHED ENOUGH for {_span(ts - cs['since'])}: import stays {cs['over_kw']:,.1f} kW "
        f"over the {_fmt(ctl.get('target_kw'), 1, ' kW')} target; {why}{load}"
    )


def _order_line(o: dict[str, Any]) -> str:
    cap = "-" if o.get("cap_kw") is None else f"{o['cap_kw']:,.1f} kW"
    comp = {True: "compliant", False: "NOT compliant", None: "compliance not yet known"}[
        o.get("compliant")
    ]
    end = "open-ended" if o.get("end") is None else f"until {_when(o['end'])}"
    return (
        f"{o['order_id']} ({o.get('status')}, mod {o.get('modification', 0)}): cap {cap}, "
        f"from {_when(o.get('start'))} {end}, respond by {_when(o.get('deadline'))} UTC; {comp}"
    )


def print_status(doc: dict[str, Any], out: Console) -> None:
    out.print(f"[bold]site {doc['site']}[/bold]  at {_when(doc['ts'])} UTC (cycle {doc['cycle']})")
    cap = doc.get("cap_kw")
    imp = doc.get("import_kw")
    if cap is None:
        out.print(f"import {_fmt(imp, 1, ' kW')}  (control off: monitoring only)")
    else:
        out.print(
            f"import {_fmt(imp, 1, ' kW')}  vs cap {_fmt(cap, 1, ' kW')}  "
            f"set by {doc.get('cap_source')}: {doc.get('cap_detail', '')}"
        )
    if not doc.get("meter_ok"):
        out.print("[red]the import meter is not answering: import is estimated[/red]")
    db = doc.get("state_db")
    if db and not db.get("ok"):
        out.print(
            f"[red]state database failing ({db.get('error_kind')}) since {_when(db['since'])} UTC: "
            f"{db.get('unsaved')} write(s) wait in memory; {db.get('error')}[/red]"
        )
    ov = doc.get("override")
    if ov:
        out.print(
            f"override {ov['kw']:,.1f} kW by {ov['actor']} until {_when(ov['expires_at'])} UTC: "
            f"{ov['reason']}"
        )
    b = doc.get("budget")
    if b:
        out.print(
            f"budget {b['used_kwh']:,.0f} of {b['budget_kwh']:,.0f} kWh used this {b['period']}, "
            f"{b['remaining_kwh']:,.0f} kWh left (until {_when(b['period_end'])} UTC)"
        )
    grid = doc.get("grid")
    if grid is not None:
        active, pending = grid.get("active") or [], grid.get("pending") or []
        out.print(
            f"grid orders: {len(active)} active, {len(pending)} pending"
            + ("; HEARTBEAT FAILSAFE in force" if grid.get("failsafe") else "")
            + "".join(f"\n  {_order_line(o)}" for o in [*active, *pending])
        )
    oa = doc.get("openadr")
    if oa:  # the OpenADR VEN's health (controller/runtime/openadr_service.py)
        bad = oa.get("status") != "ok"
        out.print(
            ("[red]" if bad else "")
            + f"OpenADR VTN {oa.get('vtn')}: {oa.get('status')}, MQTT {oa.get('mqtt')}, "
            f"{len(oa.get('events') or [])} event(s), {oa.get('reports_waiting', 0)} report(s) "
            f"waiting" + (f"; {oa.get('error')}[/red]" if bad else "")
        )
    rigs = doc["rigs"]
    out.print(
        "rigs: " + ", ".join(f"{k} {v}" for k, v in rigs.items()) + f" (of {doc['rigs_total']})"
    )
    out.print(
        f"hashrate {doc['hashrate_ths'] / 1000:,.2f} PH/s, rig power {doc['rig_power_kw']:,.1f} kW"
    )
    ctl = doc.get("control")
    if ctl:
        out.print(
            f"control: {ctl.get('mode')}, target {_fmt(ctl.get('target_kw'), 1, ' kW')} "
            f"({ctl.get('basis')}), {ctl.get('inflight_actions', 0)} action(s) in flight, "
            f"{ctl.get('maintenance', 0)} in maintenance, {ctl.get('pinned', 0)} pinned"
        )
        short = cannot_shed_line(ctl, doc["ts"])
        if short:
            out.print(f"[bold red]{short}[/bold red]")
        elif ctl.get("note"):
            out.print(f"  {ctl['note']}")
        wait = ctl.get("min_off_wait")
        if wait:
            out.print(
                f"{wait['rigs']} rig(s) rigd slept stay asleep for min_off_s "
                f"({wait['min_off_s']:g} s) although there is room: the next may wake in "
                f"{_span(wait['next_in_s'])}, all in {_span(wait['all_in_s'])}"
            )
    un = doc["unreachable"]
    devs = doc.get("devices", {})
    bad = [
        f"{kind[:-1]} {k}: {h.get('last_error')}"
        for kind in ("meters", "pdus")
        for k, h in devs.get(kind, {}).items()
        if h.get("reachable") is False
    ]
    out.print(
        f"health: unreachable miners {un['miners']}, PDUs {un['pdus']}, meters {un['meters']}; "
        f"MQTT {'connected' if doc.get('mqtt_connected') else 'DISCONNECTED'}"
        + "".join(f"\n  {b}" for b in bad)
    )


def _make(r: dict[str, Any]) -> str:
    t = r.get("telemetry") or {}
    return str(t.get("make") or "")


def filter_rigs(rigs: list[dict[str, Any]], args: argparse.Namespace) -> list[dict[str, Any]]:
    out = rigs
    if args.state:
        out = [r for r in out if r["state"] == args.state]
    if args.group:
        out = [r for r in out if r.get("group") == args.group]
    if args.make:
        out = [r for r in out if _make(r).lower() == args.make.lower()]
    key = {
        "efficiency": lambda r: (r.get("telemetry") or {}).get("efficiency_j_th") or 1e9,
        "power": lambda r: -(r.get("power_w") or 0.0),
        "temp": lambda r: -((r.get("telemetry") or {}).get("temp_c") or -1e9),
    }.get(args.sort or "", lambda r: r["id"])
    return sorted(out, key=key)


def print_rigs(rigs: list[dict[str, Any]], out: Console) -> None:
    t = Table(box=None, header_style="bold")
    for col, just in (
        ("rig", "left"),
        ("state", "left"),
        ("model", "left"),
        ("TH/s", "right"),
        ("W", "right"),
        ("J/TH", "right"),
        ("°C", "right"),
        ("group", "left"),
        ("control", "left"),
        ("last error", "left"),
    ):
        t.add_column(col, justify=just)  # type: ignore[arg-type]
    for r in rigs:
        tel = r.get("telemetry") or {}
        ctl = r.get("control") or {}
        held = "maintenance" if ctl.get("maintenance") else ("pinned" if ctl.get("pinned") else "")
        t.add_row(
            r["id"],
            r["state"],
            str(tel.get("model") or "-"),
            _fmt(r.get("hashrate_ths")),
            _fmt(r.get("power_w"), 0),
            _fmt(tel.get("efficiency_j_th")),
            _fmt(tel.get("temp_c"), 0),
            r.get("group") or "-",
            " ".join(x for x in (ctl.get("mode", ""), held) if x),
            (r["health"].get("last_error") or "")[:50],
        )
    out.print(t)
    out.print(f"{len(rigs)} rig(s)")


def print_rig(r: dict[str, Any], out: Console) -> None:
    tel = r.get("telemetry") or {}
    h = r["health"]
    out.print(f"[bold]{r['id']}[/bold]  {r['state']}  {r['host']}:{r['port']} ({r['driver']})")
    out.print(
        f"model {tel.get('model') or '-'}, firmware {tel.get('firmware') or '-'} "
        f"{tel.get('firmware_version') or ''}"
    )
    out.print(
        f"hashrate {_fmt(r.get('hashrate_ths'))} TH/s, power {_fmt(r.get('power_w'), 0)} W, "
        f"limit {_fmt(tel.get('power_limit_w'), 0)} W, {_fmt(tel.get('efficiency_j_th'))} J/TH, "
        f"temp {_fmt(tel.get('temp_c'), 0)} °C (chips {_fmt(tel.get('chip_temp_c'), 0)}), "
        f"fans {', '.join(str(f) for f in tel.get('fans_rpm') or []) or '-'} rpm, "
        f"uptime {_fmt(tel.get('uptime_s'), 0)} s"
    )
    for b in tel.get("hashboards", []):
        out.print(
            f"  board {b['index']}: {_fmt(b['hashrate_ths'])} TH/s, {_fmt(b['temp_c'], 0)} °C, "
            f"chips {_fmt(b.get('chips'), 0)}{'' if b['active'] else ' (inactive)'}"
        )
    o = r.get("outlet")
    if o:
        on = "on" if o["on"] else "off"
        out.print(f"outlet {o['pdu']}/{o['number']}: {on}, {_fmt(o['power_w'], 0)} W")
    out.print(
        f"health: {'reachable' if h['reachable'] else 'UNREACHABLE'}, "
        f"last seen {_when(h['last_seen'])}"
        + (
            f", last error {h['last_error']} at {_when(h['last_error_ts'])}"
            if h["last_error"]
            else ""
        )
    )
    ctl = r.get("control")
    if ctl:
        out.print(
            f"control: {ctl['mode']}" + (f" at {ctl['target_w']:.0f} W" if ctl["target_w"] else "")
        )
        for k in ("maintenance", "pinned"):
            if ctl.get(k):
                hold = ctl[k]
                until = f" until {_when(hold['expires_at'])} UTC" if hold.get("expires_at") else ""
                out.print(f"  {k} by {hold['actor']}{until}: {hold['reason']}")
    out.print("state history:")
    for e in r.get("history", []):
        out.print(f"  {_when(e['ts'])}  {e['state']}")
    out.print("last actions:")
    for a in r.get("actions", []):
        out.print(
            f"  {_when(a['ts'])}  {a['action']} {a['result']} by {a['actor']}: {a['reason']}"
            + (f" ({a['error']})" if a.get("error") else "")
        )


def _params(p: dict[str, Any] | None) -> str:
    """An audit row's parameters, for people: `kw=20 until 2026-01-01 10:00:00`."""
    out = []
    for k, v in (p or {}).items():
        if v is None or k == "watts":
            continue
        if k in ("expires_at", "end", "start", "deadline") and isinstance(v, int | float):
            out.append(f"until {_when(v)}" if k == "expires_at" else f"{k} {_when(v)}")
        elif isinstance(v, list):
            out.append(f"{k}: {'; '.join(str(x) for x in v)}" if v else "")
        else:
            out.append(f"{k}={v}")
    return ", ".join(x for x in out if x)


def print_audit(entries: list[dict[str, Any]], out: Console) -> None:
    """`rigctl audit`: who asked for what, with what, and why."""
    t = Table(box=None, header_style="bold")
    for col in ("time (UTC)", "who", "asked for", "rig", "with", "result", "reason"):
        t.add_column(col)
    for e in entries:
        t.add_row(
            _when(e["ts"]),
            e["actor"],
            e["action"],
            e.get("rig") or "-",
            _params(e.get("params")) or "-",
            e["result"] + (f": {e['error']}" if e.get("error") else ""),
            e["reason"],
        )
    out.print(t)
    out.print(f"{len(entries)} change(s) asked for by people, Home Assistant or the grid")


def print_events(entries: list[dict[str, Any]], out: Console) -> None:
    """`rigctl events`: what happened, one line each, in order."""
    for e in entries:
        what = e["action"]
        watts = (e.get("params") or {}).get("watts")
        if watts is not None:
            what += f" {watts:,.0f} W"
        if e.get("dry_run"):
            what += " (dry run, not sent)"
        result = e["result"] + (f": {e['error']}" if e.get("error") else "")
        who = "" if e["actor"] == "planner" else f" [{e['actor']}]"
        out.print(
            f"{_when(e['ts'])}  {e.get('rig') or 'site':<14} {what:<28} {result:<10} "
            f"{e['reason']}{who}"
        )
    out.print(f"{len(entries)} event(s)")


# -- commands ---------------------------------------------------------------------------------


def _socket_of_broken(path: str) -> Path:
    """The admin socket named by a config that does not validate (a technician mid-edit):
    the daemon still runs on its last good config and should stay reachable."""
    try:
        raw = tomllib.loads(Path(path).read_text(encoding="utf-8"))
        sock = raw.get("admin", {}).get("socket")
        if isinstance(sock, str) and sock:
            return Path(sock)
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError, AttributeError):
        pass
    return AdminConfig().socket


def _client(args: argparse.Namespace) -> AdminClient:
    missing = missing_config(args.config)
    if missing:  # rigctl finds the daemon's socket through the daemon's config
        raise Unreachable(missing)
    try:
        # Only the socket is needed: rigd's credentials are its own, not the technician's.
        cfg = load_config(args.config, credentials=Credentials(None, read=False))
    except ConfigError as e:
        if args.command == "config":  # reload: the daemon would refuse this file anyway
            print_config_error(e, sys.stderr)
            print(
                "rigctl: config not reloaded; the daemon keeps its running config", file=sys.stderr
            )
            raise SystemExit(EXIT_REFUSED) from e
        sock = _socket_of_broken(args.config)
        print(
            f"rigctl: warning: {args.config} has errors (rigd check-config); using {sock}",
            file=sys.stderr,
        )
        return AdminClient(sock)
    return AdminClient(cfg.admin.socket)


def inert(value: Any) -> Any:
    """`value` with every string escaped for Rich: names, errors and reasons come from
    miners, grid operators and VTNs, and a `[/x]` in one of them would otherwise stop the
    printer with a MarkupError (or a `[bold]` silently vanish). Printers keep their own
    markup in their format strings; only the data is made inert."""
    if isinstance(value, str):
        return escape(value)
    if isinstance(value, dict):
        return {inert(k): inert(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [inert(v) for v in value]
    return value


def _emit(args: argparse.Namespace, result: Any, printer: Any) -> None:
    if getattr(args, "json", False):
        print(json.dumps(result, indent=2, default=str))
    else:
        printer(inert(result), Console(highlight=False))


def cmd_scan(args: argparse.Namespace) -> int:
    """Scan from this host (no daemon needed); optionally add what is new to the config."""
    import asyncio

    from rich.progress import Progress

    from controller.adapters.discovery import add_to_config, addresses, scan
    from controller.cli.logs import configure_logging

    configure_logging("warning")  # to stderr: stdout is the result (--json)
    try:
        hosts = addresses(args.cidrs)
    except ValueError as e:
        print(f"rigctl: {e}", file=sys.stderr)
        return EXIT_UNREACHABLE
    console = Console(stderr=True)
    with Progress(console=console, transient=True, disable=args.json) as bar:
        task = bar.add_task(
            f"probing {len(hosts)} address(es) (ports {args.port}, 4433, 80)", total=len(hosts)
        )
        t0 = time.monotonic()
        found = asyncio.run(
            scan(
                hosts,
                port=args.port,
                concurrency=args.concurrency,
                wait_s=args.timeout,
                progress=lambda: bar.advance(task),
            )
        )
    took = time.monotonic() - t0
    if args.json:
        print(json.dumps([f.as_dict() for f in found], indent=2))
    else:
        t = Table(box=None, header_style="bold")
        for col in ("address", "make", "model", "firmware", "version", "driver"):
            t.add_column(col)
        for f in found:
            t.add_row(
                *inert(
                    [
                        f"{f.host}:{f.port}",
                        f.make,
                        f.model,
                        f.firmware,
                        f.firmware_version,
                        f.driver,
                    ]
                )
            )
        out = Console(highlight=False)
        out.print(t)
        out.print(f"{len(found)} miner(s) among {len(hosts)} address(es) in {took:.1f} s")
    if args.add and found:
        try:
            added = add_to_config(Path(args.config), found)
        except ConfigError as e:
            print_config_error(e, sys.stderr)
            print("rigctl: nothing added; fix the config first", file=sys.stderr)
            return EXIT_REFUSED
        except OSError as e:
            print(f"rigctl: cannot update {args.config}: {e}", file=sys.stderr)
            return EXIT_REFUSED
        print(
            f"added {len(added)} miner(s) to {args.config}"
            + (": " + ", ".join(added) if added else "")
        )
        if added:
            print("apply with: rigctl config reload")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    """Draw the site's history; reads the state database itself (read-only), so it works
    whether or not the daemon runs, and on a copy of the file (--db)."""
    from controller.adapters.history import HistoryError, read_last, read_orders, register_before
    from controller.cli.report import FORMATS, ReportError, write_report

    out = Path(args.out)
    if out.suffix.lower() not in FORMATS:
        print(f"rigctl: --out must end in .png or .html, not {out.name!r}", file=sys.stderr)
        return EXIT_UNREACHABLE
    site = "rigd"
    if args.db:
        db = Path(args.db)
    else:
        missing = missing_config(args.config)
        if missing:
            print(f"rigctl: {missing}, or name the state database with --db", file=sys.stderr)
            return EXIT_UNREACHABLE
        try:
            cfg = load_config(args.config)
        except ConfigError as e:
            print_config_error(e, sys.stderr)
            print("rigctl: cannot find the state database; name it with --db", file=sys.stderr)
            return EXIT_UNREACHABLE
        db, site = cfg.site.state_dir / "rigd.sqlite", f"site {cfg.site.id}"
    try:
        rows = read_last(db, args.since)
        before = register_before(db, rows[0].ts) if rows else None
        book = read_orders(db) if rows else []
    except HistoryError as e:
        print(f"rigctl: {e}", file=sys.stderr)
        return EXIT_UNREACHABLE
    if not rows:
        print(f"rigctl: no history in {db} (rigd keeps it while [control] is on)", file=sys.stderr)
        return EXIT_REFUSED
    title = f"rigd {site}: {_when(rows[0].ts)} to {_when(rows[-1].end)} UTC"
    try:
        write_report(rows, out, title, before, book)
    except (ReportError, OSError) as e:
        print(f"rigctl: report not written: {e}", file=sys.stderr)
        return EXIT_REFUSED
    print(f"{out}: {len(rows)} steps, {title.split(': ', 1)[1]}")
    return 0


def run_command(args: argparse.Namespace) -> int:
    c = _client(args)
    cmd = args.command
    if cmd == "status":
        _emit(args, c.call("status"), print_status)
    elif cmd == "rigs":
        rigs = filter_rigs(c.call("rigs"), args)
        _emit(args, rigs, print_rigs)
    elif cmd == "rig":
        _emit(args, c.call("rig", id=args.id), print_rig)
    elif cmd in ("sleep", "wake", "limit"):
        kw: dict[str, Any] = {"ids": args.ids, "group": args.group, "reason": args.reason}
        if cmd == "limit":
            kw["watts"] = args.watts
        results = c.call(cmd, **kw)
        failed = [r for r in results if not r["ok"]]
        for r in results:
            print(f"{r['rig']}: {'ok' if r['ok'] else 'FAILED: ' + str(r['error'])}")
        return EXIT_REFUSED if failed else 0
    elif cmd == "maintenance":
        res = c.call(
            "maintenance",
            on=args.switch == "on",
            ids=args.ids,
            group=args.group,
            reason=args.reason,
            for_s=args.for_s,
        )
        until = f" until {_when(res['expires_at'])} UTC" if res["expires_at"] else ""
        state = "in maintenance" + until if res["maintenance"] else "out of maintenance"
        print(f"{', '.join(res['rigs'])}: {state}")
    elif cmd == "budget":
        return _budget(args, c)
    elif cmd in ("events", "audit"):
        since = time.time() - args.since
        entries = c.call(cmd, since=since)
        _emit(args, entries, print_events if cmd == "events" else print_audit)
    elif cmd == "top":
        return _top(args, c)
    elif cmd == "grid":  # status; keygen and send have their own func
        _emit(args, c.call("grid"), grid_cli.print_grid)
    elif cmd == "config":  # reload; `check` has its own func
        res = c.call("reload")
        print(f"config reloaded: {res['rigs']} rig(s)")
        for note in res["notes"]:
            print(f"  note: {note}")
    return 0


def _budget(args: argparse.Namespace, c: AdminClient) -> int:
    if args.budget_command == "show":

        def show(b: dict[str, Any], out: Console) -> None:
            out.print(
                f"cap {_fmt(b['cap_kw'], 1, ' kW')} set by {b['cap_source']}: {b['cap_detail']}"
            )
            for lim in b["limits"]:
                out.print(f"  {lim['source']:<11} {lim['kw']:>12,.1f} kW  {lim['detail']}")
            bb = b.get("budget")
            if bb:
                out.print(
                    f"energy {bb['used_kwh']:,.0f} of {bb['budget_kwh']:,.0f} kWh this "
                    f"{bb['period']} ({bb['remaining_kwh']:,.0f} left)"
                )
            hr = b.get("hashrate")
            if hr:
                out.print(
                    f"hashrate kept {hr['kept_pct']:.1f} % of attainable under this cap "
                    f"({hr['hashrate_ths']:,.1f} of {hr['attainable_ths']:,.1f} TH/s)"
                )

        _emit(args, c.call("budget"), show)
    elif args.budget_command == "override":
        ov = c.call("budget_override", kw=args.kw, for_s=args.for_s, reason=args.reason)
        print(f"override {ov['kw']:,.1f} kW until {_when(ov['expires_at'])} UTC: {ov['reason']}")
    else:
        res = c.call("budget_clear", reason=args.reason or "cleared")
        print("override cleared" if res["cleared"] else "there was no override")
    return 0


def _top(args: argparse.Namespace, c: AdminClient) -> int:
    """Refresh in place on a terminal, until `q` (or Ctrl-C); elsewhere (a pipe, a log)
    print each frame in turn."""
    import io

    from rich.live import Live
    from rich.text import Text

    console = Console()
    deadline = None if args.duration is None else time.monotonic() + args.duration
    keys = sys.stdin.isatty() and console.is_terminal

    def frame() -> Text:
        status = c.call("status")
        rigs = c.call("rigs")
        hot = sorted(rigs, key=lambda r: -((r.get("telemetry") or {}).get("temp_c") or 0))
        buf = Console(record=True, file=io.StringIO(), width=console.width, highlight=False)
        print_status(inert(status), buf)
        print_rigs(inert(hot[: args.rows]), buf)
        if keys:
            buf.print(f"[dim]q quits · refreshed every {args.interval:g} s[/dim]")
        return Text.from_ansi(buf.export_text(styles=True))

    def running() -> bool:
        return deadline is None or time.monotonic() < deadline

    if not console.is_terminal:
        while running():
            console.print(frame())
            time.sleep(args.interval)
        return 0
    with _keypresses(keys) as pressed, Live(console=console, auto_refresh=False) as live:
        while running():
            live.update(frame(), refresh=True)
            if pressed(args.interval) in ("q", "Q"):
                break
    return 0


@contextlib.contextmanager
def _keypresses(enabled: bool) -> Iterator[Callable[[float], str | None]]:
    """`pressed(timeout)`: a key typed within `timeout` seconds, or None. The terminal is
    put in cbreak mode (keys arrive without Enter, Ctrl-C still works) and restored."""
    if not enabled:

        def wait(timeout: float) -> str | None:
            time.sleep(timeout)
            return None

        yield wait
        return
    import select
    import termios
    import tty

    fd = sys.stdin.fileno()
    saved = termios.tcgetattr(fd)

    def read(timeout: float) -> str | None:
        ready, _, _ = select.select([fd], [], [], timeout)
        return os.read(fd, 1).decode(errors="replace") if ready else None

    try:
        tty.setcbreak(fd)
        yield read
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


# -- parser -----------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="rigctl",
        description="Technician's CLI for rigd: talks to the running daemon over its local "
        "admin socket. Exit 0 done, 1 refused or failed, 2 daemon unreachable or bad usage.",
    )
    p.add_argument(
        "-c",
        "--config",
        default=default_config_path(),
        help="the daemon's config file (default: $RIGD_CONFIG or /etc/rigd/rigd.toml)",
    )
    version_arg(p)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def json_arg(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--json", action="store_true", help="print JSON instead of a table")

    def targets(sp: argparse.ArgumentParser, *, reason_required: bool = True) -> None:
        sp.add_argument("ids", nargs="*", metavar="ID", help="rig ids")
        sp.add_argument("--group", help="every rig of this group")
        sp.add_argument("--reason", required=reason_required, help="why (goes to the audit log)")

    sp = sub.add_parser("status", help="site summary: import vs cap, budget, rigs, health")
    json_arg(sp)
    sp = sub.add_parser("rigs", help="a table of rigs")
    sp.add_argument("--state", choices=("mining", "waking", "sleeping", "off", "unreachable"))
    sp.add_argument("--group")
    sp.add_argument("--make", help="e.g. Antminer")
    sp.add_argument("--sort", choices=("efficiency", "power", "temp"))
    json_arg(sp)
    sp = sub.add_parser("rig", help="one rig in full: telemetry, history, last actions, errors")
    sp.add_argument("id", metavar="ID")
    json_arg(sp)
    sp = sub.add_parser("sleep", help="put rigs to sleep (pins them asleep until `wake`)")
    targets(sp)
    sp = sub.add_parser("wake", help="wake rigs (refused if it would push import over the cap)")
    targets(sp)
    sp = sub.add_parser("limit", help="set a power target in watts (pins it)")
    sp.add_argument("watts", type=float, metavar="WATTS")
    targets(sp)
    sp = sub.add_parser("maintenance", help="exclude rigs from control, or return them")
    sp.add_argument("switch", choices=("on", "off"))
    targets(sp)
    sp.add_argument("--for", dest="for_s", type=parse_duration, help="e.g. 2h; default until off")
    sp = sub.add_parser("budget", help="the cap and energy budget; a temporary override")
    bsub = sp.add_subparsers(dest="budget_command", required=True, metavar="ACTION")
    show = bsub.add_parser("show", help="every limit in force and the energy budget")
    json_arg(show)
    ov = bsub.add_parser("override", help="cap import at KW for a while")
    ov.add_argument("kw", type=float, metavar="KW")
    ov.add_argument("--for", dest="for_s", type=parse_duration, required=True, help="e.g. 1h")
    ov.add_argument("--reason", required=True)
    clr = bsub.add_parser("clear", help="end the override now")
    clr.add_argument("--reason")
    for name, what in (
        ("events", "what happened: commands to rigs, grid orders, the failsafe"),
        ("audit", "who asked for what: changes by technicians, Home Assistant, the grid"),
    ):
        sp = sub.add_parser(name, help=what)
        sp.add_argument("--since", type=parse_duration, default=3600.0, help="e.g. 1h (default)")
        json_arg(sp)
    sp = sub.add_parser("top", help="a live view that refreshes in place")
    sp.add_argument("--interval", type=float, default=2.0, help="seconds between refreshes")
    sp.add_argument("--rows", type=int, default=15, help="rigs shown, hottest first")
    sp.add_argument("--duration", type=parse_duration, help=argparse.SUPPRESS)
    sp = sub.add_parser("scan", help="find miners on the network and identify them")
    sp.add_argument("cidrs", nargs="+", metavar="CIDR", help="e.g. 10.0.2.0/24 or 10.0.2.10-60")
    sp.add_argument("--port", type=int, default=4028, help="cgminer-API port (default 4028)")
    sp.add_argument("--timeout", type=float, default=1.0, help="per address, seconds (default 1)")
    sp.add_argument("--concurrency", type=int, default=256, help="addresses probed at once")
    sp.add_argument("--add", action="store_true", help="add new miners to the config file")
    json_arg(sp)
    sp.set_defaults(func=cmd_scan)
    sp = sub.add_parser(
        "report",
        help="a picture of import vs cap, grid orders, the budget and rigs, from the history",
        description="Draw the site's history from the state database (read-only; the daemon "
        "need not run): import vs cap with grid orders shaded, the energy budget's burn-down, "
        "rigs by state and hashrate. The window ends at the newest history row.",
    )
    sp.add_argument("--since", type=parse_duration, default=86400.0, help="e.g. 24h (default)")
    sp.add_argument("--out", required=True, metavar="FILE", help="FILE.png or FILE.html")
    sp.add_argument("--db", metavar="FILE", help="a state database (default: from the config)")
    sp.set_defaults(func=cmd_report)
    grid_cli.add_parser(sub, parse_duration)
    cfg = sub.add_parser("config", help="work with the config file")
    cfg_sub = cfg.add_subparsers(dest="config_command", required=True, metavar="ACTION")
    chk = cfg_sub.add_parser(
        "check", help="validate the config file; exit 1 listing every problem with its line"
    )
    credentials_arg(chk)
    chk.set_defaults(func=cmd_check_config)  # the very check `rigd check-config` runs
    cfg_sub.add_parser(
        "reload", help="make the running daemon read its config again, keeping its state"
    )
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    func = getattr(args, "func", None)
    try:
        if func is not None:
            rc: int = func(args)
            return rc
        return run_command(args)
    except Unreachable as e:
        print(f"rigctl: {e}", file=sys.stderr)
        return EXIT_UNREACHABLE
    except Refused as e:
        print(f"rigctl: {e}", file=sys.stderr)
        return EXIT_REFUSED
    except KeyboardInterrupt:
        return 0
    except BrokenPipeError:  # `rigctl rigs | head`, `rigctl scan --json | head`
        # The reader left: not an error. Point stdout at /dev/null so that the flush at
        # exit does not fail on the closed pipe again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
