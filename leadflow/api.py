"""The HTTP API: SDR tools talk back and look leads up over HTTP.

Served by ``leadflow api`` on its own, and by ``leadflow collect`` beside the
collector (leadflow.web). Every route but ``/openapi.json`` and ``/metrics`` needs
an API key, sent as ``Authorization: Bearer <key>``. Keys are configured as digests only
(``[[api.keys]]`` in ``engine.toml``: name, ``sha256:<hex>`` digest, scopes), so the
configuration holds nothing an attacker could replay; ``leadflow api key`` makes a
key and prints its table. Scopes:

* ``feedback``: ``POST /v1/feedback``, a trusted feedback event (``lead_accepted``,
  ``lead_rejected``, ``sql``... the reserved names of README "Interfaces"). It is
  validated by the engine's own decoder, its actor set from the key (``<key name>``,
  or ``<key name>/<actor given>`` when the body names one: the tool that vouches for
  it comes first), and answered ``202`` only once the broker has acknowledged it
  (``acks=all``, idempotent producer); ``503`` with ``Retry-After`` when the broker
  does not take it in time.
* ``read``: ``GET /v1/leads/{identifier}`` (what ``leadflow inspect`` shows) and
  ``GET /v1/queues/{queue}`` (roster, availability, load);
* ``read_pii``: with ``read``, a lead's identifiers in clear (without it, only
  their kinds and digests).

Errors are JSON ``{"error": <code>, "reason": <text>}``. Requests are counted in
``leadflow_api_requests_total{route,status}``, served at ``/metrics``.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable
from typing import Any

import orjson
from aiohttp import web

from engine.events import RESERVED_EVENTS
from engine.settings import ApiKey, Settings
from leadflow.acked_producer import AckedProducer, BrokerUnavailable
from leadflow.endpoints import (
    RETRY_AFTER_S,
    ApiError,
    counted,
    event_record,
    json_response,
    key_digest,
)
from leadflow.inspect import inspect_person
from leadflow.roster import show_roster


def key_table(name: str, key: str, scopes: list[str]) -> str:
    """The ``[[api.keys]]`` table to paste into engine.toml for ``key``."""
    listed = ", ".join(f'"{s}"' for s in scopes)
    return f'[[api.keys]]\nname = "{name}"\ndigest = "{key_digest(key)}"\nscopes = [{listed}]\n'


class LeadflowApi:
    """The routes, bound to the settings and a producer."""

    def __init__(self, settings: Settings, producer: Callable[[], AckedProducer]):
        self.settings = settings
        self.keys: dict[str, ApiKey] = {k.digest: k for k in settings.api.keys}
        self.producer = producer

    def authorise(self, request: web.Request, scope: str) -> ApiKey:
        """The key of ``request``, which must hold ``scope``; else ApiError 401/403."""
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise ApiError(401, "unauthorized", "send the API key as 'Authorization: Bearer <key>'")
        key = self.keys.get(key_digest(token.strip()))
        if key is None:
            raise ApiError(401, "unauthorized", "unknown API key")
        if scope not in key.scopes:
            raise ApiError(403, "forbidden", f"key {key.name!r} lacks the {scope!r} scope")
        return key

    async def feedback(self, request: web.Request) -> web.Response:
        """POST /v1/feedback: a trusted feedback event, acknowledged once the broker has it."""
        key = self.authorise(request, "feedback")
        limits = self.settings.limits
        body = await request.read()
        if len(body) > limits.max_event_bytes:
            raise ApiError(413, "oversized", f"larger than {limits.max_event_bytes} bytes")
        try:
            event = orjson.loads(body)
        except orjson.JSONDecodeError as e:
            raise ApiError(400, "invalid_json", f"the body is not JSON: {e}") from None
        if not isinstance(event, dict):
            raise ApiError(400, "not_an_object", "the body must be a JSON object")
        if event.get("type") != "track" or event.get("event") not in RESERVED_EVENTS:
            raise ApiError(
                400,
                "not_feedback",
                "expected a track event named one of " + ", ".join(sorted(RESERVED_EVENTS)),
            )
        properties = event.get("properties")
        if properties is None:
            properties = event["properties"] = {}
        if not isinstance(properties, dict):
            raise ApiError(400, "bad_field", "properties must be an object")
        given = properties.get("actor")
        properties["actor"] = f"{key.name}/{given}" if given else key.name
        event.setdefault("messageId", f"api-{uuid.uuid4()}")
        topic = self.settings.topics.feedback
        record = event_record(event, topic, trusted=True, limits=limits)
        try:
            await self.producer().send([record])
        except BrokerUnavailable as e:
            raise ApiError(503, "unavailable", str(e), RETRY_AFTER_S) from None
        return json_response(
            {"accepted": True, "messageId": event["messageId"], "actor": properties["actor"]}, 202
        )

    async def lead(self, request: web.Request) -> web.Response:
        """GET /v1/leads/{identifier}: what ``leadflow inspect`` shows, PII with read_pii."""
        key = self.authorise(request, "read")
        identifier = request.match_info["identifier"]
        found = await asyncio.to_thread(
            inspect_person, self.settings, identifier, int(time.time() * 1000)
        )
        if found is None:
            raise ApiError(404, "not_found", "no person holds this identifier")
        if "read_pii" not in key.scopes:
            found = _without_pii(found)
        return json_response(found)

    async def queue(self, request: web.Request) -> web.Response:
        """GET /v1/queues/{queue}: the queue's SDRs, their availability and load."""
        self.authorise(request, "read")
        name = request.match_info["queue"]
        if name not in {q.name for q in self.settings.routing.queues}:
            raise ApiError(404, "not_found", f"no queue {name!r}")
        roster = await asyncio.to_thread(show_roster, self.settings)
        return json_response(
            {"queue": name, "source": roster["source"], "sdrs": roster["queues"][name]}
        )

    async def openapi(self, _request: web.Request) -> web.Response:
        """GET /openapi.json: this API, described."""
        return json_response(OPENAPI)


def _without_pii(person: dict[str, Any]) -> dict[str, Any]:
    """``person`` with identifiers reduced to their kind and digest."""
    out = dict(person)
    if "identifier" in out:
        out["identifier"] = str(out["identifier"]).split(":", 1)[0] + ":***"
    if "identifiers" in out:
        out["identifiers"] = [
            {k: v for k, v in i.items() if k != "value"} for i in out["identifiers"]
        ]
    return out


def add_api_routes(
    app: web.Application, settings: Settings, producer: Callable[[], AckedProducer]
) -> None:
    """Add the API's routes to ``app`` (errors as JSON, counted)."""
    api = LeadflowApi(settings, producer)
    app.router.add_post("/v1/feedback", counted("/v1/feedback", api.feedback))
    app.router.add_get("/v1/leads/{identifier}", counted("/v1/leads/{identifier}", api.lead))
    app.router.add_get("/v1/queues/{queue}", counted("/v1/queues/{queue}", api.queue))
    app.router.add_get("/openapi.json", counted("/openapi.json", api.openapi))


_ERROR = {
    "description": "An error, with a reason",
    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
}


def _errors(*statuses: int) -> dict[str, Any]:
    return {str(s): _ERROR for s in statuses}


def _json(description: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


OPENAPI: dict[str, Any] = {
    "openapi": "3.1.0",
    "info": {
        "title": "Leadflow API",
        "version": "1",
        "description": "Sales feedback and look-ups for SDR tools. README, 'HTTP API'.",
    },
    "components": {
        "securitySchemes": {"apiKey": {"type": "http", "scheme": "bearer"}},
        "schemas": {
            "Error": {
                "type": "object",
                "required": ["error", "reason"],
                "properties": {"error": {"type": "string"}, "reason": {"type": "string"}},
            },
            "Feedback": {
                "type": "object",
                "description": "A Segment track event with a reserved name; one identifier needed.",
                "required": ["type", "event"],
                "properties": {
                    "type": {"const": "track"},
                    "event": {"enum": sorted(RESERVED_EVENTS)},
                    "messageId": {"type": "string", "maxLength": 256},
                    "userId": {"type": "string"},
                    "anonymousId": {"type": "string"},
                    "timestamp": {"type": "string", "format": "date-time"},
                    "traits": {"type": "object"},
                    "properties": {
                        "type": "object",
                        "properties": {
                            "actor": {
                                "type": "string",
                                "description": "appended to the key's name",
                            },
                            "reason": {"type": "string", "description": "lead_rejected's reason"},
                        },
                    },
                },
            },
            "Accepted": {
                "type": "object",
                "required": ["accepted", "messageId", "actor"],
                "properties": {
                    "accepted": {"const": True},
                    "messageId": {"type": "string"},
                    "actor": {"type": "string"},
                },
            },
        },
    },
    "security": [{"apiKey": []}],
    "paths": {
        "/v1/feedback": {
            "post": {
                "summary": "Send sales feedback (scope feedback); 202 once the broker has it",
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {"schema": {"$ref": "#/components/schemas/Feedback"}}
                    },
                },
                "responses": {
                    "202": _json("Taken by the broker", {"$ref": "#/components/schemas/Accepted"}),
                    **_errors(400, 401, 403, 413, 503),
                },
            }
        },
        "/v1/leads/{identifier}": {
            "get": {
                "summary": "A lead, as `leadflow inspect` shows it (read; read_pii: PII)",
                "parameters": [
                    {
                        "name": "identifier",
                        "in": "path",
                        "required": True,
                        "description": "kind:value, or an e-mail, a +phone, a user id",
                        "schema": {"type": "string"},
                    }
                ],
                "responses": {
                    "200": _json("The lead", {"type": "object"}),
                    **_errors(401, 403, 404),
                },
            }
        },
        "/v1/queues/{queue}": {
            "get": {
                "summary": "A queue's SDRs, availability and load (scope read)",
                "parameters": [
                    {"name": "queue", "in": "path", "required": True, "schema": {"type": "string"}}
                ],
                "responses": {
                    "200": _json(
                        "The queue",
                        {
                            "type": "object",
                            "required": ["queue", "source", "sdrs"],
                            "properties": {
                                "queue": {"type": "string"},
                                "source": {"type": "string"},
                                "sdrs": {"type": "array", "items": {"type": "object"}},
                            },
                        },
                    ),
                    **_errors(401, 403, 404),
                },
            }
        },
        "/openapi.json": {
            "get": {
                "summary": "This document",
                "security": [],
                "responses": {"200": _json("OpenAPI 3.1", {"type": "object"})},
            }
        },
    },
}
