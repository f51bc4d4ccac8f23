"""Leadflow's HTTP server: the collector and the API as one aiohttp application.

``leadflow collect`` serves both on ``collector.port`` (one port for trackers and SDR
tools); ``leadflow api`` serves the API alone on ``api.port``. aiohttp was chosen over
Starlette under uvicorn by a measured comparison on the collector's own work
(benchmarks/README.md, "The collector's HTTP server").
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

from aiohttp import web
from aiohttp.typedefs import Middleware
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

from dataflows.metrics import metrics
from engine.settings import Settings
from leadflow.acked_producer import AckedProducer
from leadflow.api import add_api_routes
from leadflow.collector import add_collector_routes
from leadflow.endpoints import Handler, error_response

log = logging.getLogger(__name__)

CORS_HEADERS = "Authorization, Content-Type, Content-Encoding"


def _json_errors() -> Middleware:
    """The server's own errors (no such route, wrong method) as JSON with a reason."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except web.HTTPException as e:
            if e.status < 400:
                raise
            metrics().api_requests.labels("unknown", str(e.status)).inc()
            error = "not_found" if e.status == 404 else "http"
            return error_response(e.status, error, f"{e.reason}: {request.method} {request.path}")

    return middleware


def _cors(origins: tuple[str, ...]) -> Middleware:
    """Let pages of ``origins`` ("*": any) post from a browser, preflight included."""

    def allowed(origin: str) -> str:
        return "*" if "*" in origins else origin if origin in origins else ""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        origin = allowed(request.headers.get("Origin", ""))
        if request.method == "OPTIONS" and "Access-Control-Request-Method" in request.headers:
            if not origin:
                return error_response(403, "forbidden", "this origin may not post here")
            return web.Response(
                status=204,
                headers={
                    "Access-Control-Allow-Origin": origin,
                    "Access-Control-Allow-Methods": "GET, POST",
                    "Access-Control-Allow-Headers": CORS_HEADERS,
                    "Access-Control-Max-Age": "86400",
                    "Vary": "Origin",
                },
            )
        response = await handler(request)
        if origin and request.headers.get("Origin"):
            response.headers["Access-Control-Allow-Origin"] = origin
            response.headers["Vary"] = "Origin"
        return response

    return middleware


async def _scrape(_request: web.Request) -> web.Response:
    return web.Response(
        body=generate_latest(REGISTRY), headers={"Content-Type": CONTENT_TYPE_LATEST}
    )


def create_app(settings: Settings, collector: bool = False) -> web.Application:
    """The API (and with ``collector`` the collector) as an aiohttp application.

    Its producer starts and stops with the app; browsers may post from
    ``collector.cors_origins``; request bodies are read as sent (the collector
    gunzips them itself, within its limits).
    """
    middlewares = [_json_errors()]
    if collector:
        middlewares.append(_cors(settings.collector.cors_origins))
    app = web.Application(
        middlewares=middlewares,
        client_max_size=max(settings.collector.max_batch_bytes, settings.limits.max_event_bytes)
        + 1024,
        handler_args={"auto_decompress": False},
    )
    producers: list[AckedProducer] = []

    def producer() -> AckedProducer:
        return producers[0]

    async def producer_context(_app: web.Application) -> AsyncIterator[None]:
        producers.append(AckedProducer(settings))
        yield
        producers.pop().close()

    app.cleanup_ctx.append(producer_context)
    add_api_routes(app, settings, producer)
    app.router.add_get("/metrics", _scrape)
    if collector:
        add_collector_routes(app, settings, producer)
    return app


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
    # run_app stops gracefully on SIGTERM and Ctrl-C and returns.
    web.run_app(
        create_app(settings, collector),
        host=listen,
        port=port,
        print=None,
        access_log=None,
        shutdown_timeout=10,
    )
