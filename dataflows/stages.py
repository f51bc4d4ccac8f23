"""The batch steps of the dataflow: the engine's rules plus one Redis round trip each.

Each stage is a callable taking the list of items Bytewax hands one worker in
one activation, so Redis is called once per batch, never once per event. The
stages import no Bytewax and can be driven directly against a real Redis.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import orjson

from dataflows.metrics import metrics, observed_store
from engine.consent import LISTS, suppression_of
from engine.events import Event, Origin, Rejection, decode_event, pickled_by_fields
from engine.identity import anchor, identifiers_of, resolve
from engine.person import (
    DECISION,
    DLQ,
    ERASE,
    Output,
    PersonState,
    Rulebook,
    absorb,
    already_applied,
    apply_event,
    decode_state,
    encode_state,
    erase,
    iso,
    message_digest,
    refuse_merge,
    remember,
    settle,
)
from engine.routing import Assignment
from engine.sales import (
    FEEDBACK,
    TIMER,
    Routing,
    apply_feedback,
    candidates,
    complete_routing,
    fire_timer,
    route_promotion,
    withhold_from_sales,
)
from engine.settings import ConfigError, RosterSettings, Settings, check_roster, roster_data
from engine.store import SAVED, IdentityWrites, RedisStore

log = logging.getLogger(__name__)
Clock = Callable[[], float]
# How often the person stage re-reads the input's done offsets: a stale value only
# means people keep a few more input positions until the next read.
INPUTS_DONE_REFRESH_S = 1.0


@dataclass(slots=True)  # not frozen: one per event, see engine.events.Event
class RawMessage:
    """What the decoder needs of a Kafka message."""

    value: bytes | None
    origin: Origin
    timestamp_ms: int


@pickled_by_fields
@dataclass(slots=True)  # not frozen: one per event, see engine.events.Event
class Resolved:
    """An event and the person it belongs to, with the merges it was refused (and why)."""

    one_id: str
    event: Event
    refusals: tuple[tuple[str, str], ...] = ()


class Decoder:
    """Decode and validate a batch of raw messages into events and rejections."""

    def __init__(self, settings: Settings, sources: dict[str, str], clock: Clock = time.time):
        self.settings = settings
        self.sources = sources  # input topic -> source name prefix (dataflows.kafka_io)
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
                item.source = self.sources[msg.origin.topic] + str(msg.origin.partition)
                item.offset = msg.origin.offset
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
            self._store = observed_store(self.settings.redis)
        return self._store


class IdentityStage(_LazyStore):
    """Resolve each event to one person: the only writer of the identity graph.

    The dataflow runs it on a single worker, so identity decisions are taken one
    at a time, in order, and need no locks: two workers can never both claim an
    identifier or merge the same person. A batch costs one round trip to read
    owners and erasures, one more to read the identifiers of the people whose
    graph may change (new identifiers, two owners, an erasure), and one to write.
    Events older than an erasure of one of their identifiers are dropped here
    (counted), so an erased person cannot be re-created by them.
    """

    def __call__(self, events: list[Event]) -> list[Resolved]:
        """Resolve ``events`` in order; later events of the batch see earlier decisions."""
        identity = self.settings.identity
        idents = [identifiers_of(e, identity) for e in events]
        digests = list(dict.fromkeys(i.digest for ids in idents for i in ids))
        found, erased_at = self.store.owners(digests)
        graph = _Graph(self.store, dict(zip(digests, found, strict=True)))
        erased = dict(zip(digests, erased_at, strict=True))
        graph.load(
            o
            for e, ids in zip(events, idents, strict=True)
            if _changes_graph(e, [graph.owners[i.digest] for i in ids])
            for o in (graph.owners[i.digest] for i in ids)
            if o
        )
        writes = IdentityWrites(self.store)
        out, dropped = [], 0
        block_s = identity.erasure_block_days * 86_400
        for event, ids in zip(events, idents, strict=True):
            if any(0 < event.event_ms <= erased[i.digest] for i in ids):
                dropped += 1
                continue
            owners = [graph.owners[i.digest] for i in ids]
            if _changes_graph(event, owners):
                owners = graph.current([i.digest for i in ids], writes)
            if event.trusted and event.name == ERASE:
                one_id = anchor(ids, owners)
                gone = graph.held.pop(one_id, set()) | {(i.kind, i.digest) for i in ids}
                for _, d in gone:
                    graph.owners[d] = None
                    erased[d] = max(erased.get(d, 0), event.event_ms)
                writes.erase(one_id, gone, event.event_ms, block_s)
                out.append(Resolved(one_id, event))
                continue
            res = resolve(ids, owners, graph.held, identity)
            for ident in res.claims:
                graph.owners[ident.digest] = res.one_id
                graph.held.setdefault(res.one_id, set()).add((ident.kind, ident.digest))
                writes.claim(res.one_id, ident.kind, ident.digest)
            for other in res.merges:
                graph.merge(other, res.one_id, writes)
            out.append(Resolved(res.one_id, event, res.refusals))
        self.store.write_graph(writes)
        if dropped:
            metrics().erased_events.inc(dropped)
        return out


def _changes_graph(event: Event, owners: Sequence[str | None]) -> bool:
    """Whether resolving the event may need its owners' identifiers (else the owner suffices)."""
    return None in owners or len(set(owners)) > 1 or (event.trusted and event.name == ERASE)


class _Graph:
    """The identity graph as one resolver batch sees and changes it."""

    def __init__(self, store: RedisStore, owners: dict[str, str | None]):
        self.store = store
        self.owners = owners
        self.held: dict[str, set[tuple[str, str]]] = {}
        self.pending: dict[str, set[str]] = {}
        self.redirects: dict[str, str] = {}

    def load(self, people: Iterable[str]) -> None:
        """Read the identifiers of people not read yet, following redirects."""
        wanted = sorted({p for p in people if p not in self.held})
        while wanted:
            nodes = self.store.graph(wanted)
            for one_id, node in zip(wanted, nodes, strict=True):
                self.held[one_id], self.pending[one_id] = node.identifiers, node.pending
                if node.redirect:
                    self.redirects[one_id] = node.redirect
            wanted = sorted({r for r in self.redirects.values() if r not in self.held})

    def current(self, digests: list[str], writes: IdentityWrites) -> list[str | None]:
        """The owners of ``digests`` now, loading who is needed.

        An owner found redirected was being merged when a crash cut the writes
        short: the merge is finished first.
        """
        self.load(o for d in digests if (o := self.owners[d]))
        for d in digests:
            owner = self.owners[d]
            if owner in self.redirects:
                survivor = owner
                while survivor in self.redirects:
                    survivor = self.redirects[survivor]
                self.merge(owner, survivor, writes)
        return [self.owners[d] for d in digests]

    def merge(self, absorbed: str, survivor: str, writes: IdentityWrites) -> None:
        """Merge ``absorbed`` into ``survivor``: identifiers, pending people, redirect."""
        ids = self.held.pop(absorbed, set())
        pending = self.pending.pop(absorbed, set())
        for _, d in ids:
            self.owners[d] = survivor
        self.held.setdefault(survivor, set()).update(ids)
        self.pending.setdefault(survivor, set()).update(pending | {absorbed})
        self.redirects[absorbed] = survivor
        writes.merge(absorbed, survivor, ids, pending)


# Rounds of compare-and-set before a batch gives up (and the process restarts from recovery).
MAX_ROUNDS = 20


class PersonStage(_LazyStore):
    """Score, qualify and route people; absorb the people merged into them.

    A batch is processed in rounds (:class:`_Round`). Each round loads the people
    the events were routed to, with their pending absorptions (following the
    redirects of people merged meanwhile), absorbs those pending people (their
    states are final: the resolver redirected them, and a redirected person's
    state cannot be saved), applies the events, timers and sales feedback in
    order, assigns SDRs (one script call per assignment, one round trip) and
    saves every person only if unchanged and not redirected. What lost a race
    is done again next round from fresh reads, and its outputs are not emitted.

    Every step can be repeated after a crash with the same effect: an absorbed
    person stays readable behind its redirect until its survivor records it in
    ``merged_from``, and each event's messageId digest makes its second
    application a replay of its records.
    """

    def __init__(
        self, settings: Settings, store: RedisStore | None = None, clock: Clock = time.time
    ):
        super().__init__(settings, store)
        self.rules = Rulebook(settings)
        self.clock = clock
        self._roster = settings.roster
        self._done: dict[str, int] = {}
        self._done_read_at = -INPUTS_DONE_REFRESH_S

    def inputs_done(self) -> dict[str, int]:
        """The input sources' done offsets (engine.person.settle), read at most once a second."""
        now = time.monotonic()
        if now - self._done_read_at >= INPUTS_DONE_REFRESH_S:
            self._done = self.store.inputs_done()
            self._done_read_at = now
        return self._done

    def roster(self) -> RosterSettings:
        """The roster applied in Redis (``leadflow roster apply``), else roster.toml's."""
        stored = self.store.load_roster()
        if stored is None:
            return self.settings.roster
        version, body = stored
        if version != self._roster.version:
            try:
                roster = roster_data(orjson.loads(body), "redis roster", version)
                check_roster(roster, self.settings.routing, "redis roster")
            except (ConfigError, orjson.JSONDecodeError) as e:  # keep the last good one
                log.error("roster version %d in Redis is unusable: %s", version, e)
            else:
                self._roster = roster
        return self._roster

    def __call__(self, items: list[Resolved]) -> list[Output]:
        """Process a batch of resolved events; return the records to publish."""
        work: dict[str, list[Resolved]] = {}
        for item in items:
            work.setdefault(item.one_id, []).append(item)
        outputs: list[Output] = []
        for _ in range(MAX_ROUNDS):
            if not work:
                return outputs
            work = _Round(self, work).run(outputs)
        raise RuntimeError(f"people still contended after {MAX_ROUNDS} rounds: {sorted(work)[:5]}")


def count_record(
    record: Output, person: PersonState, triggers: dict[str, Event], now_iso: str, now_ms: int
) -> None:
    """Count a record in the metrics (a decision is logged too), unless it is a replay.

    A new decision is one assigned in this round (its id is among the round's
    routings); a new lifecycle record is stamped with this round's time.
    """
    m, value = metrics(), record.value
    if record.kind == DLQ:
        m.rejected.labels(value["reason"]).inc()
    elif record.kind == DECISION:
        trigger = triggers.get(value["decision_id"])
        if trigger is None:
            return
        m.promotions.labels(person.queue).inc()
        m.assignments.labels(person.queue, person.owner).inc()
        m.decision_latency.labels(person.queue).observe(max(0, now_ms - trigger.ingested_ms) / 1000)
        m.event_to_decision.labels(person.queue).observe(max(0, now_ms - trigger.event_ms) / 1000)
        log.debug(
            "decision %s: queue %s, sdr %s",
            value["decision_id"],
            person.queue,
            person.owner,
            extra={"one_id": person.one_id},
        )
    elif value.get("recorded_at") == now_iso:
        cause = value["cause"]
        if value["from"] != value["to"]:
            m.transitions.labels(value["from"] or "none", value["to"]).inc()
        if cause == "merge":
            m.merges.inc()
        elif cause.startswith("merge_refused:"):
            m.merges_refused.labels(cause.removeprefix("merge_refused:")).inc()
        elif cause == "sla_breached":
            m.sla_breaches.labels(person.queue).inc()


class _Round:
    """One round of :class:`PersonStage` over the people of a batch."""

    def __init__(self, stage: PersonStage, work: dict[str, list[Resolved]]):
        self.stage = stage
        self.settings, self.store, self.rules = stage.settings, stage.store, stage.rules
        self.now_ms = int(stage.clock() * 1000)
        self.work = work
        self.retry: dict[str, list[Resolved]] = {}
        self.people: dict[str, PersonState] = {}
        self.loaded: dict[str, bytes | None] = {}
        self.timers_loaded: dict[str, dict[str, int]] = {}
        self.replayed: set[str] = set()  # people with an event already applied (a replay)
        self.absorbing: dict[str, list[PersonState]] = {}
        self.produced: dict[str, list[Output]] = {}
        self.routings: list[Routing] = []
        self.fired: list[tuple[str, str, int]] = []  # timers fired: (one_id, kind, due ms)
        self.erased: dict[str, list[str]] = {}  # erased person -> people it had absorbed

    def run(self, outputs: list[Output]) -> dict[str, list[Resolved]]:
        """Do the round; add the records of people saved to ``outputs``; return what to retry."""
        self._load()
        self._apply()
        self._save(outputs)
        return self.retry

    def _again(self, one_id: str, items: list[Resolved]) -> None:
        self.retry.setdefault(one_id, []).extend(items)

    def _load(self) -> None:
        """Load the people, then the frozen states of those they have yet to absorb."""
        wanted: dict[str, set[str]] = {}
        done_offsets = self.stage.inputs_done()
        stored_people = self.store.load_people(list(self.work), pending=True)
        for one_id, stored in zip(self.work, stored_people, strict=True):
            if stored.redirect:
                self._again(stored.redirect, self.work[one_id])
                continue
            person = self.people[one_id] = decode_state(one_id, stored.state, stored.version)
            settle(person, done_offsets)
            self.loaded[one_id] = stored.state
            self.timers_loaded[one_id] = dict(person.timers)
            done = {m[0] for m in person.merged_from} | {one_id}
            wanted[one_id] = {o for o in stored.pending if o not in done}
        others = sorted(set().union(*wanted.values()))
        frozen = {
            o: decode_state(o, st.state, st.version)
            for o, st in zip(others, self.store.load_people(others), strict=True)
            if st.redirect  # not frozen yet: its merge is still being written; absorbed later
        }
        for one_id, pending in wanted.items():
            states = [frozen[o] for o in sorted(pending) if o in frozen]
            # A pending person already absorbed by another pending one comes with it.
            inner = {m[0] for s in states for m in s.merged_from}
            self.absorbing[one_id] = [s for s in states if s.one_id not in inner]

    def _apply(self) -> None:
        """Absorb, then apply each event, in order, for every person loaded."""
        for one_id, person in self.people.items():
            out = self.produced[one_id] = []
            for n, item in enumerate(self.work[one_id]):
                event = item.event
                digest = message_digest(event.message_id)
                before = len(out)
                if n == 0:
                    for other in self.absorbing[one_id]:
                        out.append(absorb(person, other, event, self.rules, self.now_ms))
                if already_applied(person, event, digest):
                    self.replayed.add(one_id)
                else:
                    for other_id, reason in item.refusals:
                        out.append(
                            refuse_merge(person, other_id, reason, event, self.rules, self.now_ms)
                        )
                # Merge and refusal records go in the outbox under the event that caused
                # them, or a crash before they are sent would lose them (the replay finds
                # the merge done and the event seen).
                if len(out) > before:
                    remember(person, digest, out[before:], self.settings.limits.outbox_size)
                if event.trusted and event.name == ERASE and not person.erased_ms:
                    self.erased[one_id] = [o for o, _ in person.merged_from]
                    out.append(erase(person, event, self.rules, self.now_ms))
                    continue
                self._step(person, event, out)
        self._assign()

    def _step(self, person: PersonState, event: Event, out: list[Output]) -> None:
        """Apply one event, timer or sales feedback; queue what needs an SDR."""
        routing, promotion = None, None
        if event.type == TIMER:
            self.fired.append((person.one_id, event.name, event.event_ms))
            records, routing, promotion = fire_timer(person, event, self.rules, self.now_ms)
        elif event.trusted and event.name in FEEDBACK:
            records = apply_feedback(person, event, self.rules, self.now_ms)
        else:
            records, promotion = apply_event(person, event, self.rules, self.now_ms)
        if promotion is not None:
            routing = route_promotion(promotion, self.rules, self.now_ms)
        if routing is None:
            out.extend(records)
        else:
            self.routings.append(routing)

    def _assign(self) -> None:
        """Assign every routing of the round to an SDR, in one round trip."""
        if not self.routings:
            return
        # In event-time order, not the order people were processed in: who gets which
        # lead then does not depend on how the input was cut into batches (nor on a replay).
        self.routings.sort(key=lambda r: (r.event.event_ms, r.event.message_id))
        people = [(r.person.one_id, r.person.profile.email_domain) for r in self.routings]
        routed = []
        for r, on_lists in zip(
            self.routings, self.store.lists_holding(people, tuple(LISTS)), strict=True
        ):
            r.suppression = suppression_of(on_lists)
            if r.suppression.blacklisted:
                records = withhold_from_sales(r, self.rules, self.now_ms)
                self.produced[r.person.one_id].extend(records)
            else:
                routed.append(r)
        self.routings = routed
        if not routed:
            return
        roster = self.stage.roster()
        requests = [
            Assignment(
                r.queue, r.key, r.company, candidates(roster, r.queue, self.now_ms, r.exclude)
            )
            for r in self.routings
        ]
        sdrs = {s.id: s for s in roster.sdrs}
        for routing, sdr_id in zip(self.routings, self.store.assign(requests), strict=True):
            sdr = sdrs.get(sdr_id) if sdr_id else None
            records = complete_routing(routing, sdr, roster, self.rules, self.now_ms)
            self.produced[routing.person.one_id].extend(records)

    def _save(self, outputs: list[Output]) -> None:
        """Save whoever changed; emit the records of those saved; losers go round again."""
        block_ms = self.settings.identity.erasure_block_days * 86_400_000
        # Saved at every event: a person expires retention_days after their last one.
        retention_ms = self.settings.limits.retention_days * 86_400_000
        saves, done = [], []
        for one_id in self.produced:
            person = self.people[one_id]
            raw = encode_state(person)
            if raw == self.loaded[one_id] or person.is_new:
                done.append(one_id)  # replays, or nobody: nothing to save, records to (re-)emit
            else:
                ttl_ms = block_ms if person.erased_ms else retention_ms
                saves.append((one_id, person.version, raw, ttl_ms))
        for (one_id, _, _, _), status in zip(saves, self.store.save_people(saves), strict=True):
            if status == SAVED:
                done.append(one_id)
            else:
                self._again(one_id, self.work[one_id])
        triggers = {r.key: r.event for r in self.routings}
        now_iso = iso(self.now_ms)
        m = metrics()
        for one_id in done:
            person = self.people[one_id]
            outputs.extend(self.produced[one_id])
            for record in self.produced[one_id]:
                count_record(record, person, triggers, now_iso, self.now_ms)
            if one_id in self.erased:
                self.store.drop_people(self.erased[one_id])
                m.erasures.inc()
        self.store.absorbed([(o, [s.one_id for s in self.absorbing[o]]) for o in done])
        saved = set(done)
        for one_id, kind, _ in self.fired:
            if one_id in saved:
                m.timers_fired.labels(kind).inc()
        # Timers set or moved since loaded, and all timers of a person whose events are
        # replayed (a crash may have come between the save and this call). Entries left
        # behind in Redis are harmless: a timer the state no longer holds does nothing.
        self.store.sync_timers(
            [
                (o, kind, due)
                for o in done
                for kind, due in self.people[o].timers.items()
                if o in self.replayed or self.timers_loaded[o].get(kind) != due
            ],
            [t for t in self.fired if t[0] in saved],
        )
