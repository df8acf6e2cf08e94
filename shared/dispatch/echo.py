"""The Echo-compatible path: today's Echo request, ``POST /v1/message/{fcm,apns}``, so an Echo
install can point its push service URL here. It names tokens, not users; it is answered at once
with counts (no ledger, no privacy delay), and its dead tokens go to ``K_SINK`` when one is bound."""
from __future__ import annotations

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from shared import metrics
from shared.core import Device, WakeUp
from shared.dispatch.dead_tokens import DeadTokens
from shared.dispatch.report import DispatchReport
from shared.dispatch.sending import Sender
from shared.events import parse_echo_request
from shared.http import read_json
from shared.providers.base import EchoTokens
from shared.settings import DispatchSettings, NotificationSettings
from shared.subscriptions import SubscriptionStore, token_sha256


class EchoPath:
    """Serves Echo's request for one provider, whose :class:`EchoTokens` say how to read it."""

    def __init__(
        self, provider: str, tokens: EchoTokens, notification: NotificationSettings, store: SubscriptionStore,
        settings: DispatchSettings, sender: Sender, dead_tokens: DeadTokens,
    ) -> None:
        self.provider = provider
        self.path = f"/v1/message/{provider}"
        self.tokens = tokens
        self.notification = notification
        self.store = store
        self.settings = settings
        self.sender = sender
        self.dead_tokens = dead_tokens

    async def handle(self, request: Request) -> Response:
        echo = parse_echo_request(await read_json(request), self.notification)
        metrics.NOTIFICATIONS_REQUESTED.labels(self.provider, "echo").inc()
        tokens = [token.lower() for token in echo.tokens] if self.tokens.lower_case else list(echo.tokens)
        known = await run_in_threadpool(
            self.store.by_token_hashes, [token_sha256(t) for t in tokens], self.provider
        )
        subscriptions = []
        for token in tokens:
            digest = token_sha256(token)
            row = known.get(digest)
            environment = row.environment if row else self.settings.echo_apns_environment
            subscriptions.append(
                Device(
                    id=row.id if row else 0, token=token, token_sha256=digest,
                    # Echo leaves the topic out for devices it stored without one: a known
                    # device has its own; an unknown one without a topic is refused (MissingTopic).
                    topic=echo.topic or (row.topic if row else None),
                    environment=environment if self.tokens.environment else None,
                    app=row.app if row else None,
                )
            )
        report = DispatchReport()
        await self.sender.send_all(
            subscriptions, WakeUp(echo.message_type, self.notification.default_ttl_seconds, echo.dry_run), report
        )
        if report.transient:
            return await self.dead_tokens.answer(report)
        if report.dead:
            await self.dead_tokens.report(report.dead)
        return JSONResponse(
            {"delivered": report.delivered, "invalid": report.dead_count, "rejected": report.rejected}
        )
