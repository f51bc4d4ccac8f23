"""What each byte of Redis is for: the README's per-person memory, reproduced.

One ``leadflow run --stop-at-end`` over the bench workload (1 process, its own broker
and Redis), then:

- the keys the run left, by kind: how many, and their mean ``MEMORY USAGE``;
- used memory per person after the run, every key included;
- 1,000,000 people laid out as the engine lays them out (``suite.memory_at_scale``,
  every state the run left): all of it, the identity keys alone, the state keys alone,
  the state keys with empty values (what a key costs before its value), and all of it
  with the retention TTL the engine sets;
- the state's bytes per field of ``engine.person.StoredPerson``, the mean per person.

Usage: ``python -m benchmarks.memory [--people N] [--events N]`` (about two minutes
with the defaults, the suite's workload).
"""

from __future__ import annotations

import argparse
import tempfile
from collections import Counter
from pathlib import Path

import msgspec
import redis

from benchmarks import workload
from benchmarks.suite import (
    create,
    log,
    memory_at_scale,
    produce,
    redis_people,
    run_engine,
    stored_states,
)
from engine.person_records import StoredPerson
from engine.settings import load_settings
from leadflow.servers import LocalBroker, LocalRedis, free_port

PEOPLE_AT_SCALE = 1_000_000
KEYS_MEASURED = 3_000  # MEMORY USAGE per kind of key, on this many keys of each


def keys_by_kind(redis_url: str) -> dict[str, tuple[int, float]]:
    """Per kind of key (the part before its hash tag): how many, and mean MEMORY USAGE."""
    client = redis.Redis.from_url(redis_url)
    counts: Counter[str] = Counter()
    usage: dict[str, list[int]] = {}
    for key in client.scan_iter(count=10_000):
        kind = key.split(b"{")[0].decode()
        counts[kind] += 1
        if counts[kind] <= KEYS_MEASURED:
            usage.setdefault(kind, []).append(int(client.memory_usage(key, samples=0) or 0))
    client.close()
    return {kind: (n, sum(usage[kind]) / len(usage[kind])) for kind, n in counts.items()}


def bytes_per_field(states: list[bytes]) -> dict[str, float]:
    """Mean encoded bytes of each StoredPerson field (and the format byte), per person."""
    encode = msgspec.msgpack.Encoder().encode
    names = StoredPerson.__struct_fields__
    total: Counter[str] = Counter()
    for raw in states:
        total["(format byte and array header)"] += 1 + (1 if len(names) < 16 else 3)
        for name, value in zip(names, msgspec.msgpack.decode(raw[1:]), strict=False):
            total[name] += len(encode(value))
    return {name: n / len(states) for name, n in total.most_common()}


def main() -> None:
    """Run the engine once, then print where the bytes go."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--people", type=int, default=100_000)
    parser.add_argument("--events", type=int, default=250_000)
    args = parser.parse_args()
    messages = workload.encoded(args.people, args.events)
    config = workload.bench_config(Path(tempfile.mkdtemp()) / "config")
    with LocalBroker() as broker, LocalRedis("redis") as server:
        assert isinstance(broker, LocalBroker) and isinstance(server, LocalRedis)
        env = workload.engine_env(config, broker.bootstrap, server.url, free_port())
        settings = load_settings(config, env=env)
        create(broker.bootstrap, list(settings.topics.all()), 2)
        produce(broker.bootstrap, settings.topics.events, messages)
        log(f"Leadflow, 1 process, {len(messages):,} events")
        run_engine(env, 1)
        print("keys the run left (kind, count, mean MEMORY USAGE):")
        for kind, (n, mean) in sorted(keys_by_kind(server.url).items()):
            print(f"  {kind:14} {n:9,} {mean:8.0f} B")
        people, per_person = redis_people(server.url)
        print(f"used memory per person after the run: {per_person:,.0f} B ({people:,} people)")
        states = stored_states(server.url)
        ttl_ms = settings.limits.retention_days * 86_400_000
        log(f"{PEOPLE_AT_SCALE:,} people, five layouts")
        at_scale = {
            "all of it": memory_at_scale(server.url, states, PEOPLE_AT_SCALE),
            "identity keys alone": memory_at_scale(
                server.url, states, PEOPLE_AT_SCALE, states=False
            ),
            "state keys alone": memory_at_scale(
                server.url, states, PEOPLE_AT_SCALE, identity=False
            ),
            "state keys with empty values": memory_at_scale(
                server.url, [b""], PEOPLE_AT_SCALE, identity=False
            ),
            "all of it, with the retention TTL": memory_at_scale(
                server.url, states, PEOPLE_AT_SCALE, ttl_ms=ttl_ms
            ),
        }
        print(f"per person at {PEOPLE_AT_SCALE:,} people:")
        for what, size in at_scale.items():
            print(f"  {what:36} {size:6.0f} B")
        mean = sum(map(len, states)) / len(states)
        print(f"the state's value, {mean:.0f} B on average, by field:")
        for name, size in bytes_per_field(states).items():
            print(f"  {name:32} {size:6.1f} B")


if __name__ == "__main__":
    main()
