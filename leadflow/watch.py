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
from datetime import datetime
from typing import Any

import orjson
from confluent_kafka import Consumer, TopicPartition

from dataflows.kafka_io import client_options
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


def parse_iso_ms(text: str) -> float:
    """ISO-8601 UTC (``...Z``) to epoch milliseconds."""
    return datetime.fromisoformat(text).timestamp() * 1000


class OutputWatcher:
    """Consume the output topics from the beginning in a background thread."""

    def __init__(self, settings: Settings, on_decision: Callable[[dict[str, Any], float], None] | None = None):
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
            }
        )
        topics = settings.topics
        parts = []
        for topic in (topics.decisions, topics.lifecycle, topics.dlq):
            meta = self._consumer.list_topics(topic, timeout=10).topics[topic]
            parts += [TopicPartition(topic, p, 0) for p in meta.partitions]
        self._consumer.assign(parts)

    def start(self) -> OutputWatcher:
        """Start consuming."""
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop consuming and close the consumer."""
        self._stop.set()
        self._thread.join(10)
        self._consumer.close()

    def snapshot(self) -> Observed:
        """A copy of what has been read so far."""
        with self.lock:
            o = self.observed
            return Observed(
                dict(o.decisions), dict(o.lifecycle), list(o.dlq), list(o.latencies_ms), o.duplicates, o.last_change
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

    def _run(self) -> None:
        topics = self.settings.topics
        while not self._stop.is_set():
            for msg in self._consumer.consume(500, 0.1):
                if msg.error():
                    continue
                now_ms = time.time() * 1000
                with self.lock:
                    o = self.observed
                    o.last_change = time.monotonic()
                    if msg.topic() == topics.dlq:
                        headers = dict(msg.headers() or [])
                        o.dlq.append(
                            DlqRecord(
                                headers.get("leadflow.reason", b"").decode(),
                                headers.get("leadflow.detail", b"").decode(),
                                msg.value() or b"",
                            )
                        )
                        continue
                    record = orjson.loads(msg.value())
                    if msg.topic() == topics.lifecycle:
                        o.duplicates += record["record_id"] in o.lifecycle
                        o.lifecycle[record["record_id"]] = record
                        continue
                    if record["decision_id"] in o.decisions:
                        o.duplicates += 1
                        continue
                    o.decisions[record["decision_id"]] = record
                    latency = now_ms - parse_iso_ms(record["trigger"]["ingested_at"])
                    o.latencies_ms.append(latency)
                if self.on_decision is not None:
                    self.on_decision(record, latency)
