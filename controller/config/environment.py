"""Settings from the environment: RIGD_<SECTION>__<KEY>=value overrides the file.

Double underscores separate levels (RIGD_MQTT__URL, RIGD_POLL__INTERVAL_S), so one file
serves several environments and systemd can inject the broker; lists and tables are given
in TOML syntax (RIGD_X__Y='["a", "b"]'). Overrides are applied to the parsed file before
validation, so they are checked like any setting, and an error in one names the variable.

The file is typed strictly (a quoted number is an error there), but an environment
variable is always a string: where the setting it overrides is a number or a yes/no, its
text is read as a TOML number or boolean (`RIGD_POLL__INTERVAL_S=2.5`,
`RIGD_CONTROL__DRY_RUN=true`); everywhere else it stays the string it is.
"""

from __future__ import annotations

import tomllib
import types
import typing
from collections.abc import Iterator, Mapping
from typing import Any

from pydantic import BaseModel

ENV_PREFIX = "RIGD_"


def env_overrides(environ: Mapping[str, str]) -> Iterator[tuple[str, tuple[str, ...], Any]]:
    """(variable, path, value) for every RIGD_A__B[__C] variable."""
    for name, value in sorted(environ.items()):
        if not name.startswith(ENV_PREFIX) or "__" not in name:
            continue
        path = tuple(p.lower() for p in name[len(ENV_PREFIX) :].split("__"))
        if not all(path):
            continue
        parsed: Any = value
        if value[:1] in ("[", "{"):
            # Lists and tables are given in TOML syntax: RIGD_X__Y='["a", "b"]'.
            try:
                parsed = tomllib.loads(f"v = {value}")["v"]
            except (ValueError, RecursionError):  # not TOML, too deep, too many digits
                parsed = value
        yield name, path, parsed


_SCALARS = (bool, int, float)


def _leaf(model: type[BaseModel], path: tuple[str, ...]) -> Any:
    """The annotation of the setting at `path` in `model`, or None where the path leaves the
    models (a list of rows, a table of names, an unknown key)."""
    ann: Any = None
    for i, part in enumerate(path):
        field = model.model_fields.get(part)
        if field is None:
            return None
        ann = field.annotation
        if i == len(path) - 1:
            return ann
        nested = [a for a in _options(ann) if isinstance(a, type) and issubclass(a, BaseModel)]
        if not nested:
            return None
        model = nested[0]
    return ann


def _options(ann: Any) -> tuple[Any, ...]:
    """`X | None` and `Optional[X]` as (X, NoneType); anything else as itself."""
    if typing.get_origin(ann) in (typing.Union, types.UnionType):
        return typing.get_args(ann)
    return (ann,)


def _typed(value: Any, ann: Any) -> Any:
    """An environment string as the number or boolean its setting wants (see the module)."""
    if not isinstance(value, str) or not any(a in _SCALARS for a in _options(ann)):
        return value
    try:
        parsed = tomllib.loads(f"v = {value}")["v"]
    except (ValueError, RecursionError):
        return value  # not a number: the validation says so, naming the variable
    return parsed if isinstance(parsed, _SCALARS) else value


def apply_env(
    raw: dict[str, Any], environ: Mapping[str, str], schema: type[BaseModel] | None = None
) -> dict[tuple[str, ...], str]:
    """Apply RIGD_* overrides to the parsed file; with `schema`, numbers and booleans typed.
    Returns which variable set which path, for error messages."""
    applied: dict[tuple[str, ...], str] = {}
    for name, path, value in env_overrides(environ):
        if schema is not None:
            value = _typed(value, _leaf(schema, path))
        node = raw
        for part in path[:-1]:
            nxt = node.get(part)
            if not isinstance(nxt, dict):
                nxt = {}
                node[part] = nxt
            node = nxt
        node[path[-1]] = value
        applied[path] = name
    return applied
