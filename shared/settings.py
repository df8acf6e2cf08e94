"""Every setting, declared once: its name, type, default, bounds, which functions read it and what
it means; the typed settings each function reads at start-up; and the rules between settings.

A function reads its settings once, when it starts (``*Settings.from_env()`` below): a mistake
stops it then with an error naming the variable, never later on a request. A setting is read
only through its declaration (:func:`read_setting`), so its default and bounds are written in one
place, and the table in ``docs/configuration.md`` is generated from the declarations
(``scripts/gen_config_docs.py``; a test fails when they differ).

Secrets (keys, credentials) are read as :mod:`shared.config` says: from ``NAME_FILE``, ``NAME``
(the value, or a file path), or a file in ``PUSH_SECRETS_DIR``.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from shared.config import DEFAULT_SECRETS_DIR, ConfigError, env, env_float, env_int, env_list, secret

SUBSCRIBE = "subscribe"
UNSUBSCRIBE = "unsubscribe"
DISPATCH_FCM = "dispatch-fcm"
DISPATCH_APNS = "dispatch-apns"
DISPATCH_WEBPUSH = "dispatch-webpush"
CLEANUP = "cleanup-invalid-tokens"
IMPORT_ECHO = "pushctl import-echo"
DISPATCHERS = (DISPATCH_FCM, DISPATCH_APNS, DISPATCH_WEBPUSH)
API = (SUBSCRIBE, UNSUBSCRIBE)
FUNCTIONS = (*API, *DISPATCHERS, CLEANUP)
"""The six functions (``functions/*/main.py``); ``pushctl import-echo`` reads a few settings too."""

TEXT, INT, FLOAT, LIST, SECRET, OUTSIDE = "text", "int", "float", "list", "secret", "outside"
"""Kinds of setting: a string, a whole number, a number, a comma-separated list, a secret (text
read as :func:`shared.config.secret` reads it), and one read by a library, not by our code."""


@dataclass(frozen=True)
class Setting:
    """One environment variable: what it is, who reads it, what it means (the docs' row)."""

    name: str
    kind: str
    used_by: tuple[str, ...]
    meaning: str
    default: Any = None
    """The value when unset (``None``: none); for a list, a tuple."""
    minimum: float | None = None
    maximum: float | None = None
    shown_default: str | None = None
    """The default as the docs say it, when the value alone does not (``the JSON's project_id``)."""
    where: str = ""
    """Where in those functions it matters, as the docs say it (``MySQL``, ``OpenFaaS``)."""


def _s(name: str, kind: str, used_by: tuple[str, ...], meaning: str, default: Any = None, *,
       minimum: float | None = None, maximum: float | None = None, shown: str | None = None,
       where: str = "") -> Setting:
    return Setting(name, kind, used_by, meaning, default, minimum, maximum, shown, where)


DEFAULT_DATABASE_URL = "sqlite:///push.sqlite3"
DEFAULT_SUBSCRIBE_RATE_LIMIT = "60/minute"
DEFAULT_METRICS_PORT = "9095"

SETTINGS: tuple[Setting, ...] = (
    _s("PUSH_DATABASE_URL", SECRET, FUNCTIONS,
       "SQLAlchemy URL; production: `mysql+pymysql://user:pw@host/db?charset=utf8mb4`",
       DEFAULT_DATABASE_URL),
    _s("PUSH_DATABASE_POOL_SIZE", INT, FUNCTIONS,
       "connections kept per process (a fixed pool: requests beyond it wait up to 10 s, then 503); the "
       "manifests set 5 (clean-up 2): [deploy.md, \"Database connections\"](deploy.md#database-connections)",
       10, minimum=1, where="MySQL"),
    _s("PUSH_DATABASE_MAX_OVERFLOW", INT, FUNCTIONS,
       "extra connections opened under load and closed after use (each costs a TLS set-up)",
       0, minimum=0, where="MySQL"),
    _s("PUSH_DATABASE_CONNECT_TIMEOUT", INT, FUNCTIONS, "seconds", 5, minimum=1, where="MySQL"),
    _s("PUSH_SECRETS_DIR", TEXT, FUNCTIONS,
       "where a secret not otherwise given is looked for, as a file named after it (`push-apns-key`)",
       DEFAULT_SECRETS_DIR),
    _s("PUSH_FLUSH_TICK_URLS", LIST, (CLEANUP,),
       "comma-separated URLs to post a flush tick to when held work is due (OpenFaaS: the dispatchers' "
       "async routes, as stack.yml sets); unset: the tick is clean-up's reply event, which the broker "
       "routes (Knative)"),
    _s("PUSH_AUTH_PUBLIC_KEY", SECRET, API,
       "the wiki's token-signing public key, PEM (RSA >= 2048 bits: RS256; EC P-256: ES256)"),
    _s("PUSH_AUTH_JWKS_URL", TEXT, API, "instead of the key: the wiki's JWKS URL"),
    _s("PUSH_AUTH_ISSUER", TEXT, API, "when set, tokens' `iss` must equal it"),
    _s("PUSH_AUTH_AUDIENCE", TEXT, API, "when set, tokens' `aud` must contain it"),
    _s("PUSH_AUTH_LEEWAY_SECONDS", INT, API, "clock skew allowed on `exp`/`nbf`/`iat`",
       30, minimum=0, maximum=300),
    _s("PUSH_MAX_SUBSCRIPTIONS_PER_USER", INT, (SUBSCRIBE,),
       "per-user cap; the least recently updated is evicted (not applied by `pushctl import-echo`)",
       10, minimum=1),
    _s("PUSH_APNS_ALLOWED_TOPICS", LIST, (SUBSCRIBE, IMPORT_ECHO),
       "comma-separated bundle ids accepted as APNs topics", shown="any"),
    _s("PUSH_MESSAGE_TYPES", LIST, DISPATCHERS, "comma-separated message types producers may send",
       ("checkEchoV1",)),
    _s("PUSH_MAX_USERS_PER_EVENT", INT, DISPATCHERS, "more users in one event: 422", 1000, minimum=1),
    _s("PUSH_DEFAULT_TTL_SECONDS", INT, DISPATCHERS, "TTL when the event gives none", 86400, minimum=0),
    _s("PUSH_DISPATCH_CONCURRENCY", INT, DISPATCHERS, "sends in flight at once per event", 100, minimum=1),
    _s("PUSH_DISPATCH_DEADLINE_SECONDS", FLOAT, DISPATCHERS,
       "sends unfinished by then count as transient; keep below the platform timeout", 60.0, minimum=1.0),
    _s("PUSH_DISPATCH_DRAIN_SECONDS", FLOAT, DISPATCHERS,
       "after the deadline, how long outcomes the database could not take yet are still tried (through an "
       "outage) before the event is answered 503", 10.0, minimum=0.0),
    _s("PUSH_DELIVERY_LEASE_SECONDS", INT, DISPATCHERS,
       "how long a claim keeps other invocations off a device; above the deadline plus the drain", 120,
       minimum=1),
    _s("PUSH_DELIVERY_RECORD_HOURS", INT, DISPATCHERS,
       "how long delivery records are kept (a redelivery or replayed dead letter within it sends nothing "
       "twice); clean-up deletes them after", 24, minimum=1),
    _s("PUSH_INTERNAL_TOKEN", SECRET, (*DISPATCHERS, CLEANUP),
       "when set, every request but the platform's probes must carry it in `X-Push-Internal-Token` (else "
       "401); the dispatchers send it with their `K_SINK` reports (OpenFaaS: the secret "
       "`push-internal-token`)"),
    _s("PUSH_ECHO_APNS_ENVIRONMENT", TEXT, (DISPATCH_APNS,), "environment of unknown tokens in Echo's requests",
       "production"),
    _s("K_SINK", TEXT, DISPATCHERS,
       "where dead-token reports go (set by a Knative SinkBinding); unset: in the reply"),
    _s("PUSH_FCM_CREDENTIALS", SECRET, (DISPATCH_FCM,),
       "service-account JSON (its `token_uri` is where access tokens come from)"),
    _s("PUSH_FCM_PROJECT_ID", TEXT, (DISPATCH_FCM,), "Firebase project", shown="the JSON's `project_id`"),
    _s("PUSH_FCM_ENDPOINT", TEXT, (DISPATCH_FCM,), "FCM HTTP v1 base URL", "https://fcm.googleapis.com"),
    _s("PUSH_FCM_CA_FILE", TEXT, (DISPATCH_FCM,),
       "extra CA bundle (PEM) to trust, beside the system's (also for the token endpoint, instead of "
       "requests' CAs)", shown="system CAs"),
    _s("PUSH_FCM_TIMEOUT_SECONDS", FLOAT, (DISPATCH_FCM,), "per request", 10.0, minimum=0.001),
    _s("PUSH_FCM_MAX_CONNECTIONS", INT, (DISPATCH_FCM,),
       "HTTP/2 connections at most (as many requests in flight on each as FCM's SETTINGS allow, 100 today)",
       8, minimum=1),
    _s("PUSH_APNS_KEY", SECRET, (DISPATCH_APNS,), "the `.p8` token-signing key (PEM)"),
    _s("PUSH_APNS_KEY_ID", TEXT, (DISPATCH_APNS,), "its key id"),
    _s("PUSH_APNS_TEAM_ID", TEXT, (DISPATCH_APNS,), "the Apple team id"),
    _s("PUSH_APNS_PRODUCTION_URL", TEXT, (DISPATCH_APNS,), "production endpoint", "https://api.push.apple.com"),
    _s("PUSH_APNS_SANDBOX_URL", TEXT, (DISPATCH_APNS,), "sandbox endpoint", "https://api.sandbox.push.apple.com"),
    _s("PUSH_APNS_CA_FILE", TEXT, (DISPATCH_APNS,), "extra CA bundle (PEM) to trust, beside the system's",
       shown="system CAs"),
    _s("PUSH_APNS_TIMEOUT_SECONDS", FLOAT, (DISPATCH_APNS,), "per request", 10.0, minimum=0.001),
    _s("PUSH_APNS_MAX_CONNECTIONS", INT, (DISPATCH_APNS,),
       "HTTP/2 connections at most per environment (requests in flight on each: as Apple's SETTINGS allow)",
       4, minimum=1),
    _s("PUSH_APNS_TOKEN_REFRESH_MINUTES", INT, (DISPATCH_APNS,),
       "age at which the shared provider token is replaced", 40, minimum=20, maximum=55),
    _s("PUSH_VAPID_PRIVATE_KEY", SECRET, (DISPATCH_WEBPUSH,),
       "VAPID private key: base64url raw 32 bytes (`pushctl vapid-keygen`) or PEM"),
    _s("PUSH_VAPID_PUBLIC_KEY", TEXT, (SUBSCRIBE, DISPATCH_WEBPUSH),
       "the public key subscribe publishes at `GET /vapid-public-key`; dispatch-webpush refuses to start "
       "when it is not its private key's", shown="derived from the private key where given"),
    _s("PUSH_VAPID_SUBJECT", TEXT, (DISPATCH_WEBPUSH,), "`mailto:` or `https:` contact for push services"),
    _s("PUSH_WEBPUSH_CA_FILE", TEXT, (DISPATCH_WEBPUSH,), "extra CA bundle (PEM) to trust, beside the system's",
       shown="system CAs"),
    _s("PUSH_WEBPUSH_TIMEOUT_SECONDS", FLOAT, (DISPATCH_WEBPUSH,), "per request", 10.0, minimum=0.001),
    _s("PUSH_WEBPUSH_URGENCY", TEXT, (DISPATCH_WEBPUSH,), "`very-low`, `low`, `normal` or `high`", "normal"),
    _s("PUSH_WEBPUSH_MAX_CONNECTIONS", INT, (DISPATCH_WEBPUSH,),
       "HTTP/2 connections at most per push service; requests in flight over HTTP/1.1 (push services that "
       "do not speak HTTP/2)", 16, minimum=1),
    _s("HTTPS_PROXY", OUTSIDE, DISPATCHERS,
       "forward proxy (`http://[user:password@]host:port`, CONNECT) for every provider connection, read as "
       "Python's `urllib` reads it (`ALL_PROXY` too; see `shared/transport/proxy.py` for where that differs "
       "from curl)", shown="none"),
    _s("NO_PROXY", OUTSIDE, DISPATCHERS, "hosts reached without the proxy, read as Python's `urllib` reads it",
       shown="none"),
    _s("PUSH_EVENT_LIMITS", SECRET, DISPATCHERS, "per-event-type limits per device, JSON or a JSON file",
       shown="none"),
    _s("PUSH_PRIVACY_DELAY", TEXT, DISPATCHERS, "`MIN-MAX` seconds of random delay before a wake-up",
       shown="off"),
    _s("PUSH_PENDING_LEASE_SECONDS", FLOAT, DISPATCHERS,
       "how long a flush's claim keeps other flushes off the wake-ups it sends; above the deadline plus the "
       "drain", 120.0, minimum=1.0),
    _s("PUSH_APPS", SECRET, (SUBSCRIBE, *DISPATCHERS, IMPORT_ECHO),
       "several apps' credentials, JSON or a JSON file", shown="one app"),
    _s("PUSH_SUBSCRIPTION_MAX_AGE_DAYS", INT, (CLEANUP, IMPORT_ECHO),
       "subscriptions not refreshed for longer are expired (and not imported)", 270, minimum=1),
    _s("PUSH_METRICS_PORT", TEXT, FUNCTIONS,
       "port of the metrics server (not 9091, which Knative's queue-proxy holds); `off` to disable",
       DEFAULT_METRICS_PORT),
    _s("PUSH_METRICS_ADDR", TEXT, FUNCTIONS, "address the metrics server binds", "0.0.0.0"),
    _s("PUSH_LOG_LEVEL", TEXT, FUNCTIONS, "`debug`, `info`, `warning` or `error`", "INFO", shown="`info`"),
    _s("PUSH_SUBSCRIBE_RATE_LIMIT", TEXT, (SUBSCRIBE,),
       "subscribe requests per user (`off` to disable): 429 with `Retry-After`", DEFAULT_SUBSCRIBE_RATE_LIMIT),
    _s("PUSH_WEBPUSH_ALLOWED_HOSTS", LIST, (SUBSCRIBE, DISPATCH_WEBPUSH),
       "hosts Web Push endpoints may be on besides the browser push services: exact names, `*.domain` for "
       "its subdomains, `*` for any public host ([hardening.md](hardening.md#web-push-endpoints))",
       shown="the browser push services"),
    _s("PUSH_WEBPUSH_ALLOW_LOCAL_ENDPOINTS", LIST, (SUBSCRIBE, DISPATCH_WEBPUSH),
       "local development only: exact `host:port` pairs (`localhost:8090`) exempt from the endpoint rules; "
       "`make run` sets it to its receiver", shown="none"),
    _s("PUSH_CORS_ALLOWED_ORIGINS", LIST, API,
       "comma-separated exact origins whose web pages may call them (e.g. `https://en.wikipedia.org`); `*` "
       "is refused at start-up", shown="none"),
    _s("PUSH_DISPATCH_MAX_IN_FLIGHT", INT, DISPATCHERS,
       "requests one process works on at once; more get 503 + `Retry-After`", 100, minimum=1),
    _s("PUSH_CONNECTOR_EVENT_TYPE", TEXT, (*DISPATCHERS, CLEANUP),
       "read connector requests (no CloudEvent headers) as this event type", shown="off", where="OpenFaaS"),
    _s("PUSH_CONNECTOR_ID_HEADERS", LIST, (*DISPATCHERS, CLEANUP),
       "headers whose value is a connector message's event id", ("X-Call-Id",), where="OpenFaaS"),
)

DECLARED: dict[str, Setting] = {setting.name: setting for setting in SETTINGS}


def read_setting(name: str) -> Any:
    """The setting's value as its declaration types it: its default when unset, a
    :class:`ConfigError` naming it when malformed or out of bounds. A secret is its text (or
    ``None``); whether a function needs it is the function's to say
    (:func:`shared.config.require_secret`)."""
    setting = DECLARED[name]
    if setting.kind == INT:
        maximum = None if setting.maximum is None else int(setting.maximum)
        return env_int(name, setting.default, int(setting.minimum or 0), maximum)
    if setting.kind == FLOAT:
        return env_float(name, setting.default, setting.minimum or 0.0)
    if setting.kind == LIST:
        return env_list(name, setting.default or ())
    if setting.kind == SECRET:
        found = secret(name)
        return setting.default if found is None else found
    if setting.kind == TEXT:
        return env(name, setting.default)
    raise KeyError(f"{name} is read by a library, not by us")


def default(name: str) -> Any:
    """The setting's default, for a constructor that takes the value as an argument."""
    return DECLARED[name].default


# -- value types ------------------------------------------------------------------------------

_UNITS = {"s": 1, "second": 1, "m": 60, "minute": 60, "h": 3600, "hour": 3600, "d": 86400, "day": 86400}
_LIMIT = re.compile(r"^\s*(\d+)\s*/\s*(\d*)\s*([a-z]+)\s*$")


@dataclass(frozen=True)
class Limit:
    """At most ``count`` per ``window_seconds``: a rate limit as settings write it
    (:mod:`shared.ratelimits` counts against it)."""

    count: int
    window_seconds: int

    @classmethod
    def parse(cls, text: str, setting: str) -> Limit:
        """``"5/hour"``, ``"10/day"``, ``"3/15m"``: count per (number of) unit."""
        match = _LIMIT.match(text.lower()) if isinstance(text, str) else None
        if not match or match.group(3) not in _UNITS:
            raise ConfigError(f"{setting}: {text!r} is not a limit like 5/hour, 10/day or 3/15m")
        count, number, unit = int(match.group(1)), int(match.group(2) or 1), match.group(3)
        if count < 1 or number < 1:
            raise ConfigError(f"{setting}: {text!r} must allow at least 1 per window")
        return cls(count, number * _UNITS[unit])


@dataclass(frozen=True)
class PrivacyDelay:
    """``PUSH_PRIVACY_DELAY``: each wake-up waits a random time in [min, max] seconds."""

    min_seconds: float
    max_seconds: float

    @classmethod
    def parse(cls, text: str) -> PrivacyDelay:
        try:
            low, high = (float(part) for part in text.split("-", 1))
        except ValueError:
            raise ConfigError(f"PUSH_PRIVACY_DELAY must be MIN-MAX seconds like 60-300, not {text!r}") from None
        if not 0 <= low <= high:
            raise ConfigError(f"PUSH_PRIVACY_DELAY: need 0 <= MIN <= MAX, not {text!r}")
        return cls(low, high)


# -- each function's settings -------------------------------------------------------------------


@dataclass(frozen=True)
class DatabaseSettings:
    """How every function reaches the database (:func:`shared.db.get_engine`)."""

    url: str = DEFAULT_DATABASE_URL
    pool_size: int = 10
    max_overflow: int = 0
    connect_timeout: int = 5

    @classmethod
    def from_env(cls) -> DatabaseSettings:
        return cls(read_setting("PUSH_DATABASE_URL"), read_setting("PUSH_DATABASE_POOL_SIZE"),
                   read_setting("PUSH_DATABASE_MAX_OVERFLOW"), read_setting("PUSH_DATABASE_CONNECT_TIMEOUT"))


@dataclass(frozen=True)
class NotificationSettings:
    """What producers may ask of a dispatcher: the message types apps understand, and how much at
    once."""

    message_types: tuple[str, ...] = DECLARED["PUSH_MESSAGE_TYPES"].default
    max_users: int = DECLARED["PUSH_MAX_USERS_PER_EVENT"].default
    default_ttl_seconds: int = DECLARED["PUSH_DEFAULT_TTL_SECONDS"].default

    @classmethod
    def from_env(cls) -> NotificationSettings:
        return cls(
            read_setting("PUSH_MESSAGE_TYPES"),
            read_setting("PUSH_MAX_USERS_PER_EVENT"),
            read_setting("PUSH_DEFAULT_TTL_SECONDS"),
        )


@dataclass(frozen=True)
class DeliverySettings:
    """What a dispatcher holds back: per-event-type limits per device (``PUSH_EVENT_LIMITS``),
    the privacy delay, and how long a flush's claim on the delayed wake-ups lasts."""

    limits: dict[str, Limit] = field(default_factory=dict)
    privacy_delay: PrivacyDelay | None = None
    pending_lease_seconds: float = DECLARED["PUSH_PENDING_LEASE_SECONDS"].default

    @classmethod
    def from_env(cls) -> DeliverySettings:
        limits: dict[str, Limit] = {}
        raw = read_setting("PUSH_EVENT_LIMITS")  # the JSON, or a file holding it
        if raw is not None:
            try:
                document = json.loads(raw)
            except ValueError:
                raise ConfigError("PUSH_EVENT_LIMITS is not valid JSON") from None
            if not isinstance(document, dict):
                raise ConfigError("PUSH_EVENT_LIMITS must be a JSON object of event type to limit")
            for event_type, text in document.items():
                limits[event_type] = Limit.parse(text, f"PUSH_EVENT_LIMITS[{event_type!r}]")
        delay = read_setting("PUSH_PRIVACY_DELAY")
        return cls(limits, PrivacyDelay.parse(delay) if delay else None, read_setting("PUSH_PENDING_LEASE_SECONDS"))


@dataclass(frozen=True)
class DispatchSettings:
    """A dispatcher's settings (``dispatch-fcm``, ``dispatch-apns``, ``dispatch-webpush``; its
    provider's are read by the provider, :mod:`shared.providers`)."""

    concurrency: int = DECLARED["PUSH_DISPATCH_CONCURRENCY"].default
    """Sends in flight at once for one event."""
    deadline_seconds: float = DECLARED["PUSH_DISPATCH_DEADLINE_SECONDS"].default
    """Sends not finished by then count as transient: the event is redelivered for them. Keep it
    below the platform's request timeout and below the claim lease."""
    drain_seconds: float = DECLARED["PUSH_DISPATCH_DRAIN_SECONDS"].default
    """After the deadline, how long outcomes not yet written (the database unreachable) are still
    tried before the event is answered 503 (:mod:`shared.recorder`)."""
    echo_apns_environment: str = DECLARED["PUSH_ECHO_APNS_ENVIRONMENT"].default
    """The APNs environment of tokens that Echo's request names and we do not know."""
    max_in_flight: int = DECLARED["PUSH_DISPATCH_MAX_IN_FLIGHT"].default
    """Requests one process works on at once; more are answered 503 so the broker backs off
    (load shedding instead of unbounded memory)."""
    delivery_lease_seconds: int = DECLARED["PUSH_DELIVERY_LEASE_SECONDS"].default
    """How long a claim on a device keeps other invocations off it."""
    delivery_record_hours: int = DECLARED["PUSH_DELIVERY_RECORD_HOURS"].default
    """How long a delivery is remembered, so a redelivery sends nothing twice."""
    sink_url: str | None = None
    """``K_SINK``: where dead-token reports go; ``None``: in the reply."""
    notification: NotificationSettings = NotificationSettings()
    delivery: DeliverySettings = DeliverySettings()

    @classmethod
    def from_env(cls) -> DispatchSettings:
        """Every setting a dispatcher reads, checked, with the rules between them."""
        settings = cls(
            concurrency=read_setting("PUSH_DISPATCH_CONCURRENCY"),
            deadline_seconds=read_setting("PUSH_DISPATCH_DEADLINE_SECONDS"),
            drain_seconds=read_setting("PUSH_DISPATCH_DRAIN_SECONDS"),
            echo_apns_environment=read_setting("PUSH_ECHO_APNS_ENVIRONMENT"),
            max_in_flight=read_setting("PUSH_DISPATCH_MAX_IN_FLIGHT"),
            delivery_lease_seconds=read_setting("PUSH_DELIVERY_LEASE_SECONDS"),
            delivery_record_hours=read_setting("PUSH_DELIVERY_RECORD_HOURS"),
            sink_url=read_setting("K_SINK"),
            notification=NotificationSettings.from_env(),
            delivery=DeliverySettings.from_env(),
        )
        check_rules({
            "PUSH_DISPATCH_DEADLINE_SECONDS": settings.deadline_seconds,
            "PUSH_DISPATCH_DRAIN_SECONDS": settings.drain_seconds,
            "PUSH_DELIVERY_LEASE_SECONDS": settings.delivery_lease_seconds,
            "PUSH_PENDING_LEASE_SECONDS": settings.delivery.pending_lease_seconds,
        })
        return settings


@dataclass(frozen=True)
class CleanupSettings:
    """Clean-up's own settings."""

    subscription_max_age_days: int = DECLARED["PUSH_SUBSCRIPTION_MAX_AGE_DAYS"].default
    flush_tick_urls: tuple[str, ...] = ()

    @classmethod
    def from_env(cls) -> CleanupSettings:
        return cls(read_setting("PUSH_SUBSCRIPTION_MAX_AGE_DAYS"), read_setting("PUSH_FLUSH_TICK_URLS"))


@dataclass(frozen=True)
class SubscriptionApiSettings:
    """Subscribe's and unsubscribe's own settings (authentication, CORS, what subscribe accepts
    and the apps' keys are read by :mod:`shared.auth`, :mod:`shared.cors`,
    :class:`shared.validation.SubscribeSettings` and :mod:`shared.apps`)."""

    max_subscriptions_per_user: int = DECLARED["PUSH_MAX_SUBSCRIPTIONS_PER_USER"].default
    subscribe_limit: Limit | None = Limit.parse(DEFAULT_SUBSCRIBE_RATE_LIMIT, "PUSH_SUBSCRIBE_RATE_LIMIT")
    """Subscribe requests per user (``PUSH_SUBSCRIBE_RATE_LIMIT``, e.g. ``60/minute``); ``None``
    (``off``): not limited."""

    @classmethod
    def from_env(cls) -> SubscriptionApiSettings:
        text = read_setting("PUSH_SUBSCRIBE_RATE_LIMIT")
        limit = None if text.lower() in ("off", "none", "0") else Limit.parse(text, "PUSH_SUBSCRIBE_RATE_LIMIT")
        return cls(read_setting("PUSH_MAX_SUBSCRIPTIONS_PER_USER"), limit)


# -- rules between settings -----------------------------------------------------------------------


@dataclass(frozen=True)
class Rule:
    """``above`` must be greater than ``below`` (plus ``plus``, when named); ``why`` says what goes
    wrong otherwise. Checked when a function that reads them starts (:func:`check_rules`)."""

    above: str
    below: str
    why: str
    plus: str | None = None

    def broken(self, values: dict[str, Any]) -> str | None:
        high, low = values[self.above], values[self.below]
        extra = values[self.plus] if self.plus else 0
        if high > low + extra:
            return None
        plus = f" + {self.plus} ({extra:g})" if self.plus else ""
        return f"{self.above} ({high:g}) must be above {self.below} ({low:g}){plus}, {self.why}"


RULES = (
    # The drain too: a flush or an event may still record its sends that long after the
    # deadline (shared.recorder), and a claim that ran out meanwhile is taken over and sent again.
    Rule("PUSH_PENDING_LEASE_SECONDS", "PUSH_DISPATCH_DEADLINE_SECONDS",
         "or a slow flush's wake-ups are sent again by the next tick", plus="PUSH_DISPATCH_DRAIN_SECONDS"),
    Rule("PUSH_DELIVERY_LEASE_SECONDS", "PUSH_DISPATCH_DEADLINE_SECONDS",
         "or a redelivery can claim a device whose send is still running, or whose outcome is still being "
         "recorded, and push to it twice", plus="PUSH_DISPATCH_DRAIN_SECONDS"),
)


def check_rules(values: dict[str, Any]) -> None:
    """Raise :class:`ConfigError` naming the variables of every rule ``values`` break."""
    broken = [message for rule in RULES if (message := rule.broken(values)) is not None]
    if broken:
        raise ConfigError("; ".join(broken))
