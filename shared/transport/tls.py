"""The one rule for whom a provider connection trusts: the system's CA store, plus the CA file
the provider's setting names (``PUSH_APNS_CA_FILE``, ``PUSH_FCM_CA_FILE``,
``PUSH_WEBPUSH_CA_FILE``), for a private endpoint, a TLS-inspecting proxy or a test server.

The file is read when the provider is configured, so a bad one fails the start-up naming its
setting; the context itself is built at the first connection (loading the system store takes
about 20 ms, a cold start's cost otherwise)."""
from __future__ import annotations

import ssl

from shared.config import ConfigError


class ClientTls:
    """The TLS settings of one provider's connections: trust as above, and a context per list
    of ALPN protocols offered (``h2``; Web Push ``h2`` and ``http/1.1``, or ``http/1.1``)."""

    def __init__(self, ca_file: str | None, setting: str) -> None:
        """Raises :class:`ConfigError` naming ``setting`` when ``ca_file`` is not a readable PEM
        bundle."""
        self._ca_pem: str | None = None
        if ca_file:
            try:
                with open(ca_file, encoding="ascii") as pem:
                    text = pem.read()
                ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cadata=text)
            except (OSError, ValueError, ssl.SSLError) as exc:
                raise ConfigError(f"{setting}: cannot load CA bundle {ca_file}: {exc}") from None
            self._ca_pem = text
        self._contexts: dict[tuple[str, ...], ssl.SSLContext] = {}

    def context(self, *alpn: str) -> ssl.SSLContext:
        """The client context offering ``alpn`` (made once each): certificates and host names
        verified."""
        context = self._contexts.get(alpn)
        if context is None:
            context = ssl.create_default_context()
            if self._ca_pem is not None:
                context.load_verify_locations(cadata=self._ca_pem)
            context.set_alpn_protocols(list(alpn))
            self._contexts[alpn] = context
        return context
