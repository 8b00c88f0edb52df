"""The server process's logging: one stderr handler, plain text or one JSON object per line.

Every logger goes through it, uvicorn's included (their own handlers are removed so their records
reach the root handler), and so do Python warnings: with ``json`` a log collector can parse every
line the server writes. A record made while an HTTP request is handled carries that request's id
(``X-Request-Id``), so one grep finds everything the server logged for it.
"""

from __future__ import annotations

import json
import logging
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any, Literal

# A contextvar rather than request.state: log records are made far from any Request object (uvicorn's
# access log, the error middleware, thread-pool work), and each request's task has its own context. It
# lives here, with the formatters that read it, so that nothing below the API layer imports the API.
REQUEST_ID: ContextVar[str | None] = ContextVar("request_id", default=None)


def current_request_id() -> str | None:
    """The id of the HTTP request this code runs for, or None outside one (startup, the engine thread)."""
    return REQUEST_ID.get()


LogFormat = Literal["text", "json"]
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"
# Loggers that get their own stderr handler (transformers, huggingface_hub and torch at import; uvicorn when it
# configures itself): their handlers are removed and their records propagate, so every line has one format.
OWN_HANDLER_LOGGERS = ("uvicorn", "uvicorn.error", "uvicorn.access", "transformers", "huggingface_hub", "torch")
# uvicorn's access record: logger.info('%s - "%s %s HTTP/%s" %d', client, method, path, http_version, status).
_ACCESS_ARGS = 5


class TextFormatter(logging.Formatter):
    """The classic line, with ``request_id=...`` appended inside a request."""

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 (logging's name)
        line = super().formatMessage(record)
        request_id = current_request_id()
        return f"{line} request_id={request_id}" if request_id else line


class JsonFormatter(logging.Formatter):
    """``ts`` (ISO 8601, UTC), ``level``, ``logger``, ``message``; ``request_id`` inside a request;
    ``client``, ``method``, ``path``, ``status`` on uvicorn's access lines; ``exception`` when there is one."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        request_id = current_request_id()
        if request_id:
            entry["request_id"] = request_id
        if record.name == "uvicorn.access" and isinstance(record.args, tuple) and len(record.args) == _ACCESS_ARGS:
            client, method, path, _, status = record.args
            entry.update(client=client, method=method, path=path, status=status)
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            entry["exception"] = record.exc_text
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        # default=str: a record's arguments are already in the message; nothing else here can fail to encode.
        return json.dumps(entry, ensure_ascii=False, default=str)


def configure_logging(level: str, log_format: LogFormat) -> None:
    """Replace the process's log handlers with one that writes ``log_format`` lines to stderr.

    Call after transformers is imported (it installs its handler then) and before
    ``uvicorn.run(..., log_config=None)``, which then only sets its loggers' levels.
    """
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    root = logging.getLogger()
    for old in root.handlers[:]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    for name in OWN_HANDLER_LOGGERS:
        library_logger = logging.getLogger(name)
        library_logger.handlers.clear()
        library_logger.propagate = True
    logging.captureWarnings(True)
    if log_format == "json":
        _disable_progress_bars()


def _disable_progress_bars() -> None:
    """Progress bars are not log records: drawn on stderr, they would be the lines of a JSON log that do not parse."""
    from huggingface_hub.utils import disable_progress_bars
    from transformers.utils import logging as transformers_logging

    disable_progress_bars()  # hub downloads
    transformers_logging.disable_progress_bar()  # loading and writing weights
