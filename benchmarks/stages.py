"""CPU per event of the engine's stages against a real Redis, without Kafka or Bytewax.

Starts a local Redis, decodes the synthetic stream for ``--people`` personas and
runs it through the decoder, the resolver (``IdentityStage``) and the person
stage in batches of ``--batch`` events, as one worker does; prints this
process's CPU time per event (Redis is another process, so not counted) and the
wall time, as JSON.

Wall and CPU time both move ±20 % run to run on this VM. For an A/B of a small
change, count instructions instead, which repeat within 0.2 %: run it twice under
callgrind, once with ``--skip`` (everything but the stages: start-up, the
synthetic stream), and divide the difference by the events::

    valgrind --tool=callgrind --callgrind-out-file=/tmp/cg.out \\
        python -m benchmarks.stages --people 2000
    valgrind --tool=callgrind --callgrind-out-file=/tmp/cg-skip.out \\
        python -m benchmarks.stages --people 2000 --skip

(``PYTHONHASHSEED=0`` for both; about 100 s each.) ``callgrind_annotate`` on the
output names the compiled rules too (``CPyDef_person___apply_event``), which
py-spy folds into their callers.
"""

from __future__ import annotations

import argparse
import json
import time

import orjson
from msgspec.structs import replace

import engine
from dataflows.stages import Decoder, IdentityStage, PersonStage, RawMessage
from engine.events import Event, Origin
from engine.person import iso
from engine.settings import load_settings
from leadflow.servers import LocalRedis
from leadflow.synthetic import synthetic_events

EPOCH_MS = (int(time.time()) // 3600 - 1) * 3_600_000  # recent: see benchmarks.workload


def main() -> None:
    """Run the stages over the stream and print one JSON object."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--people", type=int, default=20_000)
    parser.add_argument("--batch", type=int, default=500, help="events per batch (default 500)")
    parser.add_argument(
        "--owner-cache-size", type=int, help="dataflow.owner_cache_size (default: the config's)"
    )
    parser.add_argument("--skip", action="store_true", help="set up only, run no stage")
    args = parser.parse_args()
    with LocalRedis() as redis:
        assert isinstance(redis, LocalRedis)
        settings = load_settings(env={"LEADFLOW_REDIS_URL": redis.url})
        # No rate limit per person, as in workload.bench_config: the peers have none.
        settings = replace(settings, limits=replace(settings.limits, max_events_per_minute=0))
        if args.owner_cache_size is not None:
            dataflow = replace(settings.dataflow, owner_cache_size=args.owner_cache_size)
            settings = replace(settings, dataflow=dataflow)
        raw = []
        for n, event in enumerate(synthetic_events(args.people, seed=1)):
            event["timestamp"] = iso(EPOCH_MS + n)
            origin = Origin(settings.topics.events, 0, n)
            raw.append(RawMessage(orjson.dumps(event), origin, EPOCH_MS + n))
        decoder = Decoder(settings, lambda _topic, _partition: "e0")
        resolver, people = IdentityStage(settings, None), PersonStage(settings, None)
        cpu, wall = time.process_time(), time.perf_counter()
        for i in range(0, 0 if args.skip else len(raw), args.batch):
            events = [e for e in decoder(raw[i : i + args.batch]) if isinstance(e, Event)]
            people(resolver(events))
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    print(
        json.dumps(
            {
                "compiled": engine.compiled,
                "events": len(raw),
                "cpu_us_per_event": round(cpu / len(raw) * 1e6, 1),
                "wall_us_per_event": round(wall / len(raw) * 1e6, 1),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
