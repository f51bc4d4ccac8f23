"""The Quix Streams peer: Leadflow's scoring and qualification in a Quix Streams app.

Runs in its own virtual environment (``.venv-quix``: Quix Streams pins an older
confluent-kafka), with this checkout on ``PYTHONPATH`` for the engine's pure
domain code. What it does: decode and validate each event, keep the person's
state in Quix's RocksDB state keyed by the message key (the cookie), apply the
same scoring, cleansing, fit and MQL rule (``engine.person.apply_event``), and
write the records it produces to the output topic. What it does not do, because
its partitioned state cannot: resolve identities across keys (merges), assign
SDRs fairly across partitions (it picks by hash), timers.

``python -m benchmarks.quix_peer BOOTSTRAP IN OUT COUNT|serve STATE_DIR [GROUP]`` —
with a count, it stops after that many events and prints the events per second.
With ``serve`` and a consumer ``GROUP`` shared by several of them (one consumer
each, the partitions shared out by the group), each writes ``events first last``
(a count and two ``time.time()`` stamps) to ``STATE_DIR/progress`` every 1,000
events, for the suite to add up (benchmarks.suite.quix_peers).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import orjson
from quixstreams import Application  # type: ignore[import-not-found]
from quixstreams.state import State  # type: ignore[import-not-found]

from benchmarks import workload
from engine.person import PersonState, Rulebook, apply_event, decode_state, encode_state
from engine.sales import complete_routing, route_promotion
from engine.settings import load_settings


def main() -> None:
    """Run the app."""
    bootstrap, inp, out, count, state_dir = sys.argv[1:6]
    group = sys.argv[6] if len(sys.argv) > 6 else f"quix-peer-{time.time_ns()}"
    progress = Path(state_dir) / "progress"
    partial = Path(state_dir) / "progress.partial"
    settings = load_settings(env={})
    rules = Rulebook(settings)
    roster = settings.roster
    app = Application(
        broker_address=bootstrap,
        consumer_group=group,
        auto_offset_reset="earliest",
        state_dir=state_dir,
        consumer_extra_config={"fetch.wait.max.ms": 10},
    )
    source = app.topic(inp, value_deserializer="bytes", key_deserializer="bytes")
    sink = app.topic(out, value_serializer="bytes", key_serializer="bytes")
    limit = 0 if count == "serve" else int(count)
    seen = {"n": 0, "start": 0.0, "first": 0.0}

    def process(value: bytes, state: State) -> list[bytes]:
        if seen["n"] == 0:
            seen["start"], seen["first"] = time.perf_counter(), time.time()
        seen["n"] += 1
        if limit and seen["n"] >= limit:
            app.stop()
        if seen["n"] % 1000 == 0:
            # Replaced whole, never truncated in place: the suite reads it meanwhile.
            partial.write_text(f"{seen['n']} {seen['first']} {time.time()}")
            partial.replace(progress)
        now_ms = int(time.time() * 1000)
        event = workload.decode(value, inp, now_ms)
        if event is None:
            return []
        # Quix state holds JSON values: the state's bytes as Latin-1 text (one char a byte).
        raw = state.get("p")
        person = decode_state("q", raw.encode("latin-1")) if raw else PersonState("q", is_new=True)
        records, promotion = apply_event(person, event, rules, now_ms)
        if promotion is not None:
            routing = route_promotion(promotion, rules, now_ms)
            sdrs = roster.for_queue(routing.queue)
            sdr = sdrs[hash(event.anonymous_id) % len(sdrs)]
            records = complete_routing(routing, sdr, roster, rules, now_ms)
        state.set("p", encode_state(person).decode("latin-1"))
        return [orjson.dumps(r.value) for r in records]

    sdf: Any = app.dataframe(source)
    sdf = sdf.apply(process, stateful=True, expand=True)
    sdf.to_topic(sink)
    app.run()
    if limit:
        elapsed = time.perf_counter() - seen["start"]
        print(f"{seen['n'] / elapsed:.1f}", flush=True)


if __name__ == "__main__":
    main()
