"""`rigctl`: the technician's command line on the edge host.

This first version checks configs the same way the daemon loads them; the
commands that talk to a running daemon over its local admin API come with it.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from controller.cli import cmd_check_config, default_config_path


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rigctl", description="Technician's CLI for rigd.")
    p.add_argument(
        "-c",
        "--config",
        default=default_config_path(),
        help="the daemon's config file (default: $RIGD_CONFIG or /etc/rigd/rigd.toml)",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    cfg = sub.add_parser("config", help="work with the config file")
    cfg_sub = cfg.add_subparsers(dest="config_command", required=True, metavar="ACTION")
    chk = cfg_sub.add_parser(
        "check", help="validate the config file; exit 1 listing every problem with its line"
    )
    chk.set_defaults(func=cmd_check_config)  # the very check `rigd check-config` runs
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    rc: int = args.func(args)
    return rc


if __name__ == "__main__":
    sys.exit(main())
