"""Structured logs: one JSON object per line, with the request id and the CloudEvent id.

The level comes from ``PUSH_LOG_LEVEL`` (default ``INFO``). Fields passed as ``extra=`` appear as
keys of the line. What is logged must never hold a token, a user id or a secret: log ids and
hashes, as the rest of the code does.
"""
from __future__ import annotations

import contextvars
import json
import logging
import sys
import time

from shared.config import ConfigError
from shared.settings import read_setting

request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id", default=None)
event_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("event_id", default=None)

# The attributes every LogRecord has; anything else on a record came from ``extra=``.
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime", "taskName"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, object] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if (rid := request_id.get()) is not None:
            line["request_id"] = rid
        if (eid := event_id.get()) is not None:
            line["event_id"] = eid
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                line[key] = value if isinstance(value, (str, int, float, bool, type(None))) else str(value)
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False)


_configured = False


def configure_logging() -> None:
    """Send every log line to stderr as JSON, once per process."""
    global _configured
    if _configured:
        return
    level = read_setting("PUSH_LOG_LEVEL").upper()
    if level not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
        raise ConfigError(f"PUSH_LOG_LEVEL must be debug, info, warning or error, not {level!r}")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(level)
    # httpx logs every request's URL at INFO (noise per push; a URL may carry a token), and
    # hpack/h2 log every header they encode at DEBUG, access tokens included: never below WARNING.
    for noisy in ("httpx", "httpcore", "hpack", "h2"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
    _configured = True
