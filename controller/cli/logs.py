"""Structured logging: JSON lines under systemd (or any non-terminal), readable in a terminal.

Every log line is an event with key-value context (device, operation, error
kind), so journald and log shippers can filter on fields instead of parsing
prose.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from typing import Any, TextIO

import structlog


def _under_systemd() -> bool:
    return bool(os.environ.get("JOURNAL_STREAM") or os.environ.get("INVOCATION_ID"))


class _Survivor:
    """A log stream that outlives its reader: `rigd run 2>&1 | tee log` stopped with Ctrl-C
    kills `tee` too, and a log line written to the closed pipe must not abort rigd's clean
    stop (going offline, removing its socket, closing the state database). Writes after
    the reader is gone go nowhere."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self._gone = False

    def write(self, text: str) -> int:
        if not self._gone:
            try:
                return self._stream.write(text)
            except (BrokenPipeError, ValueError):  # a closed pipe, or a closed file
                self._lost()
        return len(text)

    def flush(self) -> None:
        if not self._gone:
            try:
                self._stream.flush()
            except (BrokenPipeError, ValueError):
                self._lost()

    def _lost(self) -> None:
        self._gone = True
        # What is still buffered goes to /dev/null: the interpreter's flush at exit must
        # not fail on the closed pipe again.
        with contextlib.suppress(OSError, ValueError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), self._stream.fileno())

    def isatty(self) -> bool:
        return self._stream.isatty()

    def fileno(self) -> int:
        return self._stream.fileno()


def configure_logging(
    level: str = "info", *, json: bool | None = None, stream: TextIO | None = None
) -> None:
    """Route structlog (and the stdlib loggers of our libraries) to one stream."""
    out: Any = _Survivor(stream if stream is not None else sys.stderr)
    if json is None:
        json = _under_systemd() or not out.isatty()
    lvl = logging.getLevelName(level.upper())
    if not isinstance(lvl, int):
        raise ValueError(f"unknown log level {level!r}")
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if json
        else structlog.dev.ConsoleRenderer(colors=out.isatty())
    )
    structlog.configure(
        processors=[
            *shared,
            structlog.processors.StackInfoRenderer(),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(lvl),
        logger_factory=structlog.PrintLoggerFactory(file=out),
        cache_logger_on_first_use=False,
    )
    # Libraries log through stdlib logging: render those lines the same way (JSON under
    # systemd), so one log stream has one format, and keep their chatter (hex dumps, broker
    # internals) out unless it is a warning.
    handler = logging.StreamHandler(out)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[*shared, structlog.stdlib.add_logger_name],
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                structlog.processors.format_exc_info,
                renderer,
            ],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(max(lvl, logging.WARNING))
    for noisy in ("pymodbus", "amqtt", "transitions", "pysnmp", "asyncio"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
