"""Forward proxies from the environment, read by the standard library's own functions
(:func:`urllib.request.getproxies_environment`, :func:`urllib.request.proxy_bypass_environment`),
so every provider path follows one reading of ``HTTPS_PROXY``/``NO_PROXY``.

What that reading is, where it differs from curl's (tests/test_transport_proxy.py pins each):
- the lower-case variable wins over the upper-case one, and a lower-case one set empty hides
  the upper-case one (``https_proxy=`` turns ``HTTPS_PROXY`` off);
- ``all_proxy``/``ALL_PROXY`` apply when no scheme-specific variable is set (handled here; urllib
  reports it under ``all`` only);
- ``NO_PROXY`` entries are host names or addresses matched exactly or as a domain suffix
  (``example.org`` and ``.example.org`` both cover ``fcm.example.org``), ``*`` covers every host,
  a ``:port`` on an entry must match the port; CIDR ranges (``10.0.0.0/8``), which curl reads,
  are not understood and cover nothing;
- under CGI (``REQUEST_METHOD`` set) urllib ignores ``HTTP_PROXY`` (httpoxy); ``HTTPS_PROXY`` is
  unaffected.
"""
from __future__ import annotations

import base64
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit
from urllib.request import getproxies_environment, proxy_bypass_environment


@dataclass(frozen=True)
class Proxy:
    """A forward proxy reached in clear that opens CONNECT tunnels, with optional Basic
    credentials (from the proxy URL's ``user:password@``)."""

    host: str
    port: int
    authorization: str | None = None

    def __repr__(self) -> str:  # never the credentials
        return f"Proxy({self.host}:{self.port})"


def proxy_for(scheme: str, host: str, port: int) -> Proxy | None:
    """The proxy the environment names for ``scheme://host:port`` (module docstring), or
    ``None``. Raises :class:`ValueError` naming the variable when the proxy URL is not an
    ``http://`` URL."""
    proxies = getproxies_environment()
    url = proxies.get(scheme) or proxies.get("all")
    if not url:
        return None
    if proxies.get("no") and proxy_bypass_environment(f"{host}:{port}", proxies):
        return None
    variable = f"{scheme.upper()}_PROXY" if proxies.get(scheme) else "ALL_PROXY"
    parts = urlsplit(url if "://" in url else f"http://{url}")
    try:
        proxy_port = parts.port or 80
    except ValueError:
        proxy_port = 0
    if parts.scheme != "http" or not parts.hostname or not proxy_port:
        raise ValueError(f"{variable} must look like http://[user:password@]host[:port]")
    authorization = None
    if parts.username is not None:
        credentials = f"{unquote(parts.username)}:{unquote(parts.password or '')}"
        authorization = "Basic " + base64.b64encode(credentials.encode()).decode()
    return Proxy(parts.hostname, proxy_port, authorization)
