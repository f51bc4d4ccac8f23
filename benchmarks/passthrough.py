"""A pass-through Bytewax flow, Kafka -> decode -> Kafka.

``python -m benchmarks.passthrough BOOTSTRAP IN_TOPIC OUT_TOPIC [--to-end]``: the floor
any Bytewax engine pays, for the latency comparison of :mod:`benchmarks.suite` (running
until stopped) and its throughput and CPU row (``--to-end``: it stops at the end of the
input, as ``leadflow run --stop-at-end`` does).
"""

from __future__ import annotations

import sys

import bytewax.operators as op
import orjson
from bytewax.connectors.kafka import KafkaSink, KafkaSinkMessage, KafkaSource
from bytewax.dataflow import Dataflow
from bytewax.testing import run_main

from dataflows.kafka_io import SinkMessage, SourceItem
from leadflow.runner import tune_gc


def flow(bootstrap: str, inp: str, out: str, to_end: bool = False) -> Dataflow:
    """Forward every event, decoded and re-encoded, from ``inp`` to ``out``."""
    f = Dataflow("passthrough")
    source = KafkaSource(
        [bootstrap],
        [inp],
        tail=not to_end,
        add_config={"fetch.wait.max.ms": "10"},
        batch_size=1000,
    )
    messages = op.input("input", f, source)

    def forward(items: list[SourceItem]) -> list[SinkMessage]:
        out: list[SinkMessage] = []
        for m in items:
            value = getattr(m, "value", None)
            if value is not None:
                out.append(KafkaSinkMessage(None, orjson.dumps(orjson.loads(value))))
        return out

    op.output(
        "output", op.flat_map_batch("forward", messages, forward), KafkaSink([bootstrap], out)
    )
    return f


if __name__ == "__main__":
    tune_gc()
    bootstrap, inp, out = sys.argv[1:4]
    run_main(flow(bootstrap, inp, out, to_end="--to-end" in sys.argv[4:]))
