"""What the one identity resolver can carry, alone and behind the workers' lookups.

The workload's events, decoded, go through the resolver (``IdentityStage``) in
batches of 500 on one thread against a real Redis: its rate is the ceiling of a
flow where every event goes through it. Then the second half of the workload goes
through a lookup (``IdentityLookup``) first, as every worker does: the share it
finds, and the rate of the resolver on what is left, give the ceiling of the
stream the one resolver serves when only graph changes reach it.

Usage: ``python -m benchmarks.identity [--people N] [--events N]`` (it starts its own
Redis), or :func:`resolver_ceiling` from the suite.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from msgspec.structs import replace

from benchmarks import workload
from dataflows.stages import IdentityLookup, IdentityStage
from engine.events import Event, Origin, decode_event
from engine.settings import load_settings
from leadflow.servers import LocalRedis

BATCH = 500


def decoded(messages: list[tuple[bytes, bytes]]) -> list[Event]:
    """The workload's valid events, each with an input position of one source."""
    events = []
    for offset, (_, value) in enumerate(messages):
        event = decode_event(
            value,
            Origin("bench", 0, offset),
            ingested_ms=workload.EPOCH_MS + 10**10,
            trusted=False,
            max_bytes=32_768,
            max_future_skew_ms=10**12,
        )
        if isinstance(event, Event):
            event.source, event.offset = "bench0", offset
            events.append(event)
    return events


def resolver_ceiling(redis_url: str, messages: list[tuple[bytes, bytes]]) -> dict[str, float]:
    """Events/s of the resolver alone, the lookup's share and rate, and the ceiling with it."""
    config = workload.bench_config(Path(tempfile.mkdtemp()) / "config")
    settings = load_settings(config, env={"LEADFLOW_REDIS_URL": redis_url})
    # Keys of their own: the suite's Redis holds the engine runs' people.
    settings = replace(settings, redis=replace(settings.redis, key_prefix="bench-identity:"))
    events = decoded(messages)
    half = len(events) // 2
    resolver = IdentityStage(settings, None)
    start = time.perf_counter()
    for i in range(0, half, BATCH):
        resolver(events[i : i + BATCH])
    alone = half / (time.perf_counter() - start)
    done = {"bench0": half - 1}  # every earlier event applied: nothing is held back
    lookup = IdentityLookup(settings, None, done.__getitem__)
    rest, found, looking, resolving = events[half:], 0, 0.0, 0.0
    for i in range(0, len(rest), BATCH):
        start = time.perf_counter()
        known, unknown = lookup(rest[i : i + BATCH])
        looking += time.perf_counter() - start
        found += len(known)
        start = time.perf_counter()
        resolver(unknown)
        resolving += time.perf_counter() - start
        done["bench0"] = rest[min(i + BATCH, len(rest)) - 1].offset
    return {
        "resolver_alone_per_s": alone,
        "lookup_share": found / len(rest),
        "lookup_per_s": len(rest) / looking,
        "resolver_ceiling_per_s": len(rest) / resolving,
    }


def main() -> None:
    """Print the figures for a workload of its own."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--people", type=int, default=100_000)
    parser.add_argument("--events", type=int, default=250_000)
    args = parser.parse_args()
    with LocalRedis("redis") as server:
        assert isinstance(server, LocalRedis)
        figures = resolver_ceiling(server.url, workload.encoded(args.people, args.events))
    for name, value in figures.items():
        print(f"{name}: {value:,.3f}" if value < 1 else f"{name}: {value:,.0f}")


if __name__ == "__main__":
    main()
