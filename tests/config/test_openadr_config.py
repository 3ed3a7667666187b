"""The `[openadr]` section (controller/config/openadr.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from controller.config import ConfigError, parse_config

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
