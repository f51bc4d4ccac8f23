"""Observability for real: a Prometheus server scrapes a running engine; rules, dashboard, probes.

Needs Debian's ``prometheus`` package (``prometheus`` and ``promtool`` on PATH),
which ``.ci/run`` installs; without it these tests are skipped with a message.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from engine.settings import Settings
from leadflow.servers import LocalBroker, LocalRedis, free_port, stop_process
from tests.conftest import local_settings
from tests.integration.flow import hot_lead, outputs, page, send

DEPLOY = Path(__file__).parents[2] / "deploy"
NEEDS_PROMETHEUS = pytest.mark.skipif(
    not (shutil.which("prometheus") and shutil.which("promtool")),
    reason="prometheus/promtool not on PATH: apt-get install prometheus (.ci/run does)",
)
SERIES = re.compile(r"\b((?:leadflow|bytewax)_[a-z_]+)")


def get(url: str, timeout: float = 5) -> tuple[int, bytes]:
    """Status and body of a GET (an HTTP error status is an answer, not an exception)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def wait_for(what: str, check: Any, timeout_s: float = 60) -> Any:
    """Poll ``check`` until it returns something truthy; fail naming ``what``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            value = check()
        except OSError:
            value = None
        if value:
            return value
        time.sleep(0.5)
    pytest.fail(f"timed out after {timeout_s}s waiting for {what}")


def declared(metrics_text: str) -> set[str]:
    """Series names a /metrics page declares (``# TYPE``), with their sample suffixes."""
    names = set()
    for line in metrics_text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ", 3)
            names.add(name)
            suffixes = {
                "counter": ["_total"],
                "histogram": ["_bucket", "_count", "_sum"],
                "info": ["_info"],
            }
            names.update(name + s for s in suffixes.get(kind, []))
    return names


def sample(metrics_text: str, name: str) -> float:
    """The sum of a series' samples on a /metrics page."""
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in metrics_text.splitlines()
        if line.startswith((name + " ", name + "{"))
    )


@pytest.fixture
def engine(settings: Settings, tmp_path: Path) -> Iterator[dict[str, Any]]:
    """``leadflow run`` at DEBUG with JSON logs, its metrics and health ports."""
    ports = {"metrics": free_port(), "health": free_port()}
    env = {
        **os.environ,
        "LEADFLOW_KAFKA_BOOTSTRAP": settings.kafka.bootstrap,
        "LEADFLOW_REDIS_URL": settings.redis.url,
        "LEADFLOW_RECOVERY_DIR": str(tmp_path / "recovery"),
        "LEADFLOW_METRICS_PORT": str(ports["metrics"]),
        "LEADFLOW_HEALTH_PORT": str(ports["health"]),
        "LEADFLOW_LOG_FORMAT": "json",
        "LEADFLOW_LOG_LEVEL": "DEBUG",
    }
    log = tmp_path / "engine.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "leadflow.cli", "run"], env=env, stdout=out, stderr=out
        )
    try:
        yield {**ports, "log": log, "proc": proc}
    finally:
        stop_process(proc)


@pytest.fixture
def prometheus(engine: dict[str, Any], tmp_path: Path) -> Iterator[str]:
    """A real Prometheus scraping the engine every second (tests using it: NEEDS_PROMETHEUS)."""
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global: {scrape_interval: 1s}\n"
        "scrape_configs:\n"
        "  - job_name: leadflow\n"
        f"    static_configs: [{{targets: ['127.0.0.1:{engine['metrics']}']}}]\n"
    )
    port = free_port()
    proc = subprocess.Popen(
        [
            "prometheus",
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=(tmp_path / "prometheus.log").open("wb"),
    )
    try:
        base = f"http://127.0.0.1:{port}"
        wait_for("Prometheus to be ready", lambda: get(f"{base}/-/ready")[0] == 200)
        yield base
    finally:
        stop_process(proc)


def query(base: str, promql: str) -> float | None:
    """An instant query's single value (None while there is none)."""
    url = f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
    result = orjson.loads(get(url)[1])["data"]["result"]
    return float(result[0]["value"][1]) if result else None


@NEEDS_PROMETHEUS
def test_prometheus_scrapes_what_was_sent_and_the_probes_answer(
    settings: Settings, engine: dict[str, Any], prometheus: str
) -> None:
    health = f"http://127.0.0.1:{engine['health']}"
    wait_for("/livez", lambda: get(f"{health}/livez")[0] == 200)
    ready = wait_for(
        "/readyz", lambda: get(f"{health}/readyz")[0] == 200 and get(f"{health}/readyz")
    )
    assert orjson.loads(ready[1])["checks"] == dict.fromkeys(
        ("redis", "kafka", "dataflow", "input"), "ok"
    )

    events = [*hot_lead("ana"), *hot_lead("bruno"), page("v1", "carla", "/pricing")]
    send(settings, [*events, b"not json"])
    metrics_url = f"http://127.0.0.1:{engine['metrics']}/metrics"

    def engine_counted() -> str | None:
        text = get(metrics_url)[1].decode()
        return text if sample(text, "leadflow_events_total") == len(events) else None

    text = wait_for("the engine to count every event", engine_counted)
    assert len(outputs(settings).decisions) == 2
    # What Prometheus stored from its scrapes matches what was sent.
    assert wait_for(
        "Prometheus to scrape the counts",
        lambda: query(prometheus, "sum(leadflow_events_total)") == len(events),
    )
    assert query(prometheus, 'sum(leadflow_events_total{type="track"})') == 6
    assert query(prometheus, 'leadflow_dlq_total{reason="invalid_json"}') == 1
    assert query(prometheus, "sum(leadflow_ingest_to_decision_seconds_count)") == 2
    assert query(prometheus, "sum(leadflow_event_to_decision_seconds_count)") == 2
    assert query(prometheus, 'sum(leadflow_stage_transitions_total{to_stage="mql"})') == 2
    assert (query(prometheus, "sum(leadflow_redis_seconds_count)") or 0) > 0
    # Every event passed every stage; the records of the two leads were acknowledged.
    for stage in ("decoded", "resolved", "applied"):
        promql = f'leadflow_stage_latency_seconds_count{{stage="{stage}"}}'
        assert wait_for(f"{stage} counted", lambda q=promql: query(prometheus, q) == len(events))
    acknowledged = 'leadflow_stage_latency_seconds_count{stage="acknowledged"}'
    # The three people's states: read when first seen, then kept between batches.
    assert (query(prometheus, 'sum(leadflow_state_loads_total{how="read"})') or 0) >= 3
    # And their identifiers' owners: read from Redis by the resolver when first met.
    assert (query(prometheus, 'sum(leadflow_identity_owner_reads_total{how="read"})') or 0) >= 3
    assert wait_for("records acknowledged", lambda: (query(prometheus, acknowledged) or 0) >= 4)
    assert query(prometheus, "count(leadflow_build_info)") == 1
    p99 = query(
        prometheus,
        "histogram_quantile(0.99, sum by (le) (leadflow_ingest_to_decision_seconds_bucket))",
    )
    assert p99 is not None and 0 < p99 <= 10

    # Every series the dashboard and the alert rules use is one the engine declares
    # (leadflow_webhook_deliveries comes from `leadflow alerts`, declared in the same registry).
    names = declared(text)
    dashboard = json.loads((DEPLOY / "grafana/dashboards/leadflow.json").read_text())
    used = {m for p in dashboard["panels"] for t in p["targets"] for m in SERIES.findall(t["expr"])}
    used |= set(SERIES.findall((DEPLOY / "alerts.yml").read_text()))
    assert used - names == set()

    # Logs: one JSON object per line (librdkafka writes its own lines, marked with %),
    # the decisions logged with their One-ID, no e-mail anywhere.
    log_text = engine["log"].read_text()
    lines = [line for line in log_text.splitlines() if line.startswith("{")]
    records = [orjson.loads(line) for line in lines]
    assert records and {"time", "level", "logger", "message"} <= records[0].keys()
    others = [ln for ln in log_text.splitlines() if not ln.startswith(("{", "%"))]
    assert others == []
    assert sum(1 for r in records if r.get("one_id") and "decision" in r["message"]) == 2
    assert "@ana.example" not in log_text


@NEEDS_PROMETHEUS
def test_promtool_accepts_the_alert_rules_and_the_scrape_config() -> None:
    def promtool(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["promtool", *args], capture_output=True, text=True, check=False)

    rules = promtool("check", "rules", str(DEPLOY / "alerts.yml"))
    assert rules.returncode == 0, rules.stdout + rules.stderr
    assert "SUCCESS: 8 rules found" in rules.stdout
    config = promtool("check", "config", str(DEPLOY / "prometheus.yml"))
    assert config.returncode == 0, config.stdout + config.stderr


def test_the_dashboard_is_a_grafana_dashboard_on_the_provisioned_datasource() -> None:
    dashboard = json.loads((DEPLOY / "grafana/dashboards/leadflow.json").read_text())
    assert dashboard["uid"] == "leadflow" and dashboard["schemaVersion"] >= 36
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids)) >= 10
    source = (DEPLOY / "grafana/provisioning/datasources/prometheus.yml").read_text()
    uid = re.search(r"uid: (\S+)", source)
    assert uid is not None
    for panel in dashboard["panels"]:
        assert {"h", "w", "x", "y"} <= panel["gridPos"].keys()
        assert panel["datasource"]["uid"] == uid.group(1)
        assert panel["targets"] and all(t["expr"] and t["refId"] for t in panel["targets"])


def test_the_kubernetes_config_map_holds_the_shipped_configuration() -> None:
    text = (DEPLOY / "k8s/configmap.yaml").read_text()
    config = Path(__file__).parents[2] / "config"
    for path in sorted(config.iterdir()):
        block = f"  {path.name}: |\n" + "".join(
            f"    {line}\n" if line else "\n" for line in path.read_text().splitlines()
        )
        assert block in text, f"deploy/k8s/configmap.yaml is out of date for {path.name}"


def test_readiness_fails_and_says_why_when_redis_and_kafka_are_unreachable() -> None:
    from engine.settings import load_settings
    from leadflow.health import Health, serve_health

    closed = free_port()
    settings = load_settings(
        env={
            "LEADFLOW_REDIS_URL": f"redis://127.0.0.1:{closed}/0",
            "LEADFLOW_KAFKA_BOOTSTRAP": f"127.0.0.1:{closed}",
        }
    )
    health = Health(settings)
    server = serve_health(health, free_port())
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}"
        assert get(f"{base}/livez")[0] == 200
        status, body = get(f"{base}/readyz", timeout=15)
        assert status == 503
        checks = orjson.loads(body)["checks"]
        assert checks["redis"].startswith("unreachable")
        assert checks["kafka"].startswith("unreachable")
        assert checks["dataflow"] == "not running"
        assert get(f"{base}/nowhere")[0] == 404
    finally:
        server.shutdown()


def test_readiness_counts_messages_and_fails_on_consumer_errors(
    broker: LocalBroker, redis_server: LocalRedis
) -> None:
    """A poll that brings only consumer errors is no read: /readyz says which and why."""
    from bytewax.connectors.kafka import KafkaError, KafkaSourceMessage
    from confluent_kafka import KafkaError as BrokerError

    from dataflows.kafka_io import INPUT_CLOCK, to_raw_messages
    from leadflow.health import Health, serve_health

    settings = local_settings(broker, redis_server)
    health = Health(settings)
    health.running = True
    server = serve_health(health, free_port(), "127.0.0.1")
    saved = (INPUT_CLOCK.partitions, dict(INPUT_CLOCK.consumer_errors))
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}"
        INPUT_CLOCK.partitions = 1
        # What the consumer yields when the broker refuses the topic: an error item.
        refused = BrokerError(BrokerError.TOPIC_AUTHORIZATION_FAILED)
        message: KafkaSourceMessage[bytes | None, bytes | None] = KafkaSourceMessage(
            key=None, value=None, topic="leadflow.events"
        )
        assert to_raw_messages([KafkaError(refused, message)]) == []
        status, body = get(f"{base}/readyz")
        answer = orjson.loads(body)
        assert status == 503 and "messages_read" in answer
        assert answer["checks"]["input"].startswith("consumer error on leadflow.events:")
        assert "TOPIC_AUTHORIZATION_FAILED" in answer["checks"]["input"]
        # Reading messages again clears it.
        ok: KafkaSourceMessage[bytes | None, bytes | None] = KafkaSourceMessage(
            key=None, value=b"{}", topic="leadflow.events", offset=0
        )
        assert len(to_raw_messages([ok])) == 1
        assert not INPUT_CLOCK.consumer_errors
    finally:
        INPUT_CLOCK.partitions, INPUT_CLOCK.consumer_errors = saved[0], saved[1]
        server.shutdown()
