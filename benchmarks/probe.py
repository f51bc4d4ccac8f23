"""The latency probe: a separate process that notes when each output record arrives.

``python -m benchmarks.probe BOOTSTRAP OUT_FILE SECONDS TOPIC...`` reads the
topics from their current end for ``SECONDS`` and writes one line per record:
``<messageId> <arrival epoch seconds>``. The messageId is the record's
``message_id`` (lifecycle records), ``trigger.message_id`` (decisions) or
``messageId`` (a forwarded event).
"""

from __future__ import annotations

import sys
import time

import orjson
from confluent_kafka import OFFSET_END, Consumer, TopicPartition


def message_id(value: bytes) -> str:
    """The id of the input event a record answers ('' if none)."""
    try:
        doc = orjson.loads(value)
    except orjson.JSONDecodeError:
        return ""
    if not isinstance(doc, dict):
        return ""
    trigger = doc.get("trigger")
    if isinstance(trigger, dict):
        return str(trigger.get("message_id", ""))
    return str(doc.get("message_id") or doc.get("messageId") or "")


def main() -> None:
    """Consume and note arrival times."""
    bootstrap, out, seconds, *topics = sys.argv[1:]
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": "leadflow-bench-probe",
            "enable.auto.commit": False,
            "fetch.wait.max.ms": 5,
        }
    )
    parts = []
    for topic in topics:
        meta = consumer.list_topics(topic, timeout=10).topics[topic]
        parts += [TopicPartition(topic, p, OFFSET_END) for p in meta.partitions]
    consumer.assign(parts)
    print("ready", flush=True)
    deadline = time.time() + float(seconds)
    with open(out, "w") as f:
        while time.time() < deadline:
            # Wait for one record, then take what else is there without waiting:
            # consume(n, timeout) blocks until n records or the timeout, which
            # would add up to the timeout to every latency measured.
            first = consumer.poll(0.1)
            if first is None:
                continue
            for msg in [first, *consumer.consume(1000, 0)]:
                if msg.error() is None:
                    now = time.time()
                    mid = message_id(msg.value() or b"")
                    if mid:
                        f.write(f"{mid} {now:.6f}\n")
            f.flush()  # the suite reads the file while we write it (warm-up)
    consumer.close()


if __name__ == "__main__":
    main()
