"""cleanup-invalid-tokens: deletes subscriptions the dispatchers found dead, and, on a schedule,
those not refreshed for months."""
import functions_framework.aio
from starlette.requests import Request
from starlette.responses import Response

from shared.cleanup import Cleanup

cleanup = Cleanup.from_env()


@functions_framework.aio.http
async def cleanup_invalid_tokens(request: Request) -> Response:
    return await cleanup.handle(request)
