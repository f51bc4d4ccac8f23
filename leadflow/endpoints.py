"""What every HTTP endpoint of Leadflow shares: keys as digests, JSON errors, request metrics."""

from __future__ import annotations

import hashlib
import logging
import secrets
from collections.abc import Awaitable, Callable

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from dataflows.metrics import metrics

log = logging.getLogger(__name__)

RETRY_AFTER_S = 5  # what a 503 tells a client to wait

Endpoint = Callable[[Request], Awaitable[Response]]


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
        self.status, self.error, self.reason, self.retry_after_s = (
            status,
            error,
            reason,
            retry_after_s,
        )


def error_response(status: int, error: str, reason: str, retry_after_s: int = 0) -> Response:
    """The JSON answer of an error (with ``Retry-After`` when the client should try again)."""
    headers = {"Retry-After": str(retry_after_s)} if retry_after_s else None
    return JSONResponse({"error": error, "reason": reason}, status, headers=headers)


def counted(route: str, endpoint: Endpoint) -> Endpoint:
    """``endpoint`` answering ApiError as JSON, counted by route and status."""

    async def handle(request: Request) -> Response:
        try:
            response = await endpoint(request)
        except ApiError as e:
            response = error_response(e.status, e.error, e.reason, e.retry_after_s)
        except Exception:
            log.exception("%s failed", route)
            response = error_response(500, "internal", "an internal error; see the server's log")
        metrics().api_requests.labels(route, str(response.status_code)).inc()
        return response

    return handle
