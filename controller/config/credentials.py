"""Secrets from systemd credentials instead of the config file.

Any secret setting (a password, an SNMP community or key) and any file setting (the MQTT TLS
files, a grid operator's key file) may be written as a reference:

    password = { credential = "miner-password" }

and the unit passes the secret with `LoadCredential=miner-password:/etc/rigd/credentials/...`.
systemd reads the source as root, however it is protected, and hands a copy to rigd's user
alone, in a private directory named by $CREDENTIALS_DIRECTORY. The config file then holds no
secret and may be readable by technicians, and no secret travels in the environment, which
children inherit and /proc shows.

A secret's value is the credential's text without its trailing newline; a file setting
becomes the path of the credential's file. A reference that cannot be resolved is a config
error naming the setting and the credential, never the secret.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import SecretStr, ValidationInfo

CREDENTIALS_ENV = "CREDENTIALS_DIRECTORY"
CONTEXT_KEY = "credentials"  # in the pydantic validation context

# systemd takes a credential's name up to the first ':' of LoadCredential=NAME:FILE, and
# refuses a name that is not a valid file name or holds ':' or control characters; a
# conservative subset of the rest keeps unit lines and error messages clear. Checked with
# fullmatch: `$` would let a trailing newline through.
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.@-]{0,254}")
_MAX_BYTES = 1 << 20  # systemd's own limit for one credential


@dataclass(frozen=True, slots=True)
class Credentials:
    """Where credential references are resolved.

    `read = False` validates references without reading them: for checks run by people who
    may not read rigd's credentials (`check-config` outside systemd, rigctl looking up the
    admin socket). Such a config must never be used to talk to a device.
    """

    directory: Path | None
    read: bool = True
    used: list[str] = field(default_factory=list, compare=False)  # names met, for summaries

    @classmethod
    def from_environ(cls, environ: Mapping[str, str]) -> Credentials:
        d = environ.get(CREDENTIALS_ENV)
        return cls(Path(d) if d else None)

    def _note(self, name: str) -> None:
        if name not in self.used:
            self.used.append(name)

    def _path(self, name: str) -> Path:
        self._note(name)
        if self.directory is None:
            raise ValueError(
                f"credential {name!r}: $CREDENTIALS_DIRECTORY is not set. rigd reads "
                f"credentials when systemd starts it with LoadCredential={name}:FILE; "
                "outside systemd give `rigd check-config --credentials-dir DIR`"
            )
        path = self.directory / name
        if not path.is_file():
            raise ValueError(
                f"credential {name!r} not found in {self.directory} "
                f"(the unit needs LoadCredential={name}:FILE)"
            )
        return path

    def secret(self, name: str) -> SecretStr:
        if not self.read:
            self._note(name)
            return SecretStr(f"<credential {name}, not read>")
        path = self._path(name)
        try:
            with path.open("rb") as f:
                data = f.read(_MAX_BYTES + 1)
        except OSError as e:
            raise ValueError(f"credential {name!r} cannot be read: {e.strerror}") from e
        if len(data) > _MAX_BYTES:
            raise ValueError(f"credential {name!r} is larger than 1 MiB")
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"credential {name!r} is not UTF-8 text") from e
        text = text.rstrip("\r\n")  # `echo secret > file` leaves one
        if not text:
            raise ValueError(f"credential {name!r} is empty")
        return SecretStr(text)

    def file(self, name: str) -> Path:
        if not self.read:
            self._note(name)
            return _UNREAD / name
        return self._path(name)


_UNREAD = Path(f"${CREDENTIALS_ENV}")


def unread(path: Path) -> bool:
    """A file setting that names a credential which was not read (`Credentials(read=False)`)."""
    return path.parts[:1] == _UNREAD.parts


def reference(value: Any) -> str | None:
    """The credential a setting refers to, None for a plain value; ValueError if malformed."""
    if not isinstance(value, Mapping):
        return None
    if set(value) != {"credential"}:
        raise ValueError('give a value, or a systemd credential as { credential = "NAME" }')
    name = value["credential"]
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ValueError(
            f"bad credential name {name!r}: use letters, digits, '_', '.', '@' and '-'"
        )
    return name


def _credentials(info: ValidationInfo) -> Credentials:
    ctx = info.context
    found = ctx.get(CONTEXT_KEY) if isinstance(ctx, Mapping) else None
    return found if isinstance(found, Credentials) else Credentials.from_environ(os.environ)


def secret_or_credential(value: Any, info: ValidationInfo) -> Any:
    """pydantic before-validator of secret settings."""
    name = reference(value)
    return value if name is None else _credentials(info).secret(name)


def file_or_credential(value: Any, info: ValidationInfo) -> Any:
    """pydantic before-validator of file settings."""
    name = reference(value)
    return value if name is None else _credentials(info).file(name)
