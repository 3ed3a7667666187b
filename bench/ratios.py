"""The yardsticks beside rigd, measured against the same simulated farm in the same run.

Absolute CPU figures do not carry from one machine to another, ratios do: so each run
also measures, against the very farm the daemon polls,

- the floor of each dialect (bench/floors: a bare client making the same exchange, no
  parsing), per rig-poll and per PDU-poll, and the floor sending the curtailment's
  commands where bench/floors has a command client;
- pyasic reading the same rigs (a third-party client; installed into this interpreter by
  the benchmark if missing, never a dependency of rigd), where pyasic can read them.

Each is measured in a child process (`python -m bench.ratios floors|commands|pyasic`, a JSON job on
stdin, a JSON answer on stdout) whose own CPU is the figure: not this process, whose MQTT
watcher would be counted too, and never while the daemon polls, so the two do not share
the cores at the moment either is measured.
"""

from __future__ import annotations

import asyncio
import importlib
import json
import subprocess
import sys
import time
import tomllib
from collections import Counter
from pathlib import Path
from typing import Any

PYASIC = "pyasic==0.79.0"  # the version the issue measured
BOOT_WAIT_S = 16.0  # a simulated rig's API answers this long after its outlet is on
PYASIC_SAMPLE = 100  # rigs of each dialect pyasic reads (its CPU per read is what counts)

Target = tuple[str, int]


def farm_targets(cfg: Path) -> tuple[dict[str, list[Target]], list[Target]]:
    """Rig addresses by driver kind, and PDU addresses, from the config `rigd sim` wrote."""
    doc = tomllib.loads(cfg.read_text(encoding="utf-8"))
    rigs: dict[str, list[Target]] = {}
    for m in doc.get("miners", []):
        rigs.setdefault(str(m["driver"]), []).append((str(m["host"]), int(m["port"])))
    pdus = [(str(p["host"]), int(p["port"])) for p in doc.get("pdus", [])]
    return rigs, pdus


def weighted(per: dict[str, float | None], counts: dict[str, int]) -> float | None:
    """The mean of per-dialect figures weighted by rig count; None if any is missing."""
    total = sum(counts.values())
    if not total or any(per.get(d) is None for d in counts):
        return None
    return sum(float(per[d] or 0.0) * n for d, n in counts.items()) / total


def _child(kind: str, job: dict[str, Any], timeout_s: float) -> dict[str, Any]:
    try:
        p = subprocess.run(
            [sys.executable, "-m", "bench.ratios", kind],
            input=json.dumps(job),
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return {"error": f"{kind} did not finish within {timeout_s:g} s"}
    if p.returncode != 0:
        tail = (p.stderr or "").strip().splitlines()[-3:]
        return {"error": f"{kind} exited with {p.returncode}: {' | '.join(tail)}"}
    out: dict[str, Any] = json.loads(p.stdout.strip().splitlines()[-1])
    return out


def measure_floors(
    rigs: dict[str, list[Target]], pdus: list[Target], rounds: int = 2
) -> dict[str, Any]:
    """{"rigs": {driver: FloorResult dict | {"error"}}, "pdu": ... }, from bench/floors."""
    job = {"rigs": rigs, "pdus": pdus, "rounds": rounds}
    n = sum(len(v) for v in rigs.values()) + len(pdus)
    return _child("floors", job, 120 + n * 0.02 * rounds)


def shed_commands(cfg: Path, actions: dict[str, str]) -> tuple[list[dict[str, Any]], int]:
    """The command floor's jobs for the shed commands rigd sent (rig -> its audit action,
    see bench/farm.py), from the config `rigd sim` wrote: a sleep goes to the rig's own
    API, an outlet switched off to its PDU. Also how many commands had no floor (a power
    target, say)."""
    doc = tomllib.loads(cfg.read_text(encoding="utf-8"))
    miners = {str(m["id"]): m for m in doc.get("miners", [])}
    outlets: dict[str, tuple[str, int, int]] = {}
    for pdu in doc.get("pdus", []):
        for number, rig in (pdu.get("outlets") or {}).items():
            outlets[str(rig)] = (str(pdu["host"]), int(pdu["port"]), int(number))
    jobs: list[dict[str, Any]] = []
    skipped = 0
    for rig, action in sorted(actions.items()):
        m = miners.get(rig)
        if action == "sleep" and m is not None:
            host, port = str(m["host"]), int(m["port"])
            web = int(m.get("web_port", 80))
            jobs.append({"rig": rig, "kind": str(m["driver"]), "host": host, "port": port,
                         "web_port": web})  # fmt: skip
        elif action == "outlet_off" and rig in outlets:
            host, port, number = outlets[rig]
            jobs.append({"rig": rig, "kind": "pdu", "host": host, "port": port, "outlet": number})
        else:
            skipped += 1
    return jobs, skipped


def measure_command_floor(
    jobs: list[dict[str, Any]],
    restore: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """The command floor (bench/floors/commands.py) sending `jobs` (`shed_commands`): it
    first switches the `restore` outlets back on and lets those rigs boot, wakes every rig
    (switches every outlet back on), since the farm must be running again, then sends the
    same commands rigd sent, all at once. {"wake": ..., "sleep": ...} with each burst's
    figures, or {"error"}."""
    job = {"commands": jobs, "restore": restore or []}
    return _child("commands", job, 300 + len(jobs) * 0.02)


def measure_pyasic(rigs: dict[str, list[Target]], sample: int = PYASIC_SAMPLE) -> dict[str, Any]:
    """{driver: {"cpu_ms_per_poll", "devices", "errors"} | {"error"}} for pyasic's reads."""
    job = {"rigs": {d: [h for h, _ in t[:sample]] for d, t in rigs.items()}}
    return _child("pyasic", job, 300 + 10 * len(rigs) * sample / 100)


# -- in the child ---------------------------------------------------------------------------


def _floors(job: dict[str, Any]) -> dict[str, Any]:
    try:
        floors = importlib.import_module("bench.floors")
    except ImportError as e:
        return {"error": f"bench.floors is not available: {e}"}
    rounds = int(job["rounds"])
    out: dict[str, Any] = {"rigs": {}, "pdu": None}
    for driver, targets in job["rigs"].items():
        try:
            r = floors.measure(driver, [tuple(t) for t in targets], rounds)
            out["rigs"][driver] = r.as_dict()
        except Exception as e:  # a dialect bench/floors does not know: say which
            out["rigs"][driver] = {"error": f"{type(e).__name__}: {e}"}
    if job["pdus"]:
        try:
            out["pdu"] = floors.measure("pdu", [tuple(t) for t in job["pdus"]], rounds).as_dict()
        except Exception as e:
            out["pdu"] = {"error": f"{type(e).__name__}: {e}"}
    return out


def _commands(job: dict[str, Any]) -> dict[str, Any]:
    from bench import proc
    from bench.floors.commands import Command, CommandFloor, curtail
    from controller.runtime import eventloop

    proc.raise_open_files()
    cmds = [Command(**c) for c in job["commands"]]
    restore = [Command(**c) for c in job.get("restore") or ()]

    async def main() -> dict[str, Any]:
        floor = CommandFloor()
        if restore:  # rigs the daemon powered off: power, and their boot (sim: <= 15 s)
            await floor.prepare(restore)
            restored = await curtail(restore, "wake", floor)
            await asyncio.sleep(BOOT_WAIT_S)
        out: dict[str, Any] = {"unprepared": len(await floor.prepare(cmds))}
        if restore:
            out["restored"] = restored
        try:
            out["wake"] = await curtail(cmds, "wake", floor)
            await asyncio.sleep(1.0)  # the last replies' connections closing
            out["sleep"] = await curtail(cmds, "sleep", floor)
        finally:
            await floor.release()
        return out

    with asyncio.Runner(loop_factory=eventloop.loop_factory()) as runner:
        return runner.run(main())


def _ensure_pyasic() -> Any:
    try:
        return importlib.import_module("pyasic")
    except ImportError:
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "-q", PYASIC],
            check=True,
            stdout=subprocess.DEVNULL,
        )
        importlib.invalidate_caches()
        return importlib.import_module("pyasic")


async def _pyasic_dialect(pyasic: Any, hosts: list[str]) -> dict[str, Any]:
    """Identify each rig once (as pyasic's own scan would), then time steady reads."""
    sem = asyncio.Semaphore(64)

    async def ident(h: str) -> Any:
        async with sem:
            try:
                return await asyncio.wait_for(pyasic.get_miner(h), 30)
            except Exception:
                return None

    miners = [m for m in await asyncio.gather(*(ident(h) for h in hosts)) if m is not None]
    if not miners:
        return {"error": "pyasic identified none of these rigs", "devices": len(hosts)}
    errors = Counter[str]()

    async def read(m: Any) -> None:
        async with sem:
            try:
                d = await asyncio.wait_for(m.get_data(), 30)
                if d is None or d.hashrate is None:
                    errors["no reading"] += 1
            except Exception as e:
                errors[type(e).__name__] += 1

    await asyncio.gather(*(read(m) for m in miners))  # warm-up
    errors.clear()
    rounds = 2
    cpu0, wall0 = time.process_time(), time.perf_counter()
    for _ in range(rounds):
        await asyncio.gather(*(read(m) for m in miners))
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    polls = rounds * len(miners)
    return {
        "devices": len(hosts),
        "identified": len(miners),
        "kind": sorted({type(m).__name__ for m in miners}),
        "cpu_ms_per_poll": round(1000.0 * cpu / polls, 3),
        "wall_s": round(wall, 2),
        "errors": dict(errors),
        # Readings that failed cost less than good ones: the figure holds for good ones only
        "ok": sum(errors.values()) <= polls // 10,
    }


def _pyasic(job: dict[str, Any]) -> dict[str, Any]:
    try:
        pyasic = _ensure_pyasic()
    except (subprocess.CalledProcessError, ImportError) as e:
        return {"error": f"pyasic could not be installed: {e}"}
    out: dict[str, Any] = {"version": getattr(pyasic, "__version__", None), "rigs": {}}
    for driver, hosts in job["rigs"].items():
        try:
            out["rigs"][driver] = asyncio.run(_pyasic_dialect(pyasic, hosts))
        except Exception as e:
            out["rigs"][driver] = {"error": f"{type(e).__name__}: {e}"}
    return out


def main(argv: list[str]) -> int:
    job = json.loads(sys.stdin.read())
    run = {"floors": _floors, "commands": _commands, "pyasic": _pyasic}[argv[0]]
    out = run(job)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
