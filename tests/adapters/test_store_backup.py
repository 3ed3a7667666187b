"""`rigd backup`: a consistent, checked, self-contained copy of the state database, taken
while the daemon holds it open and writes; restoring is copying it back."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from controller.adapters.store import StateStore, StoreError, backup
from controller.cli.rigd import main


def test_backup_while_open_and_written_then_restore(tmp_path: Path) -> None:
    live = StateStore.open(tmp_path / "state")
    live.put("planner.memory", {"rig-001": {"mode": "sleep", "since": 1.0}})
    live.audit(
        ts=1.0,
        actor="user:alice",
        action="sleep",
        rig_id="rig-001",
        params={},
        reason="x",
        result="ok",
    )
    assert (tmp_path / "state" / "rigd.sqlite-wal").exists()  # rigd runs: a WAL in use
    out = tmp_path / "backup" / "rigd-2026-01-01.sqlite"
    out.parent.mkdir()
    assert backup(live.path, out) > 0
    live.put("planner.memory", {})  # later writes do not reach the copy
    assert not (out.parent / f"{out.name}-wal").exists()  # one file
    assert out.stat().st_mode & 0o777 == 0o600
    live.close()

    # restore: rigd stopped, the copy put in place of the database
    restored = tmp_path / "restored"
    restored.mkdir()
    shutil.copy(out, restored / "rigd.sqlite")
    st = StateStore.open(restored)
    assert st.get("planner.memory") == {"rig-001": {"mode": "sleep", "since": 1.0}}
    assert [e.actor for e in st.audit_since(0.0)] == ["user:alice"]
    st.close()


def test_no_database_is_an_error_and_leaves_nothing(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="no state database"):
        backup(tmp_path / "nope.sqlite", tmp_path / "out.sqlite")
    assert list(tmp_path.iterdir()) == []


def test_rigd_backup_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    st = StateStore.open(tmp_path)
    st.put("control.override", None)
    cfg = tmp_path / "rigd.toml"
    cfg.write_text(f'[site]\nid = "x"\nstate_dir = "{tmp_path}"\n')
    assert main(["backup", "-c", str(cfg), "--out", str(tmp_path / "copy.sqlite")]) == 0
    assert "integrity ok" in capsys.readouterr().out
    st.close()
    assert main(["backup", "--db", str(tmp_path / "nope"), "--out", str(tmp_path / "c2")]) == 2
    assert main(["backup", "-c", str(tmp_path / "none.toml"), "--out", "x"]) == 2
    assert "no config file at" in capsys.readouterr().err
