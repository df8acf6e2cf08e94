"""Prometheus metrics: the four golden signals of every function, and the product's own figures.

Metrics are served by prometheus-client on their own port (``PUSH_METRICS_PORT``, default 9095,
``off`` to disable), not on the function's port: subscribe and unsubscribe are public, their
metrics are not. Labels hold only bounded, non-personal values: function names, methods, status
classes, providers, outcomes and provider reason words; never a token, a user id or a secret.

The server starts with the first request, in the process that serves it (not in gunicorn's master,
which imports the function and forks the workers). When a function runs several worker
processes, set ``PROMETHEUS_MULTIPROC_DIR`` (prometheus-client's multi-process mode): the one worker
that serves metrics then adds up every worker's figures.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from datetime import timezone
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    start_http_server,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import REGISTRY, Collector

from shared.config import ConfigError
from shared.core import PROVIDERS, app_name
from shared.settings import default, read_setting

log = logging.getLogger(__name__)

DEFAULT_PORT = int(default("PUSH_METRICS_PORT"))
# Wake-ups should leave within milliseconds; the top buckets catch provider timeouts.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

REQUEST_DURATION = Histogram(
    "push_request_duration_seconds",
    "Time to answer a request, by function, method and status class (2xx, 4xx, 5xx).",
    ["function", "method", "status_class"],
    buckets=LATENCY_BUCKETS,
)
REQUESTS = Counter(
    "push_requests_total", "Requests answered, by function, method and status class.",
    ["function", "method", "status_class"],
)
ERRORS = Counter(
    "push_errors_total", "Requests answered with an error, by function and error code.",
    ["function", "reason"],
)
IN_FLIGHT = Gauge(
    "push_requests_in_flight", "Requests being handled now (saturation).", ["function"],
    multiprocess_mode="livesum",
)
SUBSCRIPTION_REQUESTS = Counter(
    "push_subscription_requests_total",
    "Subscribe and unsubscribe requests by action and result.",
    ["action", "provider", "result"],
)
NOTIFICATIONS_REQUESTED = Counter(
    "push_notifications_requested_total",
    "Notification requests (events or Echo requests) a dispatcher accepted.",
    ["provider", "source"],
)
SENDS = Counter(
    "push_sends_total",
    "Wake-ups sent to devices, by provider, outcome (delivered, dead, transient, rate_limited, "
    "rejected; credentials, kept, discarded, expired for held ones) and the provider's reason.",
    ["provider", "outcome", "reason"],
)
PROVIDER_LATENCY = Histogram(
    "push_provider_request_duration_seconds",
    "Time for one send to a push provider, by provider and outcome.",
    ["provider", "outcome"],
    buckets=LATENCY_BUCKETS,
)
REDELIVERIES = Counter(
    "push_redeliveries_total",
    "Redelivered events seen: events some of whose devices were already served.",
    ["provider"],
)
SKIPPED = Counter(
    "push_sends_skipped_total",
    "Devices not sent to again because an earlier delivery of the same event served them.",
    ["provider"],
)
INVALID_DELETED = Counter(
    "push_invalid_subscriptions_deleted_total", "Subscriptions deleted as dead by clean-up.", []
)
EXPIRED = Counter(
    "push_expired_subscriptions_total", "Subscriptions deleted for not being refreshed.", []
)
DEAD_LETTERS_RECEIVED = Counter(
    "push_dead_letters_received_total",
    "Events the broker gave up on, by event type; kept=false for ticks, which are not kept.",
    ["event_type", "kept"],
)


def status_class(status: int) -> str:
    return f"{status // 100}xx"


class _Cached:
    """A figure read from the database at scrape time and kept for ``ttl`` seconds, so frequent
    scrapes (or many at once) cost one query; a failed read keeps the last figure (a scrape must
    not fail on a database outage)."""

    def __init__(self, ttl: float, empty: Any, what: str) -> None:
        self.ttl = ttl
        self.what = what
        self._lock = threading.Lock()
        self._cached = empty
        self._at = float("-inf")

    def get(self, read: Callable[[], Any] | None) -> Any:
        with self._lock:
            if read is not None and time.monotonic() - self._at > self.ttl:
                try:
                    self._cached = read()
                    self._at = time.monotonic()
                except Exception:  # noqa: BLE001 - see the class docstring
                    log.warning("could not read %s for metrics", self.what)
            return self._cached


class _CachedCollector(Collector):
    """A collector whose figures come from the database through a :class:`_Cached`."""

    def __init__(self, ttl: float, empty: Any, what: str) -> None:
        self._cache = _Cached(ttl, empty, what)

    @property
    def ttl(self) -> float:
        return self._cache.ttl

    @ttl.setter
    def ttl(self, seconds: float) -> None:
        self._cache.ttl = seconds


class SubscriptionTotals(_CachedCollector):
    """``push_subscriptions`` per provider, counted in the database when scraped."""

    def __init__(self, ttl: float = 30.0) -> None:
        super().__init__(ttl, {}, "subscriptions")
        self.count: Callable[[], dict[str, int]] | None = None

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily("push_subscriptions", "Stored subscriptions per provider.", labels=["provider"])
        cached = self._cache.get(self.count)
        for provider in PROVIDERS:
            family.add_metric([provider], cached.get(provider, 0))
        yield family


class PendingTotals(_CachedCollector):
    """``push_pending`` and ``push_pending_oldest_age_seconds`` per provider, when the privacy
    delay is on: read from the database at scrape time."""

    def __init__(self, ttl: float = 15.0) -> None:
        super().__init__(ttl, {}, "pending pushes")
        self.stats: Callable[[], dict[str, tuple[int, float]]] | None = None

    def collect(self) -> Iterator[GaugeMetricFamily]:
        if self.stats is None:
            return
        cached = dict(self._cache.get(self.stats))
        count = GaugeMetricFamily("push_pending", "Wake-ups waiting for their privacy delay.", labels=["provider"])
        age = GaugeMetricFamily(
            "push_pending_oldest_age_seconds", "Age of the oldest pending wake-up.", labels=["provider"]
        )
        for provider in PROVIDERS:
            pending, oldest = cached.get(provider, (0, 0.0))
            count.add_metric([provider], pending)
            age.add_metric([provider], oldest)
        yield count
        yield age


class DeadLetterTotal(_CachedCollector):
    """``push_dead_letters``: the dead letters kept in the database and not yet replayed, read
    when scraped (by clean-up, which keeps them)."""

    def __init__(self, ttl: float = 30.0) -> None:
        super().__init__(ttl, 0, "dead letters")
        self.count: Callable[[], int] | None = None

    def collect(self) -> Iterator[GaugeMetricFamily]:
        if self.count is None:
            return
        yield GaugeMetricFamily("push_dead_letters", "Dead letters kept, not yet replayed.",
                                value=self._cache.get(self.count))


class HoldTotals(_CachedCollector):
    """The holds (:mod:`shared.holds`), read from the database at scrape time:
    ``push_paused`` and ``push_paused_seconds`` per paused provider and app (``*``: all),
    ``push_credentials_refused`` per provider and app whose credentials are held, and
    ``push_kept`` per provider and app: the wake-ups kept for them. Only holds that exist are
    reported, so a series ends with its hold."""

    def __init__(self, ttl: float = 5.0) -> None:
        super().__init__(ttl, ((), {}), "holds")
        self.read: Callable[[], Any] | None = None
        self.waiting: Callable[[], dict[tuple[str, str], tuple[int, int]]] | None = None

    def _read_both(self) -> tuple[Any, dict[tuple[str, str], tuple[int, int]]]:
        assert self.read is not None and self.waiting is not None
        return self.read().holds, self.waiting()

    def collect(self) -> Iterator[GaugeMetricFamily]:
        if self.read is None or self.waiting is None:
            return
        holds, waiting = self._cache.get(self._read_both)
        labels = ["provider", "app"]
        paused = GaugeMetricFamily("push_paused", "1 while an operator's pause holds the sends.", labels=labels)
        age = GaugeMetricFamily("push_paused_seconds", "How long the pause has lasted.", labels=labels)
        refused = GaugeMetricFamily(
            "push_credentials_refused", "1 while the provider refuses our credentials for the app.", labels=labels)
        kept = GaugeMetricFamily("push_kept", "Wake-ups a hold keeps in the database.", labels=labels)
        now = time.time()
        for hold in holds:
            names = [hold.provider, app_name(hold.app)]
            if hold.paused:
                paused.add_metric(names, 1)
                age.add_metric(names, max(0.0, now - hold.since.replace(tzinfo=timezone.utc).timestamp()))
            elif hold.credentials_refused:
                refused.add_metric(names, 1)
        for (provider, app), (_, held) in sorted(waiting.items()):
            if held:
                kept.add_metric([provider, app_name(app)], held)
        yield paused
        yield age
        yield refused
        yield kept


SUBSCRIPTION_TOTALS = SubscriptionTotals()
REGISTRY.register(SUBSCRIPTION_TOTALS)
DEAD_LETTER_TOTAL = DeadLetterTotal()
REGISTRY.register(DEAD_LETTER_TOTAL)
PENDING_TOTALS = PendingTotals()
REGISTRY.register(PENDING_TOTALS)
HOLD_TOTALS = HoldTotals()
REGISTRY.register(HOLD_TOTALS)

_server_lock = threading.Lock()
_settings: tuple[int, str] | None = None
"""Port and address of the metrics server, once :func:`configure` has read them."""
_served: tuple[int, int | None] | None = None
"""The process that started a metrics server, and its port (``None``: the bind failed)."""


def configure() -> None:
    """Read and check ``PUSH_METRICS_PORT`` and ``PUSH_METRICS_ADDR`` at start-up; the server
    itself starts with the first request (:func:`serve_metrics`)."""
    global _settings
    raw = read_setting("PUSH_METRICS_PORT")
    if raw == "off":
        _settings = None
        return
    try:
        port = int(raw)
    except ValueError:
        raise ConfigError(f"PUSH_METRICS_PORT must be a port number or off, not {raw!r}") from None
    _settings = (port, read_setting("PUSH_METRICS_ADDR"))


def serve_metrics() -> int | None:
    """Serve this process's metrics, starting the server the first time; its port (``None``
    when turned off, or when another worker holds the port).

    Called on every request, so the server runs in the process that serves requests:
    ``functions-framework --asgi`` imports the function in gunicorn's master and forks the
    workers from it, and a server started in the master would never see a worker's figures (and
    would hold the port). With several workers, the first to bind serves; the others' figures
    reach it through ``PROMETHEUS_MULTIPROC_DIR``.
    """
    global _served
    served, pid = _served, os.getpid()
    if served is not None and served[0] == pid:
        return served[1]
    with _server_lock:
        if _served is not None and _served[0] == pid:
            return _served[1]
        if _settings is None:
            configure()
        if _settings is None:
            _served = (pid, None)
            return None
        port, addr = _settings
        registry: Collector = REGISTRY
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            from prometheus_client import multiprocess

            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)
            registry.register(SUBSCRIPTION_TOTALS)
            registry.register(PENDING_TOTALS)
            registry.register(DEAD_LETTER_TOTAL)
            registry.register(HOLD_TOTALS)
        try:
            server, _thread = start_http_server(port, addr=addr, registry=registry)
            _served = (pid, server.server_address[1])
        except OSError as error:
            level = logging.INFO if os.environ.get("PROMETHEUS_MULTIPROC_DIR") else logging.WARNING
            log.log(level, "metrics server not started in this process: port %s: %s", port, error.strerror)
            _served = (pid, None)
        return _served[1]
