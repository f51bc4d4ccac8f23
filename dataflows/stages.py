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
from engine.batch import Batch, Resolved, Tally, batch_work
from engine.events import Event, Origin, Rejection, decode_event
from engine.identity import anchor, identifiers_of, reborn_id, resolve
from engine.owner_cache import OwnerCache
from engine.person import DECISION, DLQ, ERASE, Output, PersonState, Rulebook, refusal
from engine.sales import TIMER
from engine.settings import ConfigError, RosterSettings, Settings, check_roster, roster_data
from engine.state_cache import StateCache
from engine.store import IdentityWrites, RedisStore, StoreUnavailable

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
    the owners and erasures of identifiers it has not met (none when it knows
    them all), one more to read the identifiers of the people whose graph may
    change (new identifiers, two owners, an erasure), and one to write.
    Events older than an erasure of one of their identifiers are dropped here
    (counted), so an erased person cannot be re-created by them.

    The owners it read or wrote stay in :attr:`owners` between batches (being
    the only writer, it knows they still hold; engine.owner_cache).
    """

    def __init__(self, settings: Settings, store: RedisStore | None):
        super().__init__(settings, store)
        # One resolver per flow, on one worker: no other thread uses this map.
        self.owners = OwnerCache(settings.dataflow.owner_cache_size)

    def __call__(self, events: list[Event]) -> list[Resolved]:
        """Resolve ``events`` in order; later events of the batch see earlier decisions."""
        try:
            return self._resolve(events)
        except BaseException:
            self.owners.clear()  # its writes may have reached Redis in part
            raise

    def _resolve(self, events: list[Event]) -> list[Resolved]:
        identity = self.settings.identity
        idents = [identifiers_of(e, identity) for e in events]
        digests = list(dict.fromkeys(i.digest for ids in idents for i in ids))
        known, missing = self.owners.split(digests)
        found, erased_at = self.store.owners(missing)
        metrics().owner_reads.labels("kept").inc(len(known))
        metrics().owner_reads.labels("read").inc(len(missing))
        erased = dict.fromkeys(known, 0)
        known.update(zip(missing, found, strict=True))
        erased.update(zip(missing, erased_at, strict=True))
        graph = _Graph(self.store, known)
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
        self.owners.update(graph.owners, erased)
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

    The rule for a batch is :class:`engine.batch.Batch`; this stage gives it the
    Redis store, this worker's state cache, the roster and the input's done
    offsets, turns its tally into metrics, and guards the flow against a person
    whose events raise (see :meth:`__call__`).
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
        batch = self._batch()
        try:
            return self._applied(batch, batch_work(items))
        except INFRASTRUCTURE:
            raise
        except Exception as e:
            if self.settings.limits.on_processing_error == "stop":
                raise
            log.warning(
                "batch failed (%s); applying its %d people one at a time",
                type(e).__name__,
                len(batch.unfinished),
            )
            outputs = batch.outputs  # of the rounds saved before the failure
            for one_id, mine in list(batch.unfinished.items()):
                try:
                    outputs += self._applied(self._batch(), {one_id: mine})
                except INFRASTRUCTURE:
                    raise
                except Exception as error:
                    outputs += self.quarantine(one_id, mine, error)
            return outputs

    def _batch(self) -> Batch:
        return Batch(
            self.settings,
            self.rules,
            self.store,
            self.states,
            self.roster,
            self.inputs_done(),
            self.clock,
            self.event_time,
        )

    def _applied(self, batch: Batch, work: dict[str, list[Resolved]]) -> list[Output]:
        """Apply ``work``; count what it did, also when it raises (its saved rounds stand)."""
        try:
            return batch.apply(work)
        finally:
            count_batch(batch.tally, int(self.clock() * 1000))

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


def count_batch(tally: Tally, now_ms: int) -> None:
    """Count what a batch did in the metrics (a decision is logged too); replays are not counted.

    Counted per batch and label, not per record: a labelled Prometheus increment costs
    about as much as applying a page view. A new decision is one assigned in this batch
    (its id is among the tally's triggers); a record re-emitted from the outbox says so
    (``Output.replayed``).
    """
    m = metrics()
    m.state_loads.labels("kept").inc(tally.states_kept)
    m.state_loads.labels("read").inc(tally.states_read)
    if tally.erased_events:
        m.erased_events.inc(tally.erased_events)
    if tally.erasures:
        m.erasures.inc(tally.erasures)
    if tally.resends:
        m.resends.inc(tally.resends)
    for kind, n in tally.timers_fired.items():
        m.timers_fired.labels(kind).inc(n)
    counts: Counter[tuple[str, ...]] = Counter()
    for records, person in tally.emitted:
        for record in records:
            if not record.replayed:
                _tally_record(record, person, tally.triggers, now_ms, counts)
    for (what, *labels), n in counts.items():
        if what == "merges":
            m.merges.inc(n)
        else:
            getattr(m, what).labels(*labels).inc(n)


def _tally_record(
    record: Output,
    person: PersonState,
    triggers: dict[str, Event],
    now_ms: int,
    counts: Counter[tuple[str, ...]],
) -> None:
    """Add a new record to ``counts`` (metric name, labels); count a new decision at once."""
    value = record.value
    if record.kind == DLQ:
        counts[("rejected", value["reason"])] += 1
    elif record.kind == DECISION:
        trigger = triggers.get(value["decision_id"])
        if trigger is None:  # re-emitted from the outbox, not assigned in this batch
            return
        m = metrics()
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
            counts[("transitions", value["from"] or "none", value["to"])] += 1
        if cause == "merge":
            counts[("merges",)] += 1
        elif cause.startswith("merge_refused:"):
            counts[("merges_refused", cause.removeprefix("merge_refused:"))] += 1
        elif cause == "sla_breached":
            counts[("sla_breaches", person.queue)] += 1
