"""The soak run (``make soak``): a steady stream for 30 minutes, memory sampled throughout.

``python -m benchmarks.soak [--minutes 30] [--rate 1000] [--people 2000] [--bootstrap HOST:PORT]``

Starts a local Redis, the embedded broker (or uses ``--bootstrap``, a real
Kafka or Redpanda) and ``leadflow run`` (one process, recovery on), then
produces the benchmark workload's mix for a fixed set of people at a steady
rate, with new messageIds and ingest-time timestamps, so the working set (the
people, their states, identifiers and queues) fills in the first minutes and
then stays the same. 2,000 people by default: at 1,000 events/s each has sent
more than its bounded histories hold (64 messageIds, 8 outbox entries) within
a few minutes, so the last two thirds of the run measure a full working set;
with 20,000 people they were still filling after 30 minutes (Redis memory
growth slowing from 4.3 to 1.2 MiB a minute, never flat).

The producer batches for half a second: the embedded broker (tansu, memory
storage) slows down with the number of record batches it holds and stops
serving consumers after some 15,000 to 30,000 of them (measured with a plain
producer and consumer at 1,000/s and 5 ms batches: consumption stopped at
150,692 of 165,000 messages); with half-second batches 30 minutes at 1,000/s
are 3,600 batches. ``--bootstrap`` runs against a real Kafka or Redpanda
instead. A stalled input is reported as such (exit 2), not mistaken for a
steady engine.

Every ``--every`` seconds it samples the events consumed, the engine's
resident memory (RSS), Redis ``used_memory`` and the people stored. At the
end it prints a verdict: memory must stop growing once the working set is
there (the median of the last third may not exceed that of the middle third by
more than 10%), and writes everything to ``var/soak.json``. Exits 1 if the
verdict is "growing".
"""

from __future__ import annotations

import argparse
import contextlib
import json
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import orjson
import psutil
import redis
from confluent_kafka import Producer

from benchmarks import workload
from engine.settings import load_settings
from leadflow.servers import LocalBroker, LocalRedis, die_with_parent, free_port, stop_process
from leadflow.topics import create_topics

# Allowed growth of the last third's median over the middle third's.
GROWTH_LIMIT = 0.10
# Samples over which consuming under a tenth of the offered rate means a stall.
STALL_SAMPLES = 3


def log(text: str) -> None:
    """Progress on stderr."""
    print(f"[soak {time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def feed(bootstrap: str, topic: str, people: int, rate: float, stop: threading.Event) -> None:
    """Produce the workload mix for ``people`` at ``rate`` until ``stop`` is set."""
    # Large batches: tansu slows with the number of record batches it holds.
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 500})
    start, sent, chunk = time.monotonic(), 0, 0
    while not stop.is_set():
        for event in workload.events(people, 10_000, seed=chunk):
            event["messageId"] = f"s{chunk}-{event['messageId']}"
            event.pop("timestamp")  # ingest time: the soak runs in real time
            while (ahead := start + sent / rate - time.monotonic()) > 0:
                time.sleep(min(ahead, 0.05))
            if stop.is_set():
                break
            producer.produce(topic, orjson.dumps(event), str(event["anonymousId"]).encode())
            producer.poll(0)
            sent += 1
        chunk += 1
    producer.flush(30)


def consumed(metrics_port: int) -> float:
    """Events the engine has consumed so far (its ``leadflow_events_total`` counters)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as r:
        text = r.read().decode()
    return sum(
        float(line.rpartition(" ")[2])
        for line in text.splitlines()
        if line.startswith("leadflow_events_total{")
    )


def sample(
    engine: psutil.Process, client: redis.Redis, started: float, metrics_port: int
) -> dict[str, float]:
    """Engine RSS, Redis memory, people stored and events consumed, now."""
    people = sum(1 for _ in client.scan_iter("lf:p:*", count=10_000))
    return {
        "minute": (time.monotonic() - started) / 60,
        "events": consumed(metrics_port),
        "engine_rss_mib": engine.memory_info().rss / 2**20,
        "redis_used_mib": int(client.info("memory")["used_memory"]) / 2**20,
        "people": people,
    }


def watch(
    proc: subprocess.Popen[bytes],
    client: redis.Redis,
    args: argparse.Namespace,
    metrics_port: int,
) -> list[dict[str, float]] | None:
    """Sample every ``every`` seconds for ``minutes``; None if the input stalled."""
    samples: list[dict[str, float]] = []
    started = time.monotonic()
    rate, every = args.rate, args.every
    while (time.monotonic() - started) / 60 < args.minutes:
        time.sleep(every)
        if proc.poll() is not None:
            raise RuntimeError(f"the engine exited with {proc.returncode}")
        samples.append(sample(psutil.Process(proc.pid), client, started, metrics_port))
        s = samples[-1]
        log(
            f"minute {s['minute']:5.1f}: {s['events']:,.0f} events, engine RSS "
            f"{s['engine_rss_mib']:6.1f} MiB, Redis {s['redis_used_mib']:6.1f} MiB, "
            f"{s['people']:,} people"
        )
        if stalled(samples, rate, every):
            log("the input stalled (under a tenth of the offered rate): no verdict")
            return None
    return samples


def stalled(samples: list[dict[str, float]], rate: float, every: float) -> bool:
    """Whether fewer than a tenth of the offered events were consumed over the last samples."""
    if len(samples) < STALL_SAMPLES:
        return False
    consumed_now = samples[-1]["events"] - samples[-STALL_SAMPLES]["events"]
    return consumed_now < 0.1 * rate * every * (STALL_SAMPLES - 1)


def verdict(samples: list[dict[str, float]]) -> dict[str, Any]:
    """Whether memory kept growing after the working set filled in.

    Medians, not single samples: Redis's ``used_memory`` jumps for a moment
    with a large pipeline or a client's output buffer (one sample of 30 min
    read 14.3 MiB between 13.2 and 13.2), which is no leak; a leak moves the
    median of the last third above that of the middle third.
    """
    n = len(samples)
    middle, last = samples[n // 3 : n * 2 // 3], samples[n * 2 // 3 :]
    out: dict[str, Any] = {}
    for key in ("engine_rss_mib", "redis_used_mib"):
        before = statistics.median(s[key] for s in middle)
        after = statistics.median(s[key] for s in last)
        out[key] = {
            "median_middle_third": before,
            "median_last_third": after,
            "max_last_third": max(s[key] for s in last),
            "growth": after / before - 1,
        }
    out["steady"] = all(
        out[k]["growth"] <= GROWTH_LIMIT for k in ("engine_rss_mib", "redis_used_mib")
    )
    return out


def main() -> int:
    """Run the soak and report."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--rate", type=float, default=1_000.0, help="events per second")
    parser.add_argument("--people", type=int, default=2_000, help="the working set")
    parser.add_argument("--bootstrap", default="", help="a real broker instead of tansu")
    parser.add_argument("--every", type=float, default=30.0, help="seconds between samples")
    parser.add_argument("--out", default="var/soak.json")
    args = parser.parse_args()
    config = workload.bench_config(Path(tempfile.mkdtemp()) / "config")
    metrics_port = free_port()
    with contextlib.ExitStack() as servers:
        bootstrap = args.bootstrap
        if not bootstrap:
            bootstrap = servers.enter_context(LocalBroker()).bootstrap  # type: ignore[attr-defined]
        server = servers.enter_context(LocalRedis("redis"))
        assert isinstance(server, LocalRedis)
        env = workload.engine_env(config, bootstrap, server.url, metrics_port)
        settings = load_settings(config, env=env)
        create_topics(settings, partitions=1)
        engine_log = Path(tempfile.mkdtemp()) / "engine.log"
        with engine_log.open("wb") as out:
            proc = subprocess.Popen(  # our own interpreter and module
                [sys.executable, "-m", "leadflow.cli", "run"],
                env=env,
                stdout=out,
                stderr=out,
                preexec_fn=die_with_parent,  # noqa: PLW1509  # never outlive the soak
            )
        stop = threading.Event()
        feeder = threading.Thread(
            target=feed,
            args=(bootstrap, settings.topics.events, args.people, args.rate, stop),
        )
        client = redis.Redis.from_url(server.url, socket_timeout=60)
        log(f"{args.minutes:g} min at {args.rate:,.0f} events/s over {args.people:,} people")
        feeder.start()
        try:
            samples = watch(proc, client, args, metrics_port)
        finally:
            stop.set()
            feeder.join()
            proc.send_signal(signal.SIGINT)
            stop_process(proc)
            client.close()
    if samples is None:
        return 2
    result = {"minutes": args.minutes, "rate": args.rate, "people": args.people}
    result |= {"samples": samples, "verdict": verdict(samples)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    v = result["verdict"]
    for key in ("engine_rss_mib", "redis_used_mib"):
        print(
            f"{key}: median {v[key]['median_middle_third']:.1f} in the middle third, "
            f"{v[key]['median_last_third']:.1f} in the last ({v[key]['growth']:+.1%}; "
            f"max {v[key]['max_last_third']:.1f})"
        )
    print("steady" if v["steady"] else "growing", f"(figures in {args.out})")
    return 0 if v["steady"] else 1


if __name__ == "__main__":
    sys.exit(main())
