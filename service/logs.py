"""One logging set-up for the service and uvicorn: plain text or one JSON object per line.

A line written while a request is handled names that request's id (``x-codex-lb-request-id``),
so an operator can go from a response to its log lines. Nothing secret is ever passed to a
logger; the only exception by design is the first-run bootstrap token, which the operator needs
to read (and only when it was generated, not when it came from the environment).
"""

from __future__ import annotations

import logging
import logging.config
from typing import Any

import msgspec

from service.core.bodies import rfc3339
from service.core.request_ids import current_request_id

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(process)d]%(request_tag)s %(message)s"


class RequestIdFilter(logging.Filter):
    """Stamps each record with the id of the request being handled (None outside one). On the
    handler, not a logger: a logger's filters do not see records propagated from its children."""

    def filter(self, record: logging.LogRecord) -> bool:
        request_id = current_request_id()
        record.request_id = request_id
        record.request_tag = f" request_id={request_id}" if request_id else ""
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": rfc3339(record.created),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        request_id = getattr(record, "request_id", None)
        if request_id:
            entry["request_id"] = request_id
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return msgspec.json.encode(entry).decode()


def config_dict(fmt: str, level: str = "INFO") -> dict[str, Any]:
    formatter: dict[str, Any] = {"()": JsonFormatter} if fmt == "json" else {"format": TEXT_FORMAT}
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"default": formatter},
        "filters": {"request_id": {"()": RequestIdFilter}},
        "handlers": {
            "stderr": {
                "class": "logging.StreamHandler",
                "formatter": "default",
                "filters": ["request_id"],
                "stream": "ext://sys.stderr",
            },
        },
        "root": {"handlers": ["stderr"], "level": level},
        "loggers": {
            "uvicorn": {"handlers": ["stderr"], "level": level, "propagate": False},
            "uvicorn.error": {"level": level},
            "uvicorn.access": {"handlers": ["stderr"], "level": "WARNING", "propagate": False},
            # One line per upstream call is noise; failures are logged by our own code.
            "httpx": {"level": "WARNING"},
            "httpcore": {"level": "WARNING"},
        },
    }


def configure(fmt: str, level: str = "INFO") -> None:
    logging.config.dictConfig(config_dict(fmt, level))
