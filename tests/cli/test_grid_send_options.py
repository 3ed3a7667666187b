"""`rigctl grid send`: its options go before the kind of order (as the README writes them)
or after it, with the same result."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest

from controller.cli.rigctl import build_parser, main

OPTS = ["--key", "op.key", "--kid", "op", "--broker", "mqtt://127.0.0.1:1883", "--site", "sim"]
ORDER = ["--order-id", "try-1", "--max-import-kw", "30", "--duration", "2m"]


def _parsed(argv: list[str]) -> dict[str, object]:
    ns = vars(build_parser().parse_args(argv))
    ns.pop("func")
    return ns


def test_options_before_or_after_the_kind_parse_alike() -> None:
    before = _parsed(["grid", "send", *OPTS, "curtail", *ORDER])
    after = _parsed(["grid", "send", "curtail", *OPTS, *ORDER])
    assert before == after
    assert before["key"] == Path("op.key") and before["site"] == "sim"
    assert before["wait"] == 10.0 and before["print_only"] is False  # defaults kept
    # both: the one nearer the end wins, as with any repeated option
    both = _parsed(["grid", "send", "--site", "a", "ping", "--site", "b"])
    assert both["site"] == "b"


def test_print_only_needs_no_config_nor_broker(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("RIGD_CONFIG", raising=False)
    assert main(["grid", "keygen", "--out", "op"]) == 0
    capsys.readouterr()
    argv = ["grid", "send", "--key", "op.key", "--kid", "op", "--site", "sim", "curtail"]
    assert main([*argv, "--order-id", "t", "--max-import-kw", "3", "--print-only"]) == 0
    header = capsys.readouterr().out.split(".")[0]
    assert json.loads(base64.urlsafe_b64decode(header + "==")) == {
        "alg": "EdDSA",
        "kid": "op",
        "typ": "JWT",
    }
