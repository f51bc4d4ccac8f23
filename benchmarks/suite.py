"""``make bench``: the whole benchmark in one run, one table, one JSON file.

On the embedded broker and Redis (one machine, shared cores), with the workload
of :mod:`benchmarks.workload` (100,000 people, Zipf activity, 85/10/5 mix,
merges, three queues):

1. physical limits: ``orjson`` decode rate of the mix, Redis pipelined ``SET``
   rate, librdkafka produce and consume rates on the broker;
2. throughput end to end (input topic -> decisions and lifecycle records) of
   ``leadflow run --stop-at-end`` with 1 and 2 processes, and its CPU seconds per
   1,000 events (start-up included: it is what a replay costs); then the scaling
   rows: 1, 2 and 4 processes on a 4-partition topic, beside the broker's own
   produce and consume rates on 4 partitions, Redis's commands and CPU per event,
   and what the one identity resolver carries alone and behind the lookups
   (:mod:`benchmarks.identity`);
3. Redis memory per person after the run, and for 1,000,000 people;
4. the hand-written peer: one event at a time, confluent-kafka + redis-py, the
   same domain functions;
5. latency, event produced -> record consumed by a separate probe process, at a
   fixed offered load, for the engine, a pass-through Bytewax flow and a direct
   producer -> consumer hop;
6. the HTTP collector (:mod:`benchmarks.collector`): events/s in batch mode and the
   acknowledgement latency at 1,000 requests/s.

Usage: ``python -m benchmarks.suite [--people N] [--events N] [--out FILE]``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, cast

import numpy as np
import orjson
import redis
from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient
from confluent_kafka.cimpl import NewTopic
from prometheus_client.parser import text_string_to_metric_families

import engine
from benchmarks import collector as collector_bench
from benchmarks import identity as identity_bench
from benchmarks import workload
from engine.batch import next_version
from engine.identity import identifiers_of
from engine.person import PersonState, Rulebook, apply_event, decode_state, encode_state
from engine.sales import complete_routing, route_promotion
from engine.settings import RedisSettings, Settings, load_settings
from engine.store import IdentityWrites, RedisStore
from leadflow.servers import LocalBroker, LocalRedis, free_port

LEADFLOW = [sys.executable, "-m", "leadflow.cli"]
REPO = Path(__file__).parents[1]
QUIX_PYTHON = REPO / ".venv-quix" / "bin" / "python"  # `make bench` creates it


def quix_command(bootstrap: str, inp: str, out: str, count: str) -> list[str]:
    """The Quix Streams peer, in its own virtual environment."""
    state = tempfile.mkdtemp(prefix="quix-state-")
    return [str(QUIX_PYTHON), "-m", "benchmarks.quix_peer", bootstrap, inp, out, count, state]


def quix_env() -> dict[str, str]:
    """The peer imports the engine's domain code from this checkout."""
    return {**os.environ, "PYTHONPATH": str(REPO)}


def quix_peer(bootstrap: str, topic: str, count: int) -> float:
    """Events per second of the Quix Streams peer over the first ``count`` events."""
    create(bootstrap, ["bench.quix.out"], 1)
    result = subprocess.run(
        quix_command(bootstrap, topic, "bench.quix.out", str(count)),
        env=quix_env(),
        capture_output=True,
        text=True,
        check=False,
        timeout=900,
    )
    if result.returncode != 0:
        raise RuntimeError(f"Quix Streams peer failed: {result.stderr[-2000:]}")
    return float(result.stdout.strip().splitlines()[-1])


def quix_peers(bootstrap: str, topic: str, total: int, consumers: int) -> float:
    """Events per second of ``consumers`` Quix Streams peers in one group over a whole topic.

    Each reports its progress to a file (benchmarks.quix_peer); the rate is every
    event counted over the span from the first one's first event to the last one's
    last report, once the counts stop growing with the topic read. Joining the group
    takes the peers up to a minute on the embedded broker; the rate starts at the
    first event.
    """
    create(bootstrap, ["bench.quix2.out"], consumers)
    group = f"quix-peers-{time.time_ns()}"
    commands = [
        quix_command(bootstrap, topic, "bench.quix2.out", "serve") for _ in range(consumers)
    ]
    procs = [
        subprocess.Popen(
            [*c, group], env=quix_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        for c in commands
    ]
    files = [Path(c[-1]) / "progress" for c in commands]
    try:
        last, still_since, deadline = -1, time.time(), time.time() + 900
        while time.time() < deadline:
            time.sleep(0.5)
            reports = [f.read_text().split() for f in files if f.exists()]
            counted = sum(int(r[0]) for r in reports)
            if counted != last:
                last, still_since = counted, time.time()
            # Each reports every 1,000 events: up to 999 of its last ones go unreported.
            elif counted > total - 1000 * consumers and time.time() - still_since > 5:
                first = min(float(r[1]) for r in reports)
                return counted / (max(float(r[2]) for r in reports) - first)
        raise RuntimeError(f"Quix Streams peers counted {last:,} of {total:,} events in 900 s")
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(30)


def quix_figures(bootstrap: str, topic: str, total: int) -> dict[str, float]:
    """The Quix Streams peer on the whole input: one consumer, then two in one group."""
    if not QUIX_PYTHON.exists():
        log(f"Quix Streams peer skipped: {QUIX_PYTHON} missing (run `make bench`)")
        return {}
    log("Quix Streams peer, whole input")
    one = quix_peer(bootstrap, topic, total)
    log("Quix Streams peer, 2 consumers on the 2 partitions, whole input")
    two = quix_peers(bootstrap, topic, total, 2)
    return {"quix_peer_events_per_s": one, "quix_peers_2_events_per_s": two}


def log(text: str) -> None:
    """Progress on stderr, so a long run is never silent."""
    print(f"[bench {time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def create(bootstrap: str, topics: list[str], partitions: int) -> None:
    """Create topics (tansu needs explicit retention configs for some clients)."""
    admin = AdminClient({"bootstrap.servers": bootstrap})
    configs = {"retention.ms": "-1", "cleanup.policy": "delete"}
    futures = admin.create_topics([NewTopic(t, partitions, 1, config=configs) for t in topics])
    for f in futures.values():
        try:
            f.result(10)
        except Exception as e:  # an existing topic is fine
            if "TOPIC_ALREADY_EXISTS" not in str(e):
                raise


def produce(bootstrap: str, topic: str, messages: list[tuple[bytes, bytes]]) -> float:
    """Produce everything as fast as the client goes; return messages per second."""
    producer = Producer(
        {"bootstrap.servers": bootstrap, "linger.ms": 20, "batch.num.messages": 10_000}
    )
    start = time.perf_counter()
    for n, (key, value) in enumerate(messages):
        while True:
            try:
                producer.produce(topic, value, key)
                break
            except BufferError:
                producer.poll(0.05)
        if n % 10_000 == 0:
            producer.poll(0)
    producer.flush(120)
    return len(messages) / (time.perf_counter() - start)


def consume_all(bootstrap: str, topic: str, expected: int) -> float:
    """Read ``expected`` messages from the start; return messages per second."""
    consumer = Consumer(
        {"bootstrap.servers": bootstrap, "group.id": "bench-raw", "fetch.wait.max.ms": 10}
    )
    meta = consumer.list_topics(topic, timeout=10).topics[topic]
    consumer.assign([TopicPartition(topic, p, 0) for p in meta.partitions])
    start, seen = time.perf_counter(), 0
    while seen < expected:
        seen += sum(1 for m in consumer.consume(10_000, 1.0) if m.error() is None)
    rate = seen / (time.perf_counter() - start)
    consumer.close()
    return rate


def limits(bootstrap: str, redis_url: str, messages: list[tuple[bytes, bytes]]) -> dict[str, float]:
    """How fast the parts alone go on this machine."""
    values = [v for _, v in messages]
    start = time.perf_counter()
    for v in values:
        orjson.loads(v)
    decode = len(values) / (time.perf_counter() - start)
    client = redis.Redis.from_url(redis_url)
    n = 200_000
    start = time.perf_counter()
    for chunk in range(0, n, 1000):
        pipe = client.pipeline(transaction=False)
        for i in range(chunk, chunk + 1000):
            pipe.set(f"bench:limit:{i}", b"x" * 100)
        pipe.execute()
    redis_rate = n / (time.perf_counter() - start)
    client.delete(*[f"bench:limit:{i}" for i in range(n)])
    client.close()
    create(bootstrap, ["bench.raw"], 1)
    produce_rate = produce(bootstrap, "bench.raw", messages)
    consume_rate = consume_all(bootstrap, "bench.raw", len(messages))
    # The embedded broker on 4 partitions: what the scaling rows can get from it.
    create(bootstrap, ["bench.raw4"], 4)
    produce_rate_4 = produce(bootstrap, "bench.raw4", messages)
    consume_rate_4 = consume_all(bootstrap, "bench.raw4", len(messages))
    return {
        "kafka_produce_4_partitions_per_s": produce_rate_4,
        "kafka_consume_4_partitions_per_s": consume_rate_4,
        "orjson_decode_per_s": decode,
        "redis_pipelined_set_per_s": redis_rate,
        "kafka_produce_per_s": produce_rate,
        "kafka_consume_per_s": consume_rate,
    }


def run_engine(env: dict[str, str], processes: int) -> tuple[float, float]:
    """Wall and CPU seconds of ``leadflow run --stop-at-end`` over the whole input."""
    return timed_run(
        [*LEADFLOW, "run", "--processes", str(processes), "--stop-at-end"],
        {**env, "LEADFLOW_RECOVERY_DIR": tempfile.mkdtemp()},  # recovery on, from scratch
    )


def run_passthrough(bootstrap: str, topic: str) -> tuple[float, float]:
    """Wall and CPU seconds of the pass-through flow over the whole input (one process)."""
    create(bootstrap, ["bench.passthrough.out"], 1)
    argv = [sys.executable, "-m", "benchmarks.passthrough", bootstrap, topic]
    return timed_run([*argv, "bench.passthrough.out", "--to-end"], dict(os.environ))


def timed_run(argv: list[str], env: dict[str, str]) -> tuple[float, float]:
    """Wall and CPU seconds (of the command and its children) of a command that must succeed."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    result = subprocess.run(argv, env=env, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - start
    if result.returncode != 0:
        raise RuntimeError(f"{argv[2]} failed: {result.stderr[-2000:]}")
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu


SCALING_PROCESSES = (1, 2, 4)
SCALING_PARTITIONS = 4


def scaling(
    bootstrap: str, redis_url: str, config: Path, messages: list[tuple[bytes, bytes]]
) -> dict[str, dict[str, float]]:
    """The whole input on 4 partitions through 1, 2 and 4 processes (Redis emptied between).

    Run last among the engine runs: it leaves Redis holding the 4-process run's people,
    the same people the memory figures count.
    """
    scaled = config_factory(config)("bench.events4", "bench.lifecycle4", "bench.decisions4")
    env = workload.engine_env(scaled, bootstrap, redis_url, free_port())
    settings = load_settings(scaled, env=env)
    create(bootstrap, list(settings.topics.all()), SCALING_PARTITIONS)
    produce(bootstrap, settings.topics.events, messages)
    out = {}
    client = redis.Redis.from_url(redis_url)
    for processes in SCALING_PROCESSES:
        client.flushall()
        log(f"Leadflow, {processes} process(es), {SCALING_PARTITIONS} partitions, whole input")
        before, redis_before = client.info("stats"), _redis_cpu_s(client)
        wall, cpu = run_engine(env, processes)
        commands = client.info("stats")["total_commands_processed"]
        commands -= before["total_commands_processed"]
        out[str(processes)] = {
            "seconds": wall,
            "events_per_s": len(messages) / wall,
            "cpu_s_per_1000": cpu / len(messages) * 1000,
            # total_commands_processed over the run, as the server counts it.
            "redis_commands_per_event": commands / len(messages),
            "redis_cpu_us_per_event": (_redis_cpu_s(client) - redis_before) / len(messages) * 1e6,
        }
    client.close()
    return out


def _redis_cpu_s(client: redis.Redis) -> float:
    """CPU seconds the Redis server has used (user + system)."""
    cpu = client.info("cpu")
    return float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"])


def memory_at_million(redis_url: str) -> float:
    """Bytes per person at 1,000,000 people with the states of every person stored now."""
    log("Redis memory at 1,000,000 people")
    return memory_at_scale(redis_url, stored_states(redis_url), 1_000_000)


def stored_states(redis_url: str) -> list[bytes]:
    """Every person's state stored now, without its version.

    Every state, not the first thousand a SCAN returns: those are no random sample
    (SCAN walks the hash table in bucket order), and the 1M figure moved by 50 bytes
    from one run of the same code to the next with them.
    """
    client = redis.Redis.from_url(redis_url)
    keys = list(client.scan_iter("lf:p:*", count=10_000))
    states: list[bytes | None] = []
    for chunk in range(0, len(keys), 10_000):
        states += cast(list[bytes | None], client.mget(keys[chunk : chunk + 10_000]))
    client.close()
    return [v.partition(b"|")[2] for v in states if v]


def redis_people(redis_url: str, prefix: str = "lf:") -> tuple[int, float]:
    """People stored, and used memory per person (all keys included)."""
    client = redis.Redis.from_url(redis_url)
    people = sum(1 for _ in client.scan_iter(f"{prefix}p:*", count=10_000))
    used = int(client.info("memory")["used_memory"])
    client.close()
    return people, used / max(people, 1)


def memory_at_scale(
    redis_url: str,
    sample: list[bytes],
    people: int,
    identity: bool = True,
    states: bool = True,
    ttl_ms: int = 0,
) -> float:
    """Bytes per person with ``people`` people laid out as the engine lays them out.

    Each person is known by one cookie, the person named after it, as the resolver
    writes a new visitor (its own :class:`IdentityWrites`), with a state from ``sample``
    behind a version as the engine writes it (a new person's: 15 digits or so).
    ``identity`` / ``states`` leave out the identity keys / the state keys (to weigh
    each alone); ``ttl_ms`` sets the state keys' TTL, as the engine's retention does.
    """
    client = redis.Redis.from_url(redis_url, socket_timeout=300)
    store = RedisStore(RedisSettings(url=redis_url), client)
    client.flushall()
    base = int(client.info("memory")["used_memory"])
    for chunk in range(0, people, 5_000):
        writes = IdentityWrites(store)
        pipe = client.pipeline(transaction=False)
        for i in range(chunk, min(chunk + 5_000, people)):
            cookie = f"{(i * 2654435761) % (1 << 64):016x}"
            if identity:
                writes.claim(cookie, "anon", cookie)
            if states:
                value = b"%d|" % next_version(0) + sample[i % len(sample)]
                pipe.set(store.person_key(cookie), value, px=ttl_ms or None)
        store.write_graph(writes)
        pipe.execute()
    used = int(client.info("memory")["used_memory"])
    client.flushall()
    client.close()
    return (used - base) / people


def loop_peer(settings: Settings, topic: str, limit: int) -> float:
    """What a team writes without an engine: one message, two or three round trips, a save."""
    rules = Rulebook(settings)
    client = redis.Redis.from_url(settings.redis.url)
    consumer = Consumer(
        {
            "bootstrap.servers": settings.kafka.bootstrap,
            "group.id": "bench-loop-peer",
            "fetch.wait.max.ms": 10,
        }
    )
    meta = consumer.list_topics(topic, timeout=10).topics[topic]
    consumer.assign([TopicPartition(topic, p, 0) for p in meta.partitions])
    roster = settings.roster
    done, start = 0, time.perf_counter()
    while done < limit:
        msg = consumer.poll(1.0)
        if msg is None or msg.error() is not None:
            continue
        done += 1
        now_ms = int(time.time() * 1000)
        event = workload.decode(msg.value(), topic, now_ms)
        if event is None:
            continue
        ident = identifiers_of(event, settings.identity)[0]
        key = f"peer:id:{ident.digest}"
        client.set(key, ident.digest, nx=True)
        one_id = cast(bytes, client.get(key)).decode()
        raw = cast(bytes | None, client.get(f"peer:p:{one_id}"))
        person = decode_state(one_id, raw) if raw else PersonState(one_id, is_new=True)
        _, promotion = apply_event(person, event, rules, now_ms)
        if promotion is not None:
            routing = route_promotion(promotion, rules, now_ms)
            ticket = int(client.incr(f"peer:rr:{routing.queue}"))
            sdrs = roster.for_queue(routing.queue)
            complete_routing(routing, sdrs[ticket % len(sdrs)], roster, rules, now_ms)
        client.set(f"peer:p:{one_id}", encode_state(person))
    rate = done / (time.perf_counter() - start)
    consumer.close()
    client.close()
    return rate


@contextmanager
def probe(
    bootstrap: str, topics: list[str], seconds: float, stop_early: bool = False
) -> Iterator[Path]:
    """A separate consumer process noting when each record arrives (for ``seconds``)."""
    out = Path(tempfile.mkstemp(suffix=".probe")[1])
    proc = subprocess.Popen(
        [sys.executable, "-m", "benchmarks.probe", bootstrap, str(out), str(seconds), *topics],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    proc.stdout.readline()  # "ready"
    try:
        yield out
    finally:
        if stop_early:
            proc.terminate()
        proc.wait(seconds + 30)


def paced(
    bootstrap: str, topic: str, messages: list[tuple[bytes, bytes]], rate: float
) -> dict[str, float]:
    """Produce at ``rate`` per second; return each messageId's produce time."""
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 1})
    sent: dict[str, float] = {}
    start = time.time()
    for n, (key, value) in enumerate(messages):
        due = start + n / rate
        delay = due - time.time()
        if delay > 0.001:
            time.sleep(delay)
        mid = orjson.loads(value)["messageId"]
        sent[mid] = time.time()
        producer.produce(topic, value, key)
        producer.poll(0)
    producer.flush(30)
    return sent


def latencies(sent: dict[str, float], probe_file: Path) -> dict[str, float]:
    """p50/p95/p99/max in ms over the first record answering each event sent."""
    first: dict[str, float] = {}
    for line in probe_file.read_text().splitlines():
        mid, at = line.split()
        if mid in sent and mid not in first:
            first[mid] = float(at)
    probe_file.unlink()
    ms = np.array([(at - sent[mid]) * 1000 for mid, at in first.items()])
    if not len(ms):
        return {"samples": 0}
    return {
        "samples": len(ms),
        "p50_ms": float(np.percentile(ms, 50)),
        "p95_ms": float(np.percentile(ms, 95)),
        "p99_ms": float(np.percentile(ms, 99)),
        "max_ms": float(ms.max()),
    }


def tagged(messages: list[tuple[bytes, bytes]], tag: str) -> list[tuple[bytes, bytes]]:
    """The workload with new messageIds and cookies (new people), for a latency run."""
    out = []
    for key, value in messages:
        event = orjson.loads(value)
        event["messageId"] = f"{tag}-{event['messageId']}"
        event["anonymousId"] = f"{tag}-{event['anonymousId']}"
        event.pop("timestamp", None)
        out.append((key, orjson.dumps(event)))
    return out


def latency_run(
    mode: str,
    rate: int,
    seconds: float,
    messages: list[tuple[bytes, bytes]],
    ctx: dict[str, Any],
) -> dict[str, Any]:
    """One latency measurement: start the system under test, offer load, read the probe."""
    bootstrap: str = ctx["bootstrap"]
    tag = f"{mode.replace(' ', '')}{rate}"
    inp, out_topics = f"lat.{tag}.in", [f"lat.{tag}.out", f"lat.{tag}.dec"]
    processes = 2 if mode == "engine x2" else 1
    create(bootstrap, [inp, *out_topics], processes)  # a partition per process
    batch = tagged(messages[: int(rate * seconds)], tag)
    proc = None
    metrics_port = int(ctx["env"]["LEADFLOW_METRICS_PORT"])
    if mode.startswith("engine"):
        config = ctx["config_for"](inp, out_topics[0], out_topics[1])
        env = {
            **ctx["env"],
            "LEADFLOW_CONFIG_DIR": str(config),
            "LEADFLOW_RECOVERY_DIR": tempfile.mkdtemp(),
        }
        proc = subprocess.Popen(
            [*LEADFLOW, "run", "--processes", str(processes)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
    elif mode == "quix":
        proc = subprocess.Popen(
            quix_command(bootstrap, inp, out_topics[0], "serve"),
            env=quix_env(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
    elif mode == "passthrough":
        proc = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.passthrough", bootstrap, inp, out_topics[0]],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
    try:
        if proc is not None:
            _warm_up(bootstrap, inp, out_topics, tag)
        watched = out_topics if mode != "direct" else [inp]
        with probe(bootstrap, watched, seconds + 15) as probe_file:
            sent = paced(bootstrap, inp, batch, rate)
        figures: dict[str, Any] = dict(latencies(sent, probe_file))
        if mode.startswith("engine"):
            ports = [metrics_port + i for i in range(processes)]
            figures["stages"] = stage_latencies(ports)
        return figures
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(30)


def stage_latencies(ports: list[int]) -> dict[str, dict[str, float]]:
    """p50 and p99 in ms of each stage (leadflow_stage_latency_seconds), all processes summed.

    Read from the histogram's buckets as Prometheus' histogram_quantile reads them:
    linear within the bucket the quantile falls in.
    """
    buckets: dict[str, dict[float, float]] = {}
    for port in ports:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read()
        for family in text_string_to_metric_families(text.decode()):
            if family.name != "leadflow_stage_latency_seconds":
                continue
            for sample in family.samples:
                if sample.name.endswith("_bucket"):
                    counts = buckets.setdefault(sample.labels["stage"], {})
                    le = float(sample.labels["le"])
                    counts[le] = counts.get(le, 0.0) + sample.value
    out = {}
    for stage, cumulative in buckets.items():
        bounds = sorted(cumulative)
        total = cumulative[bounds[-1]]
        if not total:
            continue
        out[stage] = {"samples": total}
        for q in (0.5, 0.99):
            rank, below, lower = q * total, 0.0, 0.0
            for le in bounds:
                if cumulative[le] >= rank:
                    upper = le if le != float("inf") else lower
                    share = (rank - below) / max(cumulative[le] - below, 1)
                    out[stage][f"p{round(q * 100)}_ms"] = (lower + (upper - lower) * share) * 1000
                    break
                below, lower = cumulative[le], le
    return out


def _warm_up(bootstrap: str, inp: str, outs: list[str], tag: str) -> None:
    """Wait until the system under test answers an event."""
    warm = {"type": "page", "messageId": f"warm-{tag}", "anonymousId": f"warm-{tag}"}
    deadline = time.time() + 90
    with probe(bootstrap, outs, 90, stop_early=True) as probe_file:
        producer = Producer({"bootstrap.servers": bootstrap})
        while time.time() < deadline:
            producer.produce(inp, orjson.dumps(warm))
            producer.flush(5)
            time.sleep(1)
            if f"warm-{tag}" in probe_file.read_text():
                break
        else:
            raise RuntimeError(f"{tag}: the system under test never answered")
    probe_file.unlink(missing_ok=True)


def latency_rows(lat: dict[str, dict[str, Any]]) -> list[tuple[str, str]]:
    """The latency rows of the table: each run, the engine's stages, the ratios."""
    rows = []
    for key, figures in lat.items():
        if figures.get("samples"):
            rows.append(
                (
                    f"latency {key}",
                    f"p50 {figures['p50_ms']:.1f} / p95 {figures['p95_ms']:.1f} / "
                    f"p99 {figures['p99_ms']:.1f} / max {figures['max_ms']:.1f} ms "
                    f"({figures['samples']:,} samples)",
                )
            )
    for key, figures in lat.items():
        for stage, f in figures.get("stages", {}).items():
            rows.append(
                (
                    f"{key}: ingest to {stage}",
                    f"p50 {f['p50_ms']:.1f} / p99 {f['p99_ms']:.1f} ms ({f['samples']:,.0f})",
                )
            )
    for rate in ("2,000", "10,000"):
        ours = lat.get(f"engine @ {rate}/s", {})
        through, quix = lat.get(f"passthrough @ {rate}/s", {}), lat.get(f"quix @ {rate}/s", {})
        if ours.get("samples") and through.get("samples"):
            added = (ours["p50_ms"] - through["p50_ms"], ours["p99_ms"] - through["p99_ms"])
            rows.append(
                (
                    f"added to pass-through @ {rate}/s, 1 process",
                    f"p50 +{added[0]:.1f} / p99 +{added[1]:.1f} ms",
                )
            )
        if ours.get("samples") and quix.get("samples"):
            ratio = ours["p99_ms"] / quix["p99_ms"]
            rows.append((f"p99 ratio Leadflow / Quix @ {rate}/s", f"{ratio:.2f}"))
    two, through = lat.get("engine x2 @ 10,000/s", {}), lat.get("passthrough @ 10,000/s", {})
    if two.get("samples") and through.get("samples"):
        ratio = two["p99_ms"] / through["p99_ms"]
        rows.append(("p99 Leadflow 2 processes / pass-through @ 10,000/s", f"{ratio:.2f}x"))
    return rows


def table(results: dict[str, Any]) -> str:
    """The report as a Markdown table."""
    lim, eng, mem, lat = (
        results["limits"],
        results["engine"],
        results["memory"],
        results["latency"],
    )
    rows = [
        (
            "workload",
            f"{results['events']:,} events, {results['people']:,} people "
            f"({results['active_people']:,} active)",
        ),
        ("the engine's rules", "compiled (mypyc)" if engine.compiled else "plain Python"),
        ("orjson decode of the mix", f"{lim['orjson_decode_per_s']:,.0f} /s"),
        ("Redis pipelined SET", f"{lim['redis_pipelined_set_per_s']:,.0f} /s"),
        (
            "librdkafka produce / consume",
            f"{lim['kafka_produce_per_s']:,.0f} / {lim['kafka_consume_per_s']:,.0f} /s",
        ),
    ]
    through = results["passthrough"]
    rows.append(
        (
            "pass-through flow, 1 process (Kafka -> decode -> Kafka)",
            f"{through['events_per_s']:,.0f} events/s, "
            f"{through['cpu_s_per_1000']:.3f} CPU s / 1,000 events",
        )
    )
    for p in (1, 2):
        e = eng[str(p)]
        rows.append(
            (
                f"Leadflow, {p} process{'es' if p > 1 else ''}",
                f"{e['events_per_s']:,.0f} events/s, "
                f"{e['cpu_s_per_1000']:.3f} CPU s / 1,000 events",
            )
        )
    rows.append(
        (
            f"librdkafka produce / consume, {SCALING_PARTITIONS} partitions",
            f"{lim['kafka_produce_4_partitions_per_s']:,.0f} / "
            f"{lim['kafka_consume_4_partitions_per_s']:,.0f} /s",
        )
    )
    for p, e in results["scaling"].items():
        speedup = e["events_per_s"] / results["scaling"]["1"]["events_per_s"]
        rows.append(
            (
                f"Leadflow, {p} process{'es' if p != '1' else ''}, {SCALING_PARTITIONS} partitions",
                f"{e['events_per_s']:,.0f} events/s ({speedup:.2f}x), "
                f"{e['cpu_s_per_1000']:.3f} CPU s / 1,000 events, "
                f"Redis {e['redis_commands_per_event']:.2f} commands and "
                f"{e['redis_cpu_us_per_event']:.1f} µs CPU / event",
            )
        )
    ident = results["identity"]
    rows.append(
        (
            "identity resolver (one worker), alone / behind the lookups",
            f"{ident['resolver_alone_per_s']:,.0f} / {ident['resolver_ceiling_per_s']:,.0f} "
            f"events/s of stream ({ident['lookup_share']:.1%} found by the lookups, "
            f"{ident['lookup_per_s']:,.0f} events/s per worker)",
        )
    )
    rows.append(
        (
            "engine / pass-through, CPU per event, 1 process each",
            f"{eng['1']['cpu_s_per_1000'] / through['cpu_s_per_1000']:.2f}x",
        )
    )
    # Process for process: each peer is one process, so is Leadflow's row it is held to.
    one = eng["1"]["events_per_s"]
    peer = results["loop_peer_events_per_s"]
    rows.append(
        ("hand-written loop peer, 1 process", f"{peer:,.0f} events/s (Leadflow, 1 process: "
         f"{one / peer:.2f}x)")
    )  # fmt: skip
    if "quix_peer_events_per_s" in results:
        quix = results["quix_peer_events_per_s"]
        rows.append(
            (
                "Quix Streams peer (same rules), 1 process",
                f"{quix:,.0f} events/s (Leadflow, 1 process: {one / quix:.2f}x)",
            )
        )
    if "quix_peers_2_events_per_s" in results:
        quix2, two = results["quix_peers_2_events_per_s"], eng["2"]["events_per_s"]
        rows.append(
            (
                "Quix Streams peers, 2 consumers on 2 partitions",
                f"{quix2:,.0f} events/s (Leadflow, 2 processes: {two / quix2:.2f}x)",
            )
        )
    col = results["collector"]
    single = col["single_at_1000"]
    rows.append(
        (
            "collector, batch mode (1 process)",
            f"{col['events_per_s']:,.0f} events/s (librdkafka produce in this run: "
            f"{lim['kafka_produce_per_s']:,.0f} /s)",
        )
    )
    rows.append(
        (
            "collector ack @ 1,000 requests/s",
            f"p50 {single['p50_ms']:.1f} / p99 {single['p99_ms']:.1f} / "
            f"max {single['max_ms']:.1f} ms",
        )
    )
    rows.append(("Redis per person (after the run)", f"{mem['per_person_run']:,.0f} B"))
    rows.append(("Redis per person at 1,000,000", f"{mem['per_person_1m']:,.0f} B"))
    rows += latency_rows(lat)
    lines = ["| measure | figure |", "| --- | --- |"]
    lines += [f"| {a} | {b} |" for a, b in rows]
    return "\n".join(lines)


def config_factory(base: Path) -> Callable[[str, str, str], Path]:
    """Bench configs reading/writing other topics (for latency runs)."""

    def make(events: str, lifecycle: str, decisions: str) -> Path:
        target = Path(tempfile.mkdtemp()) / "config"
        workload.bench_config(target)
        engine = target / "engine.toml"
        text = engine.read_text()
        text = text.replace('events = "leadflow.events"', f'events = "{events}"')
        text = text.replace('lifecycle = "leadflow.lifecycle"', f'lifecycle = "{lifecycle}"')
        text = text.replace('decisions = "leadflow.decisions"', f'decisions = "{decisions}"')
        engine.write_text(text)
        return target

    del base
    return make


def measure_latency(
    ctx: dict[str, Any], messages: list[tuple[bytes, bytes]], seconds: float
) -> dict[str, dict[str, Any]]:
    """Latency of every system under test at 2,000 and 10,000 offered events/s."""
    out = {}
    modes = ["direct", "passthrough", "engine"] + (["quix"] if QUIX_PYTHON.exists() else [])
    for rate in (2_000, 10_000):
        # At 10,000/s, also the engine on two processes (two partitions): the target.
        for mode in modes + (["engine x2"] if rate == 10_000 else []):
            log(f"latency: {mode} at {rate:,} events/s")
            out[f"{mode} @ {rate:,}/s"] = latency_run(mode, rate, seconds, messages, ctx)
    return out


def main() -> None:
    """Run everything and print the table (and write the JSON)."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--people", type=int, default=100_000)
    parser.add_argument("--events", type=int, default=250_000)
    parser.add_argument("--peer-events", type=int, default=30_000)
    parser.add_argument("--latency-seconds", type=float, default=10.0)
    parser.add_argument("--out", default="var/bench.json")
    args = parser.parse_args()
    log(f"workload: {args.events:,} events over {args.people:,} people")
    messages = workload.encoded(args.people, args.events)
    active = len({orjson.loads(v)["anonymousId"].rstrip("b") for _, v in messages})
    config = workload.bench_config(Path(tempfile.mkdtemp()) / "config")
    results: dict[str, Any] = {
        "events": len(messages),
        "people": args.people,
        "active_people": active,
    }
    with LocalBroker() as broker, LocalRedis("redis") as server:
        assert isinstance(broker, LocalBroker) and isinstance(server, LocalRedis)
        env = workload.engine_env(config, broker.bootstrap, server.url, free_port())
        settings = load_settings(config, env=env)
        log("physical limits")
        results["limits"] = limits(broker.bootstrap, server.url, messages)
        create(broker.bootstrap, list(settings.topics.all()), 2)
        produce(broker.bootstrap, settings.topics.events, messages)
        log("pass-through flow (Kafka -> decode -> Kafka), 1 process, whole input")
        wall, cpu = run_passthrough(broker.bootstrap, settings.topics.events)
        results["passthrough"] = {
            "seconds": wall,
            "events_per_s": len(messages) / wall,
            "cpu_s_per_1000": cpu / len(messages) * 1000,
        }
        results["engine"] = {}
        for processes in (1, 2):
            redis.Redis.from_url(server.url).flushall()
            log(f"Leadflow, {processes} process(es), whole input")
            wall, cpu = run_engine(env, processes)
            results["engine"][str(processes)] = {
                "seconds": wall,
                "events_per_s": len(messages) / wall,
                "cpu_s_per_1000": cpu / len(messages) * 1000,
            }
        stored, per_person = redis_people(server.url)
        results["scaling"] = scaling(broker.bootstrap, server.url, config, messages)
        results["memory"] = {
            "people_run": stored,
            "per_person_run": per_person,
            "per_person_1m": memory_at_million(server.url),
        }
        results.update(quix_figures(broker.bootstrap, settings.topics.events, len(messages)))
        log("the identity resolver: alone, and behind the workers' lookups")
        results["identity"] = identity_bench.resolver_ceiling(server.url, messages)
        log(f"hand-written loop peer, {args.peer_events:,} events")
        results["loop_peer_events_per_s"] = loop_peer(
            settings, settings.topics.events, args.peer_events
        )
        log("collector: batch throughput and acknowledgement latency at 1,000 requests/s")
        results["collector"] = collector_bench.collector(broker.bootstrap, server.url)
        results["latency"] = measure_latency(
            {"bootstrap": broker.bootstrap, "env": env, "config_for": config_factory(config)},
            messages,
            args.latency_seconds,
        )
    report = table(results)
    print(report)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    log(f"figures written to {args.out}")


if __name__ == "__main__":
    main()
