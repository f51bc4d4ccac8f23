"""Kafka at the edges of the dataflow: client options, the source, the sink records."""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Iterable
from datetime import datetime
from typing import Any

import orjson
from bytewax.connectors.kafka import (
    KafkaError,
    KafkaSinkMessage,
    KafkaSource,
    KafkaSourceMessage,
)
from bytewax.inputs import StatefulSourcePartition
from bytewax.outputs import DynamicSink, StatelessSinkPartition
from confluent_kafka import KafkaError as BrokerError
from confluent_kafka import Message, Producer
from confluent_kafka.admin import AdminClient

from dataflows.metrics import metrics, observed_store
from dataflows.stages import RawMessage
from engine.events import Origin, Rejection
from engine.person import DECISION, DLQ, Output
from engine.settings import Settings
from engine.store import RedisStore

log = logging.getLogger(__name__)

SourceItem = KafkaSourceMessage[bytes | None, bytes | None] | KafkaError[bytes | None, bytes | None]
SinkMessage = KafkaSinkMessage[bytes | None, bytes | None]


ClientConfig = dict[str, str | int | float | bool]
PREFETCH_KBYTES = "8192"


def client_options(settings: Settings) -> ClientConfig:
    """Librdkafka options shared by every client: bootstrap plus ``kafka.options``."""
    return {"bootstrap.servers": settings.kafka.bootstrap, **settings.kafka.options}


def kafka_cluster(settings: Settings) -> dict[str, str]:
    """What identifies the input: bootstrap servers, the broker's cluster id, input topics."""
    admin = AdminClient(client_options(settings))
    cluster_id = admin.list_topics(timeout=10).cluster_id or ""
    topics = f"{settings.topics.events},{settings.topics.feedback}"
    return {"bootstrap": settings.kafka.bootstrap, "cluster_id": cluster_id, "topics": topics}


def input_sources(settings: Settings, cluster: dict[str, str]) -> dict[str, str]:
    """Input topic -> the prefix of its partitions' source names (``<prefix><partition>``).

    A source name is short (it is kept in people's states, see
    engine.person.settle) and changes with the input's identity
    (:func:`kafka_cluster`): offsets of another cluster or topic never mix.
    """
    tag = hashlib.blake2b(orjson.dumps(cluster, option=orjson.OPT_SORT_KEYS), digest_size=3)
    return {
        settings.topics.events: tag.hexdigest() + "e",
        settings.topics.feedback: tag.hexdigest() + "f",
    }


class InputClock:
    """When this process last read input, for the readiness probe (leadflow.health)."""

    def __init__(self) -> None:
        self.partitions = 0  # input partitions this process reads
        self.last_read = time.monotonic()


INPUT_CLOCK = InputClock()


class _PositionedPartition(StatefulSourcePartition[SourceItem, int | None]):
    """A Kafka partition that records, in Redis, the offset below which input is done.

    Bytewax snapshots a partition's offset when an epoch ends, and reads the
    next epoch's input only once every output has finished the epochs before
    (its back-pressure). So when a batch is read after two snapshots, every
    message below the older one has been applied to Redis and its records
    acknowledged by the broker: that offset is *done*. (One snapshot would do;
    the second is a margin.) Input is never read again from below it (see
    :class:`PositionedKafkaSource`), so people forget those positions.
    """

    def __init__(
        self, inner: StatefulSourcePartition[SourceItem, int | None], store: RedisStore, source: str
    ):
        self.inner = inner
        self.store = store
        self.source = source
        self.snapshots: list[int] = []  # the last two snapshotted offsets, oldest first
        self.done = -1

    def next_batch(self) -> Iterable[SourceItem]:
        """Record the done offset if it moved, then read a batch."""
        if len(self.snapshots) == 2 and self.snapshots[0] > self.done:
            self.done = self.snapshots[0]
            self.store.advance_input(self.source, self.done)
        INPUT_CLOCK.last_read = time.monotonic()
        return self.inner.next_batch()

    def next_awake(self) -> datetime | None:
        """When to read next (the Kafka partition's answer)."""
        return self.inner.next_awake()

    def snapshot(self) -> int | None:
        """The offset to resume from; remembered to learn the done offset."""
        offset = self.inner.snapshot()
        if offset is not None and offset >= 0:
            self.snapshots = [*self.snapshots[-1:], offset]
        return offset

    def close(self) -> None:
        """Close the consumer and the Redis connection."""
        self.inner.close()
        self.store.close()


class PositionedKafkaSource(KafkaSource):
    """Bytewax's Kafka source, starting no lower than the done offsets kept in Redis.

    A partition resumes from Bytewax's recovery snapshot or from its done
    offset in Redis, whichever is later: the events below the done offset are
    applied and delivered, and people have forgotten their positions. So losing
    the recovery directory (a new disk, a wiped volume) replays nothing already
    done, instead of the whole input.
    """

    def __init__(self, settings: Settings, sources: dict[str, str], **kwargs: Any):
        super().__init__(**kwargs)
        self.settings = settings
        self.sources = sources

    def build_part(  # type: ignore[override]  # a wrapper of the partition Bytewax's returns
        self, step_id: str, for_part: str, resume_state: int | None
    ) -> _PositionedPartition:
        """The partition, resumed from the later of recovery and the done offset."""
        index, topic = for_part.split("-", 1)
        source = self.sources[topic] + index
        store = observed_store(self.settings.redis)
        done = store.inputs_done().get(source)
        start = resume_state
        if done is not None and (start is None or done > start):
            log.info(
                "input %s starts at offset %d (done in Redis), not %s (recovery)",
                for_part,
                done,
                "the beginning" if start is None else start,
            )
            start = done
        INPUT_CLOCK.partitions += 1
        return _PositionedPartition(super().build_part(step_id, for_part, start), store, source)


def kafka_source(settings: Settings, sources: dict[str, str] | None = None) -> KafkaSource:
    """The input: events (untrusted) and feedback (trusted) topics, one source.

    With ``sources`` (:func:`input_sources`) it records its done offsets in
    Redis (:class:`PositionedKafkaSource`), as the engine needs; without, it is
    Bytewax's plain Kafka source (the pass-through benchmark).
    """
    options = dict(settings.kafka.options)
    options.setdefault("fetch.wait.max.ms", str(settings.kafka.fetch_wait_max_ms))
    # Bound what librdkafka prefetches while the flow is busy (its default is 64 MiB
    # per partition): a slow Redis then slows reading instead of filling memory.
    options.setdefault("queued.max.messages.kbytes", PREFETCH_KBYTES)
    args: dict[str, Any] = {
        "brokers": settings.kafka.bootstrap.split(","),
        "topics": [settings.topics.events, settings.topics.feedback],
        "tail": not settings.dataflow.stop_at_end,
        "add_config": options,
        "batch_size": settings.kafka.source_batch_size,
        # Broker errors become items we count and log; the flow never dies on them.
        "raise_on_errors": False,
    }
    if sources is None:
        return KafkaSource(**args)
    return PositionedKafkaSource(settings, sources, **args)


class DeliveryFailed(RuntimeError):
    """The broker refused or lost an output record: stop, so recovery replays its event."""


class _RecordsPartition(StatelessSinkPartition[SinkMessage]):
    """Produce a batch and wait until the broker has every record of it.

    Bytewax's own Kafka sink flushes without looking at delivery reports, so a
    record that times out is dropped without a word. Here a failed delivery
    raises :class:`DeliveryFailed`: the process stops before the epoch is
    committed, and the replay after the restart re-emits the record (the
    engine's outbox makes that idempotent). A full local queue waits for the
    broker instead of failing, and records never time out by default
    (``message.timeout.ms = 0``): a broker outage stalls the flow, which then
    stops reading input, instead of losing output.
    """

    def __init__(self, producer: Producer):
        self.producer = producer
        self.failures: list[str] = []

    def _delivered(self, err: BrokerError | None, msg: Message) -> None:
        if err is not None:
            self.failures.append(f"{msg.topic()}: {err}")

    def write_batch(self, items: list[SinkMessage]) -> None:
        """Produce every record, then wait for all of them to be acknowledged."""
        for m in items:
            headers: list[tuple[str, str | bytes | None]] = [*m.headers]
            while True:
                try:
                    self.producer.produce(
                        m.topic or "",
                        m.value,
                        m.key,
                        headers=headers,
                        on_delivery=self._delivered,
                    )
                    break
                except BufferError:  # the local queue is full: let the broker drain it
                    self.producer.poll(0.1)
        while self.producer.flush(1.0):
            log.warning("waiting for the broker to acknowledge output records")
        if self.failures:
            failures, self.failures = self.failures, []
            metrics().kafka_errors.inc(len(failures))
            raise DeliveryFailed(f"{len(failures)} output record(s) not delivered: {failures[0]}")

    def close(self) -> None:
        """Deliver what is still queued."""
        self.producer.flush(30.0)


class RecordsSink(DynamicSink[SinkMessage]):
    """The output: one producer per worker, topic chosen per record, nothing lost silently."""

    def __init__(self, options: ClientConfig):
        self.options = options

    def build(self, step_id: str, worker_index: int, worker_count: int) -> _RecordsPartition:
        """A producer for this worker."""
        return _RecordsPartition(Producer(self.options))


def kafka_sink(settings: Settings) -> RecordsSink:
    """The output sink, with the shared client options (``message.timeout.ms`` 0 by default)."""
    options = client_options(settings)
    options.setdefault("message.timeout.ms", 0)
    return RecordsSink(options)


def to_raw_messages(items: list[SourceItem]) -> list[RawMessage]:
    """Unwrap Kafka messages for the decoder; count and log consumer errors."""
    out = []
    for item in items:
        if isinstance(item, KafkaError):
            metrics().kafka_errors.inc()
            log.warning("kafka consumer error on %s: %s", item.msg.topic, item.err)
            continue
        ts_type, ts = item.timestamp if item.timestamp else (0, 0)
        origin = Origin(item.topic or "", item.partition or 0, item.offset or 0, item.key)
        out.append(RawMessage(item.value, origin, ts if ts_type else 0))
    return out


def to_dlq_message(rejection: Rejection, settings: Settings) -> SinkMessage:
    """The original bytes, untouched, with the reason and source position as headers."""
    o = rejection.origin
    headers = [
        ("leadflow.reason", rejection.reason.encode()),
        ("leadflow.detail", rejection.detail.encode("utf-8", "replace")),
        ("leadflow.source.topic", o.topic.encode()),
        ("leadflow.source.partition", str(o.partition).encode()),
        ("leadflow.source.offset", str(o.offset).encode()),
    ]
    return KafkaSinkMessage(
        key=o.key, value=rejection.raw, topic=settings.topics.dlq, headers=headers
    )


def to_output_message(output: Output, settings: Settings) -> SinkMessage:
    """A decision or lifecycle record as JSON, keyed by One-ID (a refused event: to the DLQ)."""
    if output.kind == DLQ:
        v = output.value
        headers = [
            ("leadflow.reason", v["reason"].encode()),
            ("leadflow.detail", v["detail"].encode("utf-8", "replace")),
            ("leadflow.one_id", output.one_id.encode()),
            ("leadflow.message_id", v["message_id"].encode("utf-8", "replace")),
        ]
        return KafkaSinkMessage(
            key=output.one_id.encode(),
            value=orjson.dumps(v["event"]),
            topic=settings.topics.dlq,
            headers=headers,
        )
    topic = settings.topics.decisions if output.kind == DECISION else settings.topics.lifecycle
    return KafkaSinkMessage(
        key=output.one_id.encode(), value=orjson.dumps(output.value), topic=topic
    )
