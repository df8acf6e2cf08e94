"""An event's answer to the broker, and where its dead tokens go: a ``subscription.invalid.v1``
reply event, or (with ``K_SINK`` bound) a post of that event to the sink.

The answer follows from the report: 429/503 with Retry-After while some send must be retried,
503 when the sink did not take the dead-token report, 200 with the report as the reply when no
sink is bound, else 202.
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from starlette.responses import Response

from shared.dispatch.report import DispatchReport
from shared.events import InvalidToken, binary_http, invalid_tokens_event
from shared.http import ApiError, internal_headers

if TYPE_CHECKING:
    import httpx

log = logging.getLogger(__package__)

#: Seconds the broker waits before redelivering when no provider named a Retry-After.
DEFAULT_RETRY_AFTER = 30


class DeadTokens:
    """Answers for one dispatcher (``source`` names it in the reply event) of one provider."""

    def __init__(self, provider: str, source: str, sink_url: str | None) -> None:
        self.provider = provider
        self.source = source
        self.sink_url = sink_url
        self._sink_client: httpx.AsyncClient | None = None

    async def answer(self, report: DispatchReport) -> Response:
        reported = await self.report(report.dead) if report.dead else None
        if report.transient:
            retry_after = max(int(report.retry_after or DEFAULT_RETRY_AFTER), 1)
            return ApiError(
                429 if report.only_rate_limited else 503,
                "retry",
                f"{report.transient} sends must be retried",
                headers={"Retry-After": str(retry_after)},
            ).response()
        if reported is False:
            return ApiError(
                503,
                "sink_unavailable",
                "could not report dead tokens",
                headers={"Retry-After": str(DEFAULT_RETRY_AFTER)},
            ).response()
        if report.dead and self.sink_url is None:
            headers, body = binary_http(invalid_tokens_event(self.source, self.provider, report.dead))
            return Response(body, status_code=200, headers=headers)
        return Response(status_code=202)

    async def report(self, dead: list[InvalidToken]) -> bool | None:
        """Post the dead-token report to ``K_SINK``; ``None`` when no sink is bound (the report
        then goes back as the reply), ``False`` when the sink did not take it."""
        if self.sink_url is None:
            return None
        # Imported here: only a dispatcher bound to a K_SINK needs httpx, and its import is a
        # twentieth of a cold start.
        import httpx

        if self._sink_client is None:
            self._sink_client = httpx.AsyncClient(timeout=5.0)
        headers, body = binary_http(invalid_tokens_event(self.source, self.provider, dead))
        try:
            response = await self._sink_client.post(
                self.sink_url, headers=headers | internal_headers(), content=body
            )
        except httpx.HTTPError as exc:
            log.warning("could not post dead-token report to K_SINK: %s", type(exc).__name__)
            return False
        if response.status_code >= 300:
            log.warning("K_SINK refused the dead-token report: HTTP %d", response.status_code)
            return False
        return True

    async def aclose(self) -> None:
        if self._sink_client is not None:
            await self._sink_client.aclose()
