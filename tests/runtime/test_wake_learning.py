"""Wake times are learned from the rigs' own telemetry (controller/core/wake_times.py):
with no [control.timing] in the config, rigd starts from its default prior (300 s) and,
after one curtailment, knows how long each model took from its wake command to its power
at target, to within a poll. The simulator's figures are only the judge here."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from bench.sim_harness import SimHarness, flat_out_kw
from controller.core.wake_times import AT_TARGET, kind_key

HOUR = 3600.0


@pytest.mark.timeout(120)
async def test_a_curtailment_teaches_each_model_its_wake_time(
    harness: Callable[..., SimHarness],
) -> None:
    h = harness(rigs=12, control={"ramp_kw_per_interval": 1000.0}, physical_timing=False)
    full = flat_out_kw(h.farm)
    h.at(h.now + 33, lambda: h.set_override(full * 0.4, 1200.0, "test"))
    await h.run_for(HOUR)
    ctl = h.controller
    assert ctl.wake_times.seen, "no wake was timed"
    models = {r.model.name: r for r in h.farm.rigs.values()}
    for name, sim in models.items():
        keys = [k for k in ctl.wake_times.seen if k.startswith(f"{name}|")]
        if not keys:
            continue  # no rig of this model slept
        (key,) = keys
        m = sim.model
        # Boot, then a linear ramp from idle to the target: at (1 - AT_TARGET) of it.
        true_s = m.boot_s + m.wake_ramp_s * (1.0 - AT_TARGET)
        seen = ctl.wake_times.seen[key].mean_s
        assert true_s - 1.0 <= seen <= true_s + h.interval_s + 5.0, (name, seen, true_s)
        # The planner's view of those rigs carries it, not the 300 s prior.
        assert ctl._timing(name, key).wake_s == pytest.approx(ctl.wake_times.wake_s(key, 300.0))
    assert kind_key("", "") not in ctl.wake_times.seen
