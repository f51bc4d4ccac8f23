"""`leadflow alerts` as operators run it: real processes, killed, doubled, and a receiver down."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from engine.settings import DEFAULT_CONFIG_DIR, Settings
from leadflow.servers import LocalBroker, LocalRedis, free_port, stop_process
from tests.integration.alert_rig import SECRET, Receiver, decision, emit
from tests.integration.flow import hot_lead, send
from tests.integration.test_alerts import read_topic


def config_for(tmp: Path, url: str, **alerts: float) -> Path:
    """The shipped configuration, the inbound queue POSTing to ``url``, ``alerts`` options."""
    config = tmp / "config"
    shutil.copytree(DEFAULT_CONFIG_DIR, config)
    routing = config / "routing.toml"
    routing.write_text(routing.read_text().replace('webhook_url = ""', f'webhook_url = "{url}"'))
    engine = config / "engine.toml"
    text = engine.read_text()
    for key, value in alerts.items():
        start = text.index(f"\n{key} = ") + 1
        text = text[:start] + f"{key} = {value}" + text[text.index("\n", start) :]
    engine.write_text(text)
    return config


def environment(config: Path, broker: LocalBroker, redis: LocalRedis) -> dict[str, str]:
    return {
        **os.environ,
        "LEADFLOW_CONFIG_DIR": str(config),
        "LEADFLOW_KAFKA_BOOTSTRAP": broker.bootstrap,
        "LEADFLOW_REDIS_URL": redis.url,
        "LEADFLOW_WEBHOOK_SECRET": SECRET,
        "LEADFLOW_ALERTS_METRICS_PORT": "0",
        "LEADFLOW_METRICS_PORT": str(free_port()),
        "LEADFLOW_HEALTH_PORT": "0",
        "LEADFLOW_RECOVERY_DIR": str(config.parent / "recovery"),
    }


class Processes:
    """`leadflow` processes started by a test, each logging to its own file."""

    def __init__(self, env: dict[str, str], logs: Path):
        self.env, self.logs = env, logs
        self.started: list[subprocess.Popen[bytes]] = []

    def start(self, name: str, *args: str) -> subprocess.Popen[bytes]:
        with (self.logs / f"{name}.log").open("ab") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "leadflow.cli", *args],
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        self.started.append(proc)
        return proc

    def log(self, name: str) -> str:
        return (self.logs / f"{name}.log").read_text()[-3000:]


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[list[Processes]]:
    made: list[Processes] = []
    yield made
    for p in made:
        for proc in p.started:
            stop_process(proc, sig=signal.SIGKILL)


def test_a_receiver_down_for_30_s_gets_each_alert_once_when_back(
    settings: Settings,
    broker: LocalBroker,
    redis_server: LocalRedis,
    tmp_path: Path,
    processes: list[Processes],
) -> None:
    receiver = Receiver()  # not listening yet: connections are refused
    config = config_for(tmp_path, f"{receiver.url}/ok", retry_max_s=8.0, give_up_after_s=300.0)
    run = Processes(environment(config, broker, redis_server), tmp_path)
    processes.append(run)
    records = [decision(n) for n in range(20)]
    emit(settings, records)
    sender = run.start("alerts", "alerts")
    time.sleep(30)
    assert sender.poll() is None, run.log("alerts")
    receiver.start()
    try:
        ids = {r["decision_id"] for r in records}
        receiver.wait_for(ids, timeout_s=60)
        time.sleep(2)  # a late second POST would show now
        assert Counter(receiver.delivered()) == Counter({i: 1 for i in ids})
        sender.send_signal(signal.SIGTERM)
        assert sender.wait(30) == 0, run.log("alerts")
        assert "20 delivered" in run.log("alerts")
    finally:
        receiver.stop()


def test_killed_and_doubled_senders_and_a_killed_engine_post_each_decision_once(
    settings: Settings,
    broker: LocalBroker,
    redis_server: LocalRedis,
    tmp_path: Path,
    processes: list[Processes],
) -> None:
    """Two senders share the decisions; one is killed -9 and restarted, so is the engine.

    The one POST allowed twice is the one a killed sender had in flight (it cannot know
    whether the receiver got it; the receiver de-duplicates on X-Leadflow-Decision).
    """
    receiver = Receiver(delay_s=0.02).start()
    config = config_for(tmp_path, f"{receiver.url}/ok")
    run = Processes(environment(config, broker, redis_server), tmp_path)
    processes.append(run)
    engine = run.start("engine", "run")
    senders = [run.start("alerts-a", "alerts"), run.start("alerts-b", "alerts")]
    leads = 60

    def stream() -> None:
        for n in range(leads):
            send(settings, hot_lead(f"kill-{n}", t=n))
            time.sleep(0.15)

    streaming = threading.Thread(target=stream)
    streaming.start()
    try:
        time.sleep(4)
        senders[0].send_signal(signal.SIGKILL)
        killed_at = time.monotonic()
        senders[0].wait(10)
        senders.append(run.start("alerts-a", "alerts"))
        time.sleep(2)
        engine.send_signal(signal.SIGKILL)
        engine.wait(10)
        engine = run.start("engine", "run")
        streaming.join()
        deadline = time.monotonic() + 120
        while True:
            made = read_topic(settings, settings.topics.decisions)
            ids = {d["decision_id"] for d in made}
            if len(ids) >= leads and ids <= set(receiver.delivered()):
                break
            assert time.monotonic() < deadline, (
                f"{len(ids)} decisions, {len(set(receiver.delivered()))} delivered;"
                f" engine: {run.log('engine')}\nsender: {run.log('alerts-b')}"
            )
            time.sleep(0.5)
        time.sleep(2)  # a late second POST would show now
        posts = Counter(receiver.delivered())
        twice = [d for d, n in posts.items() if n > 1]
        assert len(twice) <= 1, f"POSTed more than once: {twice}"
        for d in twice:
            first = min(p.started for p in receiver.posts if p.decision_id == d)
            assert first <= killed_at, "only the POST in flight at the kill may come twice"
        assert set(posts) == ids
        print(
            f"decisions on the topic {len(made)} (distinct {len(ids)}), POSTs {sum(posts.values())}"
        )
        for proc in (engine, *senders[1:]):
            proc.send_signal(signal.SIGTERM)
        assert [p.wait(60) for p in (engine, *senders[1:])] == [0, 0, 0]
    finally:
        receiver.stop()
