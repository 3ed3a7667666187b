"""Config loading: the example loads, every kind of error names its path (and line)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from controller.config import ConfigError, expand_range, load_config, locate_lines, parse_config
from drivers import registry

ROOT = Path(__file__).resolve().parent.parent.parent
EXAMPLE = ROOT / "config" / "example.toml"

MINIMAL = """
[site]
id = "s1"

[[miners]]
id = "r1"
host = "127.0.0.1"
"""


def errors(text: str, environ: dict[str, str] | None = None) -> list[tuple[str, int | None, str]]:
    with pytest.raises(ConfigError) as exc:
        parse_config(text, source="t.toml", environ=environ or {})
    return [(i.path, i.line, i.message) for i in exc.value.issues]


def test_example_config_loads() -> None:
    cfg = load_config(EXAMPLE, environ={})
    assert cfg.site.id == "kg-chui-01"
    assert cfg.site.timezone == "Asia/Bishkek"
    assert cfg.mqtt.tls and cfg.mqtt.port == 8883
    rigs = {r.id: r for r in cfg.rigs() if r.miner.driver != "auto"}
    assert len(rigs) == 51
    assert sum(r.miner.driver == "auto" for r in cfg.rigs()) == 254  # hall-c, to be scanned
    assert rigs["rig-2-11"].host == "10.10.2.11" and rigs["rig-2-60"].host == "10.10.2.60"
    assert rigs["rig-2-11"].outlet == ("pdu-a1", 1)
    assert rigs["s21-spare"].outlet is None and rigs["s21-spare"].miner.driver == "cgminer"
    assert cfg.pdus[0].auth_key is not None
    assert "change-me" not in repr(cfg.pdus[0])  # secrets stay out of logs and reprs


def test_minimal_config_has_defaults() -> None:
    cfg = parse_config(MINIMAL, environ={})
    assert cfg.mqtt.url == "mqtt://127.0.0.1:1883"
    assert cfg.poll.interval_s == 10.0
    assert cfg.rigs()[0].miner.port == 4028


def test_env_overrides_any_setting() -> None:
    env = {
        "RIGD_MQTT__URL": "mqtt://127.0.0.1:18830",
        "RIGD_POLL__INTERVAL_S": "2.5",
        "RIGD_POLL__TIMEOUT_S": "1",
        "RIGD_SITE__NAME": "from env",
        "RIGD_CONFIG": "/ignored/not/a/setting.toml",
    }
    cfg = parse_config(MINIMAL, environ=env)
    assert cfg.mqtt.port == 18830
    assert cfg.poll.interval_s == 2.5
    assert cfg.site.name == "from env"


def test_env_override_errors_name_the_variable() -> None:
    ((path, line, _msg),) = errors(MINIMAL, {"RIGD_POLL__TIMEOUT_S": "soon"})
    assert path == "poll.timeout_s" and line is None
    with pytest.raises(ConfigError) as exc:
        parse_config(MINIMAL, environ={"RIGD_POLL__TIMEOUT_S": "soon"})
    assert "RIGD_POLL__TIMEOUT_S" in str(exc.value)


def test_toml_syntax_error_has_line() -> None:
    ((_path, line, msg),) = errors('[site]\nid = "x"\nbroken = \n')
    assert line == 3 and "not valid TOML" in msg


def test_each_kind_of_error_names_its_path_and_line() -> None:
    text = """[site]
id = "bad/id"
timezone = "Mars/Olympus"

[mqtt]
url = "http://broker:1883"

[poll]
interval_s = 0
intervall = 5

[[meters]]
id = "m1"
host = "127.0.0.1"
protocol = "dlms"

[[pdus]]
id = "p1"
host = "127.0.0.1"
snmp_version = "3"

[[miners]]
range = "127.0.0.9-127.0.0.2"
"""
    got = {p: (line, msg) for p, line, msg in errors(text)}
    assert got["site.id"][0] == 2 and "not a valid id" in got["site.id"][1]
    assert got["site.timezone"][0] == 3 and "Mars/Olympus" in got["site.timezone"][1]
    assert got["mqtt.url"][0] == 6 and "mqtt://" in got["mqtt.url"][1]
    assert got["poll.interval_s"][0] == 9
    assert got["poll.intervall"] == (
        10,
        "unknown setting (check the spelling; see config/example.toml)",
    )
    assert got["meters[0].protocol"][0] == 15
    assert got["pdus[0]"][0] == 17 and "user, auth_key and priv_key" in got["pdus[0]"][1]
    assert got["miners[0]"][0] == 22 and "ends before it starts" in got["miners[0]"][1]


def test_cross_section_errors() -> None:
    text = """[site]
id = "s"

[[pdus]]
id = "p1"
host = "127.0.0.1"
outlets = { 1 = "r1", 2 = "ghost" }

[[pdus]]
id = "p1"
host = "127.0.0.2"
outlets = { 1 = "r1" }

[[miners]]
id = "r1"
host = "127.0.0.1"
group = "nope"

[[miners]]
id = "r1"
host = "127.0.0.5"
"""
    got = errors(text)
    paths = {p for p, _, _ in got}
    assert "pdus[0].outlets.2" in paths  # ghost rig
    assert "pdus[1].id" in paths  # duplicate PDU id
    assert "pdus[1].outlets.1" in paths  # r1 on two outlets
    assert "miners[0].group" in paths
    assert "miners[1]" in paths  # duplicate rig id
    lines = {p: line for p, line, _ in got}
    assert lines["pdus[0].outlets.2"] == 7
    assert lines["miners[0].group"] == 17
    assert lines["miners[1]"] == 19


def test_timeouts_must_fit_inside_the_interval() -> None:
    """One silent device must not stretch every poll cycle past its interval."""
    text = MINIMAL + "\n[poll]\ninterval_s = 5\ntimeout_s = 3\nretries = 1\n"
    ((path, line, msg),) = errors(text)
    assert path == "poll" and line == 9
    assert "timeout_s x (retries + 1) = 6 s" in msg and "interval_s = 5 s" in msg
    parse_config(MINIMAL + "\n[poll]\ninterval_s = 5\ntimeout_s = 2\nretries = 1\n", environ={})


def test_missing_site_is_reported() -> None:
    ((path, _, msg),) = errors("[poll]\ninterval_s = 8\n")
    assert path == "site" and msg == "required setting is missing"


def test_unreadable_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as exc:
        load_config(tmp_path / "nope.toml", environ={})
    assert "cannot read config" in str(exc.value)


def test_ranges() -> None:
    assert [str(a) for a in expand_range("10.0.0.254-10.0.1.1")] == [
        "10.0.0.254",
        "10.0.0.255",
        "10.0.1.0",
        "10.0.1.1",
    ]
    assert len(expand_range("10.0.2.0/24")) == 254
    assert [str(a) for a in expand_range("10.0.2.10-12")] == ["10.0.2.10", "10.0.2.11", "10.0.2.12"]


def test_line_locator_handles_arrays_of_tables() -> None:
    lines = locate_lines('[a]\nx = 1\n[[b]]\ny = 2\n[[b]]\n"quoted key" = 3\n[c.d]\nz.w = 4\n')
    assert lines[("a", "x")] == 2
    assert lines[("b", "0", "y")] == 4
    assert lines[("b", "1", "quoted key")] == 6
    assert lines[("c", "d", "z", "w")] == 8


def test_check_config_cli(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[site]\nid = "s"\n\n[poll]\nretries = 99\n')
    r = subprocess.run(
        [sys.executable, "-m", "controller.cli.rigd", "check-config", "-c", str(bad)],
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin"},
    )
    assert r.returncode == 1
    assert f"{bad}:5: poll.retries" in r.stdout
    r = subprocess.run(
        [sys.executable, "-m", "controller.cli.rigd", "check-config", "-c", str(EXAMPLE)],
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin"},
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert "51 miner(s)" in r.stdout and "2 PDU(s), 6 outlet(s)" in r.stdout


def test_rigctl_config_check_finds_the_config_from_the_environment(tmp_path: Path) -> None:
    bad = tmp_path / "rigd.toml"
    bad.write_text('[site]\nid = "s"\n[[miners]]\nid = "r1"\n')
    env = {"PATH": "/usr/bin:/bin", "RIGD_CONFIG": str(bad)}
    r = subprocess.run(
        [sys.executable, "-m", "controller.cli.rigctl", "config", "check"],
        capture_output=True,
        text=True,
        env=env,
    )
    assert r.returncode == 1
    assert f"{bad}:3: miners[0]: a miner needs `id` and `host`, or a `range`" in r.stdout


CONTROL = """
[[meters]]
id = "m"
host = "127.0.0.1"

[control]
max_import_kw = 1000
"""


def test_control_and_budget_sections() -> None:
    cfg = parse_config(
        MINIMAL + CONTROL + '\n[budget]\nperiod = "month"\nkwh = 500000\n', environ={}
    )
    assert cfg.control is not None and cfg.control.max_import_kw == 1000
    assert cfg.control.timing_for("Antminer S21") == cfg.control.timing_default
    assert cfg.budget is not None and cfg.budget.reserve_pct == 0.5


def test_budget_needs_control_and_an_import_meter() -> None:
    msgs = [m for _, _, m in errors(MINIMAL + '\n[budget]\nperiod = "day"\nkwh = 10\n')]
    assert any("needs a [control] section" in m for m in msgs)
    assert any("counted from an import meter" in m for m in msgs)


def test_schedule_errors_are_located() -> None:
    text = MINIMAL + CONTROL + '\n[[control.schedules]]\nname = "peak"\nstart = "25:00"\n'
    got = {p: line for p, line, _ in errors(text)}
    assert got["control.schedules[0].start"] == 18
    assert got["control.schedules[0].end"] == 16  # missing: located at its table


def test_miner_driver_settings() -> None:
    text = (
        MINIMAL
        + """driver = "antminer"
low_power_w = 2300
web_port = 8080

[[miners]]
id = "wm3"
host = "127.0.0.2"
driver = "whatsminer-v3"
power_min_w = 1800
power_max_w = 3400

[[miners]]
id = "wm3b"
host = "127.0.0.3"
driver = "whatsminer-v3"
port = 14433

[[miners]]
id = "bos"
host = "127.0.0.4"
driver = "braiins"
"""
    )
    rigs = {r.id: r.miner for r in parse_config(text, source="t.toml", environ={}).rigs()}
    r1 = rigs["r1"].settings
    assert (rigs["r1"].driver, rigs["r1"].port, r1.web_port) == ("antminer", 4028, 8080)
    assert r1.low_power_w == 2300
    assert rigs["wm3"].port == 4433  # API v3's own port when none is given
    wm3 = rigs["wm3"].settings
    assert (wm3.power_min_w, wm3.power_max_w) == (1800, 3400)
    assert rigs["wm3b"].port == 14433
    assert (rigs["bos"].port, rigs["bos"].settings.web_port) == (4028, 80)
    assert rigs["bos"].driver_settings(10.0) == registry.BraiinsSettings(grpc_port=50051)


def test_rows_share_equal_driver_settings() -> None:
    """A farm's rows of one driver and the same settings hold one settings object (and one
    set of given keys) between them, not a copy each: half of a row's memory. A row
    copied with a change (`model_copy`) leaves the others' as they were."""
    rows = "".join(
        f'\n[[miners]]\nid = "a{i}"\nhost = "127.0.1.{i}"\ndriver = "antminer"\n'
        "low_power_w = 2300\n"
        for i in range(1, 4)
    )
    rows += '\n[[miners]]\nid = "b"\nhost = "127.0.2.1"\ndriver = "antminer"\nweb_port = 81\n'
    miners = parse_config(MINIMAL + rows, source="t.toml", environ={}).miners[1:]
    a1, a2, a3, b = miners
    assert a1.settings is a2.settings is a3.settings
    assert b.settings is not a1.settings and b.settings.web_port == 81
    assert a1.__pydantic_fields_set__ is a2.__pydantic_fields_set__
    moved = a1.model_copy(update={"group": "hall"})
    assert "group" in moved.model_fields_set and "group" not in a2.model_fields_set


def test_braiins_grpc_port_reaches_the_driver() -> None:
    """Releases before 25.07 have only the gRPC API: a farm that forwards it elsewhere
    (NAT, a port per rig) says so per row, and the driver dials that port."""
    text = MINIMAL + 'driver = "braiins"\ngrpc_port = 15051\n'
    (rig,) = parse_config(text, source="t.toml", environ={}).rigs()
    settings = rig.miner.driver_settings(10.0)
    assert settings == registry.BraiinsSettings(web_port=80, grpc_port=15051)
    access = registry.MinerAccess(host="127.0.0.1", port=None)
    driver = registry.KINDS["braiins"].build("bos", access, settings)
    assert driver.rest.grpc.client.port == 15051  # type: ignore[attr-defined]
    luxos = MINIMAL + "grpc_port = 15051\n"
    msgs = [m for _, _, m in errors(luxos)]
    assert any("`grpc_port` does not apply to driver 'luxos'" in m for m in msgs), msgs
    assert any("driver braiins" in m for m in msgs), msgs


def test_miner_driver_setting_errors_name_the_driver() -> None:
    text = (
        MINIMAL
        + """driver = "luxos"
low_power_w = 2300

[[miners]]
id = "wm"
host = "127.0.0.2"
driver = "whatsminer"
power_min_w = 3000
power_max_w = 2000

[[miners]]
id = "x"
host = "127.0.0.3"
driver = "innosilicon"
"""
    )
    got = {p: (line, msg) for p, line, msg in errors(text)}
    assert got["miners[0]"][0] == 5  # the table's line
    assert "`low_power_w` does not apply to driver 'luxos'" in got["miners[0]"][1]
    assert "driver antminer" in got["miners[0]"][1]
    assert "power_min_w (3000) must be below power_max_w (2000)" in got["miners[1]"][1]
    assert "whatsminer-v3" in got["miners[2].driver"][1]


def test_summary_counts_every_driver() -> None:
    from controller.config import summarize

    cfg = parse_config(
        MINIMAL
        + 'driver = "braiins"\n\n[[miners]]\nrange = "127.0.0.2-4"\ndriver = "whatsminer"\n',
        source="t.toml",
        environ={},
    )
    assert "4 miner(s) (1 braiins, 3 whatsminer)" in summarize(cfg)


def test_a_range_whose_ids_would_not_be_valid_ids_is_refused() -> None:
    """Rig ids become MQTT topic levels: a range may not make one with '/' in it."""
    with pytest.raises(ConfigError, match="makes rig id 'a/b-0-1'"):
        parse_config('[site]\nid = "s"\n[[miners]]\nrange = "10.0.0.1-3"\nid_prefix = "a/b"\n')
