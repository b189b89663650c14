"""structlog set-up: console for humans, JSON lines for journald and containers.

Secrets never reach the output: keys that look like credentials are masked.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import MutableMapping
from typing import Any, TextIO, cast

import structlog

SECRET_KEYS = ("password", "passwd", "secret", "token", "key_file", "private_key", "dsn")


def _mask_secrets(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    for k in list(event):
        if any(s in k.lower() for s in SECRET_KEYS) and event[k]:
            event[k] = "***"
    return event


def _drop_paho_disconnect_noise(record: logging.LogRecord) -> bool:
    return not (record.name == "mqtt" and str(record.msg).startswith("Could not gracefully"))


class _CurrentStderr:
    """Writes to whatever ``sys.stderr`` is at the time of the write (test runners and
    daemonizers replace it; a captured stream object may be closed later)."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


def setup_logging(fmt: str = "console", level: str = "info", *, stream: Any = None) -> None:
    """Configure structlog and stdlib logging once for the process."""
    lvl = getattr(logging, level.upper(), logging.INFO)
    out = stream or _CurrentStderr()
    renderer: Any = (structlog.processors.JSONRenderer() if fmt == "json"
                     else structlog.dev.ConsoleRenderer(colors=False))
    processors: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        _mask_secrets,
        structlog.processors.format_exc_info,
    ]
    structlog.configure(
        processors=[*processors, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(lvl),
        logger_factory=structlog.PrintLoggerFactory(cast(TextIO, out)),
        cache_logger_on_first_use=False,
    )
    handler = logging.StreamHandler(out)
    handler.setFormatter(structlog.stdlib.ProcessorFormatter(
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
        foreign_pre_chain=[structlog.stdlib.add_log_level, structlog.stdlib.add_logger_name,
                           structlog.processors.TimeStamper(fmt="iso", utc=True), _mask_secrets],
    ))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(lvl)
    for noisy in ("aiocoap", "coap", "coap-server", "aiosqlite", "asyncio", "aiormq",
                  "aio_pika"):
        logging.getLogger(noisy).setLevel(max(lvl, logging.WARNING))
    # paho's "Could not gracefully disconnect: 4" on every failed connect says nothing a
    # user can act on; transports/mqtt.py logs the failure with host, port and cause.
    # A filter, not a level: aiomqtt sets its logger's level when it is imported.
    handler.addFilter(_drop_paho_disconnect_noise)
