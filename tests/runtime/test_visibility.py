"""What a technician sees when control cannot do what it is asked: import over the cap with
nothing left to shed, rigs kept asleep by `min_off_s`, refusals that quote the cap in force.

The issue this answers: an override of 20 kW with every rig asleep left import at 20.2 kW
(the facility's own load), and `rigctl status` said only "control: active".
"""

from __future__ import annotations

import io
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from rich.console import Console
from structlog.testing import capture_logs

from bench.sim_harness import SimHarness, flat_out_kw
from controller.adapters.metrics import Context, samples
from controller.adapters.sdnotify import status_line
from controller.cli.rigctl import print_status
from controller.core.planner import ActionKind
from controller.core.status import CycleResult
from controller.errors import ManualRefused


@pytest.fixture
async def farm(tmp_path: Path) -> AsyncIterator[SimHarness]:
    # 6 rigs and 20 kW of facility load that no rig can shed (lights, cooling, offices).
    h = SimHarness.create(tmp_path, rigs=6, pdus=0, overhead_base_w=20_000.0, control={})
    try:
        yield h
    finally:
        await h.close()


def _status_text(result: CycleResult) -> str:
    buf = Console(file=io.StringIO(), width=200, highlight=False)
    doc = {**result.document, "mqtt_connected": True}
    print_status(doc, buf)
    out = buf.file.getvalue()  # type: ignore[attr-defined]
    assert isinstance(out, str)
    return out


def _metric(result: CycleResult, name: str) -> float:
    ctx = Context(per_rig=False, interval_s=10.0)
    got = [s.value for s in samples(result, ctx) if s.name == name]
    assert len(got) == 1, name
    return got[0]


async def test_cannot_shed_enough_is_logged_once_published_counted_and_shown(
    farm: SimHarness,
) -> None:
    h = farm
    assert flat_out_kw(h.farm) > 30
    h.set_override(20.0, 3 * 3600, "feeder work")
    with capture_logs() as logs:
        await h.run_for(1200)  # every rig asleep within minutes; import stays ~20 kW
    r = await h.step()
    short = r.document["control"]["cannot_shed"]
    assert short is not None and short["over_kw"] > 0
    assert short["nonrig_kw"] == pytest.approx(20.0, abs=1.5)
    assert r.document["rigs"]["sleeping"] == 6
    # once per episode in the log, not once a cycle
    started = [e for e in logs if e["event"] == "cannot_shed_enough"]
    assert len(started) == 1
    assert started[0]["cap_source"] == "override" and started[0]["log_level"] == "warning"
    # the metric, the MQTT state document (what `publish` sends) and systemd's status line
    assert _metric(r, "rigd_control_cannot_shed") == 1
    assert _metric(r, "rigd_control_shortfall_watts") == pytest.approx(short["over_kw"] * 1000)
    assert h.link.retained("state")["control"]["cannot_shed"]["over_kw"] == short["over_kw"]
    assert "CANNOT SHED ENOUGH" in status_line(r.document, True)
    text = _status_text(r)
    assert "CANNOT SHED ENOUGH" in text and "every rig control may command is down" in text
    assert "load other than rigs" in text

    # the override is cleared: the episode ends, once
    h.controller.clear_override()
    with capture_logs() as logs:
        r = await h.step()
        await h.step()
    assert r.document["control"]["cannot_shed"] is None
    assert [e["event"] for e in logs].count("cannot_shed_ended") == 1
    assert _metric(r, "rigd_control_cannot_shed") == 0


async def test_rigs_kept_asleep_by_min_off_say_so_with_a_countdown(farm: SimHarness) -> None:
    h = farm
    h.set_override(30.0, 600, "short order")  # sheds some rigs
    await h.run_for(120)
    h.controller.clear_override()
    r = await h.step()
    wait = r.document["control"]["min_off_wait"]
    assert wait is not None and wait["rigs"] >= 1
    assert wait["min_off_s"] == 300
    assert 0 < wait["next_in_s"] <= wait["all_in_s"] <= 300
    assert _metric(r, "rigd_rigs_sleeping_min_off") == wait["rigs"]
    text = _status_text(r)
    assert "stay asleep for min_off_s (300 s)" in text and "the next may wake in" in text
    await h.run_for(600)
    r = await h.step()
    assert r.document["control"]["min_off_wait"] is None  # woken, or free to be


async def test_a_refusal_quotes_the_cap_in_force_not_one_just_cleared(farm: SimHarness) -> None:
    h = farm
    h.set_override(20.0, 3600, "feeder work")
    await h.run_for(600)
    asleep = [rid for rid, rig in h.farm.rigs.items() if rig.mode.value == "sleeping"]
    assert asleep
    with pytest.raises(ManualRefused, match="set by override"):
        h.controller.check_manual(ActionKind.WAKE, asleep, None)
    h.controller.clear_override()  # `rigctl budget clear`, no cycle since
    try:
        h.controller.check_manual(ActionKind.WAKE, asleep[:1], None)
    except ManualRefused as e:  # may still not fit, but never because of the old override
        assert "override" not in str(e) and "max_import" in str(e)
