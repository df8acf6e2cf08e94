"""gunicorn's settings module for the image's command (``--config python:shared.gunicorn_config``),
and the uvicorn worker class it names: what a cold start needs and nothing more.

Loading this module disables Python's cyclic garbage collector in the gunicorn master, before it
imports the function (``--preload``). A cold start is mostly imports, about a thousand modules
whose objects the collector would otherwise walk again and again as the heap grows: about a tenth
of the master's start-up CPU. Before each fork the master freezes what it built (the collector
never looks at it again: it lives as long as the process) and turns the collector back on, as
Python's documentation of :func:`gc.freeze` recommends for pre-forking servers: the worker's
collections then do not touch, and so copy, the pages it shares with the master.

The worker speaks HTTP through :class:`shared.http_protocol.BoundedHttpToolsProtocol`: uvicorn's
httptools protocol with a bound on each request's head (bytes and time) and body (time), which
uvicorn itself does not have and gunicorn's ``--limit-request-*`` options do not give it.

Meant for gunicorn alone: importing it anywhere else turns that process's collector off.
"""
from __future__ import annotations

import gc
from typing import Any

from uvicorn_worker import UvicornWorker as _UvicornWorker

gc.disable()

# Imported with the collector off, like the function (--preload) after it.
from shared.http_protocol import BoundedHttpToolsProtocol  # noqa: E402


def pre_fork(_server: Any, _worker: Any) -> None:
    """Keep everything the master built so far out of every later collection, in the master and
    in the worker it forks, and collect the rest as usual from now on."""
    gc.freeze()
    gc.enable()


class UvicornWorker(_UvicornWorker):
    """uvicorn-worker's worker (uvloop, picked by "auto") speaking HTTP through the bounded
    httptools protocol, without WebSocket support: no function serves WebSockets, and resolving
    ``ws="auto"`` imports wsproto and h11 in every worker as it starts. An upgrade request is
    then answered as plain HTTP."""

    CONFIG_KWARGS: dict[str, Any] = {
        **_UvicornWorker.CONFIG_KWARGS, "http": BoundedHttpToolsProtocol, "ws": "none",
    }
