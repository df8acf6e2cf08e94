"""unsubscribe: POST or DELETE removes one of the caller's devices, or all of them on logout."""
import functions_framework.aio
from starlette.requests import Request
from starlette.responses import Response

from shared.subscription_api import SubscriptionApi

api = SubscriptionApi.from_env()


@functions_framework.aio.http
async def unsubscribe(request: Request) -> Response:
    return await api.unsubscribe(request)
