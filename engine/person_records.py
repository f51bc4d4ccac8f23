"""The declared records a person's state holds, and the state as Redis keeps it.

``msgspec`` structs: typed, checked when decoded, and encoded as msgpack arrays
(no field names stored). They live apart from :mod:`engine.person` because that
module runs compiled (mypyc, see :mod:`engine`), and msgspec reads a struct's
declared types from the class, which a compiled class does not keep; here they
stay plain Python classes that compiled code uses like any other.
"""

from __future__ import annotations

from typing import Any

import msgspec

from engine.consent import ConsentStatement


class Work(msgspec.Struct, array_like=True):
    """An MQL's sales work item: its decision, queue, SDR and SLA (see engine.sales)."""

    decision_id: str
    queue: str
    qualified_on: list[str]  # the dimensions the promotion qualified on ("total", ...)
    since_ms: int  # promoted at: a queue's max_wait_minutes counts from here
    sdr: str = ""  # "" while waiting for an SDR
    assigned_ms: int = 0
    breached: list[str] = []  # SDRs who let the SLA lapse
    reroutes: int = 0  # re-routings after an SLA breach (decision ids ``-r1``, ``-r2``...)
    record: dict[str, Any] | None = None  # the decision as promoted, until accepted
    accepted_ms: int = 0


class Touch(msgspec.Struct, array_like=True):
    """A campaign touch: the UTM campaign of an event, and when."""

    campaign: str
    source: str
    medium: str
    at_ms: int


class RateWindow(msgspec.Struct, array_like=True):
    """Untrusted events counted in the person's latest broker minute (see over_rate)."""

    minute: int
    count: int
    flooded: bool = False  # an event was refused as a flood


class Absorbed(msgspec.Struct, array_like=True):
    """A person merged into this one, and when."""

    one_id: str
    at_ms: int


class RefusedMerge(msgspec.Struct, array_like=True):
    """A merge the identity rules refused: with whom, why, when."""

    one_id: str
    reason: str
    at_ms: int


class StoredPerson(msgspec.Struct, array_like=True):
    """A person's state as Redis keeps it: every field declared and checked on decode.

    A msgpack array in this order (no field names stored). New fields go at the end
    with a default, so states stored before them keep loading. Digests are bytes,
    input positions runs ``(first offset, count)``, the outbox deflated JSON (inflated
    only by a replay or a merge). A tombstone holds only ``erased_ms``
    and its outbox.
    """

    stage: str
    ref_ms: int
    last_ms: int  # format 3: the latest event's time minus ref_ms (a byte, not nine)
    # Format 3: [(dimension, [(rule, points at ref_ms, last award - last_ms), ...]), ...],
    # a rule being its index in score_rules. Format 2: dimension -> rule -> [points, ms].
    contributions: (
        list[tuple[str, list[tuple[int, float | int, int]]]]
        | dict[str, dict[str, list[float | int]]]
    )
    seen: bytes | list[bytes]  # format 3: the 6-byte digests joined, when all are 6 bytes
    # Format 3: [(rule, [(period, [award - last_ms, ...]), ...]), ...]. Format 2: rule ->
    # str(period) -> [award ms, ...].
    caps: list[tuple[int, list[tuple[int, list[int]]]]] | dict[str, dict[str, list[int]]]
    unsettled: dict[str, list[tuple[int, int]]]  # runs (first offset, count)
    profile: dict[str, Any]  # Profile's fields that are set
    disqualified: str
    transitions: int
    promotions: int
    queue: str
    owner: str
    channels: list[str]
    outbox: bytes
    merged_from: list[Absorbed]
    refused: list[RefusedMerge]
    first_touch: Touch | None
    last_touch: Touch | None
    work: Work | None
    timers: dict[str, int]
    consent: dict[str, ConsentStatement]
    rate: RateWindow | None
    submissions: list[list[Any]]  # [[content digest, event ms], ...]
    contacts: list[str] | None
    erased_ms: int = 0
    score_rules: list[str] = []  # format 3: rule names
