"""Watch Leadflow's output topics: decisions, lifecycle records and the DLQ.

A background consumer that keeps what it reads, de-duplicated by record id
(outputs are at-least-once with stable ids), and the latency of each decision
from the broker time of its triggering event to the moment it was read.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import orjson
from confluent_kafka import Consumer, KafkaError, Message, TopicPartition

from dataflows.kafka_io import client_options
from engine.person import epoch_ms
from engine.settings import Settings


@dataclass
class DlqRecord:
    """A rejected message as read back from the DLQ."""

    reason: str
    detail: str
    value: bytes


@dataclass
class Observed:
    """Everything read so far (guarded by the watcher's lock)."""

    decisions: dict[str, dict[str, Any]] = field(default_factory=dict)
    lifecycle: dict[str, dict[str, Any]] = field(default_factory=dict)
    dlq: list[DlqRecord] = field(default_factory=list)
    latencies_ms: list[float] = field(default_factory=list)
    duplicates: int = 0
    last_change: float = field(default_factory=time.monotonic)


def _text(value: str | bytes | None) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value or ""


class OutputWatcher:
    """Consume the output topics from the beginning in a background thread."""

    def __init__(
        self, settings: Settings, on_decision: Callable[[dict[str, Any], float], None] | None = None
    ):
        self.settings = settings
        self.on_decision = on_decision
        self.observed = Observed()
        self.lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="output-watcher", daemon=True)
        self._consumer = Consumer(
            {
                **client_options(settings),
                "group.id": "leadflow-watcher",
                "enable.auto.commit": False,
                "fetch.wait.max.ms": settings.kafka.fetch_wait_max_ms,
                "enable.partition.eof": True,
            }
        )
        topics = settings.topics
        parts = []
        for topic in (topics.decisions, topics.lifecycle, topics.dlq):
            meta = self._consumer.list_topics(topic, timeout=10).topics[topic]
            parts += [TopicPartition(topic, p, 0) for p in meta.partitions]
        self._consumer.assign(parts)
        self._partitions = len(parts)

    def start(self) -> OutputWatcher:
        """Start consuming."""
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop consuming and close the consumer."""
        self._stop.set()
        if self._thread.ident is not None:
            self._thread.join(10)
        self._consumer.close()

    def snapshot(self) -> Observed:
        """A copy of what has been read so far."""
        with self.lock:
            o = self.observed
            return Observed(
                dict(o.decisions),
                dict(o.lifecycle),
                list(o.dlq),
                list(o.latencies_ms),
                o.duplicates,
                o.last_change,
            )

    def wait_until(self, condition: Callable[[Observed], bool], timeout_s: float) -> Observed:
        """Wait until ``condition`` holds for what was read; raise TimeoutError otherwise."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            seen = self.snapshot()
            if condition(seen):
                return seen
            time.sleep(0.05)
        seen = self.snapshot()
        raise TimeoutError(
            f"outputs did not settle in {timeout_s}s: {len(seen.decisions)} decisions, "
            f"{len(seen.lifecycle)} lifecycle records, {len(seen.dlq)} DLQ messages"
        )

    def read_to_end(self, timeout_s: float = 30.0) -> Observed:
        """Read synchronously until every output partition reports its end (no thread)."""
        at_end: set[tuple[str, int]] = set()
        deadline = time.monotonic() + timeout_s
        while len(at_end) < self._partitions:
            if time.monotonic() > deadline:
                raise TimeoutError(f"output topics not read to the end within {timeout_s}s")
            for msg in self._consumer.consume(500, 0.2):
                err = msg.error()
                if err is None:
                    self._handle(msg)
                elif err.code() == KafkaError._PARTITION_EOF:
                    at_end.add((str(msg.topic()), int(msg.partition() or 0)))
        return self.snapshot()

    def _run(self) -> None:
        while not self._stop.is_set():
            for msg in self._consumer.consume(500, 0.1):
                if msg.error() is None:
                    self._handle(msg)

    def _handle(self, msg: Message) -> None:
        topics = self.settings.topics
        now_ms = time.time() * 1000
        with self.lock:
            o = self.observed
            o.last_change = time.monotonic()
            if msg.topic() == topics.dlq:
                raw = msg.headers() or []
                pairs = raw.items() if isinstance(raw, dict) else raw  # consumers get a list
                headers = {k: _text(v) for k, v in pairs}
                reason = headers.get("leadflow.reason", "")
                o.dlq.append(
                    DlqRecord(reason, headers.get("leadflow.detail", ""), msg.value() or b"")
                )
                return
            record = orjson.loads(msg.value() or b"null")
            if msg.topic() == topics.lifecycle:
                o.duplicates += record["record_id"] in o.lifecycle
                o.lifecycle[record["record_id"]] = record
                return
            if record["decision_id"] in o.decisions:
                o.duplicates += 1
                return
            o.decisions[record["decision_id"]] = record
            latency = now_ms - (epoch_ms(record["trigger"]["ingested_at"]) or now_ms)
            o.latencies_ms.append(latency)
        if self.on_decision is not None:
            self.on_decision(record, latency)
