"""The floor clients really exchange with the simulators (no timing assertions)."""

from __future__ import annotations

import pytest

from bench.floors import DIALECTS, FloorResult, measure, measure_driver, pooled
from bench.floors.sim import simulated

SUBNET = "127.83.0.0/24"
# (dialect, requests per steady poll)
CASES = [
    ("luxos", 1),
    ("antminer", 1),
    ("braiins", 1),
    ("avalon", 1),
    ("whatsminer", 2),
    ("whatsminer-v3", 3),
    ("epic", 1),
    ("vnish", 1),
    ("pdu", 1),
]


def test_every_dialect_has_a_case() -> None:
    assert {d for d, _ in CASES} == set(DIALECTS)


@pytest.mark.parametrize(("dialect", "requests"), CASES)
def test_floor_and_driver_read_the_simulators(dialect: str, requests: int) -> None:
    with simulated(dialect, 2, SUBNET) as targets:
        assert len(targets) == 2
        floor = measure(dialect, targets, rounds=1)
        rigd = measure_driver(dialect, targets, rounds=1)
    assert floor.errors == 0 and rigd.errors == 0
    assert floor.requests_per_poll == requests
    assert floor.bytes_per_poll is not None and floor.bytes_per_poll > 200  # real replies
    assert floor.cpu_ms_per_poll > 0 and rigd.cpu_ms_per_poll > 0


def test_pooled_runs_weigh_by_rounds() -> None:
    a = FloorResult("luxos", "floor", 10, 5, 0.5, 1.0, 10.0, 1.0, 300.0, 1)
    b = FloorResult("luxos", "floor", 10, 5, 1.5, 1.0, 30.0, 1.0, 300.0, 2)
    p = pooled(a, b)
    assert (p.rounds, p.cpu_s, p.errors) == (10, 2.0, 3)
    assert p.cpu_ms_per_poll == pytest.approx(20.0)
    with pytest.raises(ValueError):
        pooled(a, FloorResult("luxos", "rigd", 10, 5, 1.0, 1.0, 20.0, None, None, 0))
