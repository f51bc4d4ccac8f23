"""The Leadflow dataflow.

::

    input (events + feedback topics)
      -> decode        raw bytes -> Event | Rejection            (flat_map_batch)
      -> split         rejections -> DLQ
      -> resolve_identity  Event -> (One-ID, Event), Redis x1-3 per batch,
                       on ONE worker (constant key): the identity graph's only writer
      -> (+ due timers, polled from Redis once a second by one worker)
      -> key_by_person / to_owner  route each person to one worker (stateless hop)
      -> score_qualify_route  Redis x3 per batch                  (flat_map_batch)
      -> output        decisions, lifecycle, DLQ                  (one producer per worker)

Person state lives in Redis, not in Bytewax: Bytewax recovery keeps only the
input offsets, and the stages make replay harmless (see engine.person). One
resolver takes every identity decision in order, so claims and merges never
race; keying by a shard of the One-ID then gives every person one home worker
(a merge moves events across workers, under compare-and-set, see
dataflows.stages.PersonStage).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import TypeVar

import bytewax.operators as op
from bytewax.dataflow import Dataflow, Stream
from bytewax.inputs import Source
from bytewax.operators import StatefulBatchLogic
from bytewax.outputs import Sink

from dataflows.kafka_io import (
    SinkMessage,
    SourceItem,
    kafka_sink,
    kafka_source,
    to_dlq_message,
    to_output_message,
    to_raw_messages,
)
from dataflows.stages import Clock, Decoder, IdentityStage, PersonStage, Resolved
from dataflows.timers import TimerSource
from engine.events import Event, Rejection
from engine.person import Output
from engine.settings import Settings, load_settings
from engine.store import RedisStore

# Routing keys for the person stage. More shards than workers ever run, so every
# worker gets some; few enough that a batch splits into few (key, batch) groups,
# which cost ~1.3 us each in Bytewax (shared/BYTEWAX.md).
PERSON_SHARDS = 64


def person_shard(r: Resolved) -> str:
    """The routing key of a resolved event: a stable shard of its One-ID."""
    return str(int(r.one_id[:8], 16) % PERSON_SHARDS)


RESOLVER_KEY = "identity"
In = TypeVar("In")
Out = TypeVar("Out")


def _unchanged(values: list[Resolved]) -> list[Resolved]:
    return values


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


def _is_event(item: Event | Rejection) -> bool:
    return isinstance(item, Event)


def build_flow(
    settings: Settings,
    source: Source[SourceItem] | None = None,
    sink: Sink[SinkMessage] | None = None,
    store: RedisStore | None = None,
    clock: Clock = time.time,
) -> Dataflow:
    """Build the dataflow; tests may swap the source, sink, store or clock."""
    flow = Dataflow("leadflow")
    messages = op.input("input", flow, source or kafka_source(settings))
    raw = op.flat_map_batch("unwrap", messages, to_raw_messages)
    decoded = op.flat_map_batch("decode", raw, Decoder(settings, clock))
    split = op.branch("split_rejected", decoded, _is_event)
    events: Stream[Event] = split.trues  # type: ignore[assignment]  # narrowed by _is_event
    rejected: Stream[Rejection] = split.falses  # type: ignore[assignment]  # complement of the above
    # One resolver for the whole cluster: a constant key sends every event to one worker.
    resolver = IdentityStage(settings, store)
    to_resolver = op.key_on("key_by_resolver", events, lambda _e: RESOLVER_KEY)
    resolved = op.key_rm(
        "resolved",
        op.stateful_batch("resolve_identity", to_resolver, lambda _resume: _Pass(resolver)),
    )
    timers = op.input(
        "timers",
        flow,
        TimerSource(
            lambda: store or RedisStore(settings.redis), 1.0, settings.dataflow.stop_at_end
        ),
    )
    keyed = op.key_on("key_by_person", op.merge("with_timers", resolved, timers), person_shard)
    owned = op.key_rm(
        "drop_key", op.stateful_batch("to_owner", keyed, lambda _resume: _Pass(_unchanged))
    )
    outputs = op.flat_map_batch("score_qualify_route", owned, PersonStage(settings, store, clock))

    def dlq(r: Rejection) -> SinkMessage:
        return to_dlq_message(r, settings)

    def record(o: Output) -> SinkMessage:
        return to_output_message(o, settings)

    out = op.merge(
        "records", op.map("dlq_records", rejected, dlq), op.map("output_records", outputs, record)
    )
    op.output("output", out, sink or kafka_sink(settings))
    return flow


def flow_from_env() -> Dataflow:
    """The flow for ``python -m bytewax.run dataflows.pipeline:flow_from_env()``."""
    return build_flow(load_settings())
