"""Grid orders without a broker: verification, every rejection reason, the order book's
lifecycle, compliance figures and the heartbeat failsafe, and the planner under a deadline.
The MQTT path is in test_grid_mqtt.py."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jwt
import pytest

from controller.adapters.grid.verify import Rejected, Verifier, load_keys
from controller.adapters.store import StateStore
from controller.config import Config, GridConfig, parse_config
from controller.core.caps import effective_cap
from controller.core.grid.book import OrderBook, report_doc
from controller.core.grid.orders import REJECT_REASONS, json_schema
from controller.runtime.grid_service import GridService, grid_rules
from tests.grid_helpers import Operator, grid_toml, order, plain

NOW = 1_790_000_000.0
BASE = """
[site]
id = "sim"
state_dir = "{state}"
[control]
max_import_kw = 1000
"""


def config(tmp_path: Path, *ops: Operator, allow_unsigned: bool = False, extra: str = "") -> Config:
    text = BASE.format(state=tmp_path / "state") + grid_toml(
        *ops, allow_unsigned=allow_unsigned, extra=extra
    )
    return parse_config(text, environ={})


def verifier(cfg: Config) -> Verifier:
    assert cfg.grid is not None
    return Verifier(cfg.grid, cfg.site.id, load_keys(cfg.grid))


def reason(v: Verifier, raw: bytes, now: float = NOW) -> str:
    with pytest.raises(Rejected) as e:
        v.verify(raw, now)
    return e.value.reason


# -- verification ------------------------------------------------------------------------------


@pytest.mark.parametrize("alg", ["EdDSA", "ES256"])
def test_signed_orders_verify_with_either_algorithm(tmp_path: Path, alg: str) -> None:
    op = Operator.new("op-1", alg)
    v = verifier(config(tmp_path, op))
    got = v.verify(op.sign(order(now=NOW)), NOW)
    assert got.signed and got.kid == "op-1"
    assert got.message.kind == "curtail"
    # without a kid, the key is found by algorithm
    assert v.verify(op.sign(order(now=NOW), kid=None), NOW).kid == "op-1"


def test_every_rejection_before_the_book(tmp_path: Path) -> None:
    op, other = Operator.new("op-1"), Operator.new("op-2")
    es = Operator.new("op-es", "ES256")
    v = verifier(config(tmp_path, op, es))
    good = order(now=NOW)
    assert reason(v, b"x" * 20_000) == "too_large"
    assert reason(v, b"not a jws at all") == "malformed"
    assert reason(v, b"{not json") == "malformed"
    assert reason(v, plain(good)) == "unsigned_not_allowed"
    # HS256 "signed" with the public key, and alg none: never accepted
    hs = jwt.encode(good, "s" * 32, algorithm="HS256", headers={"kid": "op-1"}).encode()
    assert reason(v, hs) == "unsupported_algorithm"
    none = jwt.encode(good, None, algorithm="none").encode()
    assert reason(v, none) == "unsupported_algorithm"
    assert reason(v, other.sign(good)) == "unknown_key"  # kid op-2 is not configured
    assert reason(v, other.sign(good, kid="op-1")) == "bad_signature"
    assert reason(v, op.sign(good, kid="op-es")) == "unknown_key"  # an ES256 key, EdDSA JWS
    tampered = op.sign(good).split(b".")
    tampered[1] = jwt.utils.base64url_encode(json.dumps({**good, "site": "x"}).encode())
    assert reason(v, b".".join(tampered)) == "bad_signature"
    assert reason(v, op.sign({**good, "target": {"max_import_kw": "5"}})) == "invalid"
    assert reason(v, op.sign({**good, "target": {"max_import_kW": 5}})) == "invalid"
    assert reason(v, op.sign({**good, "colour": "red"})) == "invalid"
    assert reason(v, op.sign({**good, "target": {"max_import_kw": 5, "level": 1}})) == "invalid"
    assert reason(v, op.sign({**good, "kind": "explode"})) == "invalid"
    assert reason(v, op.sign(order(now=NOW, site="elsewhere"))) == "wrong_site"
    assert reason(v, op.sign(order(now=NOW - 1000, exp=NOW - 100))) == "expired"
    assert reason(v, op.sign(order(now=NOW - 5000, exp=NOW + 100))) == "expired"  # too old
    assert reason(v, op.sign(order(now=NOW + 600))) == "not_yet_valid"
    assert reason(v, op.sign(order(now=NOW, nbf=NOW + 600))) == "not_yet_valid"
    # small clock differences are tolerated
    v.verify(op.sign(order(now=NOW + 20)), NOW)


def test_rejections_carry_what_could_be_read(tmp_path: Path) -> None:
    op = Operator.new("op-1")
    v = verifier(config(tmp_path, op))
    with pytest.raises(Rejected) as e:
        v.verify(Operator.new("op-1").sign(order(now=NOW, jti="j-42")), NOW)
    assert e.value.reason == "bad_signature"
    assert e.value.hint["jti"] == "j-42" and e.value.hint["order_id"] == "ord-1"


def test_keys_from_pem_or_jwk_and_bad_keys_are_config_errors(tmp_path: Path) -> None:
    from cryptography.hazmat.primitives import serialization

    op = Operator.new("op-1")
    pub = serialization.load_pem_public_key(op.pair.public_pem)
    jwk = jwt.algorithms.OKPAlgorithm.to_jwk(pub)  # type: ignore[attr-defined]
    g = GridConfig.model_validate({"keys": [{"kid": "j", "alg": "EdDSA", "public_key": jwk}]})
    keys = load_keys(g)
    v = Verifier(g, "sim", keys)
    assert v.verify(op.sign(order(now=NOW), kid="j"), NOW).kid == "j"
    es = Operator.new("e", "ES256")
    bad = GridConfig.model_validate(
        {
            "keys": [
                {"kid": "a", "alg": "EdDSA", "public_key": es.pair.public_pem.decode()},
                {"kid": "b", "alg": "ES256", "public_key_file": str(tmp_path / "nope.pem")},
            ]
        }
    )
    from controller.config import ConfigError

    with pytest.raises(ConfigError) as e:
        load_keys(bad)
    assert [i.path for i in e.value.issues] == ["grid.keys[0]", "grid.keys[1]"]
    assert "Ed25519" in e.value.issues[0].message and "cannot read" in e.value.issues[1].message


def test_config_refuses_signed_only_without_keys_and_grid_without_control(tmp_path: Path) -> None:
    from controller.config import ConfigError

    with pytest.raises(ConfigError) as e:
        parse_config('[site]\nid = "s"\n[grid]\n', environ={})
    msgs = " ".join(i.message for i in e.value.issues)
    assert "need an enabled [control]" in msgs and "add a key" in msgs


def test_schema_document_is_generated_from_the_models() -> None:
    committed = Path(__file__).parent.parent.parent / "docs" / "grid-protocol.schema.json"
    assert json.loads(committed.read_text()) == json.loads(json.dumps(json_schema())), (
        "docs/grid-protocol.schema.json is stale: run `rigd grid-schema > "
        "docs/grid-protocol.schema.json`"
    )
    doc = committed.read_text()
    for reason_code in REJECT_REASONS:
        assert reason_code in doc


# -- the service: replay, redelivery and the book's own refusals ------------------------------


def service(tmp_path: Path, *ops: Operator, clock: list[float], **kw: Any) -> GridService:
    cfg = config(tmp_path, *ops, **kw)
    store = StateStore.open(cfg.site.state_dir)
    return GridService(cfg, store, None, now=lambda: clock[0])


def test_replay_redelivery_and_book_refusals(tmp_path: Path) -> None:
    op = Operator.new()
    clock = [NOW]
    svc = service(tmp_path, op, clock=clock)
    first = op.sign(order(now=NOW, jti="a1", duration_s=600))
    assert svc.handle_order(first)["status"] == "accepted"
    again = svc.handle_order(first)  # the broker redelivered it
    assert again["status"] == "accepted" and again["duplicate"] is True
    forged = op.sign(order(now=NOW, jti="a1", target={"max_import_kw": 5.0}))
    assert svc.handle_order(forged)["reason"] == "replayed"

    def send(kind: str, **f: Any) -> dict[str, Any]:
        return svc.handle_order(op.sign(order(kind, now=clock[0], **f)))

    assert send("curtail")["reason"] == "duplicate_order"  # same id, no higher modification
    assert send("modify", modification=0, target={"max_import_kw": 50.0})["reason"] == "invalid"
    ok = send("modify", modification=2, target={"max_import_kw": 50.0})
    assert ok["status"] == "accepted" and ok["cap_kw"] == 50.0
    assert send("modify", modification=1, end=NOW + 900)["reason"] == "stale_modification"
    assert send("modify", order_id="nope", modification=9, end=NOW + 900)["reason"] == (
        "unknown_order"
    )
    assert send("curtail", order_id="late", end=NOW - 10, start=NOW - 20)["reason"] == (
        "not_applicable"
    )
    assert send("cancel")["status"] == "accepted"
    assert send("cancel")["reason"] == "order_closed"
    assert send("modify", modification=5, end=NOW + 900)["reason"] == "order_closed"
    ping = send("ping")
    assert ping["status"] == "accepted" and ping["active_orders"] == []
    # every message is in the audit log with its outcome
    results = [e.result for e in svc.store.audit_since(0)]
    assert "rejected:replayed" in results and "accepted" in results


def test_unsigned_orders_where_allowed_obey_the_same_claims(tmp_path: Path) -> None:
    clock = [NOW]
    svc = service(tmp_path, clock=clock, allow_unsigned=True)
    assert svc.handle_order(plain(order(now=NOW)))["status"] == "accepted"
    assert svc.handle_order(plain(order(now=NOW - 5000)))["reason"] == "expired"
    assert svc.handle_order(b"[1, 2]")["reason"] == "malformed"
    assert svc.handle_order(b'{"kind": "curtail", "jti": NaN}')["reason"] == "malformed"


def test_orders_survive_a_restart_of_the_service(tmp_path: Path) -> None:
    op = Operator.new()
    clock = [NOW]
    svc = service(tmp_path, op, clock=clock)
    svc.handle_order(op.sign(order(now=NOW, duration_s=3600)))
    svc.before_step(NOW, None)
    svc.store.close()
    clock[0] = NOW + 60
    again = service(tmp_path, op, clock=clock)  # a new process reading the same database
    assert [o.order_id for o in again.book.active()] == ["ord-1"]
    assert "grid:ord-1" in again.book.limits()


# -- the book: lifecycle, overlap, compliance ---------------------------------------------------


def book(**grid: Any) -> OrderBook:
    return OrderBook(
        grid_rules(GridConfig.model_validate({"allow_unsigned": True, **grid})), 1000.0
    )


def apply(b: OrderBook, kind: str, now: float, **f: Any) -> Any:
    from controller.core.grid.orders import GridMessage

    msg = GridMessage.model_validate({"message": order(kind, now=now, **f)}).message
    return b.apply(msg, now, signed=False, kid=None)


def test_lifecycle_modify_and_cancel_before_and_during() -> None:
    b = book()
    assert apply(b, "curtail", NOW, start=NOW + 100, duration_s=600).accepted
    assert b.orders["ord-1"].status == "pending" and not b.limits()
    # modify while pending: new start and target
    assert apply(
        b, "modify", NOW + 10, modification=1, start=NOW + 50, target={"max_import_kw": 80.0}
    ).accepted
    b.tick(NOW + 49)
    assert b.orders["ord-1"].status == "pending"
    b.tick(NOW + 50)
    o = b.orders["ord-1"]
    assert o.status == "active" and o.end == NOW + 700  # a moved start keeps the end
    assert b.limits()["grid:ord-1"].kw == 80.0
    assert [r.status for r in o.revisions] == ["superseded"]
    # modify while active: a moved start is refused, a new target is a new deadline
    assert not apply(b, "modify", NOW + 60, modification=2, start=NOW + 70).accepted
    assert apply(b, "modify", NOW + 60, modification=2, target={"max_import_kw": 60.0}).accepted
    assert o.deadline == pytest.approx(NOW + 60 + 60)
    # cancel while active
    assert apply(b, "cancel", NOW + 70).accepted
    assert o.status == "cancelled" and not b.limits()
    # cancel while pending
    assert apply(b, "curtail", NOW, order_id="p", start=NOW + 500, duration_s=60).accepted
    assert apply(b, "cancel", NOW + 1, order_id="p").accepted
    b.tick(NOW + 600)
    assert b.orders["p"].status == "cancelled"


def test_overlapping_orders_lowest_cap_wins_and_each_ends_on_its_own() -> None:
    from controller.core.caps import MAX_IMPORT, Limit

    b = book(levels_kw=[1000, 700, 400, 0])
    apply(b, "curtail", NOW, order_id="a", target={"max_import_kw": 600.0}, duration_s=100)
    apply(b, "curtail", NOW, order_id="b", target={"level": 2}, duration_s=50)
    b.tick(NOW)
    cap = effective_cap([Limit(MAX_IMPORT, 1000.0), *b.limits().values()])
    assert cap.kw == 400.0 and cap.source == "grid" and "order b" in cap.detail
    notes = b.tick(NOW + 50)
    assert [n.kind for n in notes] == ["completed"] and notes[0].order is b.orders["b"]
    cap = effective_cap([Limit(MAX_IMPORT, 1000.0), *b.limits().values()])
    assert cap.kw == 600.0
    b.tick(NOW + 100)
    assert not b.limits()


def test_shed_is_counted_from_the_import_before_the_start() -> None:
    b = book()
    b.observe(NOW - 5, 900.0, "meter")
    apply(b, "curtail", NOW - 4, target={"shed_kw": 300.0}, start=NOW, duration_s=60)
    assert b.orders["ord-1"].cap_kw is None  # not known before the start
    b.tick(NOW)
    assert b.orders["ord-1"].cap_kw == 600.0 and b.orders["ord-1"].baseline_kw == 900.0


def test_compliance_figures_are_integrated_from_observations() -> None:
    b = book(respond_within_s=20)
    b.observe(NOW - 1, 900.0, "meter")
    apply(b, "curtail", NOW, target={"max_import_kw": 500.0}, duration_s=100)
    b.tick(NOW)
    for t, kw in (
        (NOW, 900.0),
        (NOW + 10, 700.0),
        (NOW + 30, 450.0),
        (NOW + 40, 600.0),
        (NOW + 50, 450.0),
    ):
        b.observe(t, kw, "meter")
    o = b.orders["ord-1"]
    # over target: 0-30 s (900 then 700) and 40-50 s (600): 40 s; after the deadline (20 s):
    # 20-30 and 40-50 = 20 s
    assert o.over_s == pytest.approx(40.0)
    assert o.out_of_compliance_s == pytest.approx(20.0)
    assert o.max_overshoot_kw == pytest.approx(400.0)
    assert o.first_compliant_at == NOW + 30
    b.tick(NOW + 100)  # ends: 50-100 s at 450 kW
    shed = (0 * 10 + 200 * 20 + 450 * 10 + 300 * 10 + 450 * 50) / 3600
    assert o.energy_shed_kwh == pytest.approx(shed)
    doc = report_doc("sim", o, NOW + 100, {}, final=True)
    assert doc["time_to_comply_s"] == 30.0 and doc["type"] == "final"
    assert doc["status"] == "completed" and doc["seconds_out_of_compliance"] == 20.0


def test_an_order_that_ended_while_rigd_was_down_is_closed_with_its_gap() -> None:
    b = book()
    apply(b, "curtail", NOW, target={"max_import_kw": 500.0}, duration_s=100)
    b.tick(NOW)
    b.observe(NOW, 450.0, "meter")
    saved = json.loads(json.dumps(b.as_dict()))
    again = book()
    again.load(saved, NOW + 1000)  # down for 1000 s
    notes = again.tick(NOW + 1000)
    o = again.orders["ord-1"]
    assert [n.kind for n in notes] == ["completed"] and o.status == "completed"
    assert o.data_gap_s == pytest.approx(100.0) and o.ended_at == NOW + 100


# -- heartbeat failsafe -----------------------------------------------------------------------


HB = {
    "topic": "op/hb",
    "timeout_s": 60,
    "failsafe_kw": 250,
    "min_failsafe_s": 600,
    "recovery_s": 120,
}


def test_failsafe_needs_an_open_ended_order_unless_the_contract_says_always() -> None:
    b = book(heartbeat=HB)
    b.load(None, NOW)
    b.tick(NOW + 500)
    assert "grid:failsafe" not in b.limits()  # nothing open-ended: no failsafe
    always = book(heartbeat={**HB, "always": True})
    always.load(None, NOW)
    assert [n.kind for n in always.tick(NOW + 61)] == ["failsafe_on"]
    assert always.limits()["grid:failsafe"].kw == 250


def test_failsafe_is_held_its_minimum_and_released_by_heartbeat_or_fresh_order() -> None:
    b = book(heartbeat=HB)
    b.load(None, NOW)
    apply(b, "curtail", NOW, target={"max_import_kw": 800.0})  # open-ended
    b.tick(NOW)
    b.heartbeat(NOW + 30)
    assert not b.tick(NOW + 80)  # 50 s since the heartbeat: fine
    assert [n.kind for n in b.tick(NOW + 91)] == ["failsafe_on"]
    assert b.limits()["grid:failsafe"].kw == 250
    b.heartbeat(NOW + 100)  # back, but the minimum hold is 600 s
    for t in range(110, 690, 10):
        b.heartbeat(NOW + t)
        assert not b.tick(NOW + t), t
    notes = b.tick(NOW + 700)
    assert [n.kind for n in notes] == ["failsafe_off"] and "heartbeat back" in notes[0].detail
    assert "grid:failsafe" not in b.limits()
    # lost again; a fresh order does not cut the minimum short, but releases after it
    notes = b.tick(NOW + 700 + 61)
    assert [n.kind for n in notes] == ["failsafe_on"]
    t0 = NOW + 761
    apply(b, "modify", t0 + 10, modification=1, target={"max_import_kw": 700.0})
    assert not b.tick(t0 + 599)
    assert [n.kind for n in b.tick(t0 + 600)] == ["failsafe_off"]


def test_failsafe_survives_a_restart() -> None:
    b = book(heartbeat={**HB, "always": True})
    b.load(None, NOW)
    b.tick(NOW + 61)
    again = book(heartbeat={**HB, "always": True})
    again.load(json.loads(json.dumps(b.as_dict())), NOW + 200)
    assert "grid:failsafe" in again.limits()


# -- the planner under a grid deadline ---------------------------------------------------------


def test_urgent_shedding_sleeps_instead_of_throttling_and_switches_off_what_cannot() -> None:
    from controller.core.caps import GRID, Cap, Limit
    from controller.core.planner import ActionKind, PlanInput, PlannerSettings, RigInput, plan
    from drivers.telemetry import RigState

    control = PlannerSettings(max_import_kw=100.0, min_on_s=0)
    throttlable = [
        RigInput(
            f"r{i}",
            RigState.MINING,
            3000.0,
            3000.0,
            3000.0,
            30.0 + i,
            can_power_target=True,
            min_w=2000.0,
            max_w=3000.0,
        )
        for i in range(10)
    ]
    stock = RigInput(
        "stock",
        RigState.MINING,
        3000.0,
        3000.0,
        3000.0,
        50.0,
        can_sleep=False,
        has_outlet=True,
        outlet_on=True,
    )
    rigs = (*throttlable, stock)

    def run(urgent: bool, cap_kw: float) -> dict[str, ActionKind]:
        cap = Cap(cap_kw, GRID, "order", (Limit(GRID, cap_kw),))
        inp = PlanInput(NOW, cap, control, rigs, 33.0, 1.0, {}, urgent=urgent)
        return {a.rig_id: a.kind for a in plan(inp).actions}

    calm = run(False, 25.0)  # 9 kW to shed: mostly by throttling, which keeps more hashrate
    assert sum(k is ActionKind.SET_POWER for k in calm.values()) > len(calm) / 2
    urgent = run(True, 25.0)  # the same under a deadline: sleep, which shows in seconds
    assert set(urgent.values()) == {ActionKind.SLEEP} and len(urgent) == 3
    deep = run(True, 2.0)  # everything: sleep all that can, switch off what cannot
    assert ActionKind.SET_POWER not in deep.values()
    assert deep["stock"] is ActionKind.OUTLET_OFF
    assert sum(k is ActionKind.SLEEP for k in deep.values()) == 10


def test_heartbeats_must_be_signed_where_orders_must_be(tmp_path: Path) -> None:
    op = Operator.new()
    clock = [NOW]
    hb = '\n[grid.heartbeat]\ntopic = "op/hb"\ntimeout_s = 60\nfailsafe_kw = 100\n'
    cfg = parse_config(BASE.format(state=tmp_path / "s2") + grid_toml(op) + hb, environ={})
    svc = GridService(cfg, StateStore.open(cfg.site.state_dir), None, now=lambda: clock[0])
    assert not svc.handle_heartbeat(b'{"seq": 1}')  # plain: could be anyone
    beat = {"kind": "heartbeat"}
    assert not svc.handle_heartbeat(Operator.new().sign({**beat, "iat": NOW}))  # unknown key
    assert svc.handle_heartbeat(op.sign({**beat, "iat": NOW, "seq": 1}))
    assert not svc.handle_heartbeat(op.sign({**beat, "iat": NOW - 1}))  # older: a replay
    assert not svc.handle_heartbeat(op.sign({**beat, "iat": NOW - 500}))  # stale
    assert svc.book.failsafe.heartbeats == 1


def test_urgent_shedding_may_sleep_a_rig_still_settling_a_throttle() -> None:
    from controller.core.caps import GRID, Cap, Limit
    from controller.core.planner import (
        ActionKind,
        Mode,
        PlanInput,
        PlannerSettings,
        RigInput,
        RigMemory,
        plan,
    )
    from drivers.telemetry import RigState

    control = PlannerSettings(max_import_kw=100.0, min_on_s=0)
    rig = RigInput(
        "r1",
        RigState.MINING,
        3000.0,
        3000.0,
        3000.0,
        30.0,
        can_power_target=True,
        min_w=2000.0,
        max_w=3000.0,
    )
    # throttled to 2.5 kW 10 s ago; the firmware takes 60 s to show it
    memory = {"r1": RigMemory(Mode.THROTTLE, NOW - 10, NOW + 50, 2500.0, 2500.0)}
    cap = Cap(1.0, GRID, "order", (Limit(GRID, 1.0),))

    def run(urgent: bool) -> list[ActionKind]:
        inp = PlanInput(NOW, cap, control, (rig,), 3.0, 1.0, memory, urgent=urgent)
        return [a.kind for a in plan(inp).actions]

    # The throttle alone leaves it over the cap: with or without a deadline, the slow
    # throttle becomes a fast sleep (counted from the throttle's target, not twice).
    assert run(False) == [ActionKind.SLEEP]
    assert run(True) == [ActionKind.SLEEP]
