"""The batch steps of the dataflow: the engine's rules plus one Redis round trip each.

Each stage is a callable taking the list of items Bytewax hands one worker in
one activation, so Redis is called once per batch, never once per event. The
stages import no Bytewax and can be driven directly against a real Redis.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import cast

import orjson
import redis

from dataflows.metrics import metrics, observed_store
from engine.consent import LISTS, suppression_of
from engine.events import Event, Origin, Rejection, decode_event, pickled_by_fields
from engine.identity import anchor, identifiers_of, reborn_id, resolve
from engine.person import (
    DECISION,
    DLQ,
    ERASE,
    Output,
    PersonState,
    Rulebook,
    Seen,
    absorb,
    already_applied,
    apply_event,
    decode_state,
    encode_state,
    erase,
    message_digest,
    refusal,
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
from engine.state_cache import StateCache
from engine.store import IdentityWrites, RedisStore, SaveStatus, StoreUnavailable, next_version

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
    """An event and the person it belongs to, with the merges it made or was refused.

    ``home`` is the person its batch ends with: ``one_id`` itself, or the survivor
    that absorbs ``one_id`` later in the same batch. Every event of a batch with
    the same home goes to the home's worker, in order, so the merges of a batch
    happen at their events, as one event at a time would (see :class:`_Round`).
    """

    one_id: str
    event: Event
    refusals: tuple[tuple[str, str], ...] = ()
    merges: tuple[str, ...] = ()  # people absorbed into one_id at this event
    home: str = ""
    looked_up: bool = False  # found by IdentityLookup, not the resolver

    @property
    def key(self) -> str:
        """Whose work this is: the home, or the person when nobody absorbs them."""
        return self.home or self.one_id


class Decoder:
    """Decode and validate a batch of raw messages into events and rejections."""

    def __init__(
        self, settings: Settings, source_name: Callable[[str, int], str], clock: Clock = time.time
    ):
        self.settings = settings
        self.source_name = source_name  # (topic, partition) -> source name (dataflows.kafka_io)
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
                item.source = self.source_name(msg.origin.topic, msg.origin.partition)
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
        writes = IdentityWrites(self.store, self.settings.limits.retention_days * 86_400)
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
            if res.one_id not in owners and erased.get(res.one_id):
                res.one_id = reborn_id(res.one_id, erased[res.one_id])
            for ident in res.claims:
                graph.owners[ident.digest] = res.one_id
                graph.held.setdefault(res.one_id, set()).add((ident.kind, ident.digest))
                writes.claim(res.one_id, ident.kind, ident.digest)
            for other in res.merges:
                graph.merge(other, res.one_id, writes)
            out.append(Resolved(res.one_id, event, res.refusals, tuple(res.merges)))
        self.store.write_graph(writes)
        for r in out:
            home = r.one_id
            while home in graph.redirects:
                home = graph.redirects[home]
            r.home = home
        if dropped:
            metrics().erased_events.inc(dropped)
        return out


class IdentityLookup(_LazyStore):
    """Find the people of events that change nothing in the identity graph, on any worker.

    An event all of whose identifiers belong to one person, none of them ever
    erased, is no decision: the resolver would send it to that person and write
    nothing. Every worker finds those itself, from the owners it reads (one
    round trip a batch), and only the rest (a new identifier, two owners, an
    erasure) go to the resolver, the graph's only writer. So identity costs the
    one resolver what the graph *changes*, not what is read: repeat visitors,
    most of the stream once people are known, never reach it.

    Race-free because it writes nothing: a read that is stale by the time the
    event is applied names a person since merged (the redirect takes the event
    to the survivor, under compare-and-set, as for any event in flight) or
    since erased (the event is dropped as if it had come just before the
    erasure, which would have wiped it: reviving the erased One-ID would link
    the two). And order-preserving: an event waits for the resolver path while
    an earlier event read by this worker that shares one of its identifiers or
    owners went that way and is not yet *done* (applied and delivered, the
    input's done offset, dataflows.kafka_io), so a person's events of one input
    partition are applied in their order, as before.

    The identifiers of the events that go on are computed once more by the
    resolver, on its worker, rather than shipped with them: a few hashes for the
    minority that reach it (not measured against pickling them across workers).
    """

    def __init__(
        self, settings: Settings, store: RedisStore | None, done: Callable[[str], int]
    ) -> None:
        super().__init__(settings, store)
        self.done = done  # input source -> its done offset (-1: none yet)
        # Identifier digest or One-ID -> (source, offset) of the latest event that touched
        # it and went to the resolver.
        self.waiting: dict[str, tuple[str, int]] = {}
        self._prune_at = PRUNE_WAITING_AT

    def __call__(self, events: list[Event]) -> tuple[list[Resolved], list[Event]]:
        """Split ``events`` into those of known people (resolved) and those for the resolver."""
        idents = [identifiers_of(e, self.settings.identity) for e in events]
        digests = list(dict.fromkeys(i.digest for ids in idents for i in ids))
        found, erased_at = self.store.owners(digests) if digests else ([], [])
        owner = dict(zip(digests, found, strict=True))
        erased = {d for d, at in zip(digests, erased_at, strict=True) if at}
        known: list[Resolved] = []
        unknown: list[Event] = []
        for event, ids in zip(events, idents, strict=True):
            owners = [owner[i.digest] for i in ids]
            touched = [i.digest for i in ids] + [o for o in owners if o]
            if (
                ids
                and not _changes_graph(event, owners)
                and not any(i.digest in erased for i in ids)
                and not self._waits(touched)
            ):
                one_id = cast(str, owners[0])
                known.append(Resolved(one_id, event, home=one_id, looked_up=True))
            else:
                unknown.append(event)
                for key in touched:
                    self.waiting[key] = (event.source, event.offset)
        if len(self.waiting) > self._prune_at:
            self.waiting = {k: w for k, w in self.waiting.items() if w[1] >= self.done(w[0])}
            self._prune_at = max(PRUNE_WAITING_AT, 2 * len(self.waiting))
        paths = metrics().identity_paths
        paths.labels("lookup").inc(len(known))
        paths.labels("resolver").inc(len(unknown))
        return known, unknown

    def _waits(self, keys: list[str]) -> bool:
        """Whether an earlier event touching ``keys`` went to the resolver and is not done."""
        for key in keys:
            if (w := self.waiting.get(key)) is not None and w[1] >= self.done(w[0]):
                return True
        return False


# Waiting entries are pruned of done ones when there are more than this (and twice as
# many as after the last pruning): a few MB at most.
PRUNE_WAITING_AT = 50_000


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


# Lost compare-and-set races before one person's events count as failing (see PersonStage).
MAX_ROUNDS = 20
PROCESSING_ERROR = "processing_error"  # the DLQ reason of a quarantined person's events
# Failures of the servers, not of a person's events: the flow stops and restarts from
# recovery (nothing is lost) rather than send good events to the DLQ.
INFRASTRUCTURE = (StoreUnavailable, OSError, redis.RedisError)
_PII = re.compile(r"[^\s'\"@]+@[^\s'\"]+|\+?\d[\d ().-]{5,}\d")


def _without_pii(text: str) -> str:
    """``text`` with e-mail addresses and phone-like digit runs masked."""
    return _PII.sub("***", text)


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

    Decoded states stay in :attr:`states` between batches (engine.state_cache):
    the load tells Redis which version this worker holds and gets the bytes only
    of people someone changed since.

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
        # Event time (dataflow.clock = "event", replays and the backtest): each event is
        # applied "at" its own time, so decisions, stamps and SDR availability are the
        # history's, and the same input gives the same records however it is batched.
        self.event_time = settings.dataflow.clock == "event"
        self._roster = settings.roster
        self._done: dict[str, int] = {}
        self._done_read_at = -INPUTS_DONE_REFRESH_S
        self._unfinished: dict[str, list[Resolved]] = {}  # the people of the current round
        # Worker threads of one process share this stage: each keeps its own states.
        self._local = threading.local()

    @property
    def states(self) -> StateCache:
        """This worker's decoded states between batches (engine.state_cache).

        One cache per worker thread: two workers may hold the same person for a
        moment (a merge, a rebalance), and each must take out only what it put in.
        """
        cache: StateCache | None = getattr(self._local, "states", None)
        if cache is None:
            cache = self._local.states = StateCache(self.settings.dataflow.state_cache_size)
        return cache

    def inputs_done(self) -> dict[str, int]:
        """The input sources' done offsets (engine.person.settle), read at most once a second."""
        now = time.monotonic()
        if now - self._done_read_at >= INPUTS_DONE_REFRESH_S:
            self._done = self.store.inputs_done()
            self._done_read_at = now
        return self._done

    def roster(self) -> RosterSettings:
        """The roster applied in Redis (``leadflow roster apply``), else roster.toml's."""
        stored = self.store.roster_if_changed(self._roster.version)
        if stored is None:
            return self.settings.roster
        version, body = stored
        if body is not None:  # a version this stage has not read yet
            try:
                roster = roster_data(orjson.loads(body), "redis roster", version)
                check_roster(roster, self.settings.routing, "redis roster")
            except (ConfigError, orjson.JSONDecodeError) as e:  # keep the last good one
                log.error("roster version %d in Redis is unusable: %s", version, e)
            else:
                self._roster = roster
        return self._roster

    def __call__(self, items: list[Resolved]) -> list[Output]:
        """Process a batch of resolved events; return the records to publish.

        The poison-pill guard: when applying the batch raises (anything but a
        server failing, :data:`INFRASTRUCTURE`, which no retry of ours can mend),
        the people the failing round held are done again one at a time, and a
        person whose events raise again alone is quarantined (:meth:`quarantine`)
        instead of stopping the flow, unless ``limits.on_processing_error = "stop"``.
        """
        work: dict[str, list[Resolved]] = {}
        for item in items:
            work.setdefault(item.key, []).append(item)
        outputs: list[Output] = []
        try:
            self._rounds(work, outputs)
        except INFRASTRUCTURE:
            raise
        except Exception as e:
            if self.settings.limits.on_processing_error == "stop":
                raise
            log.warning(
                "batch failed (%s); applying its %d people one at a time",
                type(e).__name__,
                len(self._unfinished),
            )
            for one_id, mine in list(self._unfinished.items()):
                alone: list[Output] = []
                try:
                    self._rounds({one_id: mine}, alone)
                except INFRASTRUCTURE:
                    raise
                except Exception as error:
                    alone = self.quarantine(one_id, mine, error)
                outputs.extend(alone)
        return outputs

    def _rounds(self, work: dict[str, list[Resolved]], outputs: list[Output]) -> None:
        """Round after round until nobody is left; a person lost races MAX_ROUNDS times: raise."""
        conflicts: dict[str, int] = {}
        while work:
            self._unfinished = work
            done_round = _Round(self, work)
            work = done_round.run(outputs)
            for one_id in done_round.conflicted:
                conflicts[one_id] = conflicts.get(one_id, 0) + 1
                if conflicts[one_id] >= MAX_ROUNDS:
                    raise RuntimeError(f"person still contended after {MAX_ROUNDS} rounds")
        self._unfinished = {}

    def quarantine(self, one_id: str, items: list[Resolved], error: Exception) -> list[Output]:
        """Send a person's events to the DLQ as ``processing_error``; their state stays as it was.

        The detail names the exception's type and message with anything like an
        e-mail address or a phone number masked. A quarantined timer is struck off
        the timer set, or it would fail again every minute.
        """
        detail = f"{type(error).__name__}: {_without_pii(str(error))}"[:300]
        log.error(
            "processing error; %d events to the DLQ: %s",
            len(items),
            detail,
            extra={"one_id": one_id},
            exc_info=log.isEnabledFor(logging.DEBUG),
        )
        metrics().processing_errors.inc(len(items))
        timers = [
            tuple(i.event.message_id.split("|")[1:])
            for i in items
            if i.event.type == TIMER and i.event.message_id.startswith("timer|")
        ]
        if timers:
            self.store.sync_timers([], [(o, k, int(due)) for o, k, due in timers])
        return [
            Output(DLQ, one_id, refusal(i.event, PROCESSING_ERROR, detail))
            for i in items
            if i.event.type != TIMER
        ]


def count_record(
    record: Output, person: PersonState, triggers: dict[str, Event], now_ms: int
) -> None:
    """Count a record in the metrics (a decision is logged too), unless it is a replay.

    A new decision is one assigned in this round (its id is among the round's
    routings); a record re-emitted from the outbox says so (``Output.replayed``).
    """
    m, value = metrics(), record.value
    if record.replayed:
        return
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
    else:
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
    """One round of :class:`PersonStage` over the people of a batch.

    A person's events are applied in order until one needs an SDR: the rest of
    that person's events wait for the next round, which reads the state saved
    with the assignment. The batch then does exactly what the same events do
    one at a time (a promotion is routed before the acceptance, the
    disqualification or the next promotion that follows it in the batch).
    """

    def __init__(self, stage: PersonStage, work: dict[str, list[Resolved]]):
        self.stage = stage
        self.settings, self.store, self.rules = stage.settings, stage.store, stage.rules
        self.wall_ms = int(stage.clock() * 1000)  # for the latency metrics
        self.now_ms = self.wall_ms  # or each event's time: see at()
        self.work = work
        self.retry: dict[str, list[Resolved]] = {}
        self.later: dict[str, list[Resolved]] = {}  # events after a routing: next round
        self.conflicted: set[str] = set()  # people whose save lost a race this round
        self.people: dict[str, PersonState] = {}
        self.loaded: dict[str, bytes | None] = {}
        self.timers_loaded: dict[str, dict[str, int]] = {}
        self.replayed: set[str] = set()  # people with an event already applied (a replay)
        self.resends = 0  # events a client sent twice (applied once, emitted once)
        self.frozen: dict[str, bytes | None] = {}  # absorbed people's states, as stored
        self.pending: dict[str, list[str]] = {}  # person -> frozen people to absorb
        self.absorbing: dict[str, list[PersonState]] = {}  # person -> people absorbed now
        self.produced: dict[str, list[Output]] = {}
        self.routings: list[tuple[str, Routing]] = []  # (home, routing) waiting for an SDR
        self.triggers: dict[str, Event] = {}  # decision id -> its event, for the metrics
        self.assigned: dict[str, list[tuple[Assignment, str]]] = {}  # person -> SDRs taken
        # Timers fired: (person, (one_id as scheduled, kind, due ms)).
        self.fired: list[tuple[str, tuple[str, str, int]]] = []
        self.erased: dict[str, list[str]] = {}  # erased person -> people it had absorbed

    def run(self, outputs: list[Output]) -> dict[str, list[Resolved]]:
        """Do the round; add the records of people saved to ``outputs``; return what to retry."""
        self._load()
        self._apply()
        self._save(outputs)
        return self.retry

    def at(self, event: Event) -> None:
        """Under event time, make ``event``'s time the round's now (else keep the wall clock's)."""
        if self.stage.event_time:
            self.now_ms = event.event_ms

    def _again(self, one_id: str, items: list[Resolved]) -> None:
        self.retry.setdefault(one_id, []).extend(items)

    def _load(self) -> None:
        """Load the people, then the frozen states of those they have yet to absorb."""
        wanted: dict[str, set[str]] = {}
        done_offsets = self.stage.inputs_done()
        cache = self.stage.states
        one_ids = list(self.work)
        stored_people = self.store.load_people(one_ids, True, cache.versions(one_ids))
        kept = sum(1 for stored in stored_people if stored.unchanged)
        metrics().state_loads.labels("kept").inc(kept)
        metrics().state_loads.labels("read").inc(len(stored_people) - kept)
        for one_id, stored in zip(one_ids, stored_people, strict=True):
            # Taken out while this round works on the state; put back once it is saved.
            cached = cache.take(one_id, stored.unchanged)
            if stored.redirect:
                self._again(stored.redirect, self.work[one_id])
                continue
            if cached is not None:
                person = self.people[one_id] = cached.state
                self.loaded[one_id] = cached.stored
            else:
                person = self.people[one_id] = decode_state(one_id, stored.state, stored.version)
                self.loaded[one_id] = stored.state
            settle(person, done_offsets)
            self.timers_loaded[one_id] = dict(person.timers)
            done = {m.one_id for m in person.merged_from} | {one_id}
            wanted[one_id] = {o for o in stored.pending if o not in done}
        others = sorted(set().union(*wanted.values()))
        self.frozen = {
            o: st.state
            for o, st in zip(others, self.store.load_people(others), strict=True)
            if st.redirect  # not frozen yet: its merge is still being written; absorbed later
        }
        for one_id, pending in wanted.items():
            self.pending[one_id] = sorted(o for o in pending if o in self.frozen)

    def _apply(self) -> None:
        """Apply each person's events in order, merging people at the events that merge them."""
        for one_id in self.people:
            self._apply_person(one_id)
        self._assign(self.routings)

    def _apply_person(self, one_id: str) -> None:
        """Absorb and apply, in order, one home's events (and those of whom it absorbs)."""
        items = self.work[one_id]
        live = self._absorbable(one_id, items)
        out = self.produced[one_id] = []
        for n, item in enumerate(items):
            start = len(out)
            waits = self._apply_item(one_id, n, item, live, out)
            for record in out[start:]:  # for the stage latency (count_record)
                record.ingested_ms = item.event.ingested_ms
            if waits and n + 1 < len(items):
                self.later[one_id] = items[n + 1 :]
                break

    def _apply_item(
        self, one_id: str, n: int, item: Resolved, live: dict[str, PersonState], out: list[Output]
    ) -> bool:
        """Apply a home's ``n``-th event; True when its routing waits for the round's SDRs."""
        person = self.people[one_id]
        self.at(item.event)
        target = live.get(item.one_id, person)
        self._merge_and_note(one_id, n, item, target, live, out)
        event = item.event
        if item.looked_up and 0 < target.erased_ms < event.event_ms:
            # Its owner was read before the erasure: dropped as if it had come just
            # before it (which wipes it), never reviving the erased One-ID.
            metrics().erased_events.inc()
            return False
        if event.trusted and event.name == ERASE and not target.erased_ms:
            # The people the erased one had absorbed are dropped once it is saved.
            self.erased.setdefault(one_id, []).extend(m.one_id for m in target.merged_from)
            out.append(erase(target, event, self.rules, self.now_ms))
            return False
        if not self._step(target, event, out, one_id):
            return False
        if live or target is not person:
            # People still to be merged in this batch hold changes that can only be
            # saved with this home: the SDR is assigned now, so nothing waits a round.
            self._assign([self.routings.pop()])
            return False
        return True

    def _absorbable(self, one_id: str, items: list[Resolved]) -> dict[str, PersonState]:
        """The people this home absorbs: at its first event, or (``live``) at their merge's."""
        if not self.pending[one_id]:  # nearly everyone
            self.absorbing[one_id] = []
            return {}
        merged_here = {o for item in items for o in item.merges}
        states = {o: decode_state(o, self.frozen[o]) for o in self.pending[one_id]}
        for o in states:  # redirected for good: their cached states, if any, are stale
            self.stage.states.drop(o)
        for o, st in states.items():  # as scheduled: struck off once absorbed
            self.timers_loaded[o] = dict(st.timers)
        # A pending person already absorbed by another pending one comes with it.
        inner = {m.one_id for st in states.values() for m in st.merged_from}
        live = {o: st for o, st in states.items() if o in merged_here}
        self.absorbing[one_id] = [
            st for o, st in states.items() if o not in inner and o not in live
        ]
        return live

    def _merge_and_note(
        self,
        one_id: str,
        n: int,
        item: Resolved,
        target: PersonState,
        live: dict[str, PersonState],
        out: list[Output],
    ) -> None:
        """The merges and refusals an event brings, and whether it was seen before."""
        event = item.event
        digest = message_digest(event.message_id)
        before = len(out)
        if n == 0:
            for other in self.absorbing[one_id]:
                out.append(absorb(self.people[one_id], other, event, self.rules, self.now_ms))
        for other in [live.pop(o) for o in item.merges if o in live]:
            out.append(absorb(target, other, event, self.rules, self.now_ms))
            self.absorbing[one_id].append(other)
        seen = already_applied(target, event, digest)
        if seen is Seen.REPLAY:
            self.replayed.add(one_id)
        elif seen is Seen.RESEND:
            self.resends += 1
        else:
            for other_id, reason in item.refusals:
                out.append(refuse_merge(target, other_id, reason, event, self.rules, self.now_ms))
        # Merge and refusal records go in the outbox under the event that caused
        # them, or a crash before they are sent would lose them (the replay finds
        # the merge done and the event seen).
        if len(out) > before:
            remember(target, digest, out[before:], self.settings.limits.outbox_size)

    def _step(self, person: PersonState, event: Event, out: list[Output], home: str) -> bool:
        """Apply one event, timer or sales feedback; True when it needs an SDR (queued)."""
        routing, promotion = None, None
        if event.type == TIMER:
            # Named as scheduled: a timer of a person since merged away fires for the survivor.
            _, scheduled_for, kind, due = event.message_id.split("|")
            self.fired.append((home, (scheduled_for, kind, int(due))))
            records, routing, promotion = fire_timer(person, event, self.rules, self.now_ms)
        elif event.trusted and event.name in FEEDBACK:
            records = apply_feedback(person, event, self.rules, self.now_ms)
        else:
            records, promotion = apply_event(person, event, self.rules, self.now_ms)
        if promotion is not None:
            routing = route_promotion(promotion, self.rules, self.now_ms)
        if routing is None:
            out.extend(records)
            return False
        self.routings.append((home, routing))
        return True

    def _assign(self, routings: list[tuple[str, Routing]]) -> None:
        """Assign routings to SDRs, in one round trip; their records go to their homes."""
        if not routings:
            return
        # In event-time order, not the order people were processed in: who gets which
        # lead then does not depend on how the input was cut into batches (nor on a replay).
        routings.sort(key=lambda hr: (hr[1].event.event_ms, hr[1].event.message_id))
        people = [
            (r.person.one_id, r.person.profile.email_domain, r.person.contacts) for _, r in routings
        ]
        routed = []
        for (home, r), on_lists in zip(
            routings, self.store.lists_holding(people, tuple(LISTS)), strict=True
        ):
            self.at(r.event)
            r.suppression = suppression_of(on_lists)
            if r.suppression.blacklisted:
                withheld = withhold_from_sales(r, self.rules, self.now_ms)
                for record in withheld:
                    record.ingested_ms = r.event.ingested_ms
                self.produced[home].extend(withheld)
            else:
                routed.append((home, r))
        if not routed:
            return
        roster = self.stage.roster()
        requests = []
        for _, r in routed:
            self.at(r.event)
            requests.append(
                Assignment(
                    r.queue, r.key, r.company, candidates(roster, r.queue, self.now_ms, r.exclude)
                )
            )
        sdrs = {s.id: s for s in roster.sdrs}
        answers = self.store.assign(requests)
        for (home, routing), request, sdr_id in zip(routed, requests, answers, strict=True):
            sdr = sdrs.get(sdr_id) if sdr_id else None
            if sdr_id:
                self.assigned.setdefault(home, []).append((request, sdr_id))
            self.triggers[routing.key] = routing.event
            self.at(routing.event)
            records = complete_routing(routing, sdr, roster, self.rules, self.now_ms)
            for record in records:
                record.ingested_ms = routing.event.ingested_ms
            self.produced[home].extend(records)

    def _save(self, outputs: list[Output]) -> None:
        """Save whoever changed; emit the records of those saved; losers go round again."""
        block_ms = self.settings.identity.erasure_block_days * 86_400_000
        # Saved at every event: a person expires retention_days after their last one.
        retention_ms = self.settings.limits.retention_days * 86_400_000
        cache = self.stage.states
        saves, done = [], []
        for one_id in self.produced:
            person = self.people[one_id]
            raw = encode_state(person)
            loaded = self.loaded[one_id]
            if raw == loaded or person.is_new:
                done.append(one_id)  # replays, or nobody: nothing to save, records to (re-)emit
                if loaded is not None:
                    cache.keep(one_id, person.version, loaded, person)
            else:
                ttl_ms = block_ms if person.erased_ms else retention_ms
                saves.append((one_id, person.version, next_version(person.version), raw, ttl_ms))
        lost: list[tuple[Assignment, str]] = []
        for (one_id, _, version, raw, _), status in zip(
            saves, self.store.save_people(saves), strict=True
        ):
            if status is SaveStatus.SAVED:
                done.append(one_id)
                self.people[one_id].version = version
                cache.keep(one_id, version, raw, self.people[one_id])
            else:
                self.conflicted.add(one_id)
                self._again(one_id, self.work[one_id])
                lost.extend(self.assigned.get(one_id, ()))
        if lost:
            # Their decisions are not emitted: the SDRs must not be charged for them.
            self.store.release(lost)
        for one_id in done:
            if one_id in self.later:
                self._again(one_id, self.later[one_id])
        self._emit(done, outputs)

    def _emit(self, done: list[str], outputs: list[Output]) -> None:
        """Emit the records of the people saved; bring Redis' side records up to date."""
        triggers = self.triggers
        m = metrics()
        for one_id in done:
            person = self.people[one_id]
            outputs.extend(self.produced[one_id])
            for record in self.produced[one_id]:
                count_record(record, person, triggers, self.wall_ms)
            if one_id in self.erased:
                self.store.drop_people(self.erased[one_id])
                m.erasures.inc()
        if self.resends:
            m.resends.inc(self.resends)
        self.store.absorbed([(o, [s.one_id for s in self.absorbing[o]]) for o in done])
        saved = set(done)
        for one_id, (_, kind, _) in self.fired:
            if one_id in saved:
                m.timers_fired.labels(kind).inc()
        # Timers set or moved since loaded are scheduled (all of them for a person whose
        # events are replayed: a crash may have come between the save and this call);
        # timers fired, moved, cancelled, or held by a person absorbed are struck off,
        # so the set holds live timers only and stale entries never crowd out due ones.
        scheduled, removed = [], [t for o, t in self.fired if o in saved]
        for o in done:
            now_set, before = self.people[o].timers, self.timers_loaded[o]
            scheduled += [
                (o, kind, due)
                for kind, due in now_set.items()
                if o in self.replayed or before.get(kind) != due
            ]
            removed += [(o, kind, due) for kind, due in before.items() if now_set.get(kind) != due]
            removed += [
                (a.one_id, k, due)
                for a in self.absorbing[o]
                for k, due in self.timers_loaded[a.one_id].items()
            ]
        self.store.sync_timers(scheduled, removed)
