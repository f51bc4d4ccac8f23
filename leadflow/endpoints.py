"""What every HTTP endpoint of Leadflow shares: keys as digests, JSON errors, request metrics."""

from __future__ import annotations

import hashlib
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from aiohttp import web

from dataflows.metrics import metrics
from engine.events import event_problem
from engine.settings import LimitSettings

log = logging.getLogger(__name__)

RETRY_AFTER_S = 5  # what a 503 tells a client to wait

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def key_digest(key: str) -> str:
    """The configured form of a key: ``sha256:<hex>`` (keys are random: no salt needed)."""
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()


def new_key() -> str:
    """A fresh API or write key: 256 random bits."""
    return "lf_" + secrets.token_urlsafe(32)


class ApiError(Exception):
    """A request answered with an error status and ``{"error": <code>, "reason": <text>}``."""

    def __init__(self, status: int, error: str, reason: str, retry_after_s: int = 0):
        super().__init__(reason)
        self.status, self.error, self.reason = status, error, reason
        self.retry_after_s = retry_after_s


def json_response(
    data: Any, status: int = 200, headers: dict[str, str] | None = None
) -> web.Response:
    """``data`` as JSON (orjson)."""
    return web.Response(
        body=orjson.dumps(data), status=status, headers=headers, content_type="application/json"
    )


Record = tuple[str, bytes | None, bytes]  # (topic, key, value) for the broker


def event_record(event: Any, topic: str, *, trusted: bool, limits: LimitSettings) -> Record:
    """The broker record of one event, checked as the engine will check it.

    Raises ApiError 400 (the DLQ's reason code and detail: what the engine would
    refuse) or 413 (larger than ``limits.max_event_bytes`` once serialised).
    """
    problem = event_problem(
        event,
        ingested_ms=int(time.time() * 1000),
        trusted=trusted,
        max_future_skew_ms=limits.max_future_skew_s * 1000,
    )
    if problem is not None:
        raise ApiError(400, *problem)
    value = orjson.dumps(event)
    if len(value) > limits.max_event_bytes:
        raise ApiError(413, "oversized", f"{len(value)} bytes > limit {limits.max_event_bytes}")
    person = event.get("anonymousId") or event.get("userId") or event.get("previousId")
    return topic, str(person).encode() if person else None, value


def error_response(status: int, error: str, reason: str, retry_after_s: int = 0) -> web.Response:
    """The JSON answer of an error (with ``Retry-After`` when the client should try again)."""
    headers = {"Retry-After": str(retry_after_s)} if retry_after_s else None
    return json_response({"error": error, "reason": reason}, status, headers)


def counted(route: str, handler: Handler) -> Handler:
    """``handler`` answering ApiError as JSON, counted by route and status."""

    async def handle(request: web.Request) -> web.StreamResponse:
        try:
            response = await handler(request)
        except ApiError as e:
            response = error_response(e.status, e.error, e.reason, e.retry_after_s)
        except web.HTTPException as e:  # aiohttp's own: a body over the server's limit
            error = "oversized" if e.status == 413 else "http"
            response = error_response(e.status, error, f"{e.reason} ({e.text})")
        except Exception:
            log.exception("%s failed", route)
            response = error_response(500, "internal", "an internal error; see the server's log")
        metrics().api_requests.labels(route, str(response.status)).inc()
        return response

    return handle
