"""One logging setup for every process: CLI commands, `serve`'s supervisor and each worker.

`logging_config(level, format)` is a `logging.config.dictConfig` dict: one stderr
handler on the root logger, uvicorn's loggers sent to it too. The CLI applies it
(`setup`) and hands the same dict to uvicorn as `log_config`, which applies it again
in every worker process it starts, so all lines look alike whichever process wrote
them:

- `text`: ``2026-12-03 14:27:57,123 WARNING byok.proxy: upstream unreachable: ...``
- `json`: one object per line with `ts` (RFC 3339, UTC), `level`, `logger`,
  `message`, and `request_id` when the line was logged while a request was being
  handled (`REQUEST_ID`, set where the request id is made). Formatted by
  python-json-logger.

Log calls never pass key material (the proxy logs exception type names, tenant ids
and request ids); this module adds no fields of its own beyond the request id.
"""

from __future__ import annotations

import copy
import logging
import logging.config
from contextvars import ContextVar
from typing import Any

LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

# The id of the request being handled in this context (each request runs in its own task).
REQUEST_ID: ContextVar[str | None] = ContextVar("request_id", default=None)

# uvicorn's loggers, which its own default config gives handlers and formats of their own.
_UVICORN_LOGGERS = ("uvicorn", "uvicorn.error", "uvicorn.access", "uvicorn.asgi")


class RequestIdFilter(logging.Filter):
    """Adds `request_id` to a record logged while a request is being handled."""

    def filter(self, record: logging.LogRecord) -> bool:
        request_id = REQUEST_ID.get()
        if request_id is not None:
            record.request_id = request_id
        return True


def _json_formatter() -> dict[str, Any]:
    from pythonjsonlogger.core import RESERVED_ATTRS

    return {
        "()": "pythonjsonlogger.json.JsonFormatter",
        "fmt": ["levelname", "name", "message"],
        "rename_fields": {"levelname": "level", "name": "logger"},
        "timestamp": "ts",
        # uvicorn adds a colored copy of some messages as an `extra`; it is not a field.
        "reserved_attrs": [*RESERVED_ATTRS, "color_message"],
    }


def logging_config(level: str, fmt: str) -> dict[str, Any]:
    """The dictConfig of every process, at `level` (one of LEVELS) in `fmt` (text or json).

    Also valid as uvicorn's `log_config` (it holds only plain, picklable values)."""
    formatter = _json_formatter() if fmt == "json" else {"format": TEXT_FORMAT}
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "filters": {"request_id": {"()": RequestIdFilter}},
        "formatters": {"default": formatter},
        "handlers": {
            "stderr": {
                "class": "logging.StreamHandler",
                "stream": "ext://sys.stderr",
                "formatter": "default",
                "filters": ["request_id"],
            }
        },
        "root": {"level": level, "handlers": ["stderr"]},
        "loggers": {
            **{
                name: {"level": level, "handlers": [], "propagate": True}
                for name in _UVICORN_LOGGERS
            },
            # Alembic says each migration step at INFO on every start: shown at DEBUG only.
            "alembic": {"level": "WARNING" if level == "INFO" else level},
        },
    }


def setup(level: str, fmt: str) -> dict[str, Any]:
    """Configure this process's logging; return the config for uvicorn's `log_config`."""
    config = logging_config(level, fmt)
    logging.config.dictConfig(copy.deepcopy(config))
    return config
