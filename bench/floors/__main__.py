"""`python -m bench.floors --dialect X --devices N`: rigd's driver against the floor client.

Starts the simulators of that dialect in a child process on loopback, then measures the
floor and rigd's driver in this process over the same devices, in the order floor, rigd,
rigd, floor (each figure pools its two runs), so neither always runs second.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from bench import proc
from bench.floors import DIALECTS, measure, measure_driver, pooled, ratio
from bench.floors.sim import DEFAULT_SUBNET, simulated
from controller.cli.logs import configure_logging


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.floors", description=__doc__)
    p.add_argument("--dialect", action="append", choices=sorted(DIALECTS),
                   help="repeatable; default every dialect")  # fmt: skip
    p.add_argument("--devices", type=int, default=200)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--subnet", default=DEFAULT_SUBNET, help="loopback only")
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    a = p.parse_args(argv)
    configure_logging("warning")  # drivers log each rig's transport at info
    proc.raise_open_files()
    info = proc.machine()
    print(f"machine: {info['cpu']}, {info['cores']} cores, Python {info['python']}, "
          f"load {os.getloadavg()[0]:.2f}", flush=True)  # fmt: skip
    print("| dialect | devices | floor ms/poll | rigd ms/poll | ratio | floor req/poll "
          "| floor B/poll |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---:|---:|")
    out = []
    for dialect in a.dialect or list(DIALECTS):
        with simulated(dialect, a.devices, a.subnet) as targets:
            # floor, rigd, rigd, floor: neither client always runs second (see `pooled`)
            floor = measure(dialect, targets, a.rounds)
            rigd = measure_driver(dialect, targets, a.rounds)
            rigd = pooled(rigd, measure_driver(dialect, targets, a.rounds))
            floor = pooled(floor, measure(dialect, targets, a.rounds))
        r = ratio(rigd, floor)
        print(f"| {dialect} | {len(targets)} | {floor.cpu_ms_per_poll:.3f} | "
              f"{rigd.cpu_ms_per_poll:.3f} | {r:.2f} | {floor.requests_per_poll:.1f} | "
              f"{floor.bytes_per_poll:.0f} |", flush=True)  # fmt: skip
        if floor.errors or rigd.errors:
            print(f"  ({dialect}: {floor.errors} floor and {rigd.errors} rigd polls failed)")
        out.append({"floor": floor.as_dict(), "rigd": rigd.as_dict(), "ratio": r})
    if a.json:
        with open(a.json, "w", encoding="utf-8") as f:
            json.dump({"machine": info, "results": out}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
