"""`rigctl grid ...`: the operator's tools (keygen, send) and the technician's view (status)."""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import sys
from pathlib import Path
from typing import Any

import aiomqtt
from pydantic import SecretStr, ValidationError

from controller.cli.common import missing_config
from controller.config import ConfigError, MqttConfig, load_config


def _time(text: str) -> float | str:
    """`now`, epoch seconds, or RFC 3339 text: passed through as the contract allows."""
    try:
        return float(text)
    except ValueError:
        return text


def add_parser(sub: Any, parse_duration: Any) -> None:
    g = sub.add_parser("grid", help="grid orders: status, and the operator's keygen/send tools")
    gsub = g.add_subparsers(dest="grid_command", required=True, metavar="ACTION")

    st = gsub.add_parser("status", help="orders known to the running daemon, and the failsafe")
    st.add_argument("--json", action="store_true", help="print JSON")

    kg = gsub.add_parser("keygen", help="make an operator key pair (PREFIX.key, PREFIX.pub)")
    kg.add_argument("--out", required=True, metavar="PREFIX", help="e.g. ./operator-2026")
    kg.add_argument("--alg", choices=("EdDSA", "ES256"), default="EdDSA")
    kg.add_argument("--kid", help="key id for rigd's config (default: the file name)")
    kg.set_defaults(func=cmd_keygen)

    def sending(p: argparse.ArgumentParser, defaults: bool) -> None:
        """The options of `send`: taken before the kind (`send --key K curtail ...`, as the
        README writes it) and after it. After it they have no defaults, so that an option
        given before the kind is not reset by the kind's parser (argparse copies a
        subparser's defaults over what its parent parsed)."""

        def d(value: Any) -> Any:
            return value if defaults else argparse.SUPPRESS

        p.add_argument("--broker", default=d(None), help="broker URL (default: from the config)")
        p.add_argument("--site", default=d(None), help="site id (default: from the config file)")
        p.add_argument(
            "--protocol", choices=("5", "3.1.1"), default=d(None), help="MQTT version (default 5)"
        )
        p.add_argument("--username", default=d(None))
        p.add_argument("--password", default=d(None))
        p.add_argument("--ca-file", type=Path, default=d(None))
        p.add_argument(
            "--key", type=Path, default=d(None), help="operator private key (PEM) to sign with"
        )
        p.add_argument("--kid", default=d(None), help="key id to put in the JWS header")
        p.add_argument(
            "--unsigned", action="store_true", default=d(False), help="send plain JSON (tests)"
        )
        p.add_argument("--iss", default=d(None), help="issuer name, kept in rigd's audit log")
        p.add_argument(
            "--ttl", type=parse_duration, default=d(300.0), help="message lifetime (default 5m)"
        )
        p.add_argument(
            "--wait", type=float, default=d(10.0), help="seconds to wait for the ack (default 10)"
        )
        p.add_argument(
            "--print-only",
            action="store_true",
            default=d(False),
            help="print the message (JWS or JSON), send nothing",
        )

    common = argparse.ArgumentParser(add_help=False)
    sending(common, defaults=False)

    send = gsub.add_parser(
        "send",
        help="build, sign and send an order; print rigd's ack",
        description="Build, sign and send a grid order and print rigd's ack (exit 0 accepted, "
        "1 rejected or unanswered). The options below go before or after KIND.",
    )
    sending(send, defaults=True)
    ksub = send.add_subparsers(dest="kind", required=True, metavar="KIND")

    def target(p: argparse.ArgumentParser, required: bool) -> None:
        t = p.add_mutually_exclusive_group(required=required)
        t.add_argument("--max-import-kw", type=float)
        t.add_argument("--shed-kw", type=float)
        t.add_argument("--level", type=int, choices=(0, 1, 2, 3))

    def window(p: argparse.ArgumentParser) -> None:
        e = p.add_mutually_exclusive_group()
        e.add_argument("--end", type=_time, help="epoch seconds or RFC 3339")
        e.add_argument("--duration", type=parse_duration, help="e.g. 30m (absent: open-ended)")
        p.add_argument("--respond-within", type=parse_duration, help="e.g. 60s")

    c = ksub.add_parser("curtail", parents=[common], help="a new curtailment order")
    c.add_argument("--order-id", required=True)
    c.add_argument("--modification", type=int, default=0)
    target(c, True)
    c.add_argument("--start", type=_time, default="now", help="now, epoch seconds or RFC 3339")
    window(c)
    m = ksub.add_parser("modify", parents=[common], help="change an order (higher modification)")
    m.add_argument("--order-id", required=True)
    m.add_argument("--modification", type=int, required=True)
    target(m, False)
    m.add_argument("--start", type=_time, help="only while the order is pending")
    window(m)
    x = ksub.add_parser("cancel", parents=[common], help="end an order now")
    x.add_argument("--order-id", required=True)
    x.add_argument("--modification", type=int)
    ksub.add_parser("ping", parents=[common], help="liveness check: rigd answers with its orders")
    send.set_defaults(func=cmd_send)


def cmd_keygen(args: argparse.Namespace) -> int:
    from controller.adapters.grid.sign import generate, write_keypair

    prefix = Path(args.out)
    try:
        key_path, pub_path = write_keypair(generate(args.alg), prefix)
    except FileExistsError:
        print(f"rigctl: {prefix}.key exists; not overwriting a private key", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"rigctl: cannot write the key pair: {e}", file=sys.stderr)
        return 1
    kid = args.kid or prefix.name
    print(f"private key: {key_path} (keep it with the operator; mode 0600)")
    print(f"public key:  {pub_path}")
    print("\nfor rigd's config:\n")
    print("[[grid.keys]]")
    print(f'kid = "{kid}"')
    print(f'alg = "{args.alg}"')
    print(f'public_key_file = "{pub_path.resolve()}"')
    return 0


def _mqtt_and_site(args: argparse.Namespace) -> tuple[MqttConfig, str]:
    base: MqttConfig | None = None
    site = args.site
    # --print-only sends nothing: the site is all it needs.
    if (args.broker is None and not args.print_only) or site is None:
        missing = missing_config(args.config)
        if missing:
            raise SystemExit(f"rigctl: give --broker and --site, or the site's config ({missing})")
        try:
            cfg = load_config(args.config)
            base = cfg.mqtt
            site = site or cfg.site.id
        except ConfigError as e:
            raise SystemExit(
                f"rigctl: give --broker and --site, or a readable config ({e.issues[0]})"
            ) from e
    fields: dict[str, Any] = {} if base is None else base.model_dump()
    if args.broker:
        fields["url"] = args.broker
    elif base is None:  # --print-only without a config: a placeholder never connected to
        fields["url"] = "mqtt://127.0.0.1:1883"
    if args.protocol:
        fields["protocol"] = args.protocol
    if args.username:
        fields["username"] = args.username
    if args.password:
        fields["password"] = SecretStr(args.password)
    if args.ca_file:
        fields["ca_file"] = args.ca_file
    return MqttConfig(**fields), site


def cmd_send(args: argparse.Namespace) -> int:
    from controller.adapters.grid.sign import build, load_private_key, send, sign

    try:
        mqtt, site = _mqtt_and_site(args)
    except ValidationError as e:
        print(f"rigctl: bad broker settings: {e.errors()[0]['msg']}", file=sys.stderr)
        return 2
    fields: dict[str, Any] = {}
    if args.kind in ("curtail", "modify", "cancel"):
        fields["order_id"] = args.order_id
        fields["modification"] = args.modification
    if args.kind in ("curtail", "modify"):
        tgt = {
            k: v
            for k, v in (
                ("max_import_kw", args.max_import_kw),
                ("shed_kw", args.shed_kw),
                ("level", args.level),
            )
            if v is not None
        }
        fields.update(
            target=tgt or None,
            start=args.start,
            end=args.end,
            duration_s=args.duration,
            respond_within_s=args.respond_within,
        )
    try:
        msg = build(args.kind, site, ttl_s=args.ttl, iss=args.iss, **fields)
    except ValidationError as e:
        print(f"rigctl: rigd would refuse this order: {e.errors()[0]['msg']}", file=sys.stderr)
        return 2
    if args.unsigned:
        payload = json.dumps(msg).encode()
    elif args.key is None:
        print("rigctl: give --key to sign (or --unsigned for a test site)", file=sys.stderr)
        return 2
    else:
        try:
            key, alg = load_private_key(args.key)
        except (OSError, ValueError) as e:
            print(f"rigctl: cannot use the key: {e}", file=sys.stderr)
            return 2
        payload = sign(msg, key, alg, args.kid).encode()
    if args.print_only:
        print(payload.decode())
        return 0
    try:
        ack = asyncio.run(send(mqtt, site, payload, wait_s=args.wait))
    except (aiomqtt.MqttError, OSError) as e:  # the broker is the problem
        print(f"rigctl: cannot send to {mqtt.url}: {e}", file=sys.stderr)
        return 2
    if args.wait <= 0:
        print(json.dumps({"sent": msg["jti"]}))
        return 0
    if ack is None:
        print(
            f"rigctl: sent {msg['jti']}, no acknowledgement within {args.wait:g} s", file=sys.stderr
        )
        return 1
    print(json.dumps(ack, indent=2))
    return 0 if ack.get("status") == "accepted" else 1


def print_grid(doc: dict[str, Any], out: Any) -> None:
    s = doc["summary"]
    hb = s.get("heartbeat_age_s")
    out.print(
        ("FAILSAFE since " + str(s["failsafe_since"]) if s["failsafe"] else "failsafe off")
        + ("" if hb is None else f", last heartbeat {hb:.0f} s ago")
    )
    if not doc["orders"]:
        out.print("no grid orders")
        return
    from rich.table import Table

    def when(ts: float | None) -> str:
        if ts is None:
            return "-"
        return dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y-%m-%d %H:%M:%S")

    t = Table(box=None, header_style="bold")
    for col in ("order", "mod", "status", "cap", "start (UTC)", "end", "respond by", "compliant"):
        t.add_column(col, justify="right" if col in ("mod", "cap") else "left")
    for o in doc["orders"]:
        cap = "-" if o["cap_kw"] is None else f"{o['cap_kw']:,.1f} kW"
        end = o.get("ended_at") if o.get("ended_at") is not None else o.get("end")
        compliant = {True: "yes", False: "NO", None: "not yet known"}[o.get("compliant")]
        t.add_row(
            o["order_id"],
            str(o["modification"]),
            o["status"],
            cap,
            when(o.get("start")),
            "open-ended" if end is None else when(end),
            when(o.get("deadline")),
            compliant,
        )
    out.print(t)
