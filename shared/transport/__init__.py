"""How every provider reaches its servers: one transport layer under the provider modules.

- :mod:`~shared.transport.http2`: the HTTP/2 client and pool (APNs, FCM, and Web Push where the
  push service agrees to HTTP/2): concurrency from the server's SETTINGS, GOAWAY handled as
  RFC 9113 section 6.8 lets, a PING before reusing a quiet connection, bounded answers.
- :mod:`~shared.transport.http1`: the HTTP/1.1 client for push services that do not.
- :mod:`~shared.transport.tls`: the one TLS rule (the system's CAs plus the provider's CA file).
- :mod:`~shared.transport.proxy`: forward proxies from the environment (``HTTPS_PROXY``,
  ``NO_PROXY``), read by the standard library's functions.
- :mod:`~shared.transport.connect`: opening a connection, through a CONNECT tunnel or not.

Provider modules build requests and classify answers; nothing about sockets, TLS or framing is
theirs. Errors are :class:`~shared.transport.connect.TransportError` (an :class:`OSError`), and
the socket's or TLS's own :class:`OSError`; their messages never hold a token or a key.
"""
