"""Leadflow on a real Redis Cluster (3 masters, 3 replicas, created with redis-cli)."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import orjson
import redis

from leadflow.servers import LocalRedisCluster, stop_process
from leadflow.topics import create_topics
from tests.integration.test_reliability import (
    WORKLOAD,
    Ending,
    assert_same_end,
    clean,
    ending,
    finish,
    produce,
    rig,
    start_engine,
    stream,
)

__all__ = ["clean"]  # the reference run, as a fixture of this module too


def run_on_cluster(tmp_path: Path, processes: int) -> Ending:
    """The workload through ``leadflow run --stop-at-end`` on a Redis Cluster."""
    with rig(tmp_path, f"cluster-{processes}", cluster=True) as r:
        create_topics(r.settings, partitions=processes)
        produce(r, WORKLOAD)
        proc = start_engine(r, "--stop-at-end", "--processes", str(processes))
        try:
            code = proc.wait(240)
        finally:
            stop_process(proc, sig=signal.SIGKILL)
        assert code == 0, r.log.read_text()[-3000:]
        return ending(r)


def test_a_redis_cluster_ends_exactly_like_a_standalone_redis(
    tmp_path: Path, clean: Ending
) -> None:
    """The same 20,000 events (merges across slots, three queues, round robin, the DLQ)."""
    assert_same_end(run_on_cluster(tmp_path, 1), clean)


def test_two_processes_on_a_cluster_lose_nothing_and_double_nothing(
    tmp_path: Path, clean: Ending
) -> None:
    """Two processes on two partitions: which One-ID survives a merge, and which SDR gets
    a lead, depend on how the partitions interleave (as on a standalone Redis), so the
    comparison is of what must not depend on it."""
    got = run_on_cluster(tmp_path, 2)
    assert got.repeated_outputs == 0
    assert not {d: s for d, s in got.decisions.items() if len(s) > 1}
    assert len(got.people) == len(clean.people)
    assert len(got.decisions) == len(clean.decisions)
    assert sum(map(sum, (q.values() for q in got.queue_counts.values()))) == len(got.decisions)
    assert got.dlq == clean.dlq


def test_the_cli_commands_and_an_erasure_work_on_a_cluster(tmp_path: Path) -> None:
    """Roster apply and show, suppression lists, inspect, and an erasure through the flow."""
    with rig(tmp_path, "cli", cluster=True) as r:
        create_topics(r.settings, partitions=1)
        produce(r, WORKLOAD[:2_000])
        anonymous_id = next(
            orjson.loads(v)["anonymousId"] for k, v in WORKLOAD[:2_000] if k is not None
        )

        def leadflow(*args: str) -> str:
            done = subprocess.run(
                [sys.executable, "-m", "leadflow.cli", *args],
                env=r.env,
                capture_output=True,
                text=True,
                timeout=120,
                check=False,
            )
            assert done.returncode == 0, done.stdout + done.stderr + r.log.read_text()[-2000:]
            return done.stdout

        leadflow("run", "--stop-at-end")
        roster = Path(r.settings.config_dir) / "roster.toml"
        assert "applied as version 1" in leadflow("roster", "apply", str(roster))
        assert "redis, version 1" in leadflow("roster", "show")
        leadflow("lists", "add", "dnc", "+14155550100")
        assert "dnc" in leadflow("lists", "check", "+14155550100")
        person = json.loads(leadflow("inspect", f"anon:{anonymous_id}"))
        assert person["one_id"] and person["stage"]

        erase = {
            "type": "track",
            "event": "erase",
            "anonymousId": anonymous_id,
            "messageId": "erase-1",
            "properties": {"actor": "dpo"},
        }
        produce(r, [(None, orjson.dumps(erase))], topic=r.settings.topics.feedback)
        leadflow("run", "--stop-at-end")
        erased = json.loads(leadflow("inspect", f"anon:{anonymous_id}"))
        assert erased.get("erased_at"), erased


def test_a_dead_seed_node_does_not_stop_start_up() -> None:
    from engine.settings import RedisSettings
    from engine.store import RedisStore
    from leadflow.servers import LocalRedisCluster, free_cluster_port

    with LocalRedisCluster("redis") as cluster:
        dead = f"127.0.0.1:{free_cluster_port()}"
        url = cluster.url.replace("redis://", f"redis://{dead},", 1)
        store = RedisStore(RedisSettings(url=url, cluster=True))
        try:
            assert store.apply_roster(b'{"sdrs": []}') == 1
        finally:
            store.close()


def test_a_cluster_node_whose_port_was_taken_meanwhile_moves_to_another() -> None:
    cluster = LocalRedisCluster("redis")
    node = cluster.nodes[2]
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", node.port))
        squatter.listen()
        taken = node.port
        with cluster:
            assert node.port != taken
            assert "Address already in use" in node.log_path.read_text(errors="replace")
            client = redis.RedisCluster(host="127.0.0.1", port=cluster.nodes[0].port)
            try:
                client.set("{moved}k", "v")
                assert client.get("{moved}k") == b"v"
            finally:
                client.close()


def test_a_master_killed_mid_stream_is_ridden_out(tmp_path: Path, clean: Ending) -> None:
    """kill -9 of a master while events stream: its replica is promoted, the engine goes on."""
    with rig(tmp_path, "failover", cluster=True) as r:
        assert isinstance(r.redis, LocalRedisCluster)
        create_topics(r.settings, partitions=1)
        proc = start_engine(r)
        feeder = stream(r)
        try:
            time.sleep(3.0)
            replicas = [n for n in r.redis.nodes if _role(r.redis, n.port) == "slave"]
            master = next(n for n in r.redis.nodes if n not in replicas)
            assert master.proc is not None
            master.proc.send_signal(signal.SIGKILL)
            killed_at = time.monotonic()
            feeder.join()
            assert proc.poll() is None, "the engine died with the master"
            proc.send_signal(signal.SIGINT)
            assert proc.wait(120) == 0, r.log.read_text()[-3000:]
        finally:
            stop_process(proc, sig=signal.SIGKILL)
        # Counted before the run to the end, so that they are of the streaming engine.
        promoted = [n for n in replicas if _role(r.redis, n.port) == "master"]
        scripts_run = [_calls(r.redis, n.port, "evalsha") for n in promoted]
        finish(r)
        got = ending(r)
    print(f"master killed {time.monotonic() - killed_at:.1f} s before the end")
    # The kill was felt: a replica took over, and the engine saved people through it
    # (a replica runs no script of its own: it only receives a script's writes). Whether
    # the engine logs a "redis error" too depends on whether redis-py's own cluster
    # retries outlast the failover, so that is not asserted.
    assert len(promoted) == 1, [(n.port, _role(r.redis, n.port)) for n in replicas]
    assert scripts_run[0] > 0
    assert_same_end(got, clean)


def _role(cluster: LocalRedisCluster, port: int) -> str:
    """``master`` or ``slave``, as the node says of itself."""
    info = subprocess.run(
        [cluster.cli(), "-p", str(port), "role"], capture_output=True, text=True, check=True
    ).stdout
    return info.split()[0]


def _calls(cluster: LocalRedisCluster, port: int, command: str) -> int:
    """How many times a node has run ``command`` (``INFO commandstats``)."""
    info = subprocess.run(
        [cluster.cli(), "-p", str(port), "info", "commandstats"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    for line in info.splitlines():
        if line.startswith(f"cmdstat_{command}:"):
            return int(line.split("calls=", 1)[1].split(",", 1)[0])
    return 0
