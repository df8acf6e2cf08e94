"""dispatch-apns: wakes the devices of notified users through the Apple Push Notification service (iOS).

Takes org.wikimedia.push.notification.requested.v1 CloudEvents from the broker and Echo's
POST /v1/message/apns requests."""
import functions_framework.aio
from starlette.requests import Request
from starlette.responses import Response

from shared.apns_tokens import ApnsTokenStore
from shared.dispatch import Dispatcher
from shared.providers.apns import ApnsProvider
from shared.providers.router import providers_from_env

# One provider token per team and key for all replicas (Apple limits how often it may change).
dispatcher = Dispatcher.from_env(providers_from_env(ApnsProvider, token_store=ApnsTokenStore.from_env()))


@functions_framework.aio.http
async def dispatch_apns(request: Request) -> Response:
    return await dispatcher.handle(request)
