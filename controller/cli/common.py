"""What every entry point shares: the config file's path, its loading and its errors,
credentials, and stopping on a signal or after a while.

`rigd`, `rigctl` and the demo each import this rather than each other, so an entry point
can change without the others noticing.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import sys
from pathlib import Path
from typing import TextIO

from controller.config import (
    DEFAULT_CONFIG_PATH,
    Config,
    ConfigError,
    load_config,
    summarize,
)
from controller.config.credentials import CREDENTIALS_ENV, Credentials, unread


def default_config_path() -> str:
    return os.environ.get("RIGD_CONFIG", str(DEFAULT_CONFIG_PATH))


def version() -> str:
    """rigd's version, as installed (`rigd --version`, `rigctl --version`)."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed

    try:
        return installed("rigd")
    except PackageNotFoundError:
        return "unknown (not installed)"


def version_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "-V",
        "--version",
        action="version",
        version=f"{p.prog} {version()}",
        help="print the version",
    )


def install_stop(stop: asyncio.Event) -> None:
    """SIGTERM (systemd) and SIGINT (Ctrl-C) end the run cleanly, state saved."""
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)


async def stop_after(stop: asyncio.Event, seconds: float | None) -> None:
    """Ends a bounded run (`--duration`): the demo and timed simulations stop by themselves."""
    if seconds is None:
        return
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)
    stop.set()


def credentials_arg(sp: argparse.ArgumentParser) -> None:
    sp.add_argument(
        "--credentials-dir",
        metavar="DIR",
        help='read { credential = "NAME" } settings from DIR/NAME (default: systemd\'s '
        "$CREDENTIALS_DIRECTORY; without either they are not read)",
    )


def missing_config(path: str) -> str | None:
    """What to say when the config file is not there at all (not "has errors"); None if
    it is there."""
    if Path(path).exists():
        return None
    how = (
        "give the daemon's config with -c FILE or RIGD_CONFIG=FILE"
        if path == str(DEFAULT_CONFIG_PATH)
        else "check the path (-c or RIGD_CONFIG)"
    )
    return f"no config file at {path}: {how}"


def print_config_error(e: ConfigError, out: TextIO) -> None:
    n = len(e.issues)
    print(f"config {e.source or ''} is invalid: {n} problem{'s' if n != 1 else ''}", file=out)
    for issue in e.issues:
        print(f"  {issue}", file=out)


def load_checked(
    path: str, credentials: Credentials | None = None, *, files: bool = False
) -> Config:
    """The config, plus what only reading files can check (the grid operator's keys; with
    `files`, that every file setting names a readable file)."""
    cfg = load_config(path, credentials=credentials, check_files=files)
    if cfg.grid is not None and cfg.grid.enabled:
        from controller.adapters.grid.verify import load_keys

        # A key in a credential that was not read cannot be checked here.
        keys = [k for k in cfg.grid.keys if not (k.public_key_file and unread(k.public_key_file))]
        try:
            load_keys(cfg.grid.model_copy(update={"keys": keys}))
        except ConfigError as e:
            raise ConfigError(e.issues, path) from e
    return cfg


def check_credentials(args: argparse.Namespace) -> Credentials:
    """`--credentials-dir`, else systemd's $CREDENTIALS_DIRECTORY; without either, credential
    references are checked for form but not read (a technician cannot read them anyway)."""
    d = getattr(args, "credentials_dir", None) or os.environ.get(CREDENTIALS_ENV)
    return Credentials(Path(d)) if d else Credentials(None, read=False)


def cmd_check_config(args: argparse.Namespace) -> int:
    missing = missing_config(args.config)
    if missing:
        print(missing)
        return 1
    creds = check_credentials(args)
    try:
        cfg = load_checked(args.config, creds, files=True)
    except ConfigError as e:
        print_config_error(e, sys.stdout)
        return 1
    print(f"{args.config}: OK")
    print(summarize(cfg))
    if creds.used:
        names = ", ".join(creds.used)
        if creds.read:
            print(f"credentials: {len(creds.used)} read from {creds.directory}: {names}")
        else:
            print(
                f"credentials: {len(creds.used)} referenced, not read: {names} "
                "(give --credentials-dir DIR to check them)"
            )
    return 0
