"""``leadflow demo``: the whole product on this machine, in about a minute.

Starts a local Kafka-protocol broker and a local Redis on free loopback ports,
creates the topics, starts the engine (``leadflow run``) as a child process,
streams a synthetic click/form stream for a few hundred people (with some
malformed messages and client retries mixed in), prints lead alerts as they
happen, then a summary. Ctrl-C or the end of the run stops everything;
children die with us even on ``kill -9`` (parent-death signal).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import orjson
from confluent_kafka import Producer

from dataflows.kafka_io import client_options
from engine.settings import Settings, load_settings
from leadflow.servers import LocalBroker, LocalRedis, die_with_parent, free_port, stop_process
from leadflow.synthetic import MALFORMED, synthetic_events
from leadflow.topics import create_topics
from leadflow.watch import Observed, OutputWatcher

# Share of events sent twice, as a retrying client would: they must not count twice.
DUPLICATE_SHARE = 0.02
# The run is over when nothing new arrived on the output topics for this long.
SETTLE_QUIET_S = 3.0
SETTLE_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class DemoOptions:
    """What the demo runs."""

    people: int = 300
    rate: float = 400.0
    processes: int = 1
    redis_flavor: str = ""
    seed: int = 7
    quiet: bool = False
    config_dir: str | None = None


def _print_alert(decision: dict[str, Any], latency_ms: float) -> None:
    reasons = ", ".join(f"{r['rule']} {r['points']:.0f}" for r in decision["reasons"])
    print(
        f"  ALERT {decision['decided_at'][11:23]}  lead {decision['one_id'][:8]}  "
        f"score {decision['score']:6.1f} -> {decision['sdr']:<10} ({decision['queue']})  "
        f"because {reasons}  [{latency_ms:.0f} ms]",
        flush=True,
    )


def run_demo(opts: DemoOptions) -> int:
    """Run the demo; return the process exit code."""
    workdir = Path(tempfile.mkdtemp(prefix="leadflow-demo-"))
    broker = LocalBroker(str(workdir))
    redis = LocalRedis(opts.redis_flavor, workdir=str(workdir))
    engine: subprocess.Popen[bytes] | None = None
    watcher: OutputWatcher | None = None
    try:
        broker.start()
        redis.start()
        print(
            f"broker  {broker.bootstrap} (tansu, memory)\n"
            f"redis   {redis.url} ({Path(redis.binary).name})"
        )
        env = {
            **os.environ,
            "LEADFLOW_KAFKA_BOOTSTRAP": broker.bootstrap,
            "LEADFLOW_REDIS_URL": redis.url,
            "LEADFLOW_PROCESSES": str(opts.processes),
            "LEADFLOW_METRICS_PORT": str(free_port()),
            "LEADFLOW_HEALTH_PORT": str(free_port()),
            # The embedded broker is new every time: so is the recovery data.
            "LEADFLOW_RECOVERY_DIR": str(workdir / "recovery"),
            "LEADFLOW_METRICS_LISTEN": "127.0.0.1",  # a laptop: nothing to serve the network
            "LEADFLOW_ALLOW_SHIPPED_SALT": "1",  # made-up people on throw-away servers
        }
        settings = load_settings(opts.config_dir, env)
        create_topics(settings)
        engine_log = workdir / "engine.log"
        with engine_log.open("wb") as log:
            engine = subprocess.Popen(  # our own interpreter and module
                [sys.executable, "-m", "leadflow.cli", "--config-dir", settings.config_dir, "run"],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                preexec_fn=die_with_parent,  # noqa: PLW1509  # the engine must not outlive the demo
            )
        print(f"engine  {opts.processes} process(es), log {engine_log}")
        print(
            f"metrics http://127.0.0.1:{settings.metrics.port}/metrics\n"
            f"health  http://127.0.0.1:{settings.metrics.health_port}/readyz\n"
        )
        watcher = OutputWatcher(settings, None if opts.quiet else _print_alert).start()
        sent = _produce(settings, opts)
        print(
            f"\nsent {sent.events} events "
            f"({sent.duplicates} retried duplicates, {sent.malformed} malformed)"
        )
        seen = watcher.wait_until(
            lambda o: (
                len(o.dlq) >= sent.malformed and time.monotonic() - o.last_change > SETTLE_QUIET_S
            ),
            SETTLE_TIMEOUT_S,
        )
        if engine.poll() is not None:
            print(
                f"engine exited early with {engine.returncode}; see {engine_log}", file=sys.stderr
            )
            return 1
        _print_summary(settings, sent, seen)
        shutil.rmtree(workdir, ignore_errors=True)  # kept only when something went wrong
        return 0
    except KeyboardInterrupt:
        print("\ninterrupted; stopping", file=sys.stderr)
        return 130
    finally:
        if watcher is not None:
            watcher.stop()
        if engine is not None:
            stop_process(engine, sig=signal.SIGINT)
        redis.stop()
        broker.stop()


@dataclass(frozen=True)
class Sent:
    """What the demo produced."""

    events: int
    duplicates: int
    malformed: int
    people: int


def _produce(settings: Settings, opts: DemoOptions) -> Sent:
    """Send the synthetic stream at ``opts.rate`` events/s, stamped with the send time."""
    producer = Producer({**client_options(settings), "linger.ms": 2})
    topic = settings.topics.events
    rng = np.random.default_rng(opts.seed)
    interval = 1.0 / opts.rate
    start = time.monotonic()
    n = duplicates = 0
    malformed_at = {int(i) for i in rng.choice(opts.people * 3, len(MALFORMED), replace=False)}
    bad = iter(MALFORMED)
    for n, event in enumerate(synthetic_events(opts.people, opts.seed), 1):
        event["timestamp"] = datetime.now(UTC).isoformat(timespec="milliseconds")
        value = orjson.dumps(event)
        key = str(event["anonymousId"]).encode()
        producer.produce(topic, value, key)
        if rng.random() < DUPLICATE_SHARE:
            producer.produce(topic, value, key)
            duplicates += 1
        if n in malformed_at:
            producer.produce(topic, next(bad)[1])
        producer.poll(0)
        # Pace against the clock rather than sleeping a fixed time per event.
        ahead = start + n * interval - time.monotonic()
        if ahead > 0:
            time.sleep(ahead)
    sent_malformed = len(malformed_at & set(range(1, n + 1)))
    producer.flush(10)
    return Sent(n, duplicates, sent_malformed, opts.people)


def _print_summary(settings: Settings, sent: Sent, seen: Observed) -> None:
    per_sdr = Counter(d["sdr"] for d in seen.decisions.values())
    reasons = Counter(r.reason for r in seen.dlq)
    causes = Counter(r["cause"] for r in seen.lifecycle.values())
    created, merged = causes.get("first_event", 0), causes.get("merge", 0)
    cleansed = {
        c.removeprefix("cleansing:"): n
        for c, n in sorted(causes.items())
        if c.startswith("cleansing:")
    }
    refused = {
        c.removeprefix("merge_refused:"): n
        for c, n in causes.items()
        if c.startswith("merge_refused:")
    }
    lat = np.array(seen.latencies_ms) if seen.latencies_ms else np.zeros(1)
    print("\n== Leadflow demo summary ==")
    print(
        f"events in            {sent.events + sent.duplicates + sent.malformed}"
        f"  ({sent.events} distinct, {sent.duplicates} duplicates, {sent.malformed} malformed)"
    )
    print(f"people               {created - merged} (of {sent.people} synthetic personas)")
    print(f"merges               {merged} merged, {sum(refused.values())} refused {refused}")
    print(f"MQLs                 {len(seen.decisions)}")
    for sdr in settings.roster.sdrs:
        print(f"  assigned to {sdr.id:<10} {per_sdr.get(sdr.id, 0)}")
    print(f"disqualified         {sum(cleansed.values())}  {cleansed}")
    print(f"DLQ                  {len(seen.dlq)}  {dict(reasons)}")
    print(
        f"decision latency     p50 {np.percentile(lat, 50):.1f} ms, "
        f"p99 {np.percentile(lat, 99):.1f} ms"
        "  (event produced -> decision consumed)"
    )
    print(f"duplicate outputs    {seen.duplicates} (re-emitted records with the same id)")
