"""subscribe: POST registers the caller's device for wake-ups, GET lists the caller's devices."""
import functions_framework.aio
from starlette.requests import Request
from starlette.responses import Response

from shared.subscription_api import SubscriptionApi

api = SubscriptionApi.from_env()


@functions_framework.aio.http
async def subscribe(request: Request) -> Response:
    return await api.subscribe(request)
