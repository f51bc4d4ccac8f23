"""The batch steps of the dataflow: the engine's rules plus one Redis round trip each.

Each stage is a callable taking the list of items Bytewax hands one worker in
one activation, so Redis is called once per batch, never once per event. The
stages import no Bytewax and can be driven directly against a real Redis.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from dataflows.metrics import metrics
from engine.events import Event, Origin, Rejection, decode_event
from engine.identity import Identifier, identifiers_of, resolve
from engine.person import (
    Output,
    PersonState,
    Promotion,
    Rulebook,
    apply_event,
    complete_promotion,
    decode_state,
    encode_state,
)
from engine.settings import Settings
from engine.store import RedisStore

Clock = Callable[[], float]


@dataclass(frozen=True, slots=True)
class RawMessage:
    """What the decoder needs of a Kafka message."""

    value: bytes | None
    origin: Origin
    timestamp_ms: int


@dataclass(frozen=True, slots=True)
class Resolved:
    """An event and the person it belongs to."""

    one_id: str
    event: Event


class Decoder:
    """Decode and validate a batch of raw messages into events and rejections."""

    def __init__(self, settings: Settings, clock: Clock = time.time):
        self.settings = settings
        self.clock = clock

    def __call__(self, messages: list[RawMessage]) -> list[Event | Rejection]:
        """Decode every message; bad ones become rejections, never exceptions."""
        limits, feedback = self.settings.limits, self.settings.topics.feedback
        now_ms = int(self.clock() * 1000)
        out: list[Event | Rejection] = []
        # Counted per batch: a labelled Prometheus increment per event costs as much as decoding.
        rejected: Counter[str] = Counter()
        consumed: Counter[tuple[str, str]] = Counter()
        for msg in messages:
            # A message without a broker timestamp is stamped on arrival.
            ingested_ms = msg.timestamp_ms if msg.timestamp_ms > 0 else now_ms
            trusted = msg.origin.topic == feedback
            item = decode_event(
                msg.value,
                msg.origin,
                ingested_ms=ingested_ms,
                trusted=trusted,
                max_bytes=limits.max_event_bytes,
                max_future_skew_ms=limits.max_future_skew_s * 1000,
            )
            if isinstance(item, Rejection):
                rejected[item.reason] += 1
            else:
                consumed[(item.type, "feedback" if trusted else "events")] += 1
            out.append(item)
        m = metrics()
        for reason, n in rejected.items():
            m.rejected.labels(reason).inc(n)
        for labels, n in consumed.items():
            m.events.labels(*labels).inc(n)
        return out


class _LazyStore:
    """Connect to Redis on first use, so building a flow does not connect."""

    def __init__(self, settings: Settings, store: RedisStore | None):
        self.settings = settings
        self._store = store

    @property
    def store(self) -> RedisStore:
        if self._store is None:
            self._store = RedisStore(self.settings.redis)
        return self._store


class IdentityStage(_LazyStore):
    """Resolve each event to a One-ID: two round trips per batch (look up, claim)."""

    def __call__(self, events: list[Event]) -> list[Resolved]:
        """Resolve ``events`` in order; later events of the batch see earlier claims."""
        salt = self.settings.identity.salt
        idents = [identifiers_of(e, salt) for e in events]
        unique = list({i.digest: i for ids in idents for i in ids}.values())
        owners: dict[str, str | None] = dict(
            zip((i.digest for i in unique), self.store.owners(unique), strict=True)
        )
        claims: dict[str, tuple[Identifier, str]] = {}
        for ids in idents:
            r = resolve(ids, [owners[i.digest] for i in ids])
            for ident in r.claims:
                owners[ident.digest] = r.one_id
                claims[ident.digest] = (ident, r.one_id)
        # Another worker may have claimed the same identifier a moment earlier:
        # the store's answer is the truth, so resolve again against it.
        for (ident, _), winner in zip(
            claims.values(), self.store.claim(list(claims.values())), strict=True
        ):
            owners[ident.digest] = winner
        out = []
        conflicts = 0
        for event, ids in zip(events, idents, strict=True):
            r = resolve(ids, [owners[i.digest] for i in ids])
            conflicts += r.conflict
            out.append(Resolved(r.one_id, event))
        if conflicts:
            metrics().identity_conflicts.inc(conflicts)
        return out


class PersonStage(_LazyStore):
    """Score, qualify and route one worker's people: three round trips per batch.

    Load the states of everyone in the batch, apply their events in order, draw
    a routing ticket for each promotion, save the states that changed.
    """

    def __init__(
        self, settings: Settings, store: RedisStore | None = None, clock: Clock = time.time
    ):
        super().__init__(settings, store)
        self.rules = Rulebook(settings)
        self.clock = clock

    def __call__(self, items: list[Resolved]) -> list[Output]:
        """Process a batch of resolved events; return the records to publish."""
        by_person: dict[str, list[Event]] = {}
        for item in items:
            by_person.setdefault(item.one_id, []).append(item.event)
        one_ids = list(by_person)
        loaded = self.store.load_people(one_ids)
        now_ms = int(self.clock() * 1000)
        outputs: list[Output] = []
        promotions: list[Promotion] = []
        states: list[PersonState] = []
        for one_id, raw in zip(one_ids, loaded, strict=True):
            person = decode_state(one_id, raw)
            states.append(person)
            for event in by_person[one_id]:
                produced, promotion = apply_event(person, event, self.rules, now_ms)
                if promotion is None:
                    outputs.extend(produced)
                else:
                    promotions.append(promotion)
        tickets = self.store.draw_tickets([(p.queue, p.decision_id) for p in promotions])
        m = metrics()
        for promotion, ticket in zip(promotions, tickets, strict=True):
            outputs.extend(complete_promotion(promotion, ticket, self.rules, now_ms))
            person = promotion.person
            m.promotions.labels(person.queue).inc()
            m.assignments.labels(person.queue, person.owner).inc()
            m.decision_latency.labels(person.queue).observe(
                max(0, now_ms - promotion.event.ingested_ms) / 1000
            )
        changed = []
        for person, raw in zip(states, loaded, strict=True):
            new = encode_state(person)
            if new != raw:
                changed.append((person.one_id, new))
        self.store.save_people(changed)
        return outputs
