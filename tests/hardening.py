"""Helpers of the hardening tests: functions run behind a synchronous client (for hypothesis,
whose examples are plain functions), row snapshots and error-log collection."""
from __future__ import annotations

import contextlib
import logging
import sys
import warnings
from collections.abc import Iterator

from functions_framework.aio import create_asgi_app

from tests.conftest import REPO

with warnings.catch_warnings():  # "use httpx2": the client works; schemathesis uses it too
    warnings.simplefilter("ignore")
    from starlette.testclient import TestClient


def load_function(name: str):
    """A function's ASGI app, loaded as functions-framework loads it; and its module."""
    app = create_asgi_app(target=name.replace("-", "_"), source=str(REPO / "functions" / name / "main.py"))
    return app, sys.modules["main"]


@contextlib.contextmanager
def running(name: str) -> Iterator[TestClient]:
    """A synchronous client of the function ``name``, on an event loop of its own."""
    app, module = load_function(name)
    with TestClient(app, base_url="http://function", raise_server_exceptions=True) as client:
        try:
            yield client
        finally:
            if hasattr(module, "dispatcher"):
                client.portal.call(module.dispatcher.aclose)


class ErrorLog(logging.Handler):
    """Collects the records logged at ERROR or above (an unhandled exception is logged so)."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    @property
    def unexpected(self) -> list[str]:
        return [r.getMessage() for r in self.records if r.getMessage() == "unexpected error"]


@contextlib.contextmanager
def error_log() -> Iterator[ErrorLog]:
    handler = ErrorLog()
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        yield handler
    finally:
        root.removeHandler(handler)
