"""The `[openadr]` section (controller/config/openadr.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from controller.config import ConfigError, parse_config, summarize

BASE = """
[site]
id = "s1"
[control]
max_import_kw = 1000
"""

OADR = """
[openadr]
vtn_url = "https://vtn.example-grid.com/openadr3/3.1.0/"
client_id = "ven-s1"
client_secret = { credential = "vtn-secret" }
ven_name = "rigd-s1"
"""


def test_openadr_section_with_a_credential(tmp_path: Path) -> None:
    (tmp_path / "vtn-secret").write_text("s3cret\n")
    cfg = parse_config(BASE + OADR, environ={"CREDENTIALS_DIRECTORY": str(tmp_path)})
    o = cfg.openadr
    assert o is not None and o.vtn_url == "https://vtn.example-grid.com/openadr3/3.1.0"
    assert o.client_secret.get_secret_value() == "s3cret"
    assert o.levels_pct == [100, 66, 33, 0] and o.alert_level == 2
    assert o.default_reports == ["USAGE", "OPERATING_STATE"]
    assert o.describe() == (
        "OpenADR 3.1 VEN 'rigd-s1' of VTN https://vtn.example-grid.com/openadr3/3.1.0 "
        "(client ven-s1), all programs, SIMPLE levels 100, 66, 33, 0 %, respond within 60 s"
    )


@pytest.mark.parametrize(
    ("text", "where"),
    [
        ("[site]\nid = 's1'\n" + OADR.replace('{ credential = "vtn-secret" }', "'x'"), "openadr"),
        (BASE + OADR.replace("https://vtn", "ftp://vtn"), "openadr.vtn_url"),
        (BASE + OADR + "default_reports = ['USAGE', 'PRICE']\n", "openadr.default_reports"),
        (BASE + OADR + "levels_pct = [100, 50]\n", "openadr.levels_pct"),
        (BASE + OADR + "vtn_secret = 'typo'\n", "openadr.vtn_secret"),
    ],
)
def test_bad_openadr_sections(tmp_path: Path, text: str, where: str) -> None:
    (tmp_path / "vtn-secret").write_text("s3cret")
    with pytest.raises(ConfigError) as e:
        parse_config(text, environ={"CREDENTIALS_DIRECTORY": str(tmp_path)})
    assert any(i.path == where for i in e.value.issues), e.value.issues


def test_openadr_is_typed_strictly_and_overridable_from_the_environment(tmp_path: Path) -> None:
    """Strict like every section: a quoted number in the file is refused; the environment
    (always text) gives numbers as numbers (controller/config/environment.py)."""
    env = {"CREDENTIALS_DIRECTORY": str(tmp_path)}
    (tmp_path / "vtn-secret").write_text("s3cret")
    with pytest.raises(ConfigError) as e:
        parse_config(BASE + OADR + 'respond_within_s = "30"\n', environ=env)
    assert [i.path for i in e.value.issues] == ["openadr.respond_within_s"]
    cfg = parse_config(BASE + OADR, environ={**env, "RIGD_OPENADR__RESPOND_WITHIN_S": "30"})
    assert cfg.openadr is not None and cfg.openadr.respond_within_s == 30


def test_check_config_summary_and_missing_files(tmp_path: Path) -> None:
    """`rigd check-config` prints the VEN in its summary, and refuses a CA file that is
    not there (a typo would otherwise surface as a VEN that cannot connect)."""
    env = {"CREDENTIALS_DIRECTORY": str(tmp_path)}
    (tmp_path / "vtn-secret").write_text("s3cret")
    cfg = parse_config(BASE + OADR, environ=env)
    assert "OpenADR 3.1 VEN 'rigd-s1' of VTN https://vtn.example-grid.com" in summarize(cfg)
    text = BASE + OADR + f"ca_file = {str(tmp_path / 'nowhere.pem')!r}\n"
    assert parse_config(text, environ=env).openadr is not None  # the daemon only warns
    with pytest.raises(ConfigError) as e:
        parse_config(text, environ=env, check_files=True)
    assert [i.path for i in e.value.issues] == ["openadr.ca_file"]
    assert e.value.issues[0].line == BASE.count("\n") + OADR.count("\n") + 1
