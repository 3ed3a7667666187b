"""A config is typed strictly, its files exist, and every problem is reported at once.

Each of these once passed `check-config`: a quoted number, a yes/no written as a word, a CA
file that is not there, a duplicate id hidden behind another error.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from controller.config import ConfigError, load_config, parse_config

CONTROL = """
[site]
id = "s1"

[[miners]]
id = "r1"
host = "127.0.0.1"

[control]
max_import_kw = {kw}
allow_outlet_off = {off}
"""


def issues(text: str, **kw: object) -> list[tuple[str, int | None, str]]:
    with pytest.raises(ConfigError) as exc:
        parse_config(text, source="t.toml", environ={}, **kw)  # type: ignore[arg-type]
    return [(i.path, i.line, i.message) for i in exc.value.issues]


def test_a_quoted_number_and_a_word_for_yes_are_refused_with_their_lines() -> None:
    found = issues(CONTROL.format(kw='"23000"', off='"yes"'))
    assert ("control.max_import_kw", 10, "Input should be a valid number") in found
    assert ("control.allow_outlet_off", 11, "Input should be a valid boolean") in found


def test_numbers_and_booleans_written_as_such_still_load() -> None:
    cfg = parse_config(CONTROL.format(kw="23000", off="false"), environ={})
    assert cfg.control is not None
    assert cfg.control.max_import_kw == 23000.0 and cfg.control.allow_outlet_off is False


def test_environment_overrides_are_typed_by_the_setting_they_override() -> None:
    """A variable is always text: a number or boolean setting reads it as one, a text
    setting keeps it as text (a password of digits stays a password)."""
    env = {
        "RIGD_CONTROL__MAX_IMPORT_KW": "500",
        "RIGD_CONTROL__DRY_RUN": "true",
        "RIGD_MQTT__PASSWORD": "123456",
        "RIGD_SITE__NAME": "42",
    }
    cfg = parse_config(CONTROL.format(kw="1", off="true"), environ=env)
    assert cfg.control is not None and cfg.control.max_import_kw == 500.0
    assert cfg.control.dry_run is True
    assert cfg.mqtt.password is not None and cfg.mqtt.password.get_secret_value() == "123456"
    assert cfg.site.name == "42"
    with pytest.raises(ConfigError) as exc:
        parse_config(CONTROL.format(kw="1", off="true"), environ={"RIGD_POLL__INTERVAL_S": "x"})
    assert exc.value.issues[0].source == "environment RIGD_POLL__INTERVAL_S"


def test_a_duplicate_id_is_reported_with_the_other_errors_at_once() -> None:
    text = """
[site]
id = "s1"

[[miners]]
id = "r1"
host = "127.0.0.1"

[[miners]]
id = "r1"
host = "127.0.0.2"

[poll]
interval_s = "ten"
"""
    found = issues(text)
    assert ("poll.interval_s", 14, "Input should be a valid number") in found
    assert ("miners[1].id", 10, "duplicate rig id 'r1' (also miners[0])") in found


TLS = """
[site]
id = "s1"

[mqtt]
url = "mqtts://127.0.0.1:8883"
ca_file = "{ca}"
"""


def test_check_config_refuses_a_file_setting_naming_no_file(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "ca.pem"
    cfg_file = tmp_path / "rigd.toml"
    cfg_file.write_text(TLS.format(ca=missing))
    # Loading for the daemon still works: a certificate may be provisioned after it starts.
    assert load_config(cfg_file, environ={}).mqtt.ca_file == missing
    with pytest.raises(ConfigError) as exc:
        load_config(cfg_file, environ={}, check_files=True)
    [problem] = exc.value.issues
    assert (problem.path, problem.line) == ("mqtt.ca_file", 7)
    assert problem.message == f"{missing} does not exist"
    r = subprocess.run(
        [sys.executable, "-m", "controller.cli.rigd", "check-config", "-c", str(cfg_file)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 1 and f"rigd.toml:7: mqtt.ca_file: {missing} does not exist" in r.stdout
    present = tmp_path / "ca.pem"
    present.write_text("-----BEGIN CERTIFICATE-----\n")
    cfg_file.write_text(TLS.format(ca=present))
    assert load_config(cfg_file, environ={}, check_files=True).mqtt.ca_file == present


def test_a_missing_operator_key_file_is_reported_at_its_line(tmp_path: Path) -> None:
    text = f"""
[site]
id = "s1"

[control]
max_import_kw = 100

[grid]
[[grid.keys]]
kid = "op"
alg = "EdDSA"
public_key_file = "{tmp_path / "op.pub"}"
"""
    found = issues(text, check_files=True)
    assert found == [("grid.keys[0].public_key_file", 12, f"{tmp_path / 'op.pub'} does not exist")]
