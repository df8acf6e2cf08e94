"""Where a Web Push endpoint may lead: the browser push services, over the public internet.

A Web Push subscription's endpoint is a URL the subscriber chose, and the dispatcher POSTs to it:
left open, any signed-in user could make the service connect to internal services (the cloud's
metadata address, the database, the cluster's API) and read the outcome back through the
subscription list. Two layers close it, both here so that subscribe and the Web Push send path
apply the same rules:

1. The endpoint's name (:meth:`EndpointRules.refusal`), at subscribe and again before each push
   (rows stored before a rule existed are held to it too): the host must be a push service of
   :data:`PUSH_SERVICES` or of ``PUSH_WEBPUSH_ALLOWED_HOSTS``, on port 443; never an IP address
   in any spelling, a single-label name or an internal one (:data:`INTERNAL_DOMAINS`).
2. The addresses the name resolves to (:meth:`EndpointRules.addresses`), when the dispatcher
   opens a connection: every one must be globally routable (:func:`is_public_address`), and the
   connection goes to an address so checked, never to the name again, so a name that resolves
   inward, now or on a second lookup (DNS rebinding), is never connected to.

A refusal is not a dead subscription: the push service never said the subscription is gone, so
the row stays and the push counts as rejected. Redirects are never followed (the client never
reads past an answer's status).

``PUSH_WEBPUSH_ALLOW_LOCAL_ENDPOINTS`` is for local development and tests only: exact
``host:port`` pairs (a local receiver) that skip both layers. There is no switch that turns the
rules off.
"""
from __future__ import annotations

import asyncio
import ipaddress
import re
import socket
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import NamedTuple

from shared.config import ConfigError
from shared.settings import read_setting

ALLOWED_HOSTS_VAR = "PUSH_WEBPUSH_ALLOWED_HOSTS"
LOCAL_ENDPOINTS_VAR = "PUSH_WEBPUSH_ALLOW_LOCAL_ENDPOINTS"

PUSH_SERVICES = (
    "fcm.googleapis.com",
    "updates.push.services.mozilla.com",
    "*.notify.windows.com",
    "web.push.apple.com",
)
"""The browser push services, by the hosts their subscriptions' endpoints name: Chrome and the
Chromium browsers (FCM: ``/fcm/send/`` and ``/wp/`` paths), Firefox (autopush), Edge (the
Windows Notification Service: a regional host per subscription, ``wns2-par02p.notify.windows.com``
and the like, hence the only pattern) and Safari. Exact hosts everywhere else: a suffix such as
``googleapis.com`` or ``push.apple.com`` would also admit Google's and Apple's other APIs."""

ANY_PUBLIC_HOST = "*"
"""The ``PUSH_WEBPUSH_ALLOWED_HOSTS`` entry that accepts any public host name (a self-hosted push
service, say): the name and address rules still hold."""

INTERNAL_DOMAINS = (
    "localhost", "local", "internal", "svc", "arpa", "localdomain", "lan", "home", "corp",
    "intranet", "private", "test", "example", "invalid", "onion", "alt",
)
"""Names under these are never a push service: loopback (RFC 6761), mDNS and the cluster's own
names (``*.local``, ``*.svc``, ``*.svc.cluster.local``), the private-use ``.internal`` (cloud
metadata: ``metadata.google.internal``), reverse-lookup and home networks (``.arpa``,
``home.arpa``), the reserved ``test``, ``example``, ``invalid``, ``onion`` and ``alt``, and the
names private networks commonly use although ICANN never delegated them."""

PUSH_PORT = 443

HOST_LABEL = re.compile(r"(?!-)[a-z0-9-]{1,63}(?<!-)")
"""A host name's label once IDNA-encoded: letters, digits and inner hyphens (RFC 1123)."""


class Refusal(NamedTuple):
    """Why an endpoint is refused: ``reason`` is a word (for logs), ``message`` completes a
    sentence about the field (for the API's error body)."""

    reason: str
    message: str


IP_LITERAL = Refusal("ip_literal", "must name a push service's host, not an IP address")
INTERNAL_NAME = Refusal("internal_name", "must be on a public host name")
NOT_PUSH_PORT = Refusal("port", "must be on port 443")
NOT_ALLOWED = Refusal("not_allowed", "is not on a push service this service sends to")
BAD_HOST = Refusal("host", "must be on a valid host name")

Resolver = Callable[[str, int], Awaitable[list[str]]]
"""Resolves a host name for a TCP connection to ``port``: the addresses, as text, in the order
to try them."""


class EndpointRefused(Exception):
    """The dispatcher will not connect for this endpoint; ``reason`` is the push's reason."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


async def system_resolver(name: str, port: int) -> list[str]:
    """The addresses the system's resolver gives for ``name``, without repeats."""
    infos = await asyncio.get_running_loop().getaddrinfo(
        name, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP
    )
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


@dataclass(frozen=True)
class EndpointRules:
    """The rules of the module doc. ``allowed_hosts``: exact host names, ``*.domain`` patterns
    (its subdomains, not the domain itself) or :data:`ANY_PUBLIC_HOST`. ``local_endpoints``:
    exact ``(host, port)`` pairs exempt from every rule, for local development only.
    ``resolver`` looks host names up (tests give a stand-in for DNS)."""

    allowed_hosts: tuple[str, ...] = PUSH_SERVICES
    local_endpoints: frozenset[tuple[str, int]] = frozenset()
    resolver: Resolver = system_resolver

    @classmethod
    def from_env(cls) -> EndpointRules:
        """The push services plus ``PUSH_WEBPUSH_ALLOWED_HOSTS``, and the pairs of
        ``PUSH_WEBPUSH_ALLOW_LOCAL_ENDPOINTS``; a malformed entry stops the start-up, naming
        the variable."""
        local = frozenset(_local_endpoint_entry(entry) for entry in read_setting(LOCAL_ENDPOINTS_VAR))
        return cls(PUSH_SERVICES + read_setting(ALLOWED_HOSTS_VAR), local)

    def __post_init__(self) -> None:
        # Every listed host is checked to be a public name once, here: a listed name then
        # needs no other check before each push.
        object.__setattr__(self, "allowed_hosts", tuple(_allowed_host_entry(e) for e in self.allowed_hosts))

    def is_local(self, host: str, port: int) -> bool:
        """Whether ``host:port`` is one of the local receivers exempt from the rules."""
        return (_normal(host), port) in self.local_endpoints

    def refusal(self, host: str, port: int | None) -> Refusal | None:
        """Why an endpoint on ``host`` (as ``urlsplit`` gives it: no brackets, any case) and
        ``port`` (``None``: the default, 443) is refused; ``None`` when it is not."""
        port = PUSH_PORT if port is None else port
        if self.is_local(host, port):
            return None
        name = _ascii_name(host)
        if not name:
            return BAD_HOST
        if port == PUSH_PORT and self._listed(name):
            return None  # the common case, before each push: a public name (__post_init__)
        if _is_ip_literal(name):
            return IP_LITERAL
        if "." not in name or _under(name, INTERNAL_DOMAINS):
            return INTERNAL_NAME
        if port != PUSH_PORT:
            return NOT_PUSH_PORT
        if ANY_PUBLIC_HOST not in self.allowed_hosts:
            return NOT_ALLOWED
        return None

    async def addresses(self, host: str, port: int) -> list[str]:
        """The addresses to connect to for ``host:port``, every one public; raises
        :class:`EndpointRefused` when any address it resolves to is not. A name that answers
        with one inward address among public ones is refused whole: nothing about it is to be
        trusted. Resolution failures (``OSError``) propagate: they are transient.

        The name is looked up fully qualified: without a final dot, a resolver with search
        domains (every Kubernetes pod's) first tries ``host.<namespace>.svc.cluster.local`` and
        the like, which the cluster answers. A local receiver is looked up as it is written
        (``/etc/hosts`` has ``localhost``, not ``localhost.``)."""
        if self.is_local(host, port):
            return await self.resolver(host, port)
        addresses = await self.resolver(host if host.endswith(".") else host + ".", port)
        if not addresses or not all(is_public_address(ipaddress.ip_address(a)) for a in addresses):
            raise EndpointRefused("address_not_public")
        return addresses

    def _listed(self, name: str) -> bool:
        """Whether ``name`` is a listed host, or a subdomain of a ``*.`` pattern's domain."""
        for entry in self.allowed_hosts:
            if entry == name or (entry.startswith("*.") and name.endswith(entry[1:])):
                return True
        return False


_SPECIAL_IPV6 = (
    ipaddress.IPv6Network("::/96"),            # IPv4-compatible (deprecated): an IPv4 inside
    ipaddress.IPv6Network("::ffff:0:0/96"),    # IPv4-mapped
    ipaddress.IPv6Network("64:ff9b:1::/48"),   # local-use NAT64 (RFC 8215)
    ipaddress.IPv6Network("2001::/32"),        # Teredo: tunnels to whatever it names
    ipaddress.IPv6Network("fec0::/10"),        # site-local (deprecated, not in every is_global)
)
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")  # RFC 6052: its last 32 bits are the IPv4 address


def is_public_address(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """Whether ``address`` is a globally routable unicast address. ``is_global`` alone is not
    enough: before Python 3.11.10 it calls NAT64, 6to4 and IPv4-compatible addresses of inward
    IPv4 addresses global, and multicast global too. An IPv6 address that carries an IPv4 one
    (6to4, NAT64 on an IPv6-only cluster) is as public as the IPv4 address it carries."""
    if address.is_multicast or not address.is_global:
        return False
    if isinstance(address, ipaddress.IPv6Address):
        if any(address in network for network in _SPECIAL_IPV6):
            return False
        if address.sixtofour is not None:
            return is_public_address(address.sixtofour)
        if address in _NAT64:
            return is_public_address(ipaddress.IPv4Address(int(address) & 0xFFFFFFFF))
    return True


def _normal(host: str) -> str:
    """A host as rules compare it: lower case, brackets and one final dot removed."""
    return host.strip("[]").lower().removesuffix(".")


def _ascii_name(host: str) -> str | None:
    """The host in lower-case ASCII (IDNA for an internationalized name), without its final
    dot; ``None`` when IDNA cannot encode it."""
    name = _normal(host)
    if name.isascii():
        return name
    try:
        return name.encode("idna").decode("ascii")
    except UnicodeError:
        return None


def _is_ip_literal(name: str) -> bool:
    """Whether ``name`` is an IP address in any spelling a resolver accepts. Besides the dotted
    and IPv6 forms, ``inet_aton`` (which getaddrinfo uses) reads ``2130706433``, ``0x7f000001``,
    ``0177.0.0.1`` and ``127.1`` as 127.0.0.1: all of them, and nothing a top-level domain can
    be, end in a label that starts with a digit."""
    if ":" in name:
        return True
    try:
        ipaddress.ip_address(name)
        return True
    except ValueError:
        pass
    last = name.rsplit(".", 1)[-1]
    return not last[:1].isalpha()


def _under(name: str, domains: Iterable[str]) -> bool:
    return any(name == domain or name.endswith("." + domain) for domain in domains)


def _allowed_host_entry(entry: str) -> str:
    """One ``PUSH_WEBPUSH_ALLOWED_HOSTS`` entry, checked: a public host name or a ``*.``
    pattern of one, or ``*``."""
    if entry == ANY_PUBLIC_HOST:
        return entry
    pattern = entry.startswith("*.")
    name = _ascii_name(entry[2:] if pattern else entry)
    problem = None
    if name is None or not all(HOST_LABEL.fullmatch(label) for label in name.split(".")):
        problem = "is not a host name (no scheme, port or path: push services are on port 443)"
    elif _is_ip_literal(name):
        problem = f"is an IP address; a local receiver goes in {LOCAL_ENDPOINTS_VAR}"
    elif "." not in name or _under(name, INTERNAL_DOMAINS):
        problem = f"is an internal name; a local receiver goes in {LOCAL_ENDPOINTS_VAR}"
    if problem:
        raise ConfigError(f"{ALLOWED_HOSTS_VAR}: {entry!r} {problem}")
    return f"*.{name}" if pattern else name


def _local_endpoint_entry(entry: str) -> tuple[str, int]:
    """One ``PUSH_WEBPUSH_ALLOW_LOCAL_ENDPOINTS`` entry: ``host:port`` (``[::1]:8443`` for an
    IPv6 address), both required, no pattern."""
    host, _, port = entry.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536 or "*" in host:
        raise ConfigError(
            f"{LOCAL_ENDPOINTS_VAR}: {entry!r} is not host:port (an exact host and port, such as "
            "localhost:8090)"
        )
    return _normal(host), int(port)
