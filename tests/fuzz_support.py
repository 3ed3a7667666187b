"""What the fuzz tests share: one Hypothesis profile, JSON strategies, and reply mutation.

Bad input is whatever a broken or hostile peer can send: a miner with a firmware bug, a PDU
card with a corrupt MIB, a forged grid order, a mistyped config line. The mutations here are
the ones seen in the field or in other projects' bug trackers: keys dropped, numbers sent as
strings (or strings where numbers belong), NaN and infinities, integers too big for a float,
Unicode digits and lone surrogates, lists where objects belong, truncated and padded bytes.

The examples are derandomized (the same ones every run, seeded from the test's name) and the
example database is off, so a CI failure reproduces on any machine. For a deeper search with
new examples each run: FUZZ_RANDOM=1 FUZZ_EXAMPLES=5000 pytest tests/*/test_fuzz_*.py
"""

from __future__ import annotations

import copy
import json
import math
import os
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

FIXTURES = Path(__file__).parent / "fixtures"

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "250"))


def fuzz_settings(examples: int = EXAMPLES) -> settings:
    """The profile of every fuzz test; `examples` is scaled down for the socket-bound ones."""
    return settings(
        max_examples=examples,
        derandomize=not os.environ.get("FUZZ_RANDOM"),
        database=None,
        deadline=None,
        print_blob=True,
        suppress_health_check=[
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
            HealthCheck.filter_too_much,
            HealthCheck.function_scoped_fixture,  # fixtures here are servers reused by design
        ],
    )


def fixture(path: str) -> Any:
    return json.loads((FIXTURES / path).read_text())


# Values that broke (or nearly broke) parsers somewhere: each is one line of a bug report.
NASTY: tuple[Any, ...] = (
    None,
    True,
    False,
    0,
    -1,
    -0.0,
    2**31,
    2**63,
    -(2**63),
    10**400,  # valid JSON, but no float can hold it
    -(10**400),
    1e308,
    -1e308,
    5e-324,
    math.nan,
    math.inf,
    -math.inf,
    "",
    " ",
    "0",
    "-5",
    "1e999",
    "-1e999",
    "NaN",
    "inf",
    "3250 W",
    "0x10",
    "1,5",
    "²",  # str.isdigit() says yes, int() says no
    "١٢٣",  # Arabic-Indic digits: int() accepts them
    "\ud800",  # a lone surrogate: json.loads makes one, str.encode() refuses it
    "\x00",
    "'true'",
    "S",
    "E",
    [],
    {},
    [None],
    [[]],
    {"": None},
)

# Drawn as copies: a shared [] or {} mutated by one example would change the next ones.
nasty = st.sampled_from(NASTY).map(copy.deepcopy)

json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=-(10**400), max_value=10**400),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
    nasty,
)

json_values = st.recursive(
    json_scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(st.text(max_size=12), inner, max_size=4),
    ),
    max_leaves=12,
)

json_objects = st.dictionaries(st.text(max_size=12), json_values, max_size=6)


def _paths(doc: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix]
    if isinstance(doc, dict):
        for k, v in doc.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            out += _paths(v, (*prefix, i))
    return out


def _get(doc: Any, path: tuple[Any, ...]) -> Any:
    for p in path:
        doc = doc[p]
    return doc


def _retype(value: Any) -> Any:
    """The same datum in the wrong JSON type, as firmware variants send it."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int | float):
        return str(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return [value]
    if isinstance(value, list):
        return {str(i): v for i, v in enumerate(value)}
    if isinstance(value, dict):
        return list(value.values())
    return value


@st.composite
def mutated(draw: st.DrawFn, seed: Any, max_mutations: int = 4) -> Any:
    """`seed` (a real reply) with up to `max_mutations` edits at random places in it."""
    doc = copy.deepcopy(seed)
    for _ in range(draw(st.integers(0, max_mutations))):
        paths = _paths(doc)[1:]  # the root stays an object: decode_reply sees to that
        if not paths:
            break
        path = draw(st.sampled_from(paths))
        op = draw(
            st.sampled_from(("nasty", "replace", "drop", "retype", "add", "truncate", "wrap"))
        )
        node = _get(doc, path)
        if op == "drop":
            parent = _get(doc, path[:-1])
            del parent[path[-1]]
            continue
        if op == "add" and isinstance(node, dict):
            node[draw(st.text(max_size=12))] = copy.deepcopy(draw(json_values))
            continue
        if op == "add" and isinstance(node, list):
            node.append(copy.deepcopy(draw(json_values)))
            continue
        if op == "truncate" and isinstance(node, list | str):
            new: Any = node[: draw(st.integers(0, max(0, len(node) - 1)))]
        elif op == "nasty":
            new = draw(nasty)
        elif op == "retype":
            new = _retype(node)
        elif op == "wrap":
            new = draw(st.sampled_from(([node], {"": node}, [[node]])))
        else:
            new = draw(json_values)
        _get(doc, path[:-1])[path[-1]] = copy.deepcopy(new)
    return doc


def dumps(doc: Any) -> bytes:
    """JSON as a lenient encoder writes it: NaN and Infinity tokens included."""
    return json.dumps(doc, allow_nan=True).encode()


@st.composite
def wire(draw: st.DrawFn, docs: st.SearchStrategy[Any]) -> bytes:
    """A reply on the wire: the JSON of a (mutated) document, sometimes damaged as bytes."""
    raw = dumps(draw(docs))
    damage = draw(st.sampled_from(("none", "none", "truncate", "insert", "nul", "deep", "join")))
    if damage == "truncate":
        raw = raw[: draw(st.integers(0, len(raw)))]
    elif damage == "insert":
        at = draw(st.integers(0, len(raw)))
        raw = raw[:at] + draw(st.binary(min_size=1, max_size=8)) + raw[at:]
    elif damage == "nul":
        raw = raw + b"\x00" + draw(st.binary(max_size=8))
    elif damage == "deep":
        depth = draw(st.integers(500, 3000))  # past the JSON decoder's recursion limit
        raw = b"[" * depth + raw + b"]" * depth
    elif damage == "join":
        raw = raw + raw  # bmminer's "}{" joins, or a repeated frame
    return raw


def replies(*seeds: Any) -> st.SearchStrategy[Any]:
    """Mutations of any of `seeds`, plus arbitrary JSON objects."""
    return st.one_of(
        st.sampled_from(seeds).flatmap(lambda s: mutated(s)),
        json_objects,
    )


def optional(strategy: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.one_of(st.none(), strategy)
