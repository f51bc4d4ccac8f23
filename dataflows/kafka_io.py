"""Kafka at the edges of the dataflow: client options, the source, the sink records."""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
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
from confluent_kafka import Consumer, Message, Producer, TopicPartition
from confluent_kafka import KafkaError as BrokerError
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
    tag = input_tag(cluster)
    return {settings.topics.events: tag + "e", settings.topics.feedback: tag + "f"}


def input_tag(cluster: dict[str, str]) -> str:
    """A short name of the input (:func:`kafka_cluster`): another cluster, another tag."""
    return hashlib.blake2b(
        orjson.dumps(cluster, option=orjson.OPT_SORT_KEYS), digest_size=3
    ).hexdigest()


class InputClock:
    """When this process last read input, for the readiness probe (leadflow.health)."""

    def __init__(self) -> None:
        self.partitions = 0  # input partitions this process reads
        self.last_read = time.monotonic()
        self.resets: list[str] = []  # input partitions found reset (a broker that lost its log)
        self.messages = 0  # messages read (not polls: an idle poll proves nothing)
        self.consumer_errors: dict[str, str] = {}  # topic -> the last consumer error, if any
        # Source name -> done offset, of the partitions this process reads (the identity
        # lookup's "is that earlier event applied yet", dataflows.stages.IdentityLookup).
        self.done: dict[str, int] = {}

    def done_offset(self, source: str) -> int:
        """The done offset of an input partition this process reads (-1: none yet)."""
        return self.done.get(source, -1)


INPUT_CLOCK = InputClock()
# Set by a stop signal (leadflow.runner): every input partition ends at its next read,
# so the flow drains what it has read and stops cleanly, with its last epoch committed.
STOPPING = threading.Event()
# An idle input partition checks this often that its position is not beyond its end.
END_CHECK_S = 5.0
# How long to try reading the last message before a position the watermark is behind.
END_PROBE_S = 3.0


class InputNames:
    """The source name of each input partition this process reads (engine.person.settle).

    ``<topic prefix><partition>``, with ``.<generation>`` once the partition's log
    was found lost and read again from its start (see :class:`_PositionedPartition`):
    a new log's offsets must never be taken for the old log's.
    """

    def __init__(self) -> None:
        self.prefixes: dict[str, str] = {}  # topic -> prefix (input_sources)
        self.generations: dict[tuple[str, int], int] = {}

    def base(self, topic: str, partition: int) -> str:
        """The partition's name in generation 0."""
        return self.prefixes[topic] + str(partition)

    def name(self, topic: str, partition: int) -> str:
        """The partition's current source name."""
        generation = self.generations.get((topic, partition), 0)
        base = self.base(topic, partition)
        return f"{base}.{generation}" if generation else base


INPUT_NAMES = InputNames()


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
        self,
        rebuild: Callable[[int | None], StatefulSourcePartition[SourceItem, int | None]],
        store: RedisStore,
        topic: str,
        partition: int,
        start: int | None,
        settings: Settings,
    ):
        self.rebuild = rebuild  # Bytewax's partition reading from an offset (None: the start)
        self.inner = rebuild(start)
        self.store = store
        self.topic, self.partition = topic, partition
        self.settings = settings
        self.snapshots: list[int] = []  # the last two snapshotted offsets, oldest first
        self.done = -1
        self.next_offset = start  # the offset the next message must have, at least
        self.held: list[SourceItem] = []  # messages after a reset, for the next batch
        self.check_end_at = time.monotonic() + END_CHECK_S

    @property
    def source(self) -> str:
        """This partition's current source name."""
        return INPUT_NAMES.name(self.topic, self.partition)

    def next_batch(self) -> Iterable[SourceItem]:
        """Record the done offset if it moved, then read a batch (cut at a reset)."""
        if STOPPING.is_set() and not self.held:
            raise StopIteration
        if len(self.snapshots) == 2 and self.snapshots[0] > self.done:
            self.done = self.snapshots[0]
            self.store.advance_input(self.source, self.done)
            INPUT_CLOCK.done[self.source] = self.done
        INPUT_CLOCK.last_read = time.monotonic()
        if self.held:
            batch, self.held = self.held, []
        else:
            batch = list(self.inner.next_batch())
        if not batch and self.next_offset is not None and time.monotonic() >= self.check_end_at:
            # Idle: a broker that lost its log may answer a position beyond its end with
            # nothing at all (the embedded one does) instead of an out-of-range error.
            self.check_end_at = time.monotonic() + END_CHECK_S
            end = _lost_end(self.settings, self.topic, self.partition, self.next_offset)
            if end is not None:
                self._reset(f"position {self.next_offset} is beyond the partition's end {end}", 0)
                self.inner.close()
                self.inner, self.next_offset = self.rebuild(None), None
                return []
        expected = self.next_offset
        for i, item in enumerate(batch):
            offset = item.msg.offset if isinstance(item, KafkaError) else item.offset
            if offset is None or offset < 0:
                continue
            if expected is not None and offset < expected:
                if i:  # what came before the reset is read under the old name
                    self.held = batch[i:]
                    self.next_offset = expected
                    return batch[:i]
                self._reset(f"read offset {offset} after {expected - 1}", offset)
            expected = offset + 1
        self.next_offset = expected
        INPUT_CLOCK.messages += len(batch)
        return batch

    def _reset(self, what: str, restart: int) -> None:
        """The broker's log of this partition went back: it lost data (restarted, recreated)."""
        old = self.source
        generation = self.store.input_generation(INPUT_NAMES.base(self.topic, self.partition)) + 1
        self.store.retire_input(INPUT_NAMES.base(self.topic, self.partition), old, generation)
        INPUT_NAMES.generations[(self.topic, self.partition)] = generation
        self.snapshots, self.done = [], -1
        note = (
            f"{self.topic}-{self.partition}: {what}; the broker lost this partition's log; "
            f"reading it again from offset {restart} as {self.source}"
        )
        log.error("input reset: %s", note)
        INPUT_CLOCK.resets = [*INPUT_CLOCK.resets[-9:], note]
        metrics().input_reset.labels(self.topic).inc()

    def next_awake(self) -> datetime | None:
        """When to read next (the Kafka partition's answer)."""
        return None if self.held else self.inner.next_awake()

    def snapshot(self) -> int | None:
        """The offset to resume from; remembered to learn the done offset."""
        if self.held:  # not read yet: resume at the first held message
            first = self.held[0]
            return first.msg.offset if isinstance(first, KafkaError) else first.offset
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
        INPUT_NAMES.prefixes.update(sources)

    def build_part(  # type: ignore[override]  # a wrapper of the partition Bytewax's returns
        self, step_id: str, for_part: str, resume_state: int | None
    ) -> _PositionedPartition:
        """The partition, resumed from the later of recovery and the done offset.

        A start beyond the partition's end means the broker lost its log (the
        embedded broker restarted, a topic re-created under the same cluster id):
        ``kafka.on_input_reset`` says what to do, never skip silently.
        """
        index, topic = for_part.split("-", 1)
        partition = int(index)
        store = observed_store(self.settings.redis)
        base = INPUT_NAMES.base(topic, partition)
        INPUT_NAMES.generations[(topic, partition)] = store.input_generation(base)
        source = INPUT_NAMES.name(topic, partition)
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
        end = None if start is None else _lost_end(self.settings, topic, partition, start)
        reset = end is not None
        if reset:
            problem = f"stored position {start} is beyond the partition's end {end}"
            if self.settings.kafka.on_input_reset == "stop":
                raise InputReset(
                    f"input {for_part}: {problem}: the broker lost data. Set kafka.on_input_reset"
                    ' = "earliest" to read it again from its start (see README, input resets)'
                )

        def rebuild(offset: int | None) -> StatefulSourcePartition[SourceItem, int | None]:
            return super(PositionedKafkaSource, self).build_part(step_id, for_part, offset)

        part = _PositionedPartition(
            rebuild, store, topic, partition, None if reset else start, self.settings
        )
        if reset:
            part._reset(problem, 0)
        INPUT_CLOCK.partitions += 1
        return part


class InputReset(RuntimeError):
    """The broker lost an input partition's log and the policy is to stop."""


def _lost_end(settings: Settings, topic: str, partition: int, position: int) -> int | None:
    """The partition's end when its log no longer reaches ``position``, else None.

    The high watermark alone is not proof: the embedded broker reports the base
    offset of its last record batch plus one, behind the real end when that batch
    holds several records. So a position beyond the watermark is confirmed by
    reading the last message before it: a log that still has it was not lost.
    """
    if position <= 0:
        return None
    consumer = Consumer(
        {
            **client_options(settings),
            "group.id": "leadflow-watermarks",
            "enable.auto.commit": False,
            "fetch.wait.max.ms": settings.kafka.fetch_wait_max_ms,
        }
    )
    try:
        _, high = consumer.get_watermark_offsets(TopicPartition(topic, partition), timeout=10)
        if high >= position:
            return None
        consumer.assign([TopicPartition(topic, partition, position - 1)])
        deadline = time.monotonic() + END_PROBE_S
        while time.monotonic() < deadline:
            msg = consumer.poll(0.2)
            if msg is not None and msg.error() is None:
                return None if msg.offset() == position - 1 else int(high)
        return int(high)
    except Exception as e:  # the source itself will report an unreachable broker
        log.warning("could not read the end of %s-%d: %s", topic, partition, e)
        return None
    finally:
        consumer.close()


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
    # A position the broker no longer has (it lost its log) restarts at the partition's
    # start, not its end: the events sent since are read; the reset is detected above.
    options.setdefault("auto.offset.reset", "earliest")
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


@dataclass(frozen=True)
class OutputMessage(KafkaSinkMessage[bytes | None, bytes | None]):
    """An engine record for the sink, with its event's broker ingest time (0: none).

    The time is not sent: the sink counts the record in the ``acknowledged`` stage
    latency once the broker has it.
    """

    ingested_ms: int = 0


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
        metrics().stage_latency.observe(
            "acknowledged", [m.ingested_ms for m in items if isinstance(m, OutputMessage)]
        )

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
            INPUT_CLOCK.consumer_errors[item.msg.topic or "?"] = str(item.err)
            continue
        if INPUT_CLOCK.consumer_errors and item.topic:
            INPUT_CLOCK.consumer_errors.pop(item.topic, None)  # reading again: recovered
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
        return OutputMessage(
            key=output.one_id.encode(),
            value=orjson.dumps(v["event"]),
            topic=settings.topics.dlq,
            headers=headers,
            ingested_ms=output.ingested_ms,
        )
    topic = settings.topics.decisions if output.kind == DECISION else settings.topics.lifecycle
    return OutputMessage(
        key=output.one_id.encode(),
        value=orjson.dumps(output.value),
        topic=topic,
        ingested_ms=output.ingested_ms,
    )
