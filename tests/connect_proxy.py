"""A forward proxy that only opens CONNECT tunnels (what HTTPS through a proxy needs), for the
tests that every provider path goes through ``HTTPS_PROXY``."""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy", "NO_PROXY", "no_proxy")


class ConnectProxy:
    """A forward proxy that only opens CONNECT tunnels (what HTTPS through a proxy needs),
    recording each tunnel's target."""

    def __init__(self) -> None:
        self.tunnels: list[str] = []
        self.server: asyncio.Server | None = None

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
        method, target, _ = head.split(" ", 2)
        if method != "CONNECT":
            writer.write(b"HTTP/1.1 405 Method Not Allowed\r\ncontent-length: 0\r\n\r\n")
            writer.close()
            return
        self.tunnels.append(target)
        host, _, port = target.rpartition(":")
        upstream_reader, upstream_writer = await asyncio.open_connection(host, int(port))
        writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
        await asyncio.gather(self.pipe(reader, upstream_writer),
                             self.pipe(upstream_reader, writer))

    @staticmethod
    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()


@pytest.fixture
async def connect_proxy(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[ConnectProxy]:
    """A CONNECT proxy in the test's event loop (google-auth's token request, made in a worker
    thread, goes through it too), with no proxy variable set yet."""
    for name in PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    connect_proxy = ConnectProxy()
    connect_proxy.server = await asyncio.start_server(connect_proxy.handle, "127.0.0.1", 0)
    yield connect_proxy
    connect_proxy.server.close()
