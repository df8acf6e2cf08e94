"""dispatch-apns: wakes the devices of notified users through the Apple Push Notification service (iOS).

Takes org.wikimedia.push.notification.requested.v1 CloudEvents from the broker and Echo's
POST /v1/message/apns requests."""
import functions_framework.aio
from starlette.requests import Request
from starlette.responses import Response

from shared.apps import providers_from_env
from shared.dispatch import Dispatcher
from shared.providers.apns import ApnsProvider

dispatcher = Dispatcher.from_env(providers_from_env(ApnsProvider))


@functions_framework.aio.http
async def dispatch_apns(request: Request) -> Response:
    return await dispatcher.handle(request)
