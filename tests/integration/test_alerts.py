"""Webhook alerts against a real broker and a real HTTP server on loopback."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import ClassVar

import pytest
from confluent_kafka import Consumer, TopicPartition

from dataflows.kafka_io import client_options
from engine.settings import Settings
from leadflow.alerts import MAX_ATTEMPTS, run_alerts, signature
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
        assert headers["X-Leadflow-Signature"] == signature(SECRET.encode(), body)
    again = run_alerts(hooked, stop_at_end=True, env={"LEADFLOW_WEBHOOK_SECRET": SECRET})
    assert again.delivered == 0  # offsets were committed: nothing is sent twice


def test_an_endpoint_that_stays_down_gets_its_alerts_parked_not_lost(
    settings: Settings, endpoint: str
) -> None:
    three_decisions(settings)
    slept: list[float] = []
    stats = run_alerts(
        with_webhook(settings, f"{endpoint}/down"), stop_at_end=True, env={}, sleep=slept.append
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
