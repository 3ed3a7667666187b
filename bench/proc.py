"""What a process costs, read from /proc, and what machine a benchmark ran on.

/proc and not psutil: the daemon is measured from outside, as an operator would with `top`,
and the benchmark needs nothing the daemon does not.
"""

from __future__ import annotations

import contextlib
import os
import platform
import resource
from pathlib import Path
from typing import Any

_TICK = os.sysconf("SC_CLK_TCK")


def cpu_s(pid: int) -> float:
    """User plus system CPU seconds the process has used so far (its threads included)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    # The command name may hold spaces and parentheses: fields start after the last ')'.
    fields = stat.rsplit(")", 1)[1].split()
    utime, stime = int(fields[11]), int(fields[12])  # fields 14 and 15 of proc(5)
    return (utime + stime) / _TICK


def children(pid: int) -> list[int]:
    """The live child processes of `pid` (a farm simulator's workers), from /proc."""
    out: list[int] = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue  # gone meanwhile
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:  # field 4 of proc(5): the parent
            out.append(int(entry.name))
    return out


def tree_cpu_s(pids: list[int]) -> float:
    """CPU seconds of these processes, each counted while it lives (see `cpu_s`)."""
    total = 0.0
    for pid in pids:
        # one exited: its last figure is lost, which a steady window does not see
        with contextlib.suppress(OSError, IndexError):
            total += cpu_s(pid)
    return total


def _status_kb(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(f"{key} not in /proc/{pid}/status")


def peak_rss_mb(pid: int) -> float:
    """The process's peak resident set (VmHWM), in MiB."""
    return _status_kb(pid, "VmHWM") / 1024.0


def rss_mb(pid: int) -> float:
    return _status_kb(pid, "VmRSS") / 1024.0


OPEN_FILES_WANTED = 1 << 17  # a 10,000-rig farm in one process: ~17,000 listening sockets


def raise_open_files() -> int:
    """Raise this process's open-files limit (children inherit it): every simulated miner
    is one or more listening sockets, and every connection the daemon keeps alive one more
    in the simulator. The 10,000-rig farm ran out at a hard limit of 20,000 (its meter and
    new connections refused); so the hard limit too is raised where that is allowed (root,
    CAP_SYS_RESOURCE), up to the kernel's `fs.nr_open`, else the soft one to the hard."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < OPEN_FILES_WANTED:
        try:
            nr_open = int(Path("/proc/sys/fs/nr_open").read_text())
        except (OSError, ValueError):
            nr_open = OPEN_FILES_WANTED
        want = min(OPEN_FILES_WANTED, nr_open)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, want))
            return want
        except (ValueError, OSError):
            pass  # not allowed: what the hard limit gives
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def load_average() -> tuple[float, float, float]:
    return os.getloadavg()


def machine() -> dict[str, Any]:
    """CPU model, cores, memory, kernel and Python: what the numbers depend on."""
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gib = 0.0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_gib = int(line.split()[1]) / 1024 / 1024
                break
    except OSError:
        pass
    return {
        "cpu": model or platform.processor() or "unknown",
        "cores": os.cpu_count(),
        "memory_gib": round(mem_gib, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "load_avg_1m_at_start": round(load_average()[0], 2),
    }
