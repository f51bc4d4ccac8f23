"""Reliability, for real: kill -9, a Redis restart, an unreachable broker, hostile input.

Each scenario streams the same workload (2,000 people, 20,000 events with
malformed ones among them) into a real broker while a real ``leadflow run``
process reads it, breaks something on the way, lets the engine finish, and
compares the end with a clean run of the same events on servers of its own:
every person's state, every decision and the SDR it went to, every lifecycle
record, the DLQ and the queue counts must be identical. Outputs may be
repeated after a crash (at-least-once); they may never differ, be missing, or
assign one decision twice.

Random moments come from a seed printed on failure; set ``LEADFLOW_CRASH_SEED``
to replay one.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar, cast

import orjson
import psutil
import pytest
import redis
from confluent_kafka import Consumer, KafkaError, Producer, TopicPartition

from benchmarks import workload
from engine.person import decode_state
from engine.settings import Settings, load_settings
from engine.store import cluster_client
from leadflow.servers import (
    LocalBroker,
    LocalRedis,
    LocalRedisCluster,
    free_port,
    free_ports,
    stop_process,
)
from leadflow.topics import create_topics

K = TypeVar("K")
PEOPLE, EVENTS = 2_000, 20_000
RATE = 2_500  # events/s offered while things break: 8 s of streaming
MALFORMED_EVERY = 997
SEED = int(os.environ.get("LEADFLOW_CRASH_SEED", str(time.time_ns() % 1_000_000)))


def messages() -> list[tuple[bytes | None, bytes]]:
    """The workload, with a malformed message every ``MALFORMED_EVERY``.

    Its events happened in the last 20 minutes: timers (SLA, demotion when a
    score decays) are then hours or days away, so runs that take different
    wall-clock times still end alike.
    """
    recent_ms = int(time.time() * 1000) - 20 * 60_000
    out: list[tuple[bytes | None, bytes]] = []
    for n, (key, value) in enumerate(workload.encoded(PEOPLE, EVENTS, epoch_ms=recent_ms)):
        if n % MALFORMED_EVERY == 0:
            out.append((None, b'{"type": "track", "messageId": "broken-%d"' % n))
        out.append((key, value))
    return out


WORKLOAD = messages()


@dataclass
class Rig:
    """Servers, configuration and environment of one engine."""

    broker: LocalBroker
    redis: LocalRedis | LocalRedisCluster
    bootstrap: str
    settings: Settings
    env: dict[str, str]
    log: Path


@contextmanager
def rig(
    tmp: Path,
    name: str,
    appendonly: bool = False,
    advertised_port: int = 0,
    cluster: bool = False,
    host: str = "127.0.0.1",
) -> Iterator[Rig]:
    """A broker and a Redis of its own, 1-partition topics, recovery every second.

    ``cluster``: a Redis Cluster (3 masters, 3 replicas) and ``redis.cluster = true``.
    ``host``: the address the broker and a standalone Redis listen on.

    Default limits otherwise: the workload's busiest cookie sends ~300 events/s,
    far more than the ``dedup_window`` (64) between two snapshots, so a replay
    recognised only by its messageId would be counted twice; input positions
    (engine.person.settle) must catch it.
    """
    config = workload.bench_config(tmp / name / "config")
    engine_toml = config / "engine.toml"
    text = engine_toml.read_text().replace(
        "snapshot_interval_s = 10.0", "snapshot_interval_s = 1.0"
    )
    if cluster:
        text = text.replace("cluster = false", "cluster = true")
    engine_toml.write_text(text)
    server: LocalRedis | LocalRedisCluster = (
        LocalRedisCluster("redis")
        if cluster
        else LocalRedis("redis", appendonly=appendonly, host=host)
    )
    with LocalBroker(advertised_port=advertised_port, host=host) as broker, server:
        assert isinstance(broker, LocalBroker)
        bootstrap = f"{host}:{advertised_port or broker.port}"
        env = {
            **os.environ,
            "LEADFLOW_CONFIG_DIR": str(config),
            "LEADFLOW_KAFKA_BOOTSTRAP": bootstrap,
            "LEADFLOW_REDIS_URL": server.url,
            "LEADFLOW_METRICS_PORT": str(free_ports(4)),  # process i: + i
            "LEADFLOW_HEALTH_PORT": "0",
            "LEADFLOW_RECOVERY_DIR": str(tmp / name / "recovery"),
        }
        settings = load_settings(config, env=env)
        yield Rig(broker, server, bootstrap, settings, env, tmp / name / "engine.log")


def start_engine(r: Rig, *extra: str) -> subprocess.Popen[bytes]:
    """``leadflow run`` as an operator starts it (its log appended to the rig's)."""
    with r.log.open("ab") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "leadflow.cli", "run", *extra],
            env=r.env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )


def finish(r: Rig, timeout_s: float = 180) -> None:
    """Run the engine to the end of the input (resuming from recovery) and check it ended well."""
    proc = start_engine(r, "--stop-at-end")
    try:
        code = proc.wait(timeout_s)
    finally:
        stop_process(proc, sig=signal.SIGKILL)
    assert code == 0, f"engine exited with {code}; log: {r.log.read_text()[-3000:]}"


def produce(
    r: Rig, batch: list[tuple[bytes | None, bytes]], rate: float = 0, topic: str = ""
) -> None:
    """Produce ``batch`` to ``topic`` (the events topic), at ``rate`` per second (0: at once)."""
    producer = Producer({"bootstrap.servers": r.bootstrap, "linger.ms": 5})
    start = time.monotonic()
    for n, (key, value) in enumerate(batch):
        if rate and n % 100 == 0 and (ahead := start + n / rate - time.monotonic()) > 0:
            time.sleep(ahead)
        while True:
            try:
                producer.produce(topic or r.settings.topics.events, value, key)
                break
            except BufferError:
                producer.poll(0.1)
        producer.poll(0)
    assert producer.flush(60) == 0


def stream(r: Rig, rate: float = RATE) -> threading.Thread:
    """The workload produced at ``rate`` in a background thread (join it)."""
    feeder = threading.Thread(target=produce, args=(r, WORKLOAD, rate), daemon=True)
    feeder.start()
    return feeder


@dataclass
class Ending:
    """What a run leaves behind, in comparable form."""

    people: dict[str, dict[str, Any]] = field(default_factory=dict)
    redirects: dict[str, str] = field(default_factory=dict)
    decisions: dict[str, set[str]] = field(default_factory=dict)  # decision id -> SDRs sent
    decided_for: dict[str, str] = field(default_factory=dict)  # decision id -> One-ID
    lifecycle: set[str] = field(default_factory=set)
    dlq: set[tuple[str, bytes]] = field(default_factory=set)
    queue_counts: dict[str, dict[str, int]] = field(default_factory=dict)
    repeated_outputs: int = 0
    # Each record's bytes as first read (record or decision id -> value), and the ids
    # of the records read again with other bytes: a replay must repeat, not recompute.
    first_read: dict[str, bytes] = field(default_factory=dict)
    differing: list[str] = field(default_factory=list)

    def read(self, record_id: str, value: bytes) -> bool:
        """Note a record read from an output topic; whether it was read before."""
        first = self.first_read.get(record_id)
        if first is None:
            self.first_read[record_id] = value
            return False
        if first != value:
            self.differing.append(record_id)
        return True


def _person_view(one_id: str, raw: bytes) -> dict[str, Any]:
    """A person's state without what depends on the wall clock (record times, SLA clocks)."""
    version, _, body = raw.partition(b"|")
    p = decode_state(one_id, body, int(version))
    return {
        "stage": p.stage,
        "scores": {
            dim: {rule: round(points, 6) for rule, (points, _) in contributions.items()}
            for dim, contributions in p.score.contributions.items()
        },
        "score_times": (p.score.ref_ms, p.score.last_ms),
        "caps": p.score.caps,
        "profile": p.profile,
        "disqualified": p.disqualified,
        # As a set: after a merge the two histories interleave in processing order,
        # which depends on how the input was cut into batches.
        "seen": sorted(p.seen),
        "counts": (p.transitions, p.promotions),
        "owner": (p.queue, p.owner),
        "channels": p.channels,
        "merged_from": sorted(m.one_id for m in p.merged_from),
        "refused": [(m.one_id, m.reason) for m in p.refused],
        "touches": (p.first_touch, p.last_touch),
        "work": p.work
        and (
            p.work.decision_id,
            p.work.queue,
            p.work.qualified_on,
            p.work.sdr,
            p.work.breached,
            p.work.reroutes,
        ),
        "erased": p.erased_ms,
    }


def ending(r: Rig) -> Ending:
    """Read Redis and every output topic to its end."""
    end = Ending()
    client = redis_client(r)
    for key in client.scan_iter("lf:r:*", count=5_000):
        end.redirects[key.decode()[len("lf:r:{") : -1]] = cast(bytes, client.get(key)).decode()
    for key in client.scan_iter("lf:p:*", count=5_000):
        one_id = key.decode()[len("lf:p:{") : -1]
        # An absorbed person's state is frozen wherever its merge caught it (events
        # in flight follow the redirect to the survivor): only live people count.
        if one_id not in end.redirects:
            end.people[one_id] = _person_view(one_id, cast(bytes, client.get(key)))
    for key in client.scan_iter("lf:q:{*}", count=5_000):
        counts = cast(dict[bytes, bytes], client.hgetall(key))
        end.queue_counts[key.decode()] = {k.decode(): int(v) for k, v in counts.items()}
    client.close()
    topics = r.settings.topics
    consumer = Consumer(
        {
            "bootstrap.servers": r.bootstrap,
            "group.id": "reliability-check",
            "enable.partition.eof": True,
            "fetch.wait.max.ms": 10,
        }
    )
    parts = [
        TopicPartition(t, p, 0)
        for t in (topics.decisions, topics.lifecycle, topics.dlq)
        for p in consumer.list_topics(t, timeout=10).topics[t].partitions
    ]
    consumer.assign(parts)
    at_end: set[tuple[str, int]] = set()
    deadline = time.monotonic() + 60
    while len(at_end) < len(parts) and time.monotonic() < deadline:
        for msg in consumer.consume(1_000, 0.2):
            err = msg.error()
            if err is not None:
                assert err.code() == KafkaError._PARTITION_EOF, err
                at_end.add((str(msg.topic()), msg.partition() or 0))
                continue
            value = msg.value() or b""
            if msg.topic() == topics.dlq:
                reason = cast(bytes, dict(msg.headers() or [])["leadflow.reason"]).decode()
                end.repeated_outputs += (reason, value) in end.dlq
                end.dlq.add((reason, value))
            elif msg.topic() == topics.lifecycle:
                record_id = orjson.loads(value)["record_id"]
                end.repeated_outputs += end.read(record_id, value)
                end.lifecycle.add(record_id)
            else:
                d = orjson.loads(value)
                end.repeated_outputs += end.read(d["decision_id"], value)
                end.decisions.setdefault(d["decision_id"], set()).add(d["sdr"])
                end.decided_for[d["decision_id"]] = d["one_id"]
    consumer.close()
    assert len(at_end) == len(parts), "output topics not read to their end"
    return end


@pytest.fixture(scope="module")
def clean(tmp_path_factory: pytest.TempPathFactory) -> Ending:
    """The reference: the workload produced up front, one uninterrupted run."""
    with rig(tmp_path_factory.mktemp("clean"), "clean") as r:
        create_topics(r.settings, partitions=1)
        produce(r, WORKLOAD)
        finish(r)
        end = ending(r)
    assert len(end.decisions) > 20 and len(end.dlq) == EVENTS // MALFORMED_EVERY + 1
    assert end.repeated_outputs == 0
    return end


def assert_same_people(got: Mapping[K, dict[str, Any]], clean: Mapping[K, dict[str, Any]]) -> None:
    """The same people, each the same in every field (the first difference shown)."""
    assert got.keys() == clean.keys()
    different = [o for o in clean if got[o] != clean[o]]
    if different:
        g, c = got[different[0]], clean[different[0]]
        diff = {k: (g[k], c[k]) for k in c if g[k] != c[k]}
        pytest.fail(f"{len(different)} people differ, e.g. {different[0]}: {diff} (got, clean)")


def assert_same_end(got: Ending, clean: Ending) -> None:
    """Nothing lost, nothing doubled, nothing different."""
    assert_same_people(got.people, clean.people)
    assert got.redirects == clean.redirects
    twice = {d: sdrs for d, sdrs in got.decisions.items() if len(sdrs) > 1}
    assert not twice, f"decisions sent to two SDRs: {twice}"
    assert got.decisions == clean.decisions
    assert got.queue_counts == clean.queue_counts  # each promotion counted once
    assert got.lifecycle == clean.lifecycle
    assert got.dlq == clean.dlq
    assert not got.differing, f"records re-emitted with other content: {got.differing[:5]}"


def redis_client(r: Rig) -> Any:
    """A client of the rig's Redis (a cluster client for a cluster)."""
    if isinstance(r.redis, LocalRedisCluster):
        return cluster_client(r.redis.url)
    return redis.Redis.from_url(r.redis.url, decode_responses=False)


def done_offset(r: Rig) -> int:
    """The input's done offset in Redis (-1 before there is one); one partition."""
    client = redis_client(r)
    values = cast(dict[bytes, bytes], client.hgetall("lf:input")).values()
    client.close()
    return max((int(v) for v in values), default=-1)


def test_kill_9_at_random_moments_loses_nothing_and_doubles_nothing(
    tmp_path: Path, clean: Ending
) -> None:
    rng = random.Random(SEED)
    with rig(tmp_path, "crash") as r:
        create_topics(r.settings, partitions=1)
        proc = start_engine(r)
        feeder = stream(r)
        kills = 0
        try:
            while feeder.is_alive() or kills < 4:
                time.sleep(rng.uniform(0.5, 3.0))
                if kills == 2:
                    # This time the recovery volume is lost too, once this run has moved the
                    # done offset (people have forgotten positions below it): input must
                    # resume from the done offset in Redis, not from the beginning.
                    done = done_offset(r)
                    deadline = time.monotonic() + 30
                    while done_offset(r) == done and time.monotonic() < deadline:
                        time.sleep(0.1)
                    assert done_offset(r) > done, "the done offset did not move in 30 s"
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                kills += 1
                if kills == 3:
                    shutil.rmtree(r.settings.dataflow.recovery_dir)
                proc = start_engine(r)
        finally:
            stop_process(proc, sig=signal.SIGKILL)
        feeder.join()
        finish(r)
        got = ending(r)
    print(f"seed {SEED}: {kills} kills, {got.repeated_outputs} outputs repeated")
    assert_same_end(got, clean)
    assert "(done in Redis), not the beginning (recovery)" in r.log.read_text()


def test_the_same_stream_ends_the_same_produced_before_or_streamed(
    tmp_path: Path, clean: Ending
) -> None:
    """Streamed while the engine runs, the workload is read in small batches; up front, in
    large ones. Merges, promotions and assignments must not depend on the cut."""
    with rig(tmp_path, "streamed") as r:
        create_topics(r.settings, partitions=1)
        proc = start_engine(r)
        try:
            stream(r).join()
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(60) == 0
        finally:
            stop_process(proc, sig=signal.SIGKILL)
        finish(r)
        got = ending(r)
    assert got.repeated_outputs == 0  # a clean stop re-emits nothing
    assert_same_end(got, clean)


def test_a_redis_restart_mid_stream_is_ridden_out(tmp_path: Path, clean: Ending) -> None:
    with rig(tmp_path, "redis", appendonly=True) as r:
        create_topics(r.settings, partitions=1)
        proc = start_engine(r)
        feeder = stream(r)
        time.sleep(3.0)
        assert isinstance(r.redis, LocalRedis)
        r.redis.restart(down_s=2.0)  # graceful: AOF written out; see README for kill -9
        feeder.join()
        assert proc.poll() is None, "the engine died while Redis was down"
        proc.send_signal(signal.SIGINT)
        assert proc.wait(60) == 0
        finish(r)
        got = ending(r)
    assert "redis error (attempt 1" in r.log.read_text()  # it did see Redis go away
    assert_same_end(got, clean)


class Blackout:
    """A TCP proxy in front of the broker that can drop every connection for a while."""

    def __init__(self, port: int, target_port: int):
        self.target_port = target_port
        self.up = threading.Event()
        self.up.set()
        self.conns: list[socket.socket] = []
        self.lock = threading.Lock()
        self.listener = socket.create_server(("127.0.0.1", port))
        self.listener.settimeout(0.1)
        self.stopped = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.stopped:
            try:
                client, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:  # closed
                return
            if not self.up.is_set():
                client.close()  # refused while the broker is "down"
                continue
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            with self.lock:
                self.conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                s.close()

    def cut(self, seconds: float) -> None:
        """Drop every connection and refuse new ones for ``seconds``."""
        self.up.clear()
        with self.lock:
            for s in self.conns:
                with suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                s.close()
            self.conns = []
        time.sleep(seconds)
        self.up.set()

    def close(self) -> None:
        """Stop proxying."""
        self.stopped = True
        self.listener.close()


def test_an_unreachable_broker_for_20_s_is_ridden_out(tmp_path: Path, clean: Ending) -> None:
    proxy_port = free_port()
    with rig(tmp_path, "outage", advertised_port=proxy_port) as r:
        proxy = Blackout(proxy_port, r.broker.port)
        try:
            create_topics(r.settings, partitions=1)
            proc = start_engine(r)
            produce(r, WORKLOAD[: len(WORKLOAD) // 2], RATE)
            proxy.cut(20.0)
            assert proc.poll() is None, "the engine died while the broker was unreachable"
            produce(r, WORKLOAD[len(WORKLOAD) // 2 :], RATE)
            proc.send_signal(signal.SIGINT)
            assert proc.wait(60) == 0
            finish(r)
            got = ending(r)
        finally:
            proxy.close()
    assert_same_end(got, clean)


PAUSE_S = 20


def test_a_paused_redis_slows_reading_instead_of_filling_memory(tmp_path: Path) -> None:
    with rig(tmp_path, "pause") as r:
        assert isinstance(r.redis, LocalRedis)
        create_topics(r.settings, partitions=1)
        proc = start_engine(r)
        try:
            produce(r, WORKLOAD[:2_000])
            time.sleep(5.0)  # started and caught up
            rss_before = psutil.Process(proc.pid).memory_info().rss
            client = redis.Redis.from_url(r.redis.url)
            big = workload.encoded(50_000, 200_000, seed=3)  # ~60 MB waiting in the broker
            paused_at = time.monotonic()
            client.client_pause(PAUSE_S * 1000)
            produce(r, [(k, v) for k, v in big])
            time.sleep(4.0)
            rss_paused = psutil.Process(proc.pid).memory_info().rss
            # Measured while Redis was still paused, or it measures the work after it.
            assert time.monotonic() - paused_at < PAUSE_S - 1, "producing outlasted the pause"
            time.sleep(PAUSE_S + 5.0 - (time.monotonic() - paused_at))  # the engine reads on
            assert proc.poll() is None
            stored = client.dbsize()
            client.close()
        finally:
            stop_process(proc)
    grown_mb = (rss_paused - rss_before) / 2**20
    print(f"RSS grew {grown_mb:.1f} MiB while Redis was paused with 200,000 events waiting")
    assert grown_mb < 40, "the engine buffered input while Redis was paused"
    assert stored > 1_000  # and it went on once Redis answered again


HOSTILE = [
    b"\x00\xff\xfe garbage",
    b"[" * 2_000 + b"]" * 2_000,
    b'{"a":' * 2_000 + b"1" + b"}" * 2_000,
    b'{"type":"track","messageId":"m","anonymousId":"\xff"}',
    b'{"type":"track","event":"Demo Requested","messageId":"n","anonymousId":"a","x":NaN}',
    b'{"type":"page","messageId":"t","anonymousId":"a","timestamp":"1970-01-01T00:00:00Z"}',
    b'{"type":"page","messageId":"u","anonymousId":"a","timestamp":"9999-12-31T23:59:59Z"}',
    b'{"type":"identify","messageId":"v","anonymousId":"a","traits":{"email":["x"]}}',
    b'{"type":"track","event":"won","messageId":"w","anonymousId":"a"}',
    orjson.dumps({"type": "page", "messageId": "x" * 300, "anonymousId": "a"}),
    orjson.dumps({"type": "page", "messageId": "y", "anonymousId": "a", "blob": "z" * 40_000}),
]


def test_hostile_messages_go_to_the_dlq_with_reasons_and_the_flow_goes_on(
    tmp_path: Path,
) -> None:
    good = [e for e in workload.encoded(50, 400, seed=5)]
    # Weird but valid: processed, not rejected.
    odd = [
        b'{"type":"track","type":"page","messageId":"dup-keys","anonymousId":"a"}',
        orjson.dumps({"type": "identify", "messageId": "wide", "anonymousId": "b",
                      "traits": {"email": "\uff41lice@example.com", "company": 7}}),
    ]  # fmt: skip
    with rig(tmp_path, "hostile") as r:
        create_topics(r.settings, partitions=1)
        batch: list[tuple[bytes | None, bytes]] = [(None, v) for v in [*HOSTILE, *odd]]
        produce(r, batch + list(good))
        finish(r)
        end = ending(r)
    rejected = {value: reason for reason, value in end.dlq}
    assert set(rejected) == set(HOSTILE), "every hostile message, and only those, in the DLQ"
    assert all(rejected.values())
    assert len(end.lifecycle) >= len({orjson.loads(v)["anonymousId"] for _, v in good})
