"""dispatch-fcm: wakes the devices of notified users through Firebase Cloud Messaging (Android).

Takes org.wikimedia.push.notification.requested.v1 CloudEvents from the broker and Echo's
POST /v1/message/fcm requests."""
import functions_framework.aio
from starlette.requests import Request
from starlette.responses import Response

from shared.dispatch import Dispatcher
from shared.providers.fcm import FcmProvider
from shared.providers.router import providers_from_env

dispatcher = Dispatcher.from_env(providers_from_env(FcmProvider))


@functions_framework.aio.http
async def dispatch_fcm(request: Request) -> Response:
    return await dispatcher.handle(request)
