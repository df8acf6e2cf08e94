"""dispatch-webpush: wakes the devices of notified users through Web Push (browsers).

Takes org.wikimedia.push.notification.requested.v1 CloudEvents from the broker."""
import functions_framework.aio
from starlette.requests import Request
from starlette.responses import Response

from shared.dispatch import Dispatcher
from shared.endpoints import EndpointRules
from shared.providers.webpush import WebPushProvider
from shared.providers.router import providers_from_env

# Where endpoints may lead (push services only) is the deployment's, the same for every app.
dispatcher = Dispatcher.from_env(providers_from_env(WebPushProvider, endpoint_rules=EndpointRules.from_env()))


@functions_framework.aio.http
async def dispatch_webpush(request: Request) -> Response:
    return await dispatcher.handle(request)
