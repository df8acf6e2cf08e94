"""The public subscription API behind the ``subscribe`` and ``unsubscribe`` functions.

Each function builds one :class:`SubscriptionApi` at start-up (configuration errors stop it there)
and hands it every request. Database work runs in worker threads, off the event loop; the
subscribe requests that arrive while one batch is written go together in the next (group commit,
:class:`shared.batching.Batcher`): under load, their statements and commit are shared.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import datetime, timezone

from sqlalchemy import Connection
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from shared import metrics
from shared.apps import APP_NAME, load_apps
from shared.auth import Authenticator
from shared.batching import Batcher
from shared.cors import CorsPolicy, allowed_origins_from_env
from shared.db import SchemaGate, get_engine, run_transaction
from shared.http import ApiError, read_json, require_method, serve
from shared.logs import configure_logging
from shared.models import Subscription
from shared.ratelimits import RateLimiter
from shared.settings import Limit, SubscriptionApiSettings
from shared.subscriptions import SubscribeRequest, SubscribeResult, SubscriptionStore
from shared.vapid import PublishedKey, published_keys
from shared.validation import SubscribeSettings, parse_subscribe, parse_unsubscribe

log = logging.getLogger(__name__)

MAX_BODY = 16 * 1024
#: subscribe's path for the VAPID public key; every other path is the subscription API.
VAPID_KEY_PATH = "/vapid-public-key"
#: The key changes only when an operator rotates it; an hour in a browser's or a CDN's cache
#: bounds how long pages may still subscribe with the old one.
VAPID_KEY_CACHE_CONTROL = "public, max-age=3600"
SUBSCRIBE_METHODS = ("GET", "POST")
UNSUBSCRIBE_METHODS = ("POST", "DELETE")


class SubscriptionApi:
    def __init__(
        self,
        store: SubscriptionStore,
        auth: Authenticator,
        policy: SubscribeSettings,
        subscribe_limit: Limit | None = None,
        vapid_keys: dict[str | None, PublishedKey] | None = None,
        cors_origins: frozenset[str] = frozenset(),
    ):
        self.store = store
        self.auth = auth
        self.policy = policy
        self.subscribe_limit = subscribe_limit
        self.vapid_keys = vapid_keys or {}
        self.subscribe_cors = CorsPolicy(cors_origins, SUBSCRIBE_METHODS) if cors_origins else None
        self.unsubscribe_cors = CorsPolicy(cors_origins, UNSUBSCRIBE_METHODS) if cors_origins else None
        self.limiter = RateLimiter(store.engine, store.clock)
        self._subscribes: Batcher[SubscribeRequest, SubscribeResult | None] = Batcher(self._subscribe_many)
        self.schema = SchemaGate(store.engine)

    @classmethod
    def from_env(cls) -> SubscriptionApi:
        """Build from the environment; fails at start-up on bad configuration or on a database
        whose schema is behind (one that cannot be reached is checked again on each request)."""
        configure_logging()
        metrics.configure()
        settings = SubscriptionApiSettings.from_env()
        store = SubscriptionStore(get_engine(), cap=settings.max_subscriptions_per_user)
        metrics.SUBSCRIPTION_TOTALS.count = store.count_by_provider
        apps = load_apps()
        return cls(
            store,
            Authenticator.from_env(),
            SubscribeSettings.from_env(apps),
            subscribe_limit=settings.subscribe_limit,
            vapid_keys=published_keys(apps),
            cors_origins=allowed_origins_from_env(),
        )

    async def subscribe(self, request: Request) -> Response:
        if request.url.path == VAPID_KEY_PATH:
            # Static and public: answered without the database, so a page can always get it.
            return await serve(request, self._vapid_key, _no_database, "subscribe", self.subscribe_cors)
        return await serve(
            request, self._counted(self._subscribe), self.schema.ready, "subscribe", self.subscribe_cors
        )

    async def unsubscribe(self, request: Request) -> Response:
        return await serve(
            request, self._counted(self._unsubscribe), self.schema.ready, "unsubscribe", self.unsubscribe_cors
        )

    async def _vapid_key(self, request: Request) -> Response:
        """``GET /vapid-public-key[?app=NAME]``: the ``applicationServerKey`` a web page subscribes
        with, for the default app or the one named. No token: the key is public."""
        require_method(request, ("GET",))
        names = request.query_params.getlist("app")
        if len(names) > 1:
            raise ApiError(400, "invalid_field", "name one app", "app")
        app = names[0] if names else None
        if app is not None and not APP_NAME.match(app):
            raise ApiError(400, "invalid_field", "app must be an app name (lower-case letters, digits, . _ -)", "app")
        published = self.vapid_keys.get(app)
        if published is None:
            which = f"app {app!r}" if app else "the default app (name one with ?app=)"
            raise ApiError(404, "no_vapid_key", f"no Web Push key is configured for {which}")
        headers = {"Cache-Control": VAPID_KEY_CACHE_CONTROL, "ETag": published.etag}
        if _none_match(request.headers.get("if-none-match", ""), published.etag):
            return Response(status_code=304, headers=headers)
        return JSONResponse({"app": app, "public_key": published.public_key}, headers=headers)

    @staticmethod
    def _counted(handler):
        """Count each request in ``push_subscription_requests_total`` by action, provider and
        result, and log it in one info line of those three (never the caller or the device);
        handlers put the provider and result on ``request.state``."""

        async def counted(request: Request) -> Response:
            request.state.action = None
            request.state.provider = "none"
            request.state.result = "error"
            try:
                return await handler(request)
            except ApiError as error:
                request.state.result = error.code
                raise
            finally:
                state = request.state
                if state.action:
                    metrics.SUBSCRIPTION_REQUESTS.labels(state.action, state.provider, state.result).inc()
                log.info(
                    "%s%s: %s", state.action or request.method,
                    "" if state.provider == "none" else f" {state.provider}", state.result,
                    extra={"action": state.action, "provider": state.provider, "result": state.result},
                )

        return counted

    async def _caller(self, request: Request) -> str:
        authorization = request.headers.get("authorization")
        if self.auth.jwks is None:
            # A static key: checking the signature is a fraction of a millisecond of CPU, less
            # than handing it to a thread. A JWKS may have to be fetched: that goes to a thread.
            return self.auth.user_id(authorization)
        return await run_in_threadpool(self.auth.user_id, authorization)

    async def _subscribe(self, request: Request) -> Response:
        require_method(request, ("GET", "POST"))
        request.state.action = "list" if request.method == "GET" else "subscribe"
        user_id = await self._caller(request)
        if request.method == "GET":
            rows = await run_in_threadpool(self.store.list_for_user, user_id)
            request.state.result = "listed"
            return JSONResponse({"subscriptions": [subscription_view(row) for row in rows]})
        body = await read_json(request, MAX_BODY)  # 413/415/400 first: no database work for them
        try:
            new = parse_subscribe(body, self.policy)
        except ApiError:
            await self._check_rate(user_id)  # invalid requests count too, and 429 comes first
            raise
        request.state.provider = new.provider
        # The request is counted in the transaction that writes the subscription: one commit.
        result = await self._subscribes.submit(SubscribeRequest(user_id, new))
        if result is None:
            raise self._rate_limited()
        request.state.result = "created" if result.created else "refreshed"
        return JSONResponse(
            subscription_view(result.subscription), status_code=201 if result.created else 200
        )

    def _subscribe_many(self, requests: Sequence[SubscribeRequest]) -> list[SubscribeResult | None | Exception]:
        """One batch of subscribe requests; each is counted against the rate limit in the
        transaction that writes it (``None``: over the limit, nothing written)."""
        return self.store.subscribe_many(requests, self._admit if self.subscribe_limit else None)

    def _admit(self, connection: Connection, user_ids: Sequence[str]) -> list[bool]:
        """Counts a subscribe request of each user against ``PUSH_SUBSCRIBE_RATE_LIMIT`` inside
        a transaction; for each, whether it is within the limit."""
        assert self.subscribe_limit is not None
        return self.limiter.hit_in(connection, [f"subscribe\n{user_id}" for user_id in user_ids], self.subscribe_limit)

    async def _check_rate(self, user_id: str) -> None:
        """Count a request that writes nothing (an invalid one) against the limit: 429 with
        Retry-After once the caller is over it."""
        if self.subscribe_limit is None:
            return
        if not await run_in_threadpool(
            run_transaction, self.store.engine, lambda connection: self._admit(connection, [user_id])[0]
        ):
            raise self._rate_limited()

    def _rate_limited(self) -> ApiError:
        assert self.subscribe_limit is not None
        window = self.subscribe_limit.window_seconds
        now = self.store.clock().replace(tzinfo=timezone.utc).timestamp()
        return ApiError(
            429, "rate_limited", "too many subscribe requests; try again later",
            headers={"Retry-After": str(max(1, window - int(now) % window))},
        )

    async def _unsubscribe(self, request: Request) -> Response:
        require_method(request, ("POST", "DELETE"))
        request.state.action = "unsubscribe"
        user_id = await self._caller(request)
        wanted = parse_unsubscribe(await read_json(request, MAX_BODY))
        request.state.provider = wanted.provider or "all"
        if wanted.all:
            deleted = await run_in_threadpool(self.store.unsubscribe_all, user_id)
        else:
            deleted = await run_in_threadpool(self.store.unsubscribe, user_id, wanted.identity)
        if deleted == 0:
            raise ApiError(404, "not_found", "none of your subscriptions matches")
        request.state.result = "deleted"
        return JSONResponse({"deleted": deleted})


async def _no_database() -> None:
    """The readiness of an answer that needs no database: always ready."""


def _none_match(if_none_match: str, etag: str) -> bool:
    """Whether If-None-Match names ``etag`` (weakly compared, as RFC 9110 13.1.2 says for GET)
    or is ``*``: then the cached copy is current and 304 answers."""
    tags = {tag.strip().removeprefix("W/") for tag in if_none_match.split(",")}
    return etag in tags or "*" in tags


def subscription_view(row: Subscription) -> dict[str, object]:
    """What apps see of a subscription: never the token, only its hash."""
    view: dict[str, object] = {
        "id": row.id,
        "provider": row.provider,
        "token_sha256": row.token_sha256,
        "created": _iso(row.created_at),
        "updated": _iso(row.updated_at),
    }
    if row.provider == "apns":
        view["topic"] = row.topic
        view["environment"] = row.environment
    if row.app is not None:
        view["app"] = row.app
    return view


def _iso(moment: datetime) -> str:
    return moment.isoformat(timespec="milliseconds") + "Z"
