"""Throughput of the real dataflow, beside a pass-through flow on the same input.

Starts a local broker and Redis, produces the synthetic stream for ``--people``
personas into a one-partition topic, then times, on one worker:

* pass-through: Kafka -> Bytewax (decode only) -> Kafka, the floor any engine pays;
* leadflow: the real dataflow (decode, identity, scoring, routing, outputs).

Both drain the same pre-filled topic and stop at its end, so the figure is
sustained throughput with no producer in the way. Usage::

    python -m benchmarks.throughput --people 30000
"""

from __future__ import annotations

import argparse
import json
import time

import bytewax.operators as op
import orjson
from bytewax.connectors.kafka import KafkaSinkMessage
from bytewax.dataflow import Dataflow
from bytewax.testing import run_main
from confluent_kafka import Producer
from msgspec.structs import replace

from dataflows.kafka_io import SinkMessage, SourceItem, client_options, kafka_sink, kafka_source
from dataflows.pipeline import build_flow
from engine.person import iso
from engine.settings import Settings, load_settings
from leadflow.runner import tune_gc
from leadflow.servers import LocalBroker, LocalRedis
from leadflow.synthetic import synthetic_events
from leadflow.topics import create_topics

EPOCH_MS = (int(time.time()) // 3600 - 1) * 3_600_000  # recent: see benchmarks.workload


def produce(settings: Settings, people: int) -> int:
    """Fill the events topic; return the number of events."""
    producer = Producer({**client_options(settings), "linger.ms": 20, "batch.num.messages": 10_000})
    n = 0
    for n, event in enumerate(synthetic_events(people, seed=1), 1):
        event["timestamp"] = iso(EPOCH_MS + n)
        key = str(event["anonymousId"]).encode()
        producer.produce(settings.topics.events, orjson.dumps(event), key)
        if n % 10_000 == 0:
            producer.poll(0)
    producer.flush(60)
    return n


def passthrough_flow(settings: Settings) -> Dataflow:
    """Kafka -> JSON decode -> Kafka: what moving the bytes through Bytewax costs."""
    flow = Dataflow("passthrough")
    messages = op.input("input", flow, kafka_source(settings))

    def forward(items: list[SourceItem]) -> list[SinkMessage]:
        out: list[SinkMessage] = []
        for m in items:
            value = getattr(m, "value", None)
            if value is not None:
                orjson.loads(value)
                out.append(KafkaSinkMessage(None, value, topic=settings.topics.lifecycle))
        return out

    op.output("output", op.flat_map_batch("forward", messages, forward), kafka_sink(settings))
    return flow


def timed(flow: Dataflow) -> float:
    """Seconds to run ``flow`` to the end of its input, tuned as ``leadflow run`` is."""
    tune_gc()
    start = time.perf_counter()
    run_main(flow)
    return time.perf_counter() - start


def main() -> None:
    """Run the benchmark and print one JSON object."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--people", type=int, default=30_000)
    args = parser.parse_args()
    with LocalBroker() as broker, LocalRedis() as redis:
        assert isinstance(broker, LocalBroker) and isinstance(redis, LocalRedis)
        env = {"LEADFLOW_KAFKA_BOOTSTRAP": broker.bootstrap, "LEADFLOW_REDIS_URL": redis.url}
        settings = load_settings(env=env)
        # No rate limit per person, as in workload.bench_config: the peers have none.
        settings = replace(
            settings,
            dataflow=replace(settings.dataflow, stop_at_end=True),
            limits=replace(settings.limits, max_events_per_minute=0),
        )
        create_topics(settings, partitions=1)
        events = produce(settings, args.people)
        passthrough_s = timed(passthrough_flow(settings))
        leadflow_s = timed(build_flow(settings))
    print(
        json.dumps(
            {
                "events": events,
                "people": args.people,
                "passthrough_events_per_s": round(events / passthrough_s),
                "leadflow_events_per_s": round(events / leadflow_s),
                "leadflow_us_per_event": round(leadflow_s / events * 1e6, 2),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
