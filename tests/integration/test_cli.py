"""The console script as a user runs it: real processes, real servers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import redis

from engine.settings import Settings
from leadflow.servers import LocalBroker, LocalRedis, free_port
from leadflow.topics import create_topics
from tests.conftest import local_settings
from tests.integration.flow import hot_lead, outputs, run_flow, send

LEADFLOW = [sys.executable, "-m", "leadflow.cli"]


def _env(broker: LocalBroker, redis: LocalRedis) -> dict[str, str]:
    return {
        **os.environ,
        "LEADFLOW_KAFKA_BOOTSTRAP": broker.bootstrap,
        "LEADFLOW_REDIS_URL": redis.url,
        "LEADFLOW_METRICS_PORT": str(free_port()),
        "LEADFLOW_HEALTH_PORT": "0",
        "LEADFLOW_RECOVERY_DIR": str(broker.workdir / "recovery"),  # gone with the broker
    }


def _server_pids() -> set[str]:
    ps = subprocess.run(
        ["ps", "-eo", "pid,args"], capture_output=True, text=True, check=True
    ).stdout
    return {
        line.split()[0]
        for line in ps.splitlines()
        if (
            "tansu" in line
            or "redis-server" in line
            or "valkey-server" in line
            or "leadflow.cli" in line
        )
        and ":6379" not in line  # the machine's own Redis is not ours
    }


def test_run_with_two_processes_forms_one_cluster(
    broker: LocalBroker, redis_server: LocalRedis
) -> None:
    settings = local_settings(broker, redis_server)
    create_topics(settings, partitions=2)
    send(settings, [e for n in range(6) for e in hot_lead(f"anon-{n}", t=n)])
    result = subprocess.run(
        [*LEADFLOW, "run", "--processes", "2", "--stop-at-end"],
        env=_env(broker, redis_server),
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    seen = outputs(settings)
    assert len(seen.decisions) == 6
    assert Counter(d["sdr"] for d in seen.decisions.values()) == {
        "sdr-ana": 2,
        "sdr-bruno": 2,
        "sdr-chen": 2,
    }
    assert "process 1 of 2" in result.stderr


def test_demo_runs_end_to_end_and_leaves_nothing_behind() -> None:
    before = _server_pids()
    result = subprocess.run(
        [*LEADFLOW, "demo", "--people", "60", "--rate", "1500", "--quiet"],
        capture_output=True,
        text=True,
        check=False,
        timeout=150,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    out = result.stdout
    assert "== Leadflow demo summary ==" in out
    assert "decision latency" in out
    assert "DLQ                  5" in out  # the five malformed messages the demo sends
    people = int(out.split("people", 1)[1].split()[0])
    assert 50 <= people <= 60  # personas that share a test e-mail are one person
    assert _server_pids() - before == set()


def test_bad_config_stops_start_up_naming_file_key_and_problem(tmp_path: Path) -> None:
    config = Path(__file__).resolve().parents[2] / "config"
    for f in config.iterdir():
        (tmp_path / f.name).write_text(f.read_text())
    scoring = tmp_path / "scoring.toml"
    scoring.write_text(
        scoring.read_text().replace("mql_threshold = 100.0", 'mql_threshold = "high"')
    )
    result = subprocess.run(
        [*LEADFLOW, "--config-dir", str(tmp_path), "run"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 2
    assert f"{scoring}: scoring.mql_threshold: expected a number, got str 'high'" in result.stderr


def test_config_show_masks_secrets() -> None:
    env = {
        **os.environ,
        "LEADFLOW_REDIS_URL": "redis://app:s3cret-pw@10.0.0.5:6379/0",
        "LEADFLOW_KAFKA_OPT_SASL_PASSWORD": "kafka-s3cret",
    }
    result = subprocess.run(
        [*LEADFLOW, "config", "show"], env=env, capture_output=True, text=True, check=True
    )
    assert "s3cret" not in result.stdout
    assert "redis://app:***@10.0.0.5:6379/0" in result.stdout
    assert '"sasl.password": "***"' in result.stdout


def test_pipeline_on_valkey(broker: LocalBroker) -> None:
    with LocalRedis("valkey") as valkey:
        assert isinstance(valkey, LocalRedis)
        settings: Settings = local_settings(broker, valkey, stop_at_end=True)
        create_topics(settings, partitions=1)
        send(settings, hot_lead("anon-v"))
        run_flow(settings, 1)
        assert len(outputs(settings).decisions) == 1


def test_roster_apply_and_show_as_sales_ops_use_them(
    broker: LocalBroker, redis_server: LocalRedis, tmp_path: Path
) -> None:
    roster = tmp_path / "march.toml"
    roster.write_text(
        '[[sdrs]]\nid = "sdr-ana"\nqueue = "inbound"\nweight = 2\n'
        '[[sdrs]]\nid = "sdr-dana"\nqueue = "inbound"\ntimezone = "Europe/Berlin"\n'
    )
    env = _env(broker, redis_server)

    def leadflow(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*LEADFLOW, *args], env=env, capture_output=True, text=True, check=False
        )

    applied = leadflow("roster", "apply", str(roster))
    assert applied.returncode == 0, applied.stderr
    assert "applied as version 1" in applied.stdout
    shown = leadflow("roster", "show")
    assert shown.returncode == 0, shown.stderr
    report = json.loads(shown.stdout)
    assert report["source"] == "redis, version 1"
    assert [(s["sdr"], s["weight"]) for s in report["queues"]["inbound"]] == [
        ("sdr-ana", 2.0),
        ("sdr-dana", 1.0),
    ]
    roster.write_text('[[sdrs]]\nid = "sdr-x"\nqueue = "nowhere"\n')
    bad = leadflow("roster", "apply", str(roster))
    assert bad.returncode == 2 and "sdrs[0].queue" in bad.stderr and "nowhere" in bad.stderr


def _run_two_processes(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """``leadflow run --processes 2 --stop-at-end`` under its supervisor, output captured."""
    return subprocess.run(
        [*LEADFLOW, "run", "--processes", "2", "--stop-at-end"],
        env=env,
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )


def _stopping_config(tmp_path: Path) -> Path:
    """The shipped configuration with ``limits.on_processing_error = "stop"``."""
    import shutil

    config = tmp_path / "config"
    shutil.copytree(Path(__file__).parents[2] / "config", config)
    engine = config / "engine.toml"
    engine.write_text(
        engine.read_text().replace('on_processing_error = "dlq"', 'on_processing_error = "stop"')
    )
    return config


def test_the_supervisor_exits_non_zero_with_the_failing_members_own_error(
    broker: LocalBroker, redis_server: LocalRedis, tmp_path: Path
) -> None:
    from tests.integration.test_nothing_stops import corrupt

    settings = local_settings(broker, redis_server, stop_at_end=True)
    create_topics(settings, partitions=2)
    send(settings, [e for n in range(4) for e in hot_lead(f"m-{n}")[:1]])
    run_flow(settings, 1)
    for n in range(4):  # whichever member holds them, one of them fails
        corrupt(settings, f"m-{n}")
    send(settings, [e for n in range(4) for e in hot_lead(f"m-{n}")[1:]])
    env = {
        **_env(broker, redis_server),
        "LEADFLOW_CONFIG_DIR": str(_stopping_config(tmp_path)),
        "LEADFLOW_METRICS_PORT": "0",  # process i would take port + i, which may be taken
    }
    result = _run_two_processes(env)
    assert result.returncode == 1, result.stderr[-3000:]
    failed = [line for line in result.stderr.splitlines() if "the cluster stopped" in line]
    assert len(failed) == 1 and "JSONDecodeError" in failed[0], result.stderr[-3000:]
    assert "thread panic" not in failed[0]


def test_errors_a_person_can_act_on(broker: LocalBroker, redis_server: LocalRedis) -> None:
    """One line naming what failed and how to fix it, and the exit code of its cause."""
    env = _env(broker, redis_server)

    def run(*args: str, **extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*LEADFLOW, *args],
            env={**env, **extra},
            capture_output=True,
            text=True,
            check=False,
            timeout=60,
        )

    dead = f"redis://127.0.0.1:{free_port()}/0"
    unreachable = run("run", "--stop-at-end", LEADFLOW_REDIS_URL=dead)
    assert unreachable.returncode == 3, unreachable.stderr
    (line,) = [x for x in unreachable.stderr.splitlines() if x.startswith("leadflow:")]
    assert "unreachable" in line and "LEADFLOW_REDIS_URL" in line
    assert "Traceback" not in unreachable.stderr

    missing = run("run", "--stop-at-end")  # no topics created on this broker yet
    assert missing.returncode == 4, missing.stderr
    assert "leadflow topics create" in missing.stderr and "Traceback" not in missing.stderr

    bad_env = run("config", "check", LEADFLOW_REDIS_URL="http://nowhere")
    assert bad_env.returncode == 2 and "env: LEADFLOW_REDIS_URL:" in bad_env.stderr

    public = run("run", "--stop-at-end", LEADFLOW_ALLOW_SHIPPED_SALT="0")
    assert public.returncode == 2 and "identity.salt" in public.stderr

    redis_client = redis.Redis.from_url(redis_server.url)
    redis_client.config_set("maxmemory-policy", "allkeys-lru")
    redis_client.set("someone-else:key", "1")
    create_topics(local_settings(broker, redis_server))
    evicting = run("config", "check", "--connect")
    assert evicting.returncode == 3 and "maxmemory-policy allkeys-lru" in evicting.stderr
    redis_client.config_set("maxmemory-policy", "noeviction")
    connected = run("config", "check", "--connect")
    assert connected.returncode == 0, connected.stderr
    assert "redis: ok" in connected.stdout and "kafka: ok" in connected.stdout
    assert "not Leadflow's" in connected.stdout  # a shared database is said, not refused


def test_a_stop_signal_ends_the_engine_quietly(
    broker: LocalBroker, redis_server: LocalRedis
) -> None:
    """SIGTERM drains the flow: exit 0, 'stopped' logged, no Rust panic on the way out."""
    import signal
    import time

    from tests.integration.test_nothing_stops import scored, wait_for

    settings = local_settings(broker, redis_server)
    create_topics(settings)
    env = {**_env(broker, redis_server), "RUST_BACKTRACE": "1"}
    proc = subprocess.Popen(
        [*LEADFLOW, "run"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        send(settings, hot_lead("sig"))
        wait_for(lambda: scored(settings, "sig"), "the engine to score the events")
        time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, output[-3000:]
    assert "stopped" in output
    assert "panicked" not in output and "Traceback" not in output, output[-3000:]


def test_config_check_refuses_a_webhook_without_its_secret(tmp_path: Path) -> None:
    import shutil

    config = tmp_path / "config"
    shutil.copytree(Path(__file__).parents[2] / "config", config)
    routing = config / "routing.toml"
    routing.write_text(
        routing.read_text().replace('webhook_url = ""', 'webhook_url = "https://crm.example/h"', 1)
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("LEADFLOW_WEBHOOK_SECRET")}

    def check(**extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*LEADFLOW, "--config-dir", str(config), "config", "check"],
            env={**env, **extra},
            capture_output=True,
            text=True,
            check=False,
        )

    missing = check()
    assert missing.returncode == 2, missing.stderr
    assert "routing.toml: routing.queues[0].webhook_secret_env" in missing.stderr
    assert "LEADFLOW_WEBHOOK_SECRET is not set" in missing.stderr
    assert check(LEADFLOW_WEBHOOK_SECRET="new,old").returncode == 0


def test_the_supervisor_names_a_member_that_fails_before_its_flow_starts(
    broker: LocalBroker, redis_server: LocalRedis
) -> None:
    """Process 1's metrics port is taken: the supervisor says so, not process 0's echo."""
    import socket

    settings = local_settings(broker, redis_server)
    create_topics(settings)
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = {**_env(broker, redis_server), "LEADFLOW_METRICS_PORT": str(port - 1)}
        result = _run_two_processes(env)
    assert result.returncode == 1, result.stderr[-3000:]
    (line,) = [x for x in result.stderr.splitlines() if "the cluster stopped" in x]
    assert "process 1 failed" in line and "Address already in use" in line, line
