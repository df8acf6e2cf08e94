"""The dispatcher's HTTP side: admission (load shedding past ``max_in_flight``), then the request
read and routed (an event, a tick, or Echo's request), answered, and logged in one line."""
from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from starlette.requests import Request
from starlette.responses import Response

from shared import logs, metrics
from shared.dispatch.report import DispatchReport
from shared.events import (
    NOTIFICATION_REQUESTED,
    PING,
    NotificationRequest,
    data_object,
    event_key,
    parse_notification,
    read_cloud_event,
)
from shared.http import ApiError, require_method, serve

if TYPE_CHECKING:
    from shared.dispatch.dispatcher import Dispatcher

log = logging.getLogger(__package__)

OVERLOAD_RETRY_AFTER = 5


class Admission:
    """Admits and routes the requests of one :class:`~shared.dispatch.dispatcher.Dispatcher`."""

    def __init__(self, dispatcher: Dispatcher) -> None:
        self.dispatcher = dispatcher
        self.provider = dispatcher.provider.name
        self._in_flight = 0

    async def handle(self, request: Request) -> Response:
        dispatcher = self.dispatcher
        return await serve(request, self._handle, dispatcher.schema.ready, dispatcher.function, internal=True)

    async def _handle(self, request: Request) -> Response:
        require_method(request, ("POST",))
        if self._in_flight >= self.dispatcher.settings.max_in_flight:
            raise ApiError(
                503, "overloaded", "too many requests in progress; try again later",
                headers={"Retry-After": str(OVERLOAD_RETRY_AFTER)},
            )
        self._in_flight += 1
        try:
            return await self._handle_admitted(request)
        except ApiError as error:
            event_id = logs.event_id.get()
            log.info(
                "%s refused: %d %s: %s%s", f"event {event_id}" if event_id else "request",
                error.status, error.code, error.message, f" [{error.field}]" if error.field else "",
                extra={"status": error.status},
            )
            raise
        finally:
            self._in_flight -= 1

    async def _handle_admitted(self, request: Request) -> Response:
        dispatcher = self.dispatcher
        if dispatcher.echo is not None and request.url.path == dispatcher.echo.path:
            return await dispatcher.echo.handle(request)
        started = time.perf_counter()
        event = await read_cloud_event(request)
        logs.event_id.set(str(event["id"])[:128])
        if event["type"] == PING:
            report = await dispatcher.flush()
            report.transient = 0  # what failed stays pending for the next tick
            return self._logged(await dispatcher.dead_tokens.answer(report), report, started)
        if event["type"] != NOTIFICATION_REQUESTED:
            raise ApiError(
                400, "unsupported_event_type", f"this function takes {NOTIFICATION_REQUESTED} and {PING}"
            )
        notification = parse_notification(data_object(event), dispatcher.notification)
        metrics.NOTIFICATIONS_REQUESTED.labels(self.provider, "cloudevent").inc()
        report = await dispatcher.dispatch(notification, event_key(event))
        if dispatcher.gate.release_wanted:  # a hold ended: send what it kept, in what time is left
            left = dispatcher.settings.deadline_seconds - (time.perf_counter() - started)
            flushed = await dispatcher.flush(left)
            log.info("event %s: a hold ended; then %s", logs.event_id.get(),
                     flushed.summary(self.provider, None), extra=flushed.fields())
            report.dead += flushed.dead  # reported with the event's own
        return self._logged(await dispatcher.dead_tokens.answer(report), report, started, notification)

    def _logged(
        self, response: Response, report: DispatchReport, started: float,
        notification: NotificationRequest | None = None,
    ) -> Response:
        """``response``, once the event's one info line is logged (its counts also as fields)."""
        elapsed = round((time.perf_counter() - started) * 1000)
        log.info(
            "event %s: %s; answered %d in %d ms", logs.event_id.get(),
            report.summary(self.provider, notification), response.status_code, elapsed,
            extra={**report.fields(), "status": response.status_code, "elapsed_ms": elapsed},
        )
        return response
