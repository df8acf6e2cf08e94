"""Opening a provider connection: directly, or through a forward proxy's CONNECT tunnel, then
TLS to the origin inside. One path for every provider (HTTP/2 and HTTP/1.1 alike)."""
from __future__ import annotations

import asyncio
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from shared.transport.proxy import Proxy

P = TypeVar("P", bound=asyncio.Protocol)

Resolver = Callable[[str, int], Awaitable[list[str]]]
"""The addresses to connect to for a host and port, in order, each one already checked (Web
Push's guard against endpoints that lead inward): the connection goes to one of them, never to
the name again (a second lookup could answer otherwise), and TLS still verifies the name."""

_TUNNEL_ANSWER_LIMIT = 16 * 1024
"""The most of a proxy's answer to CONNECT that is read: a proxy cannot grow our memory."""


class TransportError(ConnectionError):
    """A request could not be made or answered: the connection failed, was lost, the server
    refused the stream, or the answer broke a limit. Safe to retry later. The message never
    holds a token or a key (it names the peer's behaviour, not the request)."""


@dataclass(frozen=True)
class Origin:
    """Where requests go: ``https`` (TLS) or ``http`` (in clear), host and port."""

    scheme: str
    host: str
    port: int

    @property
    def authority(self) -> bytes:
        default = 443 if self.scheme == "https" else 80
        host = f"[{self.host}]" if ":" in self.host else self.host
        return (host if self.port == default else f"{host}:{self.port}").encode()


async def open_connection(
    factory: Callable[[], P],
    origin: Origin,
    tls: ssl.SSLContext | None,
    proxy: Proxy | None,
    resolve: Resolver | None = None,
) -> tuple[asyncio.Transport, P]:
    """A connection to ``origin`` speaking ``factory()``'s protocol: TCP to the origin (to the
    addresses ``resolve`` gives, in order, when given) or to ``proxy`` (then a CONNECT tunnel,
    to the first address ``resolve`` gives when given), then TLS with ``tls`` for the origin's
    name when given. The caller bounds the time it takes. Raises
    :class:`OSError` (a :class:`TransportError` for a proxy refusing), or what ``resolve``
    raises."""
    loop = asyncio.get_running_loop()
    server_hostname = origin.host if tls is not None else None
    if proxy is None:
        hosts = [origin.host] if resolve is None else await resolve(origin.host, origin.port)
        failure: OSError = TransportError(f"no address to connect to for {origin.host}")
        for host in hosts:
            try:
                transport, protocol = await loop.create_connection(
                    factory, host, origin.port, ssl=tls, server_hostname=server_hostname)
                return transport, protocol  # type: ignore[return-value]
            except ssl.SSLError:
                raise  # the next address of the same name would not do better
            except OSError as exc:
                failure = exc
        raise failure
    target = origin
    if resolve is not None:  # the proxy is asked for a checked address, not for the name
        addresses = await resolve(origin.host, origin.port)
        if not addresses:
            raise TransportError(f"no address to connect to for {origin.host}")
        target = Origin(origin.scheme, addresses[0], origin.port)
    raw, tunnel = await loop.create_connection(_Tunnel, proxy.host, proxy.port)
    try:
        await tunnel.open(target, proxy)
        protocol = factory()
        if tls is None:
            raw.set_protocol(protocol)
            transport: asyncio.Transport | None = raw
        else:
            # The protocol is given to start_tls itself: anything the server sends right after
            # the handshake goes to it.
            transport = await loop.start_tls(raw, protocol, tls, server_hostname=server_hostname)
            if transport is None:
                raise TransportError("the TLS handshake through the proxy failed")
    except BaseException:
        raw.abort()
        raise
    protocol.connection_made(transport)
    if tls is None:
        raw.resume_reading()
    return transport, protocol


class _Tunnel(asyncio.Protocol):
    """The proxy side of a connection until the CONNECT tunnel is open."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self._answer = bytearray()
        self._done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's are no subclass

    async def open(self, origin: Origin, proxy: Proxy) -> None:
        """Ask the proxy for a tunnel to ``origin``; returns once it is open."""
        assert self.transport is not None
        target = origin.authority.decode()
        if origin.port == (443 if origin.scheme == "https" else 80):
            target = f"{target}:{origin.port}"
        request = f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n"
        if proxy.authorization is not None:
            request += f"Proxy-Authorization: {proxy.authorization}\r\n"
        self.transport.write(f"{request}\r\n".encode("latin-1"))
        await self._done

    def data_received(self, data: bytes) -> None:
        if self._done.done():
            return
        self._answer += data
        end = self._answer.find(b"\r\n\r\n")
        if end < 0:
            if len(self._answer) > _TUNNEL_ANSWER_LIMIT:
                self._done.set_exception(TransportError("the proxy's answer is too long"))
            return
        status_line = bytes(self._answer[:self._answer.find(b"\r\n")]).split()
        if len(status_line) < 2 or not status_line[1].startswith(b"2"):
            status = status_line[1].decode("latin-1")[:3] if len(status_line) > 1 else "?"
            self._done.set_exception(TransportError(f"the proxy refused the tunnel ({status})"))
        elif end + 4 < len(self._answer):
            self._done.set_exception(TransportError("the proxy sent data before TLS"))
        else:
            self.transport.pause_reading()  # type: ignore[union-attr]
            self._done.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self._done.done():
            self._done.set_exception(TransportError("the proxy closed the connection"))
