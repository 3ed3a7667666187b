"""`rigd`: the daemon (`run`), its config checker, the farm simulator and the demo."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import faulthandler
import json
import os
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from controller.adapters.sdnotify import Notifier, ServiceNotifications
from controller.cli import backup as backup_cli
from controller.cli.common import (
    cmd_check_config,
    credentials_arg,
    default_config_path,
    install_stop,
    load_checked,
    print_config_error,
    stop_after,
    version_arg,
)
from controller.cli.logs import configure_logging
from controller.config import (
    ConfigError,
    parse_config,
)
from controller.runtime import eventloop

if TYPE_CHECKING:
    from controller.adapters.store import StoreError
    from controller.config import Config

# sysexits.h EX_CONFIG: systemd's unit stops restarting on it (RestartPreventExitStatus).
EXIT_CONFIG = 78
# The state database at start (README "Faults"): damaged or unreadable state needs a person,
# so systemd does not restart on EX_DATAERR; a disk that is full, read-only or missing may
# come back, so EX_IOERR is restarted. Neither run has sent a command to any rig.
EXIT_STATE_CORRUPT = 65
EXIT_STATE_IO = 74
# sysexits.h EX_CANTCREAT: another rigd holds the state directory (controller/statedir.py).
# The running one keeps the farm; systemd does not retry, a person must say which one runs.
EXIT_ALREADY_RUNNING = 73

log = structlog.get_logger("rigd")


def _install_reload(daemon: Any, notify: ServiceNotifications | None = None) -> None:
    """SIGHUP reloads the config (systemd's ExecReload); a bad config is refused, logged.

    systemd hears RELOADING=1 and then READY=1 either way: rigd runs on, on the old config
    if the new one was refused."""
    loop = asyncio.get_running_loop()
    with contextlib.suppress(NotImplementedError, RuntimeError):
        loop.add_signal_handler(
            signal.SIGHUP, lambda: asyncio.ensure_future(reload_config(daemon, notify))
        )


async def reload_config(daemon: Any, notify: ServiceNotifications | None = None) -> None:
    """One SIGHUP reload. Never raises: whatever fails, rigd runs on and says so."""
    if notify is not None:
        notify.reloading()
    refused: list[str] | None = None
    try:
        await daemon.reload()
    except ConfigError as e:
        refused = [str(i) for i in e.issues]
        log.error("config_reload_refused", problems=refused)
    except Exception as e:  # e.g. StoreError: state the new controller cannot read
        refused = [f"reload failed: {e}"]
        log.exception("config_reload_failed", error=str(e))
    if notify is not None:
        notify.reloaded(refused)


# -- rigd run ---------------------------------------------------------------------------------


def cmd_run(args: argparse.Namespace) -> int:
    configure_logging(args.log_level)
    # A watchdog restart is SIGABRT: leave every thread's Python stack in the journal.
    faulthandler.enable()
    try:
        cfg = load_checked(args.config)
    except ConfigError as e:
        print_config_error(e, sys.stderr)
        return EXIT_CONFIG
    from controller.adapters.statedir import AlreadyRunning, InstanceLock
    from controller.adapters.store import StoreError
    from controller.runtime.daemon import Daemon

    try:
        # Before anything touches the state database, the admin socket or the broker.
        lock = InstanceLock.acquire(cfg.site.state_dir)
    except AlreadyRunning as e:
        log.critical("rigd_already_running", state_dir=str(e.state_dir), pid=e.pid)
        print(f"rigd: {e}", file=sys.stderr)
        return EXIT_ALREADY_RUNNING
    except StoreError as e:
        return _state_unusable(e, cfg)

    async def main() -> None:
        stop = asyncio.Event()
        install_stop(stop)
        daemon = Daemon(cfg, dry_run=args.dry_run, config_path=args.config, settle_gc=True)
        notify = ServiceNotifications(Notifier.from_environ(), daemon)
        daemon.on_snapshot = notify.on_cycle
        _install_reload(daemon, notify)
        notify.starting()
        notifying = asyncio.create_task(notify.run(stop), name="sd-notify")
        try:
            await daemon.run(stop)
        finally:
            stop.set()
            await notifying

    try:
        eventloop.run(main())
    except StoreError as e:
        return _state_unusable(e, cfg)
    finally:
        lock.release()
    return 0


def _state_unusable(e: StoreError, cfg: Config) -> int:
    """Log and print a StoreError at start; its exit status."""
    log.critical("state_db_unusable", error=str(e), kind=e.kind, state_dir=str(cfg.site.state_dir))
    print(f"rigd: {e}", file=sys.stderr)
    return EXIT_STATE_CORRUPT if e.kind == "corrupt" else EXIT_STATE_IO


# -- rigd sim ---------------------------------------------------------------------------------


def _sim_grid_toml(args: argparse.Namespace) -> str:
    """A [grid] section trusting the operator's public key, for trying grid orders."""
    if not args.grid_key:
        return ""
    path = Path(args.grid_key).resolve()
    alg = "EdDSA"
    try:
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.hazmat.primitives.serialization import load_pem_public_key

        if isinstance(load_pem_public_key(path.read_bytes()), ec.EllipticCurvePublicKey):
            alg = "ES256"
    except (OSError, ValueError):
        pass  # check-config names the problem with the file
    kid = path.name.removesuffix(".pub")
    return (
        f'\n[grid]\n[[grid.keys]]\nkid = "{kid}"\nalg = "{alg}"\n'
        f"public_key_file = {json.dumps(str(path))}\n"
    )


def cmd_sim(args: argparse.Namespace) -> int:
    configure_logging(args.log_level)
    from simulators.shards import default_processes
    from simulators.site import SimSite

    async def main() -> None:
        site = SimSite(
            rigs=args.rigs,
            pdus=args.pdus,
            speed=args.speed,
            subnet=args.subnet,
            meter_protocol=args.meter_protocol,
            seed=args.seed,
            mix=args.mix,
            processes=args.processes or default_processes(args.rigs),
            log_level=args.log_level,
        )
        await site.start()
        eventloop.settle_gc()  # the farm model and its servers live as long as the process
        vtn = None
        try:
            oadr_toml = ""
            if args.vtn:  # an OpenADR 3.1 VTN beside the farm (controller/cli/openadr_sim.py)
                from controller.cli.openadr_sim import UtilityScript, make_vtn, openadr_toml

                if not args.max_import_kw:
                    raise ValueError("--vtn needs --max-import-kw (OpenADR events need control)")
                # wall time, as `rigd run`: its token lifetimes and event times are the daemon's
                vtn = make_vtn(args.site, args.broker, now=time.time, port=args.vtn_port)
                await vtn.start()
                program = await UtilityScript(vtn).program()
                # reports every 10 s (or each poll): a simulated site shows them soon
                oadr_toml = openadr_toml(vtn, args.site, report_interval_s=max(10.0, args.interval))
            text = site.config_toml(
                site_id=args.site,
                broker_url=args.broker,
                state_dir=args.state_dir,
                interval_s=args.interval,
                extra=(
                    f"[control]\nmax_import_kw = {args.max_import_kw:g}\n"
                    if args.max_import_kw
                    else ""
                )
                + _sim_grid_toml(args)
                + oadr_toml,
            )
            parse_config(text, source="<generated>", environ={})  # never write a bad config
            if args.write_config:
                await asyncio.to_thread(Path(args.write_config).write_text, text, "utf-8")
            farm = site.farm
            print(
                f"simulated farm: {len(farm.rigs)} rigs on {len(farm.pdus)} PDUs, "
                f"meter {site.meter.host}:{site.meter.port} ({args.meter_protocol}), "
                f"clock x{args.speed:g}"
                + (f", served by {len(site.worker_pids)} processes" if site.worker_pids else ""),
                flush=True,
            )
            for dialect in site.mix:  # the first rig of each firmware, to try by hand
                rid = next(r for r, d in site.dialects.items() if d == dialect)
                host, port = site.address_of(rid)
                print(f"  {dialect} miner {rid} at {host}:{port}", flush=True)
            for pid in farm.pdus:
                host, port = site.pdu_address(pid)
                print(f"  PDU {pid} SNMP at {host}:{port} (public/private)", flush=True)
            if vtn is not None:
                bl_secret, _ = vtn.clients["bl"]
                print(
                    f"  OpenADR 3.1 VTN at {vtn.base_url} (MQTT notifier on {args.broker}); "
                    f"business-logic client id bl, secret {bl_secret}; program {program}",
                    flush=True,
                )
            if args.write_config:
                print(f"config written to {args.write_config}; run the daemon with:", flush=True)
                print(f"  rigd run -c {args.write_config}", flush=True)
            print("Ctrl-C stops the farm.", flush=True)
            stop = asyncio.Event()
            install_stop(stop)
            await asyncio.gather(stop.wait(), stop_after(stop, args.duration))
        finally:
            if vtn is not None:
                await vtn.stop()
            await site.stop()

    try:
        eventloop.run(main())
    except ConfigError as e:
        print_config_error(e, sys.stderr)
        return 2
    except (ValueError, OSError) as e:
        print(f"rigd sim: {e}", file=sys.stderr)
        return 2
    return 0


# -- rigd demo --------------------------------------------------------------------------------


def cmd_demo(args: argparse.Namespace) -> int:
    from controller.cli.demo import run_demo

    try:
        return asyncio.run(run_demo(args))
    except ConfigError as e:
        print_config_error(e, sys.stderr)
        return 2
    except (ValueError, OSError) as e:
        print(f"rigd demo: {e}", file=sys.stderr)
        return 2


# -- parser -----------------------------------------------------------------------------------


def _positive(v: str) -> float:
    f = float(v)
    if f <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {v}")
    return f


def _count(v: str) -> int:
    n = int(v)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {v}")
    return n


def _count_or_none(v: str) -> int:
    n = int(v)
    if n < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {v}")
    return n


def farm_args(sp: argparse.ArgumentParser, *, mix: str = "luxos") -> None:
    """The simulated farm's shape, shared by `sim` and `demo`."""
    sp.add_argument("--rigs", type=_count, default=100, help="number of miners (default 100)")
    sp.add_argument(
        "--pdus", type=_count_or_none, default=4, help="number of PDUs (default 4; 0: none)"
    )
    sp.add_argument("--seed", type=int, default=7, help="random seed of the farm's model mix")
    sp.add_argument(
        "--mix",
        default=mix,
        metavar="DIALECTS",
        help="firmware of the rigs, taken in turn: comma-separated from luxos, antminer, "
        "whatsminer, whatsminer-v3, braiins, avalon, epic, vnish, each optionally with its "
        f"share (luxos=40,whatsminer=20,...) (default {mix})",
    )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="rigd",
        description="Keeps a mining farm inside its electricity budget.",
    )
    version_arg(p)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def config_arg(sp: argparse.ArgumentParser) -> None:
        sp.add_argument(
            "-c",
            "--config",
            default=default_config_path(),
            help="config file (default: $RIGD_CONFIG or /etc/rigd/rigd.toml)",
        )

    def log_arg(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--log-level", default="info", help="debug, info, warning or error")

    sp = sub.add_parser("run", help="run the daemon", description="Run the daemon.")
    config_arg(sp)
    sp.add_argument(
        "--dry-run",
        action="store_true",
        help="run the whole control loop, log and publish what it would do, send no command",
    )
    log_arg(sp)
    sp.set_defaults(func=cmd_run)

    sp = sub.add_parser(
        "check-config",
        help="validate a config file",
        description="Validate a config file (and RIGD_* environment overrides). Exit 1 with "
        "every problem and its line, or 0 with a summary.",
    )
    config_arg(sp)
    credentials_arg(sp)
    sp.set_defaults(func=cmd_check_config)

    sp = sub.add_parser(
        "sim",
        help="run a simulated farm on loopback",
        description="Start a simulated farm (miners, PDUs, meter) on loopback and optionally "
        "write a daemon config pointing at it.",
    )
    farm_args(sp)
    sp.add_argument("--write-config", metavar="FILE", help="write a daemon config for this farm")
    sp.add_argument(
        "--subnet",
        metavar="127.0.X.0/24",
        help="give each miner its own loopback address on port 4028, as on a farm subnet",
    )
    sp.add_argument("--speed", type=_positive, default=1.0, help="farm clock speed (default 1)")
    sp.add_argument(
        "--processes",
        type=_count,
        metavar="N",
        help="serve the rigs and PDUs from N worker processes, the meter from this one "
        "(default 1 up to 2,500 rigs, then one per 2,500): one process runs out of open "
        "files and of CPU at 10,000 rigs",
    )
    sp.add_argument("--meter-protocol", choices=("sdm630", "sunspec"), default="sdm630")
    sp.add_argument("--broker", default="mqtt://127.0.0.1:1883", help="broker URL for the config")
    sp.add_argument("--site", default="sim", help="site id for the config (default sim)")
    sp.add_argument("--state-dir", default="./state", help="state_dir for the config")
    sp.add_argument("--interval", type=_positive, default=10.0, help="poll interval for the config")
    sp.add_argument(
        "--max-import-kw",
        type=_positive,
        help="also write a [control] section with this max import (default: monitor only)",
    )
    sp.add_argument(
        "--grid-key",
        metavar="PUB",
        help="also write a [grid] section trusting this operator public key (needs "
        "--max-import-kw); from `rigctl grid keygen`",
    )
    sp.add_argument(
        "--vtn",
        action="store_true",
        help="also run a simulated OpenADR 3.1 VTN (notifying on --broker) and write an "
        "[openadr] section for it (needs --max-import-kw); see docs/openadr.md",
    )
    sp.add_argument(
        "--vtn-port", type=int, default=8310, help="the simulated VTN's port (default 8310)"
    )
    sp.add_argument("--duration", type=_positive, help="stop after this many seconds")
    log_arg(sp)
    sp.set_defaults(func=cmd_sim)

    sp = sub.add_parser(
        "demo",
        help="a simulated farm, a broker and the daemon, live in the terminal",
        description="Start a simulated farm, an MQTT broker inside the process (unless --broker) "
        "and the daemon, and show the farm live until Ctrl-C.",
    )
    farm_args(sp, mix="luxos,antminer,whatsminer,whatsminer-v3,braiins,avalon,epic,vnish")
    sp.add_argument("--broker", metavar="URL", help="use this broker instead of the built-in one")
    sp.add_argument("--duration", type=_positive, help="stop after this many (wall) seconds")
    sp.add_argument("--speed", type=_positive, default=10.0, help="farm clock speed (default 10)")
    sp.add_argument(
        "--interval",
        type=_positive,
        default=10.0,
        help="poll interval in farm seconds (default 10)",
    )
    sp.add_argument(
        "--dry-run",
        action="store_true",
        help="plan and publish what control would do, but send no command",
    )
    sp.add_argument(
        "--headless",
        action="store_true",
        help="print one JSON line of site state per interval instead of the live view",
    )
    sp.add_argument(
        "--metrics",
        metavar="HOST:PORT",
        help="serve Prometheus metrics on this address while the demo runs",
    )
    sp.add_argument(
        "--report",
        metavar="FILE",
        help="when the demo ends, write the report of the run (FILE.png or FILE.html)",
    )
    sp.add_argument(
        "--grid",
        choices=("signed", "openadr"),
        default="signed",
        help="how the scripted order arrives: a signed MQTT order (default), or an OpenADR "
        "3.1 event on a simulated VTN (docs/openadr.md)",
    )
    log_arg(sp)
    sp.set_defaults(func=cmd_demo)

    sp = sub.add_parser(
        "grid-schema",
        help="print the JSON Schema of grid orders, acks and reports",
        description="Print the JSON Schema generated from the grid-order models "
        "(docs/grid-protocol.schema.json is this output).",
    )
    sp.set_defaults(func=cmd_grid_schema)
    backup_cli.add_parser(sub, config_arg)
    return p


def cmd_grid_schema(args: argparse.Namespace) -> int:
    from controller.core.grid.orders import json_schema

    print(json.dumps(json_schema(), indent=2, sort_keys=True))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        rc: int = args.func(args)
    except BrokenPipeError:  # `rigd check-config | head`: the reader left, not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    return rc


if __name__ == "__main__":
    sys.exit(main())
