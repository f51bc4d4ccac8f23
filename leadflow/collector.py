"""``leadflow collect``: Segment's HTTP Tracking API in front of the events topics.

The trackers sites already run (analytics.js / ``@segment/analytics-next``, Segment's
and RudderStack's server SDKs, Segment's webhook destination) speak Segment's HTTP
Tracking API; point them here and each event reaches ``leadflow.events`` (or, for a
trusted server-side key, ``leadflow.feedback``). README "Sending events" is the user's
side of this; the routes:

* ``POST /v1/{track,page,identify,alias,group,screen}``: one event (its ``type`` from
  the path); ``/v1/t``, ``/p``, ``/i``, ``/a``, ``/g``, ``/s``: the same, as analytics.js
  posts them;
* ``POST /v1/batch`` (``/v1/import``, ``/v1/b``): ``{"batch": [...], "sentAt": ...}``;
* ``GET /v1/projects/{writeKey}/settings``: what analytics.js loads first (its
  ``cdnURL``), telling it to post here.

What Segment does, this does: a write key by HTTP Basic auth (the key as user name) or
``writeKey`` in the body (stripped before the event is produced); ``messageId``
generated when missing; ``receivedAt`` stamped; the client's clock corrected from
``sentAt`` (``timestamp += receivedAt - sentAt``, the original kept as
``originalTimestamp``); ``context.ip`` from the request (``collector.record_ip``);
gzip bodies; 32 KB an event (``limits.max_event_bytes``), 500 KB a batch
(``collector.max_batch_bytes``). Each event is checked by the engine's own decoder
before it is produced, so a client hears at once what the engine would refuse: a
bad event in a batch is answered with its index and reason and the others go on.
The answer is 200 only once the broker has acknowledged every event (``acks=all``,
idempotent producer); 503 with ``Retry-After`` when it does not (never a silent
drop); 429 with ``Retry-After`` beyond the key's ``rate_per_s``.
"""

from __future__ import annotations

import base64
import binascii
import math
import time
import uuid
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import web

from engine.person import epoch_ms, iso
from engine.settings import Settings, WriteKey
from leadflow.acked_producer import AckedProducer, BrokerUnavailable
from leadflow.endpoints import (
    ApiError,
    Handler,
    Record,
    counted,
    event_record,
    json_response,
    key_digest,
)

# Path -> event type, for single events (Segment's long names and analytics.js' letters).
SINGLE = {
    "track": "track",
    "page": "page",
    "identify": "identify",
    "alias": "alias",
    "group": "group",
    "screen": "screen",
    "t": "track",
    "p": "page",
    "i": "identify",
    "a": "alias",
    "g": "group",
    "s": "screen",
}
BATCH = ("batch", "import", "b")


@dataclass
class TokenBucket:
    """A write key's allowance: ``rate`` events a second, at most one second's worth saved.

    A request is admitted while the bucket is not empty, and may take it into debt
    (a batch larger than a second's allowance is admitted, then the key waits it off):
    so any batch size gets through, and the rate holds over time.
    """

    rate: float
    tokens: float
    at: float

    def take(self, n: int, now: float) -> float:
        """Take ``n`` tokens; 0 if granted, else the seconds until a request would be."""
        self.tokens = min(self.rate, self.tokens + (now - self.at) * self.rate)
        self.at = now
        if self.tokens > 0:
            self.tokens -= n
            return 0.0
        return (1 - self.tokens) / self.rate


def write_key_table(name: str, key: str, topic: str = "events", rate_per_s: float = 1000.0) -> str:
    """The ``[[collector.keys]]`` table to paste into engine.toml for ``key``."""
    trusted = "trusted = true\n" if topic == "feedback" else ""
    return (
        f'[[collector.keys]]\nname = "{name}"\ndigest = "{key_digest(key)}"\n'
        f'topic = "{topic}"\n{trusted}rate_per_s = {rate_per_s:g}\n'
    )


def normalise(event: dict[str, Any], received_ms: float, sent_at: Any, ip: str) -> None:
    """Segment's server-side enrichment of one event (mutated in place).

    ``messageId`` when missing; ``receivedAt``; the clock skew between the client's
    ``sentAt`` and our ``receivedAt`` taken off ``timestamp`` (the client's value kept
    as ``originalTimestamp``); ``context.ip`` when missing and ``ip`` given.
    """
    event.pop("writeKey", None)
    if not event.get("messageId"):
        event["messageId"] = f"lf-{uuid.uuid4()}"
    event["receivedAt"] = iso(int(received_ms))
    sent_ms = epoch_ms(event.pop("sentAt", None) or sent_at)
    original = event.get("timestamp") or event.get("originalTimestamp")
    original_ms = epoch_ms(original)
    if original_ms is not None:
        event["originalTimestamp"] = original
        skew = received_ms - sent_ms if sent_ms is not None else 0.0
        event["timestamp"] = iso(int(original_ms + skew))
    if ip:
        context = event.get("context")
        if context is None:
            context = event["context"] = {}
        if isinstance(context, dict) and not context.get("ip"):
            context["ip"] = ip


class Collector:
    """The collector's request handling, bound to the settings and a producer."""

    def __init__(self, settings: Settings, producer: Callable[[], AckedProducer]):
        self.settings = settings
        self.producer = producer
        self.keys: dict[str, WriteKey] = {k.digest: k for k in settings.collector.keys}
        self.buckets: dict[str, TokenBucket] = {}

    def key_of(self, request: web.Request, body_key: Any) -> WriteKey:
        """The write key of a request: Basic auth's user name, else ``writeKey`` in the body."""
        header = request.headers.get("authorization", "")
        scheme, _, credentials = header.partition(" ")
        presented = ""
        if scheme.lower() == "basic":
            try:
                presented = base64.b64decode(credentials.strip()).decode().partition(":")[0]
            except (binascii.Error, UnicodeDecodeError):
                raise ApiError(401, "unauthorized", "malformed Basic credentials") from None
        if not presented and isinstance(body_key, str):
            presented = body_key
        if not presented:
            raise ApiError(
                401, "unauthorized", "no write key: send it as Basic auth's user name or writeKey"
            )
        key = self.keys.get(key_digest(presented))
        if key is None:
            raise ApiError(401, "unauthorized", "unknown write key")
        return key

    async def body(self, request: web.Request, limit: int) -> Any:
        """The request's JSON (gunzipped if so encoded), refusing more than ``limit`` bytes."""
        raw = await request.read()
        encoding = request.headers.get("content-encoding", "").lower()
        if encoding == "gzip":
            inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
            try:
                raw = inflater.decompress(raw, limit + 1)
            except zlib.error as e:
                raise ApiError(400, "bad_encoding", f"not valid gzip: {e}") from None
        elif encoding not in ("", "identity"):
            raise ApiError(415, "bad_encoding", f"unsupported Content-Encoding {encoding!r}")
        if len(raw) > limit:
            raise ApiError(413, "oversized", f"body larger than {limit} bytes")
        try:
            return orjson.loads(raw)
        except orjson.JSONDecodeError as e:
            raise ApiError(400, "invalid_json", f"the body is not JSON: {e}") from None

    def client_ip(self, request: web.Request) -> str:
        """The client's address, for ``context.ip`` ('' when not recorded)."""
        if not self.settings.collector.record_ip:
            return ""
        forwarded = request.headers.get("x-forwarded-for", "")
        if self.settings.collector.trust_forwarded_for and forwarded:
            return forwarded.split(",")[0].strip()
        return request.remote or ""

    def admit(self, key: WriteKey, n: int) -> None:
        """Charge ``n`` events to ``key``'s allowance; Refused 429 beyond it."""
        now = time.monotonic()
        bucket = self.buckets.setdefault(
            key.digest, TokenBucket(key.rate_per_s, key.rate_per_s, now)
        )
        wait = bucket.take(n, now)
        if wait:
            after = max(1, math.ceil(wait))
            raise ApiError(
                429,
                "rate_limited",
                f"key {key.name!r} is limited to {key.rate_per_s:g} events/s",
                after,
            )

    async def single(self, request: web.Request) -> web.Response:
        """One event, its type named by the path."""
        etype = SINGLE[request.match_info["kind"]]
        limits = self.settings.limits
        event = await self.body(request, limits.max_event_bytes)
        if not isinstance(event, dict):
            raise ApiError(400, "not_an_object", "the body must be a JSON object")
        key = self.key_of(request, event.get("writeKey"))
        event["type"] = etype
        records, rejected = self.prepare(key, [event], request, None)
        if rejected:
            (problem,) = rejected
            raise ApiError(400, problem["error"], problem["reason"])
        self.admit(key, 1)
        await self.produce(records)
        return json_response({"success": True})

    async def batch(self, request: web.Request) -> web.Response:
        """A batch: each event checked on its own; the valid ones produced."""
        body = await self.body(request, self.settings.collector.max_batch_bytes)
        if not isinstance(body, dict) or not isinstance(body.get("batch"), list):
            raise ApiError(400, "not_a_batch", 'expected {"batch": [events...]}')
        key = self.key_of(request, body.get("writeKey"))
        events = body["batch"]
        records, rejected = self.prepare(key, events, request, body.get("sentAt"))
        if not records and rejected:
            return json_response(
                {
                    "success": False,
                    "error": "all_rejected",
                    "reason": "no event was valid",
                    "rejected": rejected,
                },
                400,
            )
        self.admit(key, len(records))
        await self.produce(records)
        return json_response({"success": True, "accepted": len(records), "rejected": rejected})

    def prepare(
        self, key: WriteKey, events: list[Any], request: web.Request, sent_at: Any
    ) -> tuple[list[Record], list[dict[str, Any]]]:
        """The records to produce and, by index, the events refused with their reasons."""
        limits = self.settings.limits
        topics = self.settings.topics
        topic = topics.feedback if key.topic == "feedback" else topics.events
        trusted = key.topic == "feedback"
        now_ms = time.time() * 1000
        ip = self.client_ip(request)
        records, rejected = [], []
        for index, event in enumerate(events):
            if not isinstance(event, dict):
                rejected.append(
                    {
                        "index": index,
                        "error": "not_an_object",
                        "reason": "an event must be a JSON object",
                    }
                )
                continue
            normalise(event, now_ms, sent_at, ip)
            try:
                records.append(event_record(event, topic, trusted=trusted, limits=limits))
            except ApiError as e:
                reason = e.reason
                if e.error == "untrusted_source":
                    reason += f" (write key {key.name!r} is not a trusted server-side key)"
                rejected.append({"index": index, "error": e.error, "reason": reason})
        return records, rejected

    async def produce(self, records: list[Record]) -> None:
        """Produce and wait for the broker; Refused 503 when it does not take them."""
        try:
            await self.producer().send(records)
        except BrokerUnavailable as e:
            raise ApiError(503, "unavailable", f"{e}; nothing was lost: send again", 5) from None

    async def cdn_settings(self, request: web.Request) -> web.Response:
        """What analytics.js loads first: post every event here, nothing to Segment."""
        key = self.keys.get(key_digest(request.match_info["write_key"]))
        if key is None or key.topic != "events":
            raise ApiError(404, "not_found", "no browser source has this write key")
        host = request.headers.get("host", f"127.0.0.1:{self.settings.collector.port}")
        return json_response(
            {
                "integrations": {
                    "Segment.io": {
                        "apiKey": request.match_info["write_key"],
                        "apiHost": f"{host}/v1",
                        "protocol": request.scheme,
                        "unbundledIntegrations": [],
                        "addBundledMetadata": True,
                    }
                },
                "plan": {"track": {"__default": {"enabled": True}}},
                "edgeFunction": {},
                "analyticsNextEnabled": True,
                "middlewareSettings": {},
                "enabledMiddleware": {},
                "metrics": {"sampleRate": 0},  # nothing to Segment's metrics endpoint
                "legacyVideoPluginsEnabled": False,
                "remotePlugins": [],
            }
        )


def add_collector_routes(
    app: web.Application, settings: Settings, producer: Callable[[], AckedProducer]
) -> None:
    """Add the collector's routes to ``app`` (errors as JSON, counted)."""
    c = Collector(settings, producer)
    app.router.add_post("/v1/{kind}", _dispatch(c))
    app.router.add_get(
        "/v1/projects/{write_key}/settings",
        counted("/v1/projects/{writeKey}/settings", c.cdn_settings),
    )


def _dispatch(c: Collector) -> Handler:
    """``/v1/{kind}``: a single event's route, a batch's, or a 404 naming the known ones."""
    single = counted("/v1/{type}", c.single)
    batch = counted("/v1/batch", c.batch)
    known = ", ".join(f"/v1/{k}" for k in (*SINGLE, *BATCH))

    async def unknown(request: web.Request) -> web.Response:
        raise ApiError(404, "not_found", f"no route {request.path}; expected one of {known}")

    other = counted("unknown", unknown)

    async def route(request: web.Request) -> web.StreamResponse:
        kind = request.match_info["kind"]
        return await (single if kind in SINGLE else batch if kind in BATCH else other)(request)

    return route
