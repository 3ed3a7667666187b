"""Habits of command-line users: --version, a missing config named as missing, output
piped into `head`, and messages that say how to turn on what a command needs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from controller.cli import common, rigctl

ROOT = Path(__file__).resolve().parent.parent.parent


def _run(*argv: str, stdout: int = subprocess.PIPE) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "RIGD_CONFIG"}
    return subprocess.run(
        [sys.executable, "-m", *argv],
        stdout=stdout,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        timeout=60,
    )


@pytest.mark.parametrize(
    "module,prog", [("controller.cli.rigd", "rigd"), ("controller.cli.rigctl", "rigctl")]
)
def test_version(module: str, prog: str) -> None:
    r = _run(module, "--version")
    assert r.returncode == 0
    assert r.stdout.startswith(f"{prog} ") and r.stdout.split()[1][0].isdigit()


def test_no_config_at_the_default_path_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    default = tmp_path / "etc" / "rigd" / "rigd.toml"  # as /etc/rigd/rigd.toml, absent
    monkeypatch.setattr(common, "DEFAULT_CONFIG_PATH", default)
    monkeypatch.delenv("RIGD_CONFIG", raising=False)
    assert rigctl.main(["status"]) == rigctl.EXIT_UNREACHABLE
    err = capsys.readouterr().err
    assert f"no config file at {default}" in err and "-c FILE" in err
    assert "has errors" not in err
    assert rigctl.main(["config", "check"]) == 1
    assert "no config file at" in capsys.readouterr().out
    assert rigctl.main(["report", "--out", str(tmp_path / "r.png")]) == rigctl.EXIT_UNREACHABLE
    assert "no config file at" in capsys.readouterr().err


def test_output_into_a_closed_pipe_ends_quietly(tmp_path: Path) -> None:
    """`rigctl scan --json | head`: the reader has gone; no traceback, exit 0."""
    r_fd, w_fd = os.pipe()
    os.close(r_fd)
    try:
        r = _run(
            "controller.cli.rigctl",
            "scan",
            "127.0.0.1/32",
            "--json",
            "--timeout",
            "0.2",
            stdout=w_fd,
        )
    finally:
        os.close(w_fd)
    assert "Traceback" not in r.stderr and r.returncode == 0, r.stderr


def test_scan_json_into_head_in_a_shell() -> None:
    r = subprocess.run(
        [
            "bash",
            "-c",
            f"{sys.executable} -m controller.cli.rigctl scan 127.0.0.1/28 --json "
            "--timeout 0.2 | head -c 1; echo; exit ${PIPESTATUS[0]}",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr


async def test_a_command_that_needs_control_says_how_to_turn_it_on(tmp_path: Path) -> None:
    import json
    from types import SimpleNamespace

    from controller.adapters.admin import AdminServer

    daemon = SimpleNamespace(controller=None, grid=None)
    server = AdminServer(daemon, tmp_path / "s.sock")  # type: ignore[arg-type]
    for cmd, needs in (("budget", "--max-import-kw"), ("grid", "--grid-key")):
        reply = await server.dispatch(json.dumps({"cmd": cmd}).encode(), "alice")
        assert reply["ok"] is False
        assert needs in reply["error"]["message"]
    reply = await server.dispatch(b'{"cmd": "budget"}', "alice")
    assert "[control]" in reply["error"]["message"] and "config reload" in reply["error"]["message"]
