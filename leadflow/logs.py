"""Logging set-up: human text by default, one JSON object per line for log pipelines.

``--log-format json`` (or ``LEADFLOW_LOG_FORMAT=json``, which a local cluster's
processes inherit) writes ``{"time", "level", "logger", "message", "process"}``
plus ``one_id`` when the record concerns a person (``extra={"one_id": ...}``)
and ``exc`` for an exception. Leadflow never logs an e-mail address, a phone
number or a name: people are named by One-ID only.
"""

from __future__ import annotations

import logging
import os
import sys
from datetime import UTC, datetime

import orjson

FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"


class JsonFormatter(logging.Formatter):
    """One JSON object per record."""

    def format(self, record: logging.LogRecord) -> str:
        """The record as a JSON line."""
        entry = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "process": os.getpid(),
        }
        one_id = getattr(record, "one_id", None)
        if one_id:
            entry["one_id"] = one_id
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(entry).decode()


def configure_logging(level: str, log_format: str) -> None:
    """Send logs to stderr at ``level`` in ``log_format`` (text or json)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT)
    )
    logging.basicConfig(level=level, handlers=[handler], force=True)
    # httpx logs every request at INFO; the alert sender logs what matters itself.
    logging.getLogger("httpx").setLevel(max(logging.WARNING, logging.getLevelName(level)))
    # The processes of a local cluster log alike.
    os.environ["LEADFLOW_LOG_LEVEL"], os.environ["LEADFLOW_LOG_FORMAT"] = level, log_format
