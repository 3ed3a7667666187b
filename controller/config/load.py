"""Loading a config: TOML text, environment overrides, validation, cross-checks.

A broken config must never reach a running daemon, so loading either returns a fully
checked `Config` or raises `ConfigError` listing *every* problem with its dotted path and,
where the file has it, its line (or the environment variable that set it): a technician
fixes the file in one pass instead of one error per restart.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from controller.config.checks import cross_check, missing_files, raw_duplicate_ids
from controller.config.credentials import CONTEXT_KEY, Credentials
from controller.config.environment import apply_env
from controller.config.locate import dotted, line_for, locate_lines
from controller.config.schema import Config
from controller.errors import RigdError

DEFAULT_CONFIG_PATH = Path("/etc/rigd/rigd.toml")


@dataclass(frozen=True, slots=True)
class ConfigIssue:
    path: str  # dotted, e.g. "pdus[1].outlets.3"
    message: str
    line: int | None = None  # 1-based line in the file, when known
    source: str = ""  # the file, or the environment variable that set it

    def __str__(self) -> str:
        where = self.source
        if self.line is not None:
            where = f"{where}:{self.line}" if where else f"line {self.line}"
        head = f"{where}: " if where else ""
        return f"{head}{self.path or '(top level)'}: {self.message}"


class ConfigError(RigdError):
    """A config that must not be used, with every problem found in it."""

    def __init__(self, issues: list[ConfigIssue], source: str = "") -> None:
        self.issues = issues
        self.source = source
        super().__init__("\n".join(str(i) for i in issues))


def _file_loc(loc: tuple[Any, ...]) -> tuple[Any, ...]:
    """A validation location as the file has it. A `[[miners]]` row is flat in the file,
    but its driver's settings are validated as `settings.<driver>.<key>`: drop that part."""
    out: list[Any] = []
    parts = iter(enumerate(loc))
    for i, part in parts:
        if part == "settings" and i >= 2 and loc[i - 2] == "miners":
            next(parts, None)  # the driver tag
            continue
        out.append(part)
    return tuple(out)


def parse_config(
    text: str,
    *,
    source: str = "<config>",
    environ: Mapping[str, str] | None = None,
    credentials: Credentials | None = None,
    check_files: bool = False,
) -> Config:
    """Validate TOML text (plus environment overrides); raise ConfigError listing every issue.

    `check_files`: also refuse file settings that name no readable file (`check-config`).

    `{ credential = "NAME" }` settings are read from `credentials`, by default the directory
    systemd names in $CREDENTIALS_DIRECTORY (of `environ`).
    """
    try:
        raw = tomllib.loads(text)
    except (ValueError, RecursionError) as e:  # TOMLDecodeError, or an int of 5000 digits
        m = re.search(r"\(at line (\d+), column \d+\)", str(e))
        line = int(m.group(1)) if m else None
        msg = re.sub(r"\s*\(at line \d+, column \d+\)", "", str(e))
        msg = "nested too deeply" if isinstance(e, RecursionError) else msg
        raise ConfigError([ConfigIssue("", f"not valid TOML: {msg}", line, source)], source) from e
    env = os.environ if environ is None else environ
    applied = apply_env(raw, env, Config)
    lines = locate_lines(text)
    creds = credentials if credentials is not None else Credentials.from_environ(env)

    def issue(loc: tuple[Any, ...], msg: str) -> ConfigIssue:
        key = tuple(str(p) for p in loc)
        for path, var in applied.items():
            if key[: len(path)] == path:
                return ConfigIssue(dotted(loc), msg, None, f"environment {var}")
        return ConfigIssue(dotted(loc), msg, line_for(loc, lines), source)

    try:
        cfg = Config.model_validate(raw, context={CONTEXT_KEY: creds})
    except ValidationError as e:
        issues = []
        for err in e.errors():
            loc = _file_loc(
                tuple(
                    p
                    for p in err["loc"]
                    if p not in ("[key]",) and not str(p).startswith("function-")
                )
            )
            msg = err["msg"].removeprefix("Value error, ")
            if err["type"] == "extra_forbidden":
                msg = "unknown setting (check the spelling; see config/example.toml)"
            elif err["type"] == "string_pattern_mismatch":
                msg = (
                    f"{err['input']!r} is not a valid id: use letters, digits, '-', '_' and '.', "
                    "starting with a letter or digit, at most 64 characters"
                )
            elif err["type"] == "missing":
                msg = "required setting is missing"
            issues.append(issue(loc, msg))
        issues += [issue(loc, msg) for loc, msg in raw_duplicate_ids(raw)]
        raise ConfigError(issues, source) from e
    problems = cross_check(cfg) + (missing_files(cfg) if check_files else [])
    if problems:
        raise ConfigError([issue(loc, msg) for loc, msg in problems], source)
    return cfg


def load_config(
    path: str | os.PathLike[str],
    environ: Mapping[str, str] | None = None,
    credentials: Credentials | None = None,
    *,
    check_files: bool = False,
) -> Config:
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(
            [ConfigIssue("", f"cannot read config: {e.strerror}", None, str(p))], str(p)
        ) from e
    except UnicodeDecodeError as e:
        raise ConfigError(
            [ConfigIssue("", "config is not UTF-8 text", None, str(p))], str(p)
        ) from e
    return parse_config(
        text, source=str(p), environ=environ, credentials=credentials, check_files=check_files
    )


def summarize(cfg: Config) -> str:
    """What a technician wants confirmed after `check-config`: counts, not a dump."""
    everything = cfg.rigs()
    rigs = [r for r in everything if r.miner.driver != "auto"]
    to_scan = len(everything) - len(rigs)
    mapped = sum(len(p.outlets) for p in cfg.pdus)
    ranges = sum(1 for m in cfg.miners if m.range is not None and m.driver != "auto")
    drivers: dict[str, int] = {}
    for r in rigs:
        drivers[r.miner.driver] = drivers.get(r.miner.driver, 0) + 1
    by_driver = ", ".join(f"{n} {d}" for d, n in sorted(drivers.items())) or "none"
    lines = [
        f"site {cfg.site.id} ({cfg.site.timezone}), state in {cfg.site.state_dir}",
        f"broker {cfg.mqtt.url}, poll every {cfg.poll.interval_s:g} s "
        f"({cfg.poll.concurrency} at once, timeout {cfg.poll.timeout_s:g} s)",
        f"{len(cfg.meters)} meter(s): "
        + (", ".join(f"{m.id} ({m.protocol})" for m in cfg.meters) or "none"),
        f"{len(cfg.pdus)} PDU(s), {mapped} outlet(s) mapped to rigs",
        f"{len(rigs)} miner(s) ({by_driver})"
        + (f", {ranges} address range(s) expanded" if ranges else "")
        + f", {len(rigs) - mapped} without an outlet"
        + (f"; {to_scan} address(es) to scan (driver auto)" if to_scan else ""),
        f"{len(cfg.groups)} group(s)"
        + (": " + ", ".join(sorted(cfg.groups)) if cfg.groups else ""),
    ]
    c = cfg.control
    if c is None or not c.enabled:
        lines.append("control: off (monitoring only)")
    else:
        lines.append(
            f"control: max import {c.max_import_kw:,.0f} kW, {len(c.schedules)} schedule(s)"
            + (", DRY RUN" if c.dry_run else "")
        )
    if cfg.budget is not None:
        lines.append(f"budget: {cfg.budget.kwh:,.0f} kWh per {cfg.budget.period}")
    g = cfg.grid
    if g is not None and g.enabled:
        hb = g.heartbeat
        lines.append(
            f"grid orders: {len(g.keys)} operator key(s)"
            + (", UNSIGNED ORDERS ACCEPTED" if g.allow_unsigned else ", signed only")
            + (
                f", heartbeat on {hb.topic} (failsafe {hb.failsafe_kw:,.0f} kW after "
                f"{hb.timeout_s:g} s)"
                if hb
                else ", no heartbeat"
            )
        )
    if not cfg.meters:
        lines.append("warning: no import meter; the farm's import will not be measured")
    return "\n".join(lines)
