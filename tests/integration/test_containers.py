"""The deploy files run: deploy/Dockerfile built, deploy/compose.yaml brought up, with podman.

No registry is reachable from this kind of machine, so the images start from a Debian
base made with debootstrap (deploy/podman/make-base.sh) and the compose file runs with
deploy/compose.podman.yaml over it: the embedded broker for Apache Kafka's image,
Debian's Redis 7 and Prometheus for theirs, Grafana left out. Then, through the real
stack: a hot lead produced inside the compose network becomes a decision; Redis runs
with AOF and refuses a client without the password from the secret file; Prometheus
scrapes the engine and sees the events it consumed.

Marked ``containers``; needs root, podman and debootstrap (`.ci/run` installs them with
deploy/podman/setup.sh); elsewhere it is skipped with the reason. The first run makes
the base image and builds the engine's (a few minutes, most of it pip); later runs
reuse both.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any, cast

import pytest

from tests.integration.flow import hot_lead

REPO = Path(__file__).parents[2]
DEPLOY = REPO / "deploy"
BASE_IMAGE = "localhost/leadflow-base:bookworm"
HOST_CA = Path("/etc/ssl/certs/ca-certificates.crt")
PROJECT = f"leadflowtest{os.getpid()}"
PODMAN_COMPOSE = shutil.which("podman-compose") or str(
    Path(sys.executable).parent / "podman-compose"
)


def _why_not() -> str:
    if os.geteuid() != 0:
        return "podman runs rootful here: needs root"
    for tool in ("podman", "debootstrap"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (deploy/podman/setup.sh installs it)"
    if not Path(PODMAN_COMPOSE).exists():
        return "podman-compose is not installed (the dev extra has it)"
    return ""


WHY_NOT = _why_not()
pytestmark = [pytest.mark.containers, pytest.mark.skipif(bool(WHY_NOT), reason=WHY_NOT or "-")]


def env() -> dict[str, str]:
    """The environment podman and podman-compose run in."""
    return {**os.environ, "CONTAINERS_CONF": str(DEPLOY / "podman" / "containers.conf")}


def run(argv: list[str], timeout: float = 120, **extra: Any) -> str:
    """Run a command; its output, or a failure that shows it."""
    done = subprocess.run(
        argv,
        env=extra.pop("env", env()),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        **extra,
    )
    assert done.returncode == 0, (
        f"{argv[:4]} exited {done.returncode}: {done.stdout[-3000:]}{done.stderr[-3000:]}"
    )
    return str(done.stdout)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """The compose stack, up; its secrets. Taken down (volumes too) afterwards."""
    run([str(DEPLOY / "podman" / "make-base.sh")], timeout=900)
    # The engine's image is built here (compose would otherwise), with the build's output
    # in the failure. pip in the build trusts what this host trusts: a machine behind a
    # TLS-inspecting proxy has its CA in the host's bundle, not in Debian's. The build
    # uses the host's network: on this kind of machine netavark's bridge reaches the
    # other containers but not the outside (no PyPI); the stack itself needs no egress.
    trust = []
    if HOST_CA.exists():
        trust = ["-v", f"{HOST_CA}:/run/host-ca.crt:ro", "--build-arg", "PIP_CERT=/run/host-ca.crt"]
    run(
        ["podman", "build", "--network", "host", "-f", "deploy/Dockerfile",
         "-t", "localhost/leadflow:local",
         "--build-arg", f"BASE={BASE_IMAGE}", "--build-arg", "EXTRAS=[local]", *trust, "."],
        timeout=1200, cwd=REPO,
    )  # fmt: skip
    folder = tmp_path_factory.mktemp("secrets")
    password = secrets.token_hex(12)
    values = {
        "redis_password": password,
        "redis_url": f"redis://:{password}@redis:6379/0",
        "webhook_secret": secrets.token_hex(16),
        "identity_salt": secrets.token_hex(32),
    }
    for name, value in values.items():
        (folder / name).write_text(value)
    compose_env = {**env(), "LEADFLOW_SECRETS_DIR": str(folder)}
    compose = [
        PODMAN_COMPOSE,
        "-p",
        PROJECT,
        "-f",
        "deploy/compose.yaml",
        "-f",
        "deploy/compose.podman.yaml",
    ]
    try:
        # In the order compose.yaml's depends_on gives: podman 4.3 (Debian 12) cannot wait
        # for "healthy" or "completed" (its health checks need systemd), and podman-compose
        # then links the engines to the finished topics job, which podman refuses to start.
        for services, wait_for in STAGES:
            run(
                [*compose, "up", "-d", "--no-deps", *services],
                timeout=600,
                cwd=REPO,
                env=compose_env,
            )
            eventually(partial(_ready, wait_for), 120, f"{wait_for} up")
        yield values
    finally:
        subprocess.run(
            [*compose, "logs"],
            cwd=REPO,
            env=compose_env,
            capture_output=True,
            timeout=120,
            check=False,
        )
        subprocess.run(
            [*compose, "down", "-v"],
            cwd=REPO,
            env=compose_env,
            capture_output=True,
            timeout=300,
            check=False,
        )


# The stack in dependency order; after each stage, what must be ready before the next.
STAGES = [
    (["kafka", "redis", "prometheus"], "broker"),
    (["topics"], "topics"),
    (["leadflow", "leadflow-alerts", "leadflow-collect"], "engine"),
]


def _ready(what: str) -> bool:
    if what == "broker":
        probe = "import socket; socket.create_connection(('localhost', 9092), 2)"
        run(["podman", "exec", container("kafka"), "python", "-c", probe], timeout=30)
        return True
    if what == "topics":
        state = run(
            [
                "podman",
                "inspect",
                "-f",
                "{{.State.Status}} {{.State.ExitCode}}",
                container("topics"),
            ]
        )
        return state.split() == ["exited", "0"]
    return in_engine(READYZ, timeout=30).strip() == "200"


READYZ = (
    "import urllib.request;"
    "print(urllib.request.urlopen('http://localhost:8086/readyz', timeout=3).status)"
)


def container(service: str) -> str:
    """The container of a compose service (podman-compose names them project_service_1)."""
    return f"{PROJECT}_{service}_1"


def in_engine(code: str, stdin: str = "", timeout: float = 120) -> str:
    """Python run inside the engine's container, inside the compose network."""
    return run(
        ["podman", "exec", "-i", container("leadflow"), "python", "-c", code],
        timeout=timeout,
        input=stdin,
    )


def eventually(check: Any, timeout_s: float, what: str) -> Any:
    """``check()`` until it returns something truthy, or fail saying ``what``."""
    deadline = time.monotonic() + timeout_s
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = check()
            if last:
                return last
        except (AssertionError, OSError, subprocess.TimeoutExpired) as e:
            last = e
        time.sleep(2)
    pytest.fail(f"{what} within {timeout_s:.0f} s; last: {last}")


PRODUCE_AND_WAIT = """
import json, sys, time
from confluent_kafka import Consumer, Producer
events = json.load(sys.stdin)
producer = Producer({"bootstrap.servers": "kafka:9092"})
for e in events:
    producer.produce("leadflow.events", json.dumps(e).encode(), e["anonymousId"].encode())
assert producer.flush(30) == 0
consumer = Consumer({"bootstrap.servers": "kafka:9092", "group.id": "container-test",
                     "auto.offset.reset": "earliest", "fetch.wait.max.ms": 10})
consumer.subscribe(["leadflow.decisions"])
deadline = time.monotonic() + 90
while time.monotonic() < deadline:
    msg = consumer.poll(1.0)
    if msg is not None and msg.error() is None:
        print(msg.value().decode())
        break
consumer.close()
"""


@pytest.fixture(scope="module")
def decision(stack: dict[str, str]) -> dict[str, Any]:
    """A hot lead's events produced inside the compose network; the decision they led to."""
    out = in_engine(PRODUCE_AND_WAIT, stdin=json.dumps(hot_lead("container-1")), timeout=150)
    assert out.strip(), "no decision within 90 s"
    return cast(dict[str, Any], json.loads(out.strip().splitlines()[-1]))


def test_a_lead_becomes_a_decision_through_the_compose_stack(decision: dict[str, Any]) -> None:
    assert decision["decision_id"] and decision["sdr"], decision
    assert decision["queue"] == "inbound", decision


def test_redis_keeps_an_append_only_file_behind_the_password_of_the_secret(
    stack: dict[str, str],
) -> None:
    cli = ["podman", "exec", container("redis"), "redis-cli"]
    assert "NOAUTH" in run([*cli, "ping"])
    auth = [*cli, "-a", stack["redis_password"], "--no-auth-warning"]
    assert run([*auth, "config", "get", "appendonly"]).split() == ["appendonly", "yes"]
    assert run([*auth, "config", "get", "maxmemory-policy"]).split()[-1] == "noeviction"
    files = run(["podman", "exec", container("redis"), "ls", "-R", "/data"])
    assert ".aof" in files, files


def test_prometheus_scrapes_the_engine(decision: dict[str, Any]) -> None:
    def targets() -> bool:
        with urllib.request.urlopen("http://127.0.0.1:9090/api/v1/targets", timeout=5) as r:
            active = json.load(r)["data"]["activeTargets"]
        health = {t["labels"]["job"]: t["health"] for t in active}
        assert health.get("leadflow") == "up", health
        return True

    eventually(targets, 120, "Prometheus scraping the engine")

    def consumed() -> float:
        query = "http://127.0.0.1:9090/api/v1/query?query=sum(leadflow_events_total)"
        with urllib.request.urlopen(query, timeout=5) as r:
            result = json.load(r)["data"]["result"]
        return float(result[0]["value"][1]) if result else 0.0

    assert eventually(consumed, 120, "leadflow_events_total scraped") > 0
