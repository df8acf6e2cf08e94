"""A TCP proxy in front of MariaDB that a test cuts and restores: at once, or at a chosen point
of the conversation (a statement about to go, gone, or answered), for the fault tests."""
from __future__ import annotations

import asyncio
import socket
import threading
from dataclasses import dataclass


@dataclass
class _Trap:
    """Cut every connection when a statement containing ``trigger`` passes on a connection that
    earlier sent ``after`` (any connection when ``after`` is empty): ``mode`` "before" drops the
    statement (the server never sees it), "after" passes it on and cuts (the server may run it,
    its answer is lost), "reply" passes it and its answer, then cuts."""

    trigger: bytes
    mode: str
    after: bytes = b""


class CuttableProxy:
    """A TCP proxy to ``127.0.0.1:target_port``, on its own thread and event loop. :meth:`cut`
    drops every connection and refuses new ones until :meth:`restore`; :meth:`arm` makes it cut
    itself at a point of the conversation, and sets :attr:`tripped` when it did."""

    def __init__(self, target_port: int = 3306) -> None:
        self.target_port = target_port
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server: asyncio.Server | None = None
        self.writers: set[asyncio.StreamWriter] = set()
        self.tripped = threading.Event()
        self._trap: _Trap | None = None
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        sock.close()
        self.restore()

    def url(self, database_url: str) -> str:
        """``database_url`` (on 127.0.0.1:3306) through this proxy."""
        return database_url.replace("127.0.0.1:3306", f"127.0.0.1:{self.port}")

    def _call(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(10)

    async def _pipe(self, reader, writer, upstream: bool, seen: set[str]) -> None:
        try:
            while data := await reader.read(65536):
                trap = self._trap
                if trap is not None and upstream and trap.after and trap.after in data:
                    seen.add("after")
                armed = trap is not None and (not trap.after or "after" in seen)
                if armed and upstream and trap.trigger in data:
                    if trap.mode == "before":
                        self._spring()
                        return
                    writer.write(data)
                    await writer.drain()
                    if trap.mode == "after":
                        self._spring()
                        return
                    seen.add("reply")  # the next answer on this connection is the trigger's
                    continue
                writer.write(data)
                await writer.drain()
                if armed and not upstream and "reply" in seen:
                    self._spring()
                    return
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()

    def _spring(self) -> None:
        self._trap = None
        self._cut_now()
        self.tripped.set()

    async def _client(self, reader, writer) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.close()
            return
        self.writers |= {writer, up_writer}
        seen: set[str] = set()
        try:
            await asyncio.gather(self._pipe(reader, up_writer, True, seen), self._pipe(up_reader, writer, False, seen))
        except asyncio.CancelledError:  # closing: the connection goes with the loop
            return
        self.writers -= {writer, up_writer}

    async def _start(self) -> None:
        self.server = await asyncio.start_server(self._client, "127.0.0.1", self.port)

    def _cut_now(self) -> None:
        if self.server is not None:
            self.server.close()
        for writer in list(self.writers):
            writer.transport.abort()
        self.writers.clear()

    async def _cut(self) -> None:
        self._cut_now()
        if self.server is not None:
            await self.server.wait_closed()

    def arm(self, trigger: bytes, mode: str, after: bytes = b"") -> threading.Event:
        """Cut at the next statement containing ``trigger`` (see :class:`_Trap`); the event is
        set once it did. The proxy then stays cut until :meth:`restore`."""
        assert mode in ("before", "after", "reply")
        self.tripped.clear()
        self._trap = _Trap(trigger, mode, after)
        return self.tripped

    def restore(self) -> None:
        if self.server is not None and self.server.is_serving():
            return
        self._call(self._start())

    def cut(self) -> None:
        self._call(self._cut())

    def close(self) -> None:
        self.cut()
        self._call(self._settle())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)

    async def _settle(self) -> None:
        """Let the connections' tasks end before the loop stops."""
        tasks = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
