"""The building blocks every section of the config is made of.

Unknown keys are errors in every table (a typo must not silently fall back to a default),
ids follow one rule wherever they appear, and any secret or file setting may name a
systemd credential instead of holding the value (`credentials.py`).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, SecretStr

from controller.config.credentials import file_or_credential, secret_or_credential

# Ids end up in MQTT topics and file names: no '/', '+', '#', spaces.
IDENT_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
IDENT_RE = re.compile(IDENT_PATTERN)
Ident = Annotated[str, Field(pattern=IDENT_PATTERN)]
Port = Annotated[int, Field(ge=1, le=65535)]
# A secret or file setting may instead name a systemd credential: { credential = "NAME" }.
Secret = Annotated[SecretStr, BeforeValidator(secret_or_credential)]
OptionalSecret = Annotated[SecretStr | None, BeforeValidator(secret_or_credential)]
# Paths are TOML strings: the one conversion strict typing allows.
FsPath = Annotated[Path, Field(strict=False)]
OptionalFile = Annotated[FsPath | None, BeforeValidator(file_or_credential)]


class Strict(BaseModel):
    """Unknown keys are errors: a typo must not silently fall back to a default. Types are
    strict: `max_import_kw = "23000"` or `allow_outlet_off = "yes"` is refused rather than
    guessed at, since a quoted number usually means a file edited by hand in a hurry, and a
    setting that silently means something else is worse than one refused."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)
