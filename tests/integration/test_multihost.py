"""A Bytewax cluster across hosts: one ``leadflow run`` per host, 4 partitions, kill -9, rescale.

The hosts are network namespaces with addresses of their own (tests/integration/
hosts.py); the broker and Redis listen on the bridge that joins them. Each host
has its own recovery directory, as each pod of the StatefulSet in deploy/k8s has
its own volume. The same 20,000 events as the reliability tests (merges, three
queues, round robin, malformed messages) go in while two hosts run; one of them
is killed with SIGKILL at a random moment, the cluster goes down with it and is
started again on the same two hosts, then stopped and started on three (the
third with an empty recovery directory): a rescale from the same recovery store.
Then the rest of the events arrive and the second host's recovery volume is lost:
that member refuses to start, naming what to do, and the way back it names works.

The end must equal one process reading the same 4 partitions on servers of its
own, in everything that does not depend on how the partitions interleave: which
One-ID survives a merge, and so which SDR a lead of a merged person goes to and
the ids of their decisions, does (as it does for one process and another
interleaving). So people are compared by the identifiers they hold, decisions by
count and, for people never merged, by id; queue totals exactly; per-SDR counts
within the round robin's bound (one lead apart from the reference per SDR).
"""

from __future__ import annotations

import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import pytest

from engine.person import Rulebook, current_scores, decode_state
from engine.store import RedisStore
from leadflow.servers import stop_process
from leadflow.topics import create_topics
from tests.integration.hosts import Hosts, hosts, why_no_hosts
from tests.integration.test_reliability import (
    RATE,
    SEED,
    WORKLOAD,
    Ending,
    Rig,
    _person_view,
    assert_same_people,
    done_offset,
    ending,
    finish,
    produce,
    redis_client,
    rig,
)

PARTITIONS = 4
CLUSTER_PORT = 2101  # each host has its own port space
NO_HOSTS = why_no_hosts()
pytestmark = pytest.mark.skipif(bool(NO_HOSTS), reason=NO_HOSTS or "-")


@dataclass
class Comparable:
    """A run's end keyed by what does not depend on which One-ID survived a merge."""

    people: dict[frozenset[str], dict[str, Any]]
    unmerged_decisions: set[str]
    decisions: int
    queue_totals: dict[str, int]
    per_sdr: dict[str, Counter[str]]
    dlq: set[tuple[str, bytes]]
    repeated: int
    doubled: dict[str, set[str]]


# What survives a merge under another One-ID, or comes from the round robin's order;
# and the scores' stored form: points as of a reference time that depends on which event
# came first (the same score, compared below at the person's latest event); the last
# messages seen (the dedup window: which are last depends on the order, not how many).
_ORDER_DEPENDENT = (
    "owner", "work", "merged_from", "refused", "scores", "score_times", "seen"
)  # fmt: skip


def comparable(r: Rig, end: Ending) -> Comparable:
    """``end`` (and the identity graph in Redis) in a form two interleavings can share."""
    client = redis_client(r)
    rules = Rulebook(r.settings)
    people: dict[frozenset[str], dict[str, Any]] = {}
    merged: set[str] = set()
    store = RedisStore(r.settings.redis, client)
    for one_id in end.people:
        held = [f"{kind}:{d}" for kind, d in store.identifiers(one_id)]
        raw = cast(bytes, client.get(f"lf:p:{{{one_id}}}"))
        view = _person_view(one_id, raw)
        if view["merged_from"]:
            merged.add(one_id)
        version, _, body = raw.partition(b"|")
        state = decode_state(one_id, body, int(version))
        scores = {dim: round(v, 4) for dim, v in current_scores(state, rules).items()}
        people[frozenset(held)] = {k: v for k, v in view.items() if k not in _ORDER_DEPENDENT} | {
            "queue": view["owner"][0],
            "sdr_assigned": bool(view["owner"][1]),
            "scores": scores,
            "rules": {dim: sorted(c) for dim, c in view["scores"].items()},
            "latest_event": view["score_times"][1],
            "seen": len(view["seen"]),
            # A merged person's stage changes are the survivor's, whichever that was.
            "counts": view["counts"] if not view["merged_from"] else view["counts"][1:],
        }
    client.close()
    return Comparable(
        people=people,
        unmerged_decisions={
            d for d, one_id in end.decided_for.items() if one_id not in merged | set(end.redirects)
        },
        decisions=len(end.decisions),
        queue_totals={q: sum(c.values()) for q, c in end.queue_counts.items()},
        per_sdr={q: Counter(c) for q, c in end.queue_counts.items()},
        dlq=end.dlq,
        repeated=end.repeated_outputs,
        doubled={d: s for d, s in end.decisions.items() if len(s) > 1},
    )


@pytest.fixture(scope="module")
def one_process(tmp_path_factory: pytest.TempPathFactory) -> Comparable:
    """The reference: the workload on 4 partitions, one uninterrupted process."""
    with rig(tmp_path_factory.mktemp("one"), "one") as r:
        create_topics(r.settings, partitions=PARTITIONS)
        produce(r, WORKLOAD)
        finish(r)
        return comparable(r, ending(r))


def start_member(
    r: Rig, net: Hosts, host: int, members: int, tmp: Path, *extra: str
) -> subprocess.Popen[bytes]:
    """``leadflow run --process-id HOST --addresses ...`` inside host ``host``."""
    addresses = ";".join(f"{a}:{CLUSTER_PORT}" for a in net.addresses[:members])
    env = {**r.env, "LEADFLOW_RECOVERY_DIR": str(tmp / f"host-{host}" / "recovery")}
    with (tmp / f"host-{host}.log").open("ab") as log:
        argv = [sys.executable, "-m", "leadflow.cli", "run"]
        argv += ["--process-id", str(host), "--addresses", addresses, *extra]
        return subprocess.Popen(
            net.command(host, argv), env=env, stdout=log, stderr=subprocess.STDOUT
        )


def logs(tmp: Path) -> str:
    """The tail of every host's log."""
    tails = (f"--- {p.name}\n{p.read_text()[-1500:]}" for p in sorted(tmp.glob("host-*.log")))
    return "\n".join(tails)


def test_hosts_killed_restarted_and_rescaled_end_like_one_process(
    tmp_path: Path, one_process: Comparable
) -> None:
    rng = random.Random(SEED)
    cut = len(WORKLOAD) * 3 // 4
    with hosts(3) as net, rig(tmp_path, "hosts", host=net.gateway) as r:
        create_topics(r.settings, partitions=PARTITIONS)
        feeder = threading.Thread(target=produce, args=(r, WORKLOAD[:cut], RATE), daemon=True)
        feeder.start()
        members = [start_member(r, net, i, 2, tmp_path) for i in range(2)]
        try:
            # A member killed before the cluster formed leaves its peer waiting for it (as
            # Bytewax does on start-up): the random moment is after the first batch is done.
            deadline = time.monotonic() + 60
            while done_offset(r) < 0 and time.monotonic() < deadline:
                time.sleep(0.1)
            time.sleep(rng.uniform(0.0, 3.0))
            members[1].send_signal(signal.SIGKILL)  # a host lost at a random moment
            # Its peer loses the connection and stops too: the cluster is down.
            assert members[0].wait(60) != 0, logs(tmp_path)
            members = [start_member(r, net, i, 2, tmp_path) for i in range(2)]
            feeder.join()
            time.sleep(2.0)
            for m in members:  # an operator's clean stop before the rescale
                m.send_signal(signal.SIGINT)
            assert [m.wait(60) for m in members] == [0, 0], logs(tmp_path)
            members = [start_member(r, net, i, 3, tmp_path, "--stop-at-end") for i in range(3)]
            assert [m.wait(240) for m in members] == [0, 0, 0], logs(tmp_path)

            # Then host 1 loses its recovery volume: it says so and what to do, and the
            # operator's way back (every directory emptied, the layout key deleted) works.
            produce(r, WORKLOAD[cut:])
            shutil.rmtree(tmp_path / "host-1" / "recovery")
            members = [start_member(r, net, 1, 3, tmp_path, "--stop-at-end")]
            assert members[0].wait(60) == 1
            said = (tmp_path / "host-1.log").read_text()
            assert "RecoveryVolumeLost: the recovery directory" in said, said[-2000:]
            key = said.split("delete the Redis key ")[1].split(";")[0]
            for i in range(3):
                shutil.rmtree(tmp_path / f"host-{i}" / "recovery", ignore_errors=True)
            client = redis_client(r)
            assert client.delete(key) == 1
            client.close()
            members = [start_member(r, net, i, 3, tmp_path, "--stop-at-end") for i in range(3)]
            assert [m.wait(240) for m in members] == [0, 0, 0], logs(tmp_path)
        finally:
            for m in members:
                stop_process(m, sig=signal.SIGKILL)
        got = comparable(r, ending(r))
    print(f"seed {SEED}: {got.repeated} outputs repeated")
    assert not got.doubled, f"decisions sent to two SDRs: {got.doubled}"
    assert_like(got, one_process)


def assert_like(got: Comparable, reference: Comparable) -> None:
    """Nothing lost, nothing doubled: equal wherever the interleaving does not matter."""
    assert_same_people(got.people, reference.people)
    assert got.decisions == reference.decisions
    assert got.unmerged_decisions == reference.unmerged_decisions
    assert got.queue_totals == reference.queue_totals  # each promotion counted once
    for queue, counts in reference.per_sdr.items():
        apart = {s: got.per_sdr[queue][s] - n for s, n in counts.items()}
        assert all(abs(d) <= 1 for d in apart.values()), (queue, apart)
    assert got.dlq == reference.dlq
