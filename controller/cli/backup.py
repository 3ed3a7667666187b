"""`rigd backup`: a consistent copy of the state database, safe while rigd runs.

The state database (`<state_dir>/rigd.sqlite`) is what rigd remembers across restarts:
which rigs it slept and when, the energy counter, overrides and holds, grid orders in
force, the history. Restoring a copy is a plain file copy while rigd is stopped
(docs/operations.md)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from controller.adapters.store import StateStore, StoreError, backup
from controller.cli.common import missing_config, print_config_error
from controller.config import ConfigError, load_config
from controller.config.credentials import Credentials


def add_parser(sub: Any, config_arg: Any) -> None:
    sp = sub.add_parser(
        "backup",
        help="copy the state database, consistently, even while rigd runs",
        description="Copy the state database (which rigs rigd slept, the energy counter, "
        "overrides, holds, grid orders, history) to FILE with SQLite's online backup: "
        "consistent while rigd runs, checked, one file. Run it as root or as rigd's user. "
        "Exit 0 written, 1 failed, 2 no config or no database.",
    )
    config_arg(sp)
    sp.add_argument("--out", required=True, metavar="FILE", help="where to write the copy")
    sp.add_argument("--db", metavar="FILE", help="the state database (default: from the config)")
    sp.set_defaults(func=cmd_backup)


def cmd_backup(args: argparse.Namespace) -> int:
    if args.db:
        db = Path(args.db)
    else:
        missing = missing_config(args.config)
        if missing:
            print(f"rigd backup: {missing}, or name the database with --db", file=sys.stderr)
            return 2
        try:  # the state directory is all it needs: no credentials are read
            cfg = load_config(args.config, credentials=Credentials(None, read=False))
        except ConfigError as e:
            print_config_error(e, sys.stderr)
            return 2
        db = cfg.site.state_dir / StateStore.FILENAME
    out = Path(args.out)
    try:
        size = backup(db, out)
    except StoreError as e:
        print(f"rigd backup: {e}", file=sys.stderr)
        return 2 if e.kind == "unavailable" and not db.exists() else 1
    print(f"{db} backed up to {out} ({size / 1024:,.0f} KiB, integrity ok)")
    return 0
