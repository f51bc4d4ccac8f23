"""Segment-spec events: decoding, validation and the reasons input is rejected.

Decoding never raises on bad input: it returns an :class:`Event` or a
:class:`Rejection` carrying a machine-readable reason (one of :data:`REASONS`)
and the original bytes, which the dataflow sends to the DLQ.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime
from operator import attrgetter
from typing import Any, TypeVar

import orjson

# Reserved event names: they change a person's lifecycle, consent or existence,
# so they are accepted only from the trusted feedback topic.
RESERVED_EVENTS = frozenset(
    {
        "manual_mql",
        "lead_accepted",
        "lead_rejected",
        "sql",
        "opportunity",
        "won",
        "lost",
        "recycle",
        "disqualify",
        "erase",
        "consent_override",
    }
)

# Segment's call types. ``group`` ties the person to a company whose traits (name,
# employees, industry, website) feed the profile; ``screen`` is a mobile app's ``page``.
EVENT_TYPES = ("track", "page", "screen", "identify", "alias", "group")

REASONS = (
    "oversized",  # larger than limits.max_event_bytes
    "invalid_json",  # not parseable as JSON (incl. invalid UTF-8)
    "not_an_object",  # JSON, but not an object
    "unknown_type",  # `type` missing or not one of EVENT_TYPES
    "missing_message_id",  # `messageId` missing, empty or not a string
    "missing_event_name",  # track without a non-empty `event`
    "bad_field",  # a known field has the wrong type or an invalid value
    "bad_timestamp",  # `timestamp` unparseable, before 2000, or too far in the future
    "no_identifier",  # none of userId, anonymousId, traits.email, previousId
    "untrusted_source",  # a reserved event on the untrusted events topic
    "illegal_transition",  # sales feedback the lifecycle does not allow from the stage
)

T = TypeVar("T")


def pickled_by_fields(cls: type[T]) -> type[T]:
    """Pickle instances of a dataclass as (class, field values).

    Items that cross processes are pickled by Bytewax; the dataclass default for
    ``slots`` classes calls ``fields()`` for every item (measured: 12% of the CPU of
    a two-process run went to it). Needs at least two fields.
    """
    values = attrgetter(*(f.name for f in fields(cls)))  # type: ignore[arg-type]

    def reduce(self: T) -> tuple[type[T], tuple[Any, ...]]:
        return cls, values(self)

    cls.__reduce__ = reduce  # type: ignore[assignment, method-assign]
    return cls


_MAX_ID_LEN = 256
# Events before this are data errors (epoch-zero clocks), not history.
_MIN_EVENT_MS = 946_684_800_000  # 2000-01-01T00:00:00Z


@pickled_by_fields
@dataclass(slots=True)  # not frozen: one per event, see engine.events.Event
class Origin:
    """Where a message came from: enough to find it again in Kafka."""

    topic: str
    partition: int
    offset: int
    key: bytes | None = None


@pickled_by_fields
@dataclass(slots=True)
class Event:
    """A validated Segment event. Treat it as immutable.

    Not ``frozen``, like the other classes built once per event: a frozen
    dataclass's ``__init__`` sets each field through ``object.__setattr__``,
    8x slower (1.9 against 0.24 us for this one), and they add up per event.

    Attributes:
        type: track, page, identify or alias.
        message_id: the idempotency key.
        event_ms: event time (``timestamp``, else ingest time), epoch ms.
        ingested_ms: when the broker stamped the message, epoch ms.
        name: track event name, or page name ('' if none).
        path: URL path of a page event ('' if none).
        user_id, anonymous_id, email, previous_id: raw identifiers ('' if absent).
        trusted: True when read from the feedback topic.
        payload: the whole decoded object, unknown fields included.
        source: the input partition it was read from ('' when not read from
            Kafka: a timer), named by dataflows.kafka_io.InputPositions.
        offset: its offset in that partition (-1 when ``source`` is '').
    """

    type: str
    message_id: str
    event_ms: int
    ingested_ms: int
    name: str = ""
    path: str = ""
    user_id: str = ""
    anonymous_id: str = ""
    email: str = ""
    previous_id: str = ""
    trusted: bool = False
    payload: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)
    source: str = ""
    offset: int = -1


@pickled_by_fields
@dataclass(frozen=True, slots=True)
class Rejection:
    """Input that cannot be processed; goes to the DLQ with the original bytes."""

    reason: str
    detail: str
    raw: bytes
    origin: Origin


class _Invalid(Exception):
    def __init__(self, reason: str, detail: str):
        self.reason = reason
        self.detail = detail


def decode_event(
    raw: bytes | None,
    origin: Origin,
    *,
    ingested_ms: int,
    trusted: bool,
    max_bytes: int,
    max_future_skew_ms: int,
) -> Event | Rejection:
    """Decode and validate one message value.

    Args:
        raw: the Kafka message value.
        origin: topic/partition/offset of the message (kept on rejection).
        ingested_ms: broker timestamp, used when the event has no ``timestamp``
            and as the reference for the future-skew check.
        trusted: whether the message came from the trusted feedback topic.
        max_bytes: size limit; larger messages are rejected unparsed.
        max_future_skew_ms: how far ahead of ``ingested_ms`` a timestamp may be.
    """
    data = raw or b""
    try:
        return _decode(data, ingested_ms, trusted, max_bytes, max_future_skew_ms)
    except _Invalid as e:
        return Rejection(e.reason, e.detail, data, origin)


def event_problem(
    obj: Any, *, ingested_ms: int, trusted: bool, max_future_skew_ms: int
) -> tuple[str, str] | None:
    """Why an already parsed event would be rejected, as ``(reason, detail)``; None if valid.

    What the HTTP collector asks before it produces an event, so that a client hears
    at once what the engine would send to the DLQ (size is the caller's to check).
    """
    try:
        _check(obj, ingested_ms, trusted, max_future_skew_ms)
    except _Invalid as e:
        return e.reason, e.detail
    return None


def _decode(raw: bytes, ingested_ms: int, trusted: bool, max_bytes: int, skew_ms: int) -> Event:
    if len(raw) > max_bytes:
        raise _Invalid("oversized", f"{len(raw)} bytes > limit {max_bytes}")
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError as e:
        raise _Invalid("invalid_json", str(e)[:200]) from None
    return _check(obj, ingested_ms, trusted, skew_ms)


def _check(  # one flat list of checks, in the order they apply
    obj: Any, ingested_ms: int, trusted: bool, skew_ms: int
) -> Event:
    if not isinstance(obj, dict):
        raise _Invalid("not_an_object", f"top-level JSON is {type(obj).__name__}")
    etype = obj.get("type")
    if etype not in EVENT_TYPES:
        raise _Invalid("unknown_type", f"type={_short(etype)}")
    message_id = obj.get("messageId")
    if not isinstance(message_id, str) or not message_id.strip():
        raise _Invalid("missing_message_id", f"messageId={_short(message_id)}")
    if len(message_id) > _MAX_ID_LEN:
        raise _Invalid("bad_field", f"messageId longer than {_MAX_ID_LEN}")
    for key in ("properties", "traits", "context"):
        if obj.get(key) is not None and not isinstance(obj[key], dict):
            raise _Invalid("bad_field", f"{key} must be an object")
    user_id = _identifier(obj, "userId")
    anonymous_id = _identifier(obj, "anonymousId")
    previous_id = _identifier(obj, "previousId")
    email = _email(obj)
    if etype == "alias" and not previous_id:
        raise _Invalid("bad_field", "alias needs previousId")
    if not (user_id or anonymous_id or email or previous_id):
        raise _Invalid("no_identifier", "no userId, anonymousId, traits.email or previousId")
    name = ""
    if etype == "track":
        event_name = obj.get("event")
        if not isinstance(event_name, str) or not event_name.strip():
            raise _Invalid("missing_event_name", f"event={_short(event_name)}")
        name = event_name
        if name in RESERVED_EVENTS and not trusted:
            raise _Invalid("untrusted_source", f"reserved event {name!r} on the events topic")
    elif etype in ("page", "screen"):
        page_name = obj.get("name")
        name = page_name if isinstance(page_name, str) else ""
    return Event(
        type=etype,
        message_id=message_id,
        event_ms=_event_time(obj.get("timestamp"), ingested_ms, skew_ms),
        ingested_ms=ingested_ms,
        name=name,
        # A screen (a mobile app's page) scores like a page: its path, else its name.
        path=(_page_path(obj) or (name if etype == "screen" else ""))
        if etype in ("page", "screen")
        else "",
        user_id=user_id,
        anonymous_id=anonymous_id,
        email=email,
        previous_id=previous_id,
        trusted=trusted,
        payload=obj,
    )


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _identifier(obj: dict[str, Any], key: str) -> str:
    value = obj.get(key)
    if value is None:
        return ""
    # Segment allows numeric user ids; they identify the same person as their string.
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str):
        raise _Invalid("bad_field", f"{key} must be a string")
    if len(value) > _MAX_ID_LEN:
        raise _Invalid("bad_field", f"{key} longer than {_MAX_ID_LEN}")
    return value.strip()


def _email(obj: dict[str, Any]) -> str:
    """The e-mail from traits, context.traits or properties, as sent."""
    for holder in (
        obj.get("traits"),
        (obj.get("context") or {}).get("traits"),
        obj.get("properties"),
    ):
        if isinstance(holder, dict) and holder.get("email") is not None:
            value = holder["email"]
            if not isinstance(value, str) or len(value) > _MAX_ID_LEN:
                raise _Invalid("bad_field", "email must be a string of at most 256 characters")
            if value.strip():
                if "@" not in value:
                    raise _Invalid("bad_field", "email has no @")
                return value.strip()
    return ""


def _page_path(obj: dict[str, Any]) -> str:
    props = obj.get("properties") or {}
    page = (obj.get("context") or {}).get("page")
    for holder in (props, page if isinstance(page, dict) else {}):
        path = holder.get("path")
        if isinstance(path, str) and path:
            return path
        url = holder.get("url")
        if isinstance(url, str) and "://" in url:
            rest = url.split("://", 1)[1]
            slash = rest.find("/")
            return rest[slash:].split("?", 1)[0].split("#", 1)[0] if slash >= 0 else "/"
    return ""


def _event_time(value: Any, ingested_ms: int, skew_ms: int) -> int:
    if value is None:
        return ingested_ms
    if not isinstance(value, str):
        raise _Invalid(
            "bad_timestamp", f"timestamp must be an ISO-8601 string, got {_short(value)}"
        )
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise _Invalid("bad_timestamp", f"not ISO-8601: {_short(value)}") from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)  # Segment timestamps are UTC
    ms = parsed.timestamp() * 1000
    if not math.isfinite(ms) or ms < _MIN_EVENT_MS:
        raise _Invalid("bad_timestamp", f"before 2000: {_short(value)}")
    if ms > ingested_ms + skew_ms:
        raise _Invalid(
            "bad_timestamp", f"{_short(value)} is further ahead of ingest time than allowed"
        )
    return int(ms)
