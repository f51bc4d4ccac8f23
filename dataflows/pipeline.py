"""The Leadflow dataflow.

Steps (Bytewax operators), each carrying one batch as one item from decoding to
the person stage, so their cost (~1 us per item and step) is paid per batch::

    input            events + feedback topics, Kafka batches
    decode           flat_map_batch: raw bytes -> events or rejections; the identity
                     lookup (on > 1 worker) finds known people's events
    split_rejected   branch: rejections -> dlq_records (map) -> records
    split_known      branch: known people's events, by person shard | the rest
    resolve_identity stateful_batch on ONE worker (constant key): the identity graph's
                     only writer, for the events that change the graph
    resolved         key_rm
    with_timers      merge: resolved + known + due timers (timers: input polled
                     from Redis once a second by one worker, then timer_shards: map)
    to_owner         stateful_batch keyed by person shard: moves each shard's list to
                     its home worker; does nothing else
    drop_key         key_rm
    score_qualify_route  flat_map_batch: everything a worker received in one
                     activation, in ONE call (a keyed step would call once per shard
                     key, and Redis once per shard: that is why to_owner is separate)
    records, output  merge, then the sink (one producer per worker; waits for acks)

Redis round trips of a batch (one worker; counted from dataflows.stages and
engine.batch, the rule for a batch):

* typical (no promotion): identity lookup MGET x1 (only with > 1 worker);
  resolver: owners and erasures MGET x0-1 (of the identifiers its owner cache
  does not hold: none when all were met before, engine.owner_cache), identifiers
  of people whose graph may change x0-1, writes x0-1; person stage: load x1
  (a script: states, redirects, pending merges; a state this worker holds
  decoded comes back as "unchanged", see engine.state_cache), save x1
  (compare-and-set script), timers x0-1, input done offsets at most once a second.
* routing (a promotion in the batch) adds: suppression lists x1, roster version
  x1 (the roster itself only when its version changed), SDR assignment x1 (one
  script call per assignment, pipelined), and a second round for the events that
  followed the promotion in the batch (load x1, save x1).

Person state lives in Redis, not in Bytewax: Bytewax recovery keeps only the
input offsets, and the stages make replay harmless (see engine.person). One
resolver takes every identity decision in order, so claims and merges never
race; events that need no decision (all their identifiers one known person's)
skip it, found by a read on the worker that read them
(dataflows.stages.IdentityLookup), so what the resolver carries is the graph's
changes, not the stream. Keying by a shard of the One-ID then gives every
person one home worker (a merge moves events across workers, under
compare-and-set, see engine.batch). Each stage adds its events
to ``leadflow_stage_latency_seconds`` (dataflows.metrics.StageLatency).
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TypeVar

import bytewax.operators as op
from bytewax.dataflow import Dataflow, Stream
from bytewax.operators import KeyedStream, StatefulBatchLogic

from dataflows.kafka_io import (
    INPUT_CLOCK,
    INPUT_NAMES,
    SinkMessage,
    SourceItem,
    input_sources,
    kafka_cluster,
    kafka_sink,
    kafka_source,
    to_dlq_message,
    to_output_message,
    to_raw_messages,
)
from dataflows.metrics import metrics, observed_store
from dataflows.stages import (
    Clock,
    Decoder,
    IdentityLookup,
    IdentityStage,
    PersonStage,
)
from dataflows.timers import TimerSource
from engine.batch import Resolved
from engine.events import Event, Rejection
from engine.settings import MEMBER_ERRORS, Settings, load_settings
from engine.store import RedisStore

# Routing keys for the person stage. More shards than workers ever run, so every
# worker gets some; few enough that a batch splits into few (key, batch) groups,
# which cost ~1.3 us each in Bytewax (shared/BYTEWAX.md).
PERSON_SHARDS = 64
log = logging.getLogger(__name__)


def person_shard(r: Resolved) -> str:
    """The routing key of a resolved event: a stable shard of its home's One-ID."""
    return str(int(r.key[:8], 16) % PERSON_SHARDS)


RESOLVER_KEY = "identity"
In = TypeVar("In")
Out = TypeVar("Out")
T = TypeVar("T")


class _Pass(StatefulBatchLogic[In, Out, None]):
    """Run a batch function where the key put the batch; keep no Bytewax state.

    All state is in Redis, so nothing is snapshotted and the logic is dropped
    after every batch.
    """

    def __init__(self, step: Callable[[list[In]], list[Out]]):
        self.step = step

    def on_batch(self, values: list[In]) -> tuple[Iterable[Out], bool]:
        return self.step(values), StatefulBatchLogic.DISCARD

    def snapshot(self) -> None:
        return None


def by_person_shard(resolved: Iterable[Resolved]) -> list[tuple[str, list[Resolved]]]:
    """Group resolved events by person shard, keeping their order within each shard."""
    groups: dict[str, list[Resolved]] = {}
    for r in resolved:
        groups.setdefault(person_shard(r), []).append(r)
    return list(groups.items())


def _flat(lists: list[list[T]]) -> list[T]:
    return [item for items in lists for item in items]


def _stay_as_sent(_resume: None) -> _Pass[list[Resolved], list[Resolved]]:
    """A hop that only moves each shard's events to the worker that owns the shard."""

    def unchanged(values: list[list[Resolved]]) -> list[list[Resolved]]:
        return values

    return _Pass(unchanged)


# What decoding a batch gives: rejections, the known people's events by person shard,
# and the events for the resolver under RESOLVER_KEY.
Decoded = Rejection | tuple[str, list[Resolved]] | tuple[str, list[Event]]


def _is_rejection(item: object) -> bool:
    return isinstance(item, Rejection)


def _is_for_resolver(item: object) -> bool:
    return isinstance(item, tuple) and item[0] == RESOLVER_KEY


def report_failure(step: str, error: BaseException) -> None:
    """Log a step's failure with its real cause, before Bytewax turns it into a panic.

    A member whose step raises brings the cluster down with "Send thread panic" in
    every process, the failing one included: this line, and the member's error
    file, are where the cause survives.
    """
    what = f"{type(error).__name__}: {error}".splitlines()[0][:500]
    log.error("step %s failed: %s", step, what)
    if path := os.environ.get(MEMBER_ERRORS):
        with contextlib.suppress(OSError):
            Path(path).write_text(what)


def _reported(step: str, fn: Callable[[In], Out]) -> Callable[[In], Out]:
    """``fn``, reporting its failure (:func:`report_failure`) before it propagates."""

    def run(items: In) -> Out:
        try:
            return fn(items)
        except Exception as e:
            report_failure(step, e)
            raise

    return run


def build_flow(
    settings: Settings, store: RedisStore | None = None, clock: Clock = time.time, workers: int = 1
) -> Dataflow:
    """Build the dataflow for ``workers`` workers in all; tests may swap the store or clock.

    From decoding to the person stage, one Bytewax item carries a whole batch
    of events (a list): Bytewax's cost is per item and per step, about 1 us,
    which over the ten steps an event used to take one at a time was the
    biggest cost that was not our own code.
    """
    flow = Dataflow("leadflow")
    sources = input_sources(settings, kafka_cluster(settings))
    messages = op.input("input", flow, kafka_source(settings, sources))
    decoder = Decoder(settings, INPUT_NAMES.name, clock)
    lookup = (
        IdentityLookup(settings, store, INPUT_CLOCK.done_offset)
        if settings.dataflow.looks_up_identity(workers)
        else None
    )

    latency = metrics().stage_latency

    def decode(items: list[SourceItem]) -> list[Decoded]:
        events: list[Event] = []
        out: list[Decoded] = []
        for d in decoder(to_raw_messages(items)):
            if isinstance(d, Event):
                events.append(d)
            else:
                out.append(d)
        if events:
            latency.observe("decoded", [e.ingested_ms for e in events])
            known, unknown = lookup(events) if lookup else ([], events)
            if known:
                latency.observe("resolved", [r.event.ingested_ms for r in known])
            out.extend(by_person_shard(known))
            if unknown:
                # One resolver for the whole cluster: a constant key sends them to one worker.
                out.append((RESOLVER_KEY, unknown))
        return out

    split = op.branch(
        "split_rejected",
        op.flat_map_batch("decode", messages, _reported("decode", decode)),
        _is_rejection,
    )
    rejected: Stream[Rejection] = split.trues  # type: ignore[assignment]  # narrowed by _is_rejection
    paths = op.branch("split_known", split.falses, _is_for_resolver)
    to_resolver: KeyedStream[list[Event]] = paths.trues  # type: ignore[assignment]  # narrowed
    known: KeyedStream[list[Resolved]] = paths.falses  # type: ignore[assignment]  # the rest

    resolver = IdentityStage(settings, store)

    def resolve(batches: list[list[Event]]) -> list[tuple[str, list[Resolved]]]:
        resolved = resolver(_flat(batches))
        latency.observe("resolved", [r.event.ingested_ms for r in resolved])
        return by_person_shard(resolved)

    resolved = op.key_rm(
        "resolved",
        op.stateful_batch(
            "resolve_identity", to_resolver, lambda _: _Pass(_reported("resolve", resolve))
        ),
    )
    timers = op.input(
        "timers",
        flow,
        TimerSource(
            lambda: store or observed_store(settings.redis), 1.0, settings.dataflow.stop_at_end
        ),
    )
    timer_batches = op.map("timer_shards", timers, lambda t: (person_shard(t), [t]))
    # (shard, events) pairs: a keyed stream, which the type checker cannot see.
    keyed: KeyedStream[list[Resolved]] = op.merge("with_timers", resolved, known, timer_batches)
    to_owner: KeyedStream[list[Resolved]] = op.stateful_batch("to_owner", keyed, _stay_as_sent)
    owned = op.key_rm("drop_key", to_owner)
    person = PersonStage(settings, store, clock)

    def score_qualify_route(batches: list[list[Resolved]]) -> list[SinkMessage]:
        items = _flat(batches)
        outputs = person(items)
        latency.observe("applied", [r.event.ingested_ms for r in items])
        return [to_output_message(o, settings) for o in outputs]

    def dlq(r: Rejection) -> SinkMessage:
        return to_dlq_message(r, settings)

    out = op.merge(
        "records",
        op.map("dlq_records", rejected, dlq),
        op.flat_map_batch(
            "score_qualify_route", owned, _reported("score_qualify_route", score_qualify_route)
        ),
    )
    op.output("output", out, kafka_sink(settings))
    return flow


def flow_from_env() -> Dataflow:
    """The flow for ``python -m bytewax.run dataflows.pipeline:flow_from_env()``."""
    return build_flow(load_settings())
