"""Webhook alerts against a real broker and a real HTTP server on loopback."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, ClassVar

import pytest
from confluent_kafka import Consumer, TopicPartition

from dataflows.kafka_io import client_options
from engine.settings import Settings
from leadflow.alerts import MAX_ATTEMPTS, run_alerts, signature, verify
from tests.integration.flow import hot_lead, run_flow, send

SECRET = "s3cret"


class Endpoint(BaseHTTPRequestHandler):
    """/flaky fails each decision's first try with 500; /down always answers 503."""

    seen: ClassVar[list[tuple[str, bytes, dict[str, str]]]] = []
    failed_once: ClassVar[set[str]] = set()

    def do_POST(self) -> None:  # http.server's naming
        body = self.rfile.read(int(self.headers["Content-Length"]))
        Endpoint.seen.append((self.path, body, dict(self.headers)))
        decision = self.headers["X-Leadflow-Decision"]
        if self.path == "/down" or decision not in Endpoint.failed_once:
            Endpoint.failed_once.add(decision)
            self.send_response(503 if self.path == "/down" else 500)
        else:
            self.send_response(200)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        return None


@pytest.fixture
def endpoint() -> Iterator[str]:
    Endpoint.seen, Endpoint.failed_once = [], set()
    server = ThreadingHTTPServer(("127.0.0.1", 0), Endpoint)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def with_webhook(settings: Settings, url: str) -> Settings:
    queues = tuple(replace(q, webhook_url=url) for q in settings.routing.queues)
    return replace(settings, routing=replace(settings.routing, queues=queues))


def three_decisions(settings: Settings) -> None:
    send(settings, [e for n in range(3) for e in hot_lead(f"alert-{n}", t=n)])
    run_flow(settings, 1)


def test_decisions_are_posted_signed_and_retried_until_delivered(
    settings: Settings, endpoint: str
) -> None:
    three_decisions(settings)
    hooked = with_webhook(settings, f"{endpoint}/flaky")
    stats = run_alerts(hooked, stop_at_end=True, env={"LEADFLOW_WEBHOOK_SECRET": SECRET})
    assert (stats.delivered, stats.retries, stats.parked) == (3, 3, 0)
    delivered = [s for s in Endpoint.seen if s[0] == "/flaky"]
    assert len(delivered) == 6
    for _, body, headers in delivered:
        assert verify(headers["X-Leadflow-Signature"], body, [SECRET.encode()], time.time())
    again = run_alerts(hooked, stop_at_end=True, env={"LEADFLOW_WEBHOOK_SECRET": SECRET})
    assert again.delivered == 0  # offsets were committed: nothing is sent twice


def test_an_endpoint_that_stays_down_gets_its_alerts_parked_not_lost(
    settings: Settings, endpoint: str
) -> None:
    three_decisions(settings)
    slept: list[float] = []
    stats = run_alerts(
        with_webhook(settings, f"{endpoint}/down"),
        stop_at_end=True,
        env={"LEADFLOW_WEBHOOK_SECRET": SECRET},
        sleep=slept.append,
    )
    assert (stats.delivered, stats.parked) == (0, 3)
    assert len(Endpoint.seen) == 3 * MAX_ATTEMPTS
    assert slept[: MAX_ATTEMPTS - 1] == [0.2, 0.4, 0.8, 1.6]  # exponential backoff
    consumer = Consumer({**client_options(settings), "group.id": "t", "enable.partition.eof": True})
    consumer.assign([TopicPartition(settings.topics.parked_alerts, p, 0) for p in range(2)])
    parked = []
    eof = 0
    while eof < 2:
        msg = consumer.poll(5)
        assert msg is not None
        if msg.error():
            eof += 1
        else:
            parked.append(dict(msg.headers() or []))
    consumer.close()
    assert len(parked) == 3
    assert {h["leadflow.reason"] for h in parked} == {b"webhook_failed"}
    assert {h["leadflow.detail"] for h in parked} == {b"HTTP 503"}


def test_a_signature_covers_the_time_and_the_body_and_rotates() -> None:
    body = b'{"decision_id": "d1"}'
    new, old = b"new-secret", b"old-secret"
    header = signature([new, old], body, 1_800_000_000)
    assert header.startswith("t=1800000000,v1=") and header.count("v1=") == 2
    assert verify(header, body, [new], 1_800_000_000 + 299)  # a receiver on the new secret
    assert verify(header, body, [old], 1_800_000_000)  # one still on the old one
    assert not verify(header, body + b" ", [new], 1_800_000_000)  # another body
    assert not verify(header, body, [b"guess"], 1_800_000_000)
    assert not verify(header, body, [new], 1_800_000_000 + 301)  # a replay, too late
    forged = header.replace("t=1800000000", "t=1800000600")  # a fresh stamp: no match
    assert not verify(forged, body, [new], 1_800_000_600)


def test_a_webhook_without_a_secret_stops_start_up_unless_marked_unsigned(
    settings: Settings, endpoint: str
) -> None:
    from engine.settings import ConfigError

    hooked = with_webhook(settings, f"{endpoint}/flaky")
    with pytest.raises(ConfigError, match="LEADFLOW_WEBHOOK_SECRET is not set"):
        run_alerts(hooked, stop_at_end=True, env={})
    queues = tuple(replace(q, webhook_unsigned=True) for q in hooked.routing.queues)
    unsigned = replace(hooked, routing=replace(hooked.routing, queues=queues))
    three_decisions(unsigned)
    stats = run_alerts(unsigned, stop_at_end=True, env={})
    assert stats.delivered == 3
    assert all("X-Leadflow-Signature" not in headers for _, _, headers in Endpoint.seen)


def test_the_readme_receiver_verifies_what_the_sender_signs() -> None:
    import re
    from pathlib import Path

    readme = (Path(__file__).parents[2] / "README.md").read_text()
    match = re.search(r"```python\n(import hashlib, hmac, time\n.*?)```", readme, re.S)
    assert match, "the receiver is in the README"
    receiver: dict[str, Any] = {}
    exec(match.group(1), receiver)  # the README's own code, as a receiver would paste it
    body = b'{"decision_id": "d1"}'
    header = signature([b"new", b"old"], body, int(time.time()))
    assert receiver["verify"](header, body, b"old")
    assert not receiver["verify"](header, body, b"other")
    stale = signature([b"new"], body, int(time.time()) - 600)
    assert not receiver["verify"](stale, body, b"new")


def test_the_parked_series_exists_at_zero_before_the_first_parking(
    settings: Settings, endpoint: str
) -> None:
    """So `increase()` in the LeadflowWebhookFailures rule sees the first parking."""
    from prometheus_client import REGISTRY

    from leadflow.alerts import AlertSender

    hooked = with_webhook(settings, f"{endpoint}/down")
    # A queue name no other test uses: its series can only come from the sender's start.
    fresh = tuple(replace(q, name=f"fresh-{q.name}") for q in hooked.routing.queues)
    AlertSender(
        replace(hooked, routing=replace(hooked.routing, queues=fresh)),
        {"LEADFLOW_WEBHOOK_SECRET": SECRET},
    )
    labels = {"queue": fresh[0].name, "outcome": "parked"}
    assert REGISTRY.get_sample_value("leadflow_webhook_deliveries_total", labels) is not None
