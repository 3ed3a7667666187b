"""`python -m bench`: can one edge host poll, plan and curtail a farm of 10,000 rigs?

Runs simulated farms of 1,000, 5,000 and 10,000 LuxOS miners (or `--rigs N`), each with
the real daemon against it in its own process, and prints one table row per size: poll
cycle time, polls per second, curtailment latency, the daemon's CPU and peak memory, and
what it publishes on MQTT; `--json FILE` writes the same as JSON (one object for one size,
else {"machine", "runs", "fit"}). See bench/farm.py for how each figure is taken.

Targets (2 cores, simulators included): 10,000 rigs polled every 10 s with the daemon under
half a core on average, a full curtailment commanded to every rig within 2 s (p99), peak
RSS under 200 MB, and cost linear in the number of rigs.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

from bench import proc
from bench.farm import BenchError, Settings, run
from controller.cli.logs import configure_logging

SIZES = (1_000, 5_000, 10_000)

COLUMNS = (
    ("rigs", "rigs", "{:d}"),
    ("poll_cycle_p50_s", "poll p50 s", "{:.2f}"),
    ("poll_cycle_p99_s", "poll p99 s", "{:.2f}"),
    ("polls_per_s", "polls/s", "{:.0f}"),
    ("curtail_commanded_first_s", "curtail first s", "{:.2f}"),
    ("curtail_commanded_p50_s", "curtail p50 s", "{:.2f}"),
    ("curtail_commanded_p99_s", "curtail p99 s", "{:.2f}"),
    ("curtail_commanded_max_s", "curtail max s", "{:.2f}"),
    ("curtail_metered_s", "metered s", "{:.1f}"),
    ("daemon_cpu_s_per_cycle", "CPU s/cycle", "{:.2f}"),
    ("daemon_cpu_cores_avg", "cores", "{:.2f}"),
    ("daemon_cpu_us_per_rig_poll", "us/rig", "{:.0f}"),
    ("daemon_peak_rss_mb", "peak RSS MB", "{:.0f}"),
    ("mqtt_msgs_per_s", "MQTT msg/s", "{:.0f}"),
    ("mqtt_bytes_per_cycle", "MQTT B/cycle", "{:.0f}"),
)


def table(runs: list[dict[str, Any]]) -> str:
    """A Markdown table: readable in a terminal and pasteable into the README."""
    head = "| " + " | ".join(h for _, h, _ in COLUMNS) + " |"
    rule = "|" + "|".join("---:" for _ in COLUMNS) + "|"
    rows = []
    for r in runs:
        cells = []
        for key, _, fmt in COLUMNS:
            v = r.get(key)
            ok = isinstance(v, int | float) and not (isinstance(v, float) and math.isnan(v))
            cells.append(fmt.format(v) if ok else "n/a")
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join([head, rule, *rows])


def fit(runs: list[dict[str, Any]], key: str) -> dict[str, float] | None:
    """Least-squares line `key` = a + b * rigs and its R^2: is the cost linear in rigs?"""
    pts = [(float(r["rigs"]), float(r[key])) for r in runs if isinstance(r.get(key), int | float)]
    if len(pts) < 2:
        return None
    n = len(pts)
    mx = sum(x for x, _ in pts) / n
    my = sum(y for _, y in pts) / n
    sxx = sum((x - mx) ** 2 for x, _ in pts)
    sxy = sum((x - mx) * (y - my) for x, y in pts)
    b = sxy / sxx
    a = my - b * mx
    ss_tot = sum((y - my) ** 2 for _, y in pts)
    ss_res = sum((y - (a + b * x)) ** 2 for x, y in pts)
    r2 = 1.0 - ss_res / ss_tot if ss_tot else 1.0
    return {"intercept": round(a, 4), "per_rig": round(b, 7), "r2": round(r2, 4)}


def targets(r: dict[str, Any]) -> list[str]:
    """The issue's targets, checked where they apply (10,000 rigs)."""
    if r["rigs"] < 10_000:
        return []
    out = []
    for ok, text in (
        (r["cycles_fully_polled"] == r["cycles_measured"], "every rig answered every cycle"),
        (r["poll_cycle_p99_s"] < r["interval_s"], f"polled within the {r['interval_s']:g} s"),
        (r["daemon_cpu_cores_avg"] < 0.5, "daemon under half a core"),
        (r["curtail_commanded_p99_s"] < 2.0, "curtailment commanded within 2 s p99"),
        (r["curtail_rigs_acknowledged"] == r["rigs"], "every rig's sleep acknowledged"),
        (r["daemon_peak_rss_mb"] < 200, "peak RSS under 200 MB"),
    ):
        out.append(f"{'PASS' if ok else 'MISS'}: {text}")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--rigs", type=int, action="append", help="one farm size (repeatable)")
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    p.add_argument("--pdus", type=int, default=0, help="switched PDUs (default 0)")
    p.add_argument("--interval", type=float, default=10.0, help="poll interval, s")
    p.add_argument("--cycles", type=int, default=6, help="steady cycles measured")
    p.add_argument("--warmup", type=int, default=2, help="cycles before measuring")
    p.add_argument(
        "--order-phase",
        type=float,
        default=0.5,
        help="the grid order arrives this long after a poll cycle began (s)",
    )
    p.add_argument("--subnet", default="127.64.0.0/18", help="loopback only")
    p.add_argument("--workdir", type=Path, help="keep configs, logs and state here")
    p.add_argument("--profile", type=Path, metavar="FILE",
                   help="py-spy the daemon over the steady cycles (collapsed stacks)")  # fmt: skip
    p.add_argument("-q", "--quiet", action="store_true", help="no progress lines")
    args = p.parse_args(argv)
    if not args.subnet.startswith("127."):
        p.error("benchmarks stay on loopback: --subnet must be inside 127.0.0.0/8")
    sizes = args.rigs or list(SIZES)
    configure_logging("warning")  # the meter driver this benchmark reads with is chatty
    info = proc.machine()
    print(
        f"machine: {info['cpu']}, {info['cores']} cores, {info['memory_gib']} GiB, "
        f"Python {info['python']}, load {info['load_avg_1m_at_start']}",
        flush=True,
    )
    runs = []
    for n in sizes:
        s = Settings(
            rigs=n,
            pdus=args.pdus,
            interval_s=args.interval,
            warmup_cycles=args.warmup,
            cycles=args.cycles,
            subnet=args.subnet,
            order_phase_s=args.order_phase,
            workdir=None if args.workdir is None else args.workdir / str(n),
            verbose=not args.quiet,
            profile=args.profile
            if len(sizes) == 1 or args.profile is None
            else args.profile.with_suffix(f".{n}{args.profile.suffix}"),
        )
        try:
            runs.append(run(s))
        except (BenchError, TimeoutError) as e:
            print(f"bench: {n} rigs: {e or type(e).__name__}", file=sys.stderr)
            return 1
    print(table(runs))
    for r in runs:
        for line in targets(r):
            print(line)
    doc: dict[str, Any]
    if len(runs) == 1:
        doc = {**runs[0], "machine": info}
    else:
        doc = {
            "machine": info,
            "runs": runs,
            "fit": {
                k: fit(runs, k)
                for k in ("daemon_cpu_s_per_cycle", "daemon_peak_rss_mb", "poll_cycle_p50_s")
            },
        }
        for k, f in doc["fit"].items():
            if f is not None:
                print(f"{k} = {f['intercept']} + {f['per_rig']} x rigs (R^2 {f['r2']})")
    if args.json:
        Path(args.json).write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
