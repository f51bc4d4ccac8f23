"""Leadflow's HTTP server: the collector and the API as one Starlette app under uvicorn.

``leadflow collect`` serves both on ``collector.port`` (one port for trackers and SDR
tools); ``leadflow api`` serves the API alone on ``api.port``. Chosen over aiohttp by a
measured comparison (benchmarks/README.md, "HTTP server").
"""

from __future__ import annotations

import logging
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import uvicorn
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from dataflows.metrics import metrics
from engine.settings import Settings
from leadflow.acked_producer import AckedProducer
from leadflow.api import api_routes
from leadflow.collector import collector_routes
from leadflow.endpoints import error_response

log = logging.getLogger(__name__)


async def _http_error(_request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    metrics().api_requests.labels("unknown", str(exc.status_code)).inc()
    error = "not_found" if exc.status_code == 404 else "http"
    return error_response(exc.status_code, error, str(exc.detail))


async def _scrape(_request: Request) -> Response:
    return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)


def create_app(settings: Settings, collector: bool = False) -> Starlette:
    """The API (and with ``collector`` the collector) as an ASGI app.

    Its producer starts and stops with the app; browsers may post from
    ``collector.cors_origins``.
    """
    producers: list[AckedProducer] = []

    def producer() -> AckedProducer:
        return producers[0]

    routes = [*api_routes(settings, producer), Route("/metrics", _scrape, methods=["GET"])]
    middleware = []
    if collector:
        routes += collector_routes(settings, producer)
        middleware.append(
            Middleware(
                CORSMiddleware,
                allow_origins=list(settings.collector.cors_origins),
                allow_methods=["GET", "POST"],
                allow_headers=["Authorization", "Content-Type", "Content-Encoding"],
                max_age=86_400,
            )
        )

    @asynccontextmanager
    async def lifespan(_app: Starlette) -> AsyncIterator[None]:
        producers.append(AckedProducer(settings))
        try:
            yield
        finally:
            producers.pop().close()

    return Starlette(
        routes=routes,
        middleware=middleware,
        lifespan=lifespan,
        exception_handlers={HTTPException: _http_error},
    )


def serve(settings: Settings, collector: bool = False) -> None:
    """Serve until SIGTERM or Ctrl-C: the collector and the API, or the API alone."""
    listen, port = (
        (settings.collector.listen, settings.collector.port)
        if collector
        else (settings.api.listen, settings.api.port)
    )
    if collector and not settings.collector.keys:
        log.warning("no [[collector.keys]] configured: every event will be refused (401)")
    if not settings.api.keys:
        log.warning("no [[api.keys]] configured: the API refuses every request (401)")
    what = "collector and API" if collector else "HTTP API"
    log.info("%s on http://%s:%d (/openapi.json)", what, listen, port)
    # uvicorn stops gracefully on SIGTERM/SIGINT, then raises the signal again for the
    # handler it found; a no-op one lets the command exit 0 like the other commands.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda _sig, _frame: None)
    uvicorn.run(
        create_app(settings, collector),
        host=listen,
        port=port,
        log_level="warning",
        access_log=False,
    )
