"""An experiment, not what deploys: the function served by one uvicorn process, with no gunicorn
master, for comparing memory and cold start with the image's command (issue 17):

    python bench/run.py --only coldstart --command 'exec python bench/single_process.py'

The same app (functions-framework's ASGI app of ``$FUNCTION``), HTTP protocol (the bounded one of
shared/http_protocol.py), loop (uvloop), garbage-collector handling (off while importing, then
frozen) and drain (on SIGTERM uvicorn stops accepting and lets requests in flight finish, here
for 75 s, the dispatchers' --graceful-timeout) as the image's gunicorn worker; what it drops is
the master process and its fork. Run from the checkout's root (bench/run.py does).
"""
from __future__ import annotations

import gc
import os
import sys

gc.disable()
sys.path.insert(0, os.getcwd())

import uvicorn  # noqa: E402
from functions_framework.aio import create_asgi_app  # noqa: E402

from shared.http_protocol import BoundedHttpToolsProtocol  # noqa: E402

FUNCTION = os.environ["FUNCTION"]
app = create_asgi_app(target=FUNCTION.replace("-", "_"), source=f"{os.getcwd()}/functions/{FUNCTION}/main.py")
gc.freeze()
gc.enable()
uvicorn.run(app, host="0.0.0.0", port=int(os.environ.get("PORT", "8080")), http=BoundedHttpToolsProtocol,
            ws="none", loop="uvloop", log_level="error", timeout_graceful_shutdown=75)
