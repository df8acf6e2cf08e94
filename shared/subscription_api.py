"""The public subscription API behind the ``subscribe`` and ``unsubscribe`` functions.

Each function builds one :class:`SubscriptionApi` at start-up (configuration errors stop it there)
and hands it every request. Database work runs in worker threads, off the event loop.
"""
from __future__ import annotations

from datetime import datetime

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from shared import metrics
from shared.apps import load_apps
from shared.auth import Authenticator
from shared.config import env_int, env_list
from shared.db import DatabaseUnavailable, check_schema, get_engine
from shared.http import ApiError, read_json, require_method, serve
from shared.logs import configure_logging
from shared.models import Subscription
from shared.subscriptions import SubscriptionStore
from shared.validation import SubscribePolicy, parse_subscribe, parse_unsubscribe

MAX_BODY = 16 * 1024


class SubscriptionApi:
    def __init__(self, store: SubscriptionStore, auth: Authenticator, policy: SubscribePolicy):
        self.store = store
        self.auth = auth
        self.policy = policy
        self._schema_checked = False

    @classmethod
    def from_env(cls) -> SubscriptionApi:
        """Build from the environment; fails at start-up on bad configuration or on a database
        whose schema is behind (one that cannot be reached is checked again on each request)."""
        configure_logging()
        metrics.serve_metrics()
        store = SubscriptionStore(
            get_engine(), cap=env_int("PUSH_MAX_SUBSCRIPTIONS_PER_USER", 10, minimum=1)
        )
        metrics.SUBSCRIPTION_TOTALS.count = store.count_by_provider
        api = cls(
            store,
            Authenticator.from_env(),
            SubscribePolicy(allowed_apns_topics=env_list("PUSH_APNS_ALLOWED_TOPICS"), apps=load_apps()),
        )
        try:
            check_schema(store.engine)
            api._schema_checked = True
        except DatabaseUnavailable:
            pass
        return api

    async def ready(self) -> None:
        if not self._schema_checked:
            await run_in_threadpool(check_schema, self.store.engine)
            self._schema_checked = True

    async def subscribe(self, request: Request) -> Response:
        return await serve(request, self._counted(self._subscribe), self.ready, "subscribe")

    async def unsubscribe(self, request: Request) -> Response:
        return await serve(request, self._counted(self._unsubscribe), self.ready, "unsubscribe")

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
        return await run_in_threadpool(self.auth.user_id, request.headers.get("authorization"))

    async def _subscribe(self, request: Request) -> Response:
        require_method(request, ("GET", "POST"))
        request.state.action = "list" if request.method == "GET" else "subscribe"
        user_id = await self._caller(request)
        if request.method == "GET":
            rows = await run_in_threadpool(self.store.list_for_user, user_id)
            request.state.result = "listed"
            return JSONResponse({"subscriptions": [subscription_view(row) for row in rows]})
        new = parse_subscribe(await read_json(request, MAX_BODY), self.policy)
        request.state.provider = new.provider
        result = await run_in_threadpool(self.store.subscribe, user_id, new)
        request.state.result = "created" if result.created else "refreshed"
        return JSONResponse(
            subscription_view(result.subscription), status_code=201 if result.created else 200
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
