"""A webhook receiver on loopback, and settings whose queues POST to it (alert tests)."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import orjson
from confluent_kafka import Producer
from msgspec.structs import replace

from dataflows.kafka_io import client_options
from engine.settings import AlertSettings, QueueSettings, Settings
from leadflow.servers import free_port

SECRET = "s3cret"
ENV = {"LEADFLOW_WEBHOOK_SECRET": SECRET}
# Retries fast enough for a test, still on the real schedule code.
FAST = AlertSettings(retry_first_s=0.05, retry_max_s=0.2, give_up_after_s=30.0, timeout_s=2.0)


@dataclass
class Post:
    """One request the receiver got."""

    path: str
    body: bytes
    headers: dict[str, str]
    started: float  # monotonic, when the request arrived

    @property
    def decision_id(self) -> str:
        return self.headers["X-Leadflow-Decision"]


@dataclass
class Receiver:
    """An HTTP receiver on a fixed port that can go down and come back.

    Paths: ``/ok`` answers 200; ``/flaky`` answers 500 to each decision's first try,
    then 200; ``/down`` always 503. ``delay_s`` holds every answer that long.
    """

    port: int = field(default_factory=free_port)
    delay_s: float = 0.0
    posts: list[Post] = field(default_factory=list)
    failed_once: set[str] = field(default_factory=set)
    lock: threading.Lock = field(default_factory=threading.Lock)
    server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> Receiver:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # http.server's naming
                started = time.monotonic()
                body = self.rfile.read(int(self.headers["Content-Length"]))
                post = Post(self.path, body, dict(self.headers), started)
                with receiver.lock:
                    receiver.posts.append(post)
                    first = post.decision_id not in receiver.failed_once
                    receiver.failed_once.add(post.decision_id)
                time.sleep(receiver.delay_s)
                status = 200
                if self.path == "/down" or (self.path == "/flaky" and first):
                    status = 503 if self.path == "/down" else 500
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                return None

        ThreadingHTTPServer.allow_reuse_address = True
        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        """Go down: the port refuses connections."""
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None

    def delivered(self, path: str = "/ok") -> list[str]:
        """Decision ids POSTed to ``path`` and answered 2xx, in order, repeats included."""
        with self.lock:
            posts = list(self.posts)
        if path == "/flaky":  # the first try of each failed
            seen: set[str] = set()
            out = []
            for p in posts:
                if p.path == path:
                    if p.decision_id in seen:
                        out.append(p.decision_id)
                    seen.add(p.decision_id)
            return out
        return [p.decision_id for p in posts if p.path == path]

    def wait_for(self, ids: set[str], path: str = "/ok", timeout_s: float = 60) -> None:
        """Until every id in ``ids`` was delivered to ``path``."""
        deadline = time.monotonic() + timeout_s
        while not ids <= set(self.delivered(path)):
            assert time.monotonic() < deadline, (
                f"{len(ids - set(self.delivered(path)))} of {len(ids)} alerts never arrived"
            )
            time.sleep(0.05)


def hooked(
    settings: Settings,
    url: str,
    *,
    queues: tuple[str, ...] = ("inbound",),
    alerts: AlertSettings = FAST,
    **queue: Any,
) -> Settings:
    """``settings`` whose queues (named ``queues``) POST to ``url`` with ``queue`` options."""
    made = tuple(QueueSettings(name, webhook_url=url, **queue) for name in queues)
    routing = replace(settings.routing, queues=made, default_queue=made[0].name)
    return replace(settings, routing=routing, alerts=alerts)


def decision(n: int, queue: str = "inbound", **extra: Any) -> dict[str, Any]:
    """A decision record as the engine writes it (the fields the alerts read)."""
    now = time.time()
    return {
        "decision_id": f"d{n:04d}-{queue}",
        "one_id": f"{n:016x}",
        "stage": "mql",
        "promotion": 1,
        "cause": "score_threshold",
        "queue": queue,
        "routing_rule": "default",
        "lead": {
            "company_domain": f"acme{n}.com",
            "company_size": 250,
            "industry": "software",
            "country": "BR",
            "seniority": "director",
        },
        "score": 126.803,
        "threshold": 100.0,
        "fit": 85.0,
        "fit_minimum": 25.0,
        "reasons": [
            {"rule": "demo_request", "points": 50.0, "last_event_time": "2026-11-10T11:30:00Z"},
            {"rule": "pricing_page", "points": 24.5, "last_event_time": "2026-11-10T11:00:00Z"},
        ],
        "channels": ["email", "phone"],
        "sdr": "sdr-ana",
        "sdr_name": "Ana <Souza> & co",
        "decided_at": time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime(now)),
        "sla_deadline": time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime(now + 900)),
        **extra,
    }


def emit(settings: Settings, records: list[dict[str, Any]]) -> None:
    """Put decision records on the decisions topic, as the engine does (keyed by One-ID)."""
    producer = Producer(client_options(settings))
    for r in records:
        producer.produce(settings.topics.decisions, orjson.dumps(r), r["one_id"].encode())
    assert producer.flush(10) == 0
