# syntax=docker/dockerfile:1
# One Dockerfile for every function's image; the function is a build argument:
#
#   docker build --build-arg FUNCTION=dispatch-apns -t push-functions/dispatch-apns .
#
# The image holds the `shared` package, only the dependencies that function needs
# (requirements/<function>.txt) and only that function's folder, and runs it as a non-root user
# as a functions-framework ASGI app on $PORT (default 8080). Every function answers
# /_/health and /_/ready (OpenFaaS) and /healthz and /readyz (Knative); metrics are on
# PUSH_METRICS_PORT (9095: Knative's queue-proxy holds 9091). See docs/deploy.md.

ARG PYTHON_IMAGE=python:3.11-slim

# --- build: a virtualenv with the function's pinned dependencies and the shared package --------
FROM ${PYTHON_IMAGE} AS build
ARG FUNCTION
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN test -n "${FUNCTION}" \
    || { echo "build with --build-arg FUNCTION=<a folder of functions/>" >&2; exit 1; }
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:${PATH}
COPY requirements/ /src/requirements/
RUN test -f "/src/requirements/${FUNCTION}.txt" \
    || { echo "no requirements/${FUNCTION}.txt: is ${FUNCTION} a folder of functions/?" >&2; exit 1; } \
    && pip install --requirement "/src/requirements/${FUNCTION}.txt"
COPY pyproject.toml /src/
COPY shared/ /src/shared/
# Its dependencies are the pinned ones above; --no-deps keeps pip from resolving anything else.
RUN pip install --no-deps /src

# --- runtime -----------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE}
ARG FUNCTION
ENV FUNCTION=${FUNCTION} \
    PATH=/opt/venv/bin:${PATH} \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PORT=8080
RUN groupadd --system --gid 10001 push \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /app \
       --shell /usr/sbin/nologin push
COPY --from=build /opt/venv /opt/venv
COPY functions/${FUNCTION}/ /app/functions/${FUNCTION}/
# pip compiled the virtualenv's modules as it installed them; the function's own folder is compiled
# here, since the image never writes bytecode (PYTHONDONTWRITEBYTECODE, and a read-only user):
# otherwise every cold start would compile main.py again.
RUN python -m compileall -q /app/functions
WORKDIR /app
# Numeric, so Kubernetes' runAsNonRoot can check it.
USER 10001:10001
EXPOSE 8080 9095
HEALTHCHECK --interval=30s --timeout=3s --start-period=10s \
    CMD python -c "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/_/health' % os.environ.get('PORT', '8080'), timeout=2)"
# gunicorn with uvicorn's worker, as `functions-framework --asgi` runs it (the same options: one
# worker unless WORKERS says, the app loaded in the master before the fork, no worker timeout,
# error-level logs), but through gunicorn's own command line, which also reads GUNICORN_CMD_ARGS:
# functions-framework's launcher ignores that variable, so its gunicorn always drains for the
# default 30 s. On SIGTERM gunicorn stops accepting requests and lets those in flight finish for
# --graceful-timeout seconds before killing its worker; the dispatchers' manifests set
# GUNICORN_CMD_ARGS="--graceful-timeout 75" to cover PUSH_DISPATCH_DEADLINE_SECONDS (60).
# For a fast cold start (shared/gunicorn_config.py): the master imports the function with Python's
# garbage collector off and freezes what it built before the fork; uvicorn's worker without
# WebSocket support (none is served; it would import wsproto in the worker); no control socket
# (gunicornc's runtime management, unused in a container: a thread and a socket per start).
# A request's head is bounded (bytes and time) and its body timed out by the worker's HTTP protocol
# (shared/http_protocol.py): gunicorn's --limit-request-* options bound only gunicorn's own parser,
# which uvicorn's worker does not use, so none is given.
# Shell form, so $PORT (set by Knative and OpenFaaS, default 8080) and the target (the folder name
# with underscores) are filled in at start; exec makes gunicorn PID 1, so it gets SIGTERM directly.
# bench/run.py runs this very line.
CMD exec gunicorn --config python:shared.gunicorn_config --worker-class shared.gunicorn_config.UvicornWorker --preload --no-control-socket --workers "${WORKERS:-1}" --timeout 0 --log-level "${GUNICORN_LOG_LEVEL:-error}" --bind "0.0.0.0:${PORT:-8080}" "functions_framework.aio:create_asgi_app(target='$(echo "${FUNCTION}" | tr - _)', source='/app/functions/${FUNCTION}/main.py')"
