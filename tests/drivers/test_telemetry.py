"""`revised`, the per-poll `dataclasses.replace` of a reading: it must carry every field."""

from __future__ import annotations

import dataclasses

from drivers.telemetry import Hashboard, RigIdentity, RigState, RigTelemetry, revised


def _reading() -> RigTelemetry:
    return RigTelemetry(
        ts=1.0, state=RigState.MINING, hashrate_ths=100.0, power_w=3000.0, power_limit_w=3100.0,
        nominal_hashrate_ths=110.0, temp_c=60.0, chip_temp_c=70.0, fans_rpm=(6000, 6100),
        hashboards=(Hashboard(index=0, hashrate_ths=33.0),), uptime_s=86400,
        identity=RigIdentity("Antminer", "Antminer S19", "bmminer", "1.0"),
    )  # fmt: skip


def test_revised_is_replace_for_every_field() -> None:
    tel = _reading()
    assert len(dataclasses.fields(RigTelemetry)) == 12  # a new field must be added to revised
    assert revised(tel) == tel
    ident = RigIdentity("Braiins", "S19", "Braiins OS", "25.07")
    changes = {"state": RigState.SLEEPING, "power_limit_w": None, "identity": ident}
    assert revised(tel, **changes) == dataclasses.replace(tel, **changes)  # type: ignore[arg-type]
    assert revised(tel, power_limit_w=2000.0) == dataclasses.replace(tel, power_limit_w=2000.0)
