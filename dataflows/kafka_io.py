"""Kafka at the edges of the dataflow: client options, the source, the sink records."""

from __future__ import annotations

import logging

import orjson
from bytewax.connectors.kafka import (
    KafkaError,
    KafkaSink,
    KafkaSinkMessage,
    KafkaSource,
    KafkaSourceMessage,
)

from dataflows.metrics import metrics
from dataflows.stages import RawMessage
from engine.events import Origin, Rejection
from engine.person import DECISION, Output
from engine.sales import DLQ
from engine.settings import Settings

log = logging.getLogger(__name__)

SourceItem = KafkaSourceMessage[bytes | None, bytes | None] | KafkaError[bytes | None, bytes | None]
SinkMessage = KafkaSinkMessage[bytes | None, bytes | None]


ClientConfig = dict[str, str | int | float | bool]


def client_options(settings: Settings) -> ClientConfig:
    """Librdkafka options shared by every client: bootstrap plus ``kafka.options``."""
    return {"bootstrap.servers": settings.kafka.bootstrap, **settings.kafka.options}


def kafka_source(settings: Settings) -> KafkaSource:
    """The input: events (untrusted) and feedback (trusted) topics, one source."""
    options = dict(settings.kafka.options)
    options.setdefault("fetch.wait.max.ms", str(settings.kafka.fetch_wait_max_ms))
    return KafkaSource(
        brokers=settings.kafka.bootstrap.split(","),
        topics=[settings.topics.events, settings.topics.feedback],
        tail=not settings.dataflow.stop_at_end,
        add_config=options,
        batch_size=settings.kafka.source_batch_size,
        # Broker errors become items we count and log; the flow never dies on them.
        raise_on_errors=False,
    )


def kafka_sink(settings: Settings) -> KafkaSink:
    """The output: one producer per worker, topic chosen per record."""
    options = dict(settings.kafka.options)
    return KafkaSink(brokers=settings.kafka.bootstrap.split(","), topic=None, add_config=options)


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
