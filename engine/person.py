"""A person's state and what one event does to it.

This is where the rules meet: de-duplication, scoring, qualification,
lifecycle and routing, applied to one person at a time. Nothing here does I/O;
the dataflow loads states, calls :func:`apply_event` for each event, draws one
routing ticket per promotion from the store, calls :func:`complete_promotion`,
and saves the states.

Nothing lost, nothing doubled: the state remembers the digests of the last
``limits.dedup_window`` messageIds it applied, and, in an *outbox*, the output
records of its last ``limits.outbox_size`` output-producing events. An event
seen again (a client retry, or Bytewax replaying input after a crash) changes
nothing and re-emits the records it produced the first time, with the same
ids, so downstream consumers see at-least-once delivery of identical records.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import orjson

from engine import lifecycle
from engine.events import Event
from engine.qualification import is_mql
from engine.routing import choose_queue, pick_sdr
from engine.scoring import ScoringModel, add_points, score_at, top_contributions
from engine.settings import Settings

DECISION = "decision"
LIFECYCLE = "lifecycle"


@dataclass(slots=True)
class Output:
    """A record for an output topic, keyed by One-ID."""

    kind: str  # DECISION or LIFECYCLE
    one_id: str
    value: dict[str, Any]


@dataclass(slots=True)
class PersonState:
    """Everything Leadflow keeps about one person (stored as one Redis value)."""

    one_id: str
    stage: str = lifecycle.LEAD
    ref_ms: int = 0  # contributions are referenced to this event time
    contributions: dict[str, float] = field(default_factory=dict)
    seen: list[str] = field(default_factory=list)  # recent messageId digests, oldest first
    transitions: int = 0  # lifecycle records written so far (makes record ids stable)
    promotions: int = 0
    queue: str = ""
    owner: str = ""
    channels: list[str] = field(default_factory=list)
    # [[event digest, [[kind, record], ...]], ...], oldest first
    outbox: list[list[Any]] = field(default_factory=list)
    is_new: bool = False  # not stored


@dataclass(slots=True)
class Promotion:
    """A promotion to MQL awaiting its routing ticket."""

    person: PersonState
    event: Event
    decision_id: str
    queue: str
    score: float
    outputs: list[Output]  # the event's other records, emitted with the decision


def message_digest(message_id: str) -> str:
    """48-bit digest of a messageId: collisions within one person's window are ~1e-11."""
    return hashlib.blake2b(message_id.encode(), digest_size=6).hexdigest()


def stable_id(one_id: str, kind: str, n: int) -> str:
    """Deterministic id of the ``n``-th record of ``kind`` for a person."""
    return hashlib.blake2b(f"{one_id}:{kind}:{n}".encode(), digest_size=10).hexdigest()


def iso(ms: int) -> str:
    """Epoch milliseconds as ISO-8601 UTC with millisecond precision."""
    return (
        datetime.fromtimestamp(ms / 1000, UTC)
        .isoformat(timespec="milliseconds")
        .replace("+00:00", "Z")
    )


def encode_state(p: PersonState) -> bytes:
    """Compact JSON for Redis; short keys keep memory per person low."""
    doc: dict[str, Any] = {"s": p.stage, "t": p.ref_ms, "c": p.contributions, "m": p.seen}
    if p.transitions:
        doc["k"] = p.transitions
    if p.promotions:
        doc["n"] = p.promotions
        doc["q"] = p.queue
        doc["o"] = p.owner
    if p.channels:
        doc["h"] = p.channels
    if p.outbox:
        doc["x"] = p.outbox
    return orjson.dumps(doc)


def decode_state(one_id: str, raw: bytes | None) -> PersonState:
    """The state stored for ``one_id``, or a fresh lead when there is none."""
    if raw is None:
        return PersonState(one_id, is_new=True)
    d = orjson.loads(raw)
    return PersonState(
        one_id=one_id,
        stage=d["s"],
        ref_ms=d["t"],
        contributions=d["c"],
        seen=d["m"],
        transitions=d.get("k", 0),
        promotions=d.get("n", 0),
        queue=d.get("q", ""),
        owner=d.get("o", ""),
        channels=d.get("h", []),
        outbox=d.get("x", []),
    )


def replayed_outputs(p: PersonState, digest: str) -> list[Output]:
    """Records an already-applied event produced, for re-emission."""
    for entry_digest, records in p.outbox:
        if entry_digest == digest:
            return [Output(kind, p.one_id, value) for kind, value in records]
    return []


def apply_event(
    p: PersonState, event: Event, model: ScoringModel, settings: Settings, now_ms: int
) -> tuple[list[Output], Promotion | None]:
    """Apply ``event`` to ``p`` (mutated) and say what it produced.

    Returns the output records to emit now, and a :class:`Promotion` when the
    event made the person an MQL; its decision is completed by
    :func:`complete_promotion` once the routing ticket is drawn.
    """
    digest = message_digest(event.message_id)
    if digest in p.seen:
        return replayed_outputs(p, digest), None
    p.seen.append(digest)
    del p.seen[: -settings.limits.dedup_window]

    outputs: list[Output] = []
    if p.is_new:
        p.is_new = False
        outputs.append(_transition(p, None, lifecycle.LEAD, "first_event", event, now_ms))
    if event.email and "email" not in p.channels:
        p.channels.append("email")
    for rule in model.matching_rules(event):
        p.ref_ms = add_points(
            p.contributions, p.ref_ms, rule.name, rule.points, event.event_ms, model.half_life_ms
        )
    p.ref_ms = max(p.ref_ms, event.event_ms)

    score = score_at(p.contributions, p.ref_ms, p.ref_ms, model.half_life_ms)
    if p.stage in lifecycle.NURTURE and is_mql(score, settings.scoring):
        outputs.append(
            _transition(p, p.stage, lifecycle.MQL, "score_threshold", event, now_ms, score)
        )
        p.promotions += 1
        promotion = Promotion(
            person=p,
            event=event,
            decision_id=stable_id(p.one_id, DECISION, p.promotions),
            queue=choose_queue(settings.routing),
            score=score,
            outputs=outputs,
        )
        return outputs, promotion
    _remember(p, digest, outputs, settings.limits.outbox_size)
    return outputs, None


def complete_promotion(
    promotion: Promotion, ticket: int, model: ScoringModel, settings: Settings, now_ms: int
) -> list[Output]:
    """Assign the promoted person to an SDR and build the decision (the lead alert)."""
    p, event = promotion.person, promotion.event
    sdr = pick_sdr(ticket, settings.roster.for_queue(promotion.queue))
    queue = settings.routing.queue(promotion.queue)
    p.queue, p.owner = queue.name, sdr.id
    reasons = top_contributions(
        p.contributions, p.ref_ms, p.ref_ms, model.half_life_ms, settings.scoring.reasons
    )
    decision = {
        "decision_id": promotion.decision_id,
        "one_id": p.one_id,
        "stage": lifecycle.MQL,
        "promotion": p.promotions,
        "queue": queue.name,
        "sdr": sdr.id,
        "sdr_name": sdr.name,
        "ticket": ticket,
        "score": round(promotion.score, 3),
        "fit": None,
        "threshold": settings.scoring.mql_threshold,
        "reasons": [{"rule": c.rule, "points": c.points} for c in reasons],
        "channels": list(p.channels),
        "trigger": {
            "message_id": event.message_id,
            "type": event.type,
            "event": event.name,
            "event_time": iso(event.event_ms),
            "ingested_at": iso(event.ingested_ms),
        },
        "decided_at": iso(now_ms),
        "sla_deadline": iso(now_ms + queue.sla_minutes * 60_000),
    }
    outputs = [*promotion.outputs, Output(DECISION, p.one_id, decision)]
    _remember(p, message_digest(event.message_id), outputs, settings.limits.outbox_size)
    return outputs


def _transition(
    p: PersonState,
    from_stage: str | None,
    to_stage: str,
    cause: str,
    event: Event,
    now_ms: int,
    score: float = 0.0,
) -> Output:
    if from_stage is not None:
        lifecycle.check_transition(from_stage, to_stage)
    p.stage = to_stage
    p.transitions += 1
    record = {
        "record_id": stable_id(p.one_id, LIFECYCLE, p.transitions),
        "one_id": p.one_id,
        "from": from_stage,
        "to": to_stage,
        "cause": cause,
        "actor": "engine",
        "message_id": event.message_id,
        "event_time": iso(event.event_ms),
        "recorded_at": iso(now_ms),
        "score": round(score, 3),
    }
    return Output(LIFECYCLE, p.one_id, record)


def _remember(p: PersonState, digest: str, outputs: list[Output], size: int) -> None:
    if outputs:
        p.outbox.append([digest, [[o.kind, o.value] for o in outputs]])
        del p.outbox[:-size]
