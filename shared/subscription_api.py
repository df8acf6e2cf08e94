"""The public subscription API behind the ``subscribe`` and ``unsubscribe`` functions.

Each function builds one :class:`SubscriptionApi` at start-up (configuration errors stop it there)
and hands it every request. Database work runs in worker threads, off the event loop; the
subscribe requests that arrive while one batch is written go together in the next (group commit,
:class:`shared.batching.Batcher`): under load, their statements and commit are shared.
"""
from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timezone

from sqlalchemy import Connection
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from shared import metrics
from shared.apps import load_apps
from shared.auth import Authenticator
from shared.batching import Batcher
from shared.config import env, env_int, env_list
from shared.db import SchemaGate, get_engine, run_transaction
from shared.http import ApiError, read_json, require_method, serve
from shared.logs import configure_logging
from shared.models import Subscription
from shared.ratelimits import Limit, RateLimiter
from shared.subscriptions import SubscribeRequest, SubscribeResult, SubscriptionStore
from shared.validation import SubscribePolicy, parse_subscribe, parse_unsubscribe

MAX_BODY = 16 * 1024
DEFAULT_SUBSCRIBE_RATE_LIMIT = "60/minute"


class SubscriptionApi:
    def __init__(
        self,
        store: SubscriptionStore,
        auth: Authenticator,
        policy: SubscribePolicy,
        subscribe_limit: Limit | None = None,
    ):
        self.store = store
        self.auth = auth
        self.policy = policy
        self.subscribe_limit = subscribe_limit
        self.limiter = RateLimiter(store.engine, store.clock)
        self._subscribes: Batcher[SubscribeRequest, SubscribeResult | None] = Batcher(self._subscribe_many)
        self.schema = SchemaGate(store.engine)

    @classmethod
    def from_env(cls) -> SubscriptionApi:
        """Build from the environment; fails at start-up on bad configuration or on a database
        whose schema is behind (one that cannot be reached is checked again on each request)."""
        configure_logging()
        metrics.configure()
        store = SubscriptionStore(
            get_engine(), cap=env_int("PUSH_MAX_SUBSCRIPTIONS_PER_USER", 10, minimum=1)
        )
        metrics.SUBSCRIPTION_TOTALS.count = store.count_by_provider
        return cls(
            store,
            Authenticator.from_env(),
            SubscribePolicy(
                allowed_apns_topics=env_list("PUSH_APNS_ALLOWED_TOPICS"),
                apps=load_apps(),
                allowed_webpush_hosts=env_list("PUSH_WEBPUSH_ALLOWED_HOSTS"),
            ),
            subscribe_limit=subscribe_limit_from_env(),
        )

    async def subscribe(self, request: Request) -> Response:
        return await serve(request, self._counted(self._subscribe), self.schema.ready, "subscribe")

    async def unsubscribe(self, request: Request) -> Response:
        return await serve(request, self._counted(self._unsubscribe), self.schema.ready, "unsubscribe")

    @staticmethod
    def _counted(handler):
        """Count each request in ``push_subscription_requests_total`` by action, provider and
        result; handlers put the provider and result on ``request.state``."""

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
                if request.state.action:
                    metrics.SUBSCRIPTION_REQUESTS.labels(
                        request.state.action, request.state.provider, request.state.result
                    ).inc()

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


def subscribe_limit_from_env() -> Limit | None:
    """``PUSH_SUBSCRIBE_RATE_LIMIT``: subscribe requests per user, e.g. ``60/minute``; ``off``
    disables it."""
    text = env("PUSH_SUBSCRIBE_RATE_LIMIT", DEFAULT_SUBSCRIBE_RATE_LIMIT)
    if text.lower() in ("off", "none", "0"):
        return None
    return Limit.parse(text, "PUSH_SUBSCRIBE_RATE_LIMIT")


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
