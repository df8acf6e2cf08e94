"""Local servers that speak each push provider's wire protocol, for the tests, the benchmarks
(bench/) and the local stack (``make run``): APNs (:mod:`fakes.apns`), FCM (:mod:`fakes.fcm`), Web
Push (:mod:`fakes.webpush`), on one base that behaves on the network as the real front ends do
(:mod:`fakes.server`: latency, recycled connections, stream limits, refusals), and a CloudEvents
sink (:mod:`fakes.sink`). Each runs in a background thread of the process that starts it
(:class:`LoopThread`), or standalone (``python -m fakes.apns --help``)."""
from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import trustme
from h2.connection import ConnectionInputs, ConnectionState, H2ConnectionStateMachine

T = TypeVar("T")

TIMEOUT_SECONDS = 10.0
"""How long starting or stopping a fake, or running something in its loop, may take before it
is an error (rather than a test run that hangs)."""


class LoopThread:
    """An event loop of its own in a daemon thread, for one fake server to live in.

    pytest-asyncio gives every test a fresh loop, and a server living on that loop would die
    with it; a thread of its own lets one server outlive any number of client loops, and lets
    synchronous tests drive ``asyncio.run``. What the server is (an ``asyncio.Server``, an
    aiohttp ``AppRunner``) is the fake's business: it hands this class the coroutine that opens
    it and the one that closes it.
    """

    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    def start(self, name: str, open_server: Callable[[], Coroutine[Any, Any, T]]) -> T:
        """Start the thread ``name``, run ``open_server()`` in its loop, and return what it
        returns once it is done (the server is listening); the loop then runs until
        :meth:`stop`. An exception from ``open_server`` is raised here, in the caller's thread,
        and the thread ends."""
        loop = asyncio.new_event_loop()
        opened: concurrent.futures.Future[T] = concurrent.futures.Future()
        thread = threading.Thread(
            target=self._run, args=(loop, open_server, opened), name=name, daemon=True
        )
        thread.start()
        result = opened.result(TIMEOUT_SECONDS)
        self._loop, self._thread = loop, thread
        return result

    def call(self, function: Callable[[], Coroutine[Any, Any, T]]) -> T:
        """Run ``function()`` in the server's loop and return its result, for anything that
        touches the server's connections (they belong to that loop's thread)."""
        assert self._loop is not None, "start the fake first"
        future = asyncio.run_coroutine_threadsafe(function(), self._loop)
        return future.result(TIMEOUT_SECONDS)

    def stop(self, close_server: Callable[[], Coroutine[Any, Any, None]]) -> None:
        """Run ``close_server()`` in the server's loop, then stop the loop and end the thread.
        Does nothing when not started, or already stopped."""
        if self._loop is None or self._thread is None:
            return
        loop, thread = self._loop, self._thread
        self._loop = self._thread = None
        try:
            asyncio.run_coroutine_threadsafe(close_server(), loop).result(TIMEOUT_SECONDS)
        finally:
            loop.call_soon_threadsafe(loop.stop)
            thread.join(TIMEOUT_SECONDS)

    @staticmethod
    def _run(
        loop: asyncio.AbstractEventLoop,
        open_server: Callable[[], Coroutine[Any, Any, T]],
        opened: concurrent.futures.Future[T],
    ) -> None:
        asyncio.set_event_loop(loop)
        try:
            result = loop.run_until_complete(open_server())
        except BaseException as exc:  # reported to start(), in the caller's thread
            opened.set_exception(exc)
            loop.close()
            return
        opened.set_result(result)
        try:
            loop.run_forever()
        finally:
            loop.close()


_shared_ca: trustme.CA | None = None
_shared_ca_lock = threading.Lock()


def shared_ca() -> trustme.CA:
    """The process-wide test CA every fake's certificate is issued by, so one CA file trusts
    every fake of the process (a production and a sandbox APNs, say)."""
    global _shared_ca
    with _shared_ca_lock:
        if _shared_ca is None:
            _shared_ca = trustme.CA()
        return _shared_ca


class DrainingServerStateMachine(H2ConnectionStateMachine):
    """h2's server connection state machine, except that a GOAWAY sent leaves the connection
    open: h2 closes it at once (python-hyper/h2#1199), while RFC 9113 section 6.8 has the server
    still answer the streams up to the GOAWAY's last stream ID, as Apple's and Google's servers
    do. A fake using it opens no stream after its GOAWAY."""

    _transitions = {
        **H2ConnectionStateMachine._transitions,
        (ConnectionState.SERVER_OPEN, ConnectionInputs.SEND_GOAWAY):
            (None, ConnectionState.SERVER_OPEN),
    }
