"""How long `rigctl scan` takes over a farm subnet: 1,024 addresses, 200 of them miners.

The simulated miners (all eight firmware dialects, in turn) run in their own process, each
on its own loopback address and real ports, as a farm LAN looks to the scanner. The scan
runs here, as `rigctl scan` runs it.
Run: `python -m bench.scan [--rigs N] [--mix A,B] [--json FILE]`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

from controller.adapters.discovery import addresses, scan

MIX = "luxos,antminer,whatsminer,whatsminer-v3,braiins,avalon,epic,vnish"


def _start_farm(rigs: int, subnet: str, mix: str = MIX) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "controller.cli.rigd", "sim", "--rigs", str(rigs), "--pdus", "4",
         "--subnet", subnet, "--mix", mix, "--log-level", "warning"],
        stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip
    assert proc.stdout is not None
    deadline = time.monotonic() + 60
    said = []
    for line in proc.stdout:
        if "Ctrl-C" in line:
            return proc
        said.append(line)
        if time.monotonic() > deadline:
            break
    proc.kill()
    raise RuntimeError(f"the simulated farm did not start: {''.join(said[-5:]).strip()}")


async def _scan_once(hosts: list[str], wait_s: float) -> tuple[float, Counter[str]]:
    t0 = time.perf_counter()
    found = await scan(hosts, wait_s=wait_s)
    return time.perf_counter() - t0, Counter(f.driver for f in found)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.scan", description=__doc__)
    p.add_argument("--rigs", type=int, default=200)
    p.add_argument("--subnet", default="127.60.0.0/22", help="loopback only (1,024 addresses)")
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--timeout", type=float, default=1.0, help="per address, as rigctl's")
    p.add_argument("--mix", default=MIX, help=f"firmware dialects, in turn (default {MIX})")
    p.add_argument("--json", metavar="FILE")
    args = p.parse_args(argv)
    if not args.subnet.startswith("127."):
        p.error("benchmarks stay on loopback: --subnet must be inside 127.0.0.0/8")
    hosts = addresses([args.subnet])
    farm = _start_farm(args.rigs, args.subnet, args.mix)
    try:
        runs = [asyncio.run(_scan_once(hosts, args.timeout)) for _ in range(args.runs)]
    finally:
        farm.send_signal(signal.SIGINT)
        farm.wait(15)
    times = [t for t, _ in runs]
    kinds = runs[-1][1]
    result = {
        "addresses": len(hosts),
        "rigs": args.rigs,
        "mix": args.mix,
        "found": sum(kinds.values()),
        "found_by_driver": dict(sorted(kinds.items())),
        "scan_s_median": round(statistics.median(times), 3),
        "scan_s_max": round(max(times), 3),
        "runs": len(times),
    }
    print(
        f"scan of {len(hosts)} addresses, {args.rigs} miners: found {result['found']} "
        f"({', '.join(f'{n} {d}' for d, n in sorted(kinds.items()))}) in "
        f"{result['scan_s_median']} s median, {result['scan_s_max']} s max over {len(times)} runs"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return 0 if result["found"] == args.rigs else 1


if __name__ == "__main__":
    sys.exit(main())
