"""A simulated farm's firmware mix: plain turns, or shares (`rigd sim --mix luxos=40,...`)."""

from __future__ import annotations

from collections import Counter

import pytest

from simulators.site import DIALECTS, SimSite, assign_dialects, mix_weights, parse_mix


def test_plain_list_takes_turns_as_before() -> None:
    assert mix_weights("luxos,whatsminer") == {"luxos": 1.0, "whatsminer": 1.0}
    assert assign_dialects(5, mix_weights("luxos, whatsminer")) == [
        "luxos", "whatsminer", "luxos", "whatsminer", "luxos",
    ]  # fmt: skip
    assert parse_mix(["antminer", "braiins"]) == ("antminer", "braiins")


def test_shares_give_exact_proportions_interleaved() -> None:
    w = mix_weights("luxos=40,whatsminer=20,antminer=10,braiins=30")
    got = assign_dialects(1000, w)
    assert Counter(got) == {"luxos": 400, "whatsminer": 200, "antminer": 100, "braiins": 300}
    # Interleaved: each run of 10 rigs (one period) holds the mix, not 400 LuxOS first.
    assert Counter(got[:10]) == {"luxos": 4, "whatsminer": 2, "antminer": 1, "braiins": 3}


def test_every_dialect_with_a_share_and_zero_shares_dropped() -> None:
    spec = ",".join(f"{d}={0 if d == 'vnish' else n}" for n, d in enumerate(DIALECTS, 1))
    w = mix_weights(spec)
    assert "vnish" not in w and len(w) == len(DIALECTS) - 1


@pytest.mark.parametrize("bad", ["", "luxos=x", "luxos=-1", "nope=3", "luxos=0"])
def test_bad_mixes_are_refused(bad: str) -> None:
    with pytest.raises(ValueError):
        mix_weights(bad)


def test_a_site_serves_the_shares() -> None:
    site = SimSite(rigs=8, pdus=1, mix="luxos=3,whatsminer=1")
    assert Counter(site.dialects.values()) == {"luxos": 6, "whatsminer": 2}
    assert site.mix == ("luxos", "whatsminer")
    assert 'driver = "whatsminer"' in "\n".join(
        site.miner_rows(next(r for r, d in site.dialects.items() if d == "whatsminer"))
    )
