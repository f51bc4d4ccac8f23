"""``leadflow alerts``: POST each queue's decisions to its webhook, signed, never blocking.

A process of its own, beside the dataflow: it reads the decisions topic with its
own consumer group, so a slow or broken endpoint never slows scoring or routing.
Each decision whose queue has a ``webhook_url`` is POSTed as the JSON of the
decision record with the headers

* ``X-Leadflow-Decision``: the ``decision_id`` (receivers de-duplicate on it:
  delivery is at-least-once),
* ``X-Leadflow-Signature``: ``t=<unix seconds>,v1=<hex HMAC-SHA256 of "<t>." + body>``,
  one ``v1`` per secret in the queue's ``webhook_secret_env`` variable (``new,old``
  during a rotation), as the large webhook senders do: the timestamp is signed, so
  a captured request cannot be replayed once it is older than the receiver's
  tolerance (:func:`verify`, 5 minutes by default). A queue with a webhook and no
  secret stops start-up, unless marked ``webhook_unsigned``.

A failure (connection error, timeout, any non-2xx answer) is retried with
exponential backoff (:data:`BACKOFF_FIRST_S` doubling up to :data:`BACKOFF_CAP_S`,
:data:`MAX_ATTEMPTS` tries); then the decision is *parked*: written, unchanged, to
the ``topics.parked_alerts`` topic with headers saying why, and counted. The
consumer offset is committed only after a decision was delivered or parked.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field

import orjson
from confluent_kafka import Consumer, KafkaError, Message, Producer, TopicPartition
from prometheus_client import start_http_server

from dataflows.kafka_io import client_options
from dataflows.metrics import metrics
from engine.settings import (
    Settings,
    check_webhook_secrets,
    webhook_secrets,
    with_secret_files,
)

log = logging.getLogger(__name__)

MAX_ATTEMPTS = 5
BACKOFF_FIRST_S = 0.2
BACKOFF_CAP_S = 10.0
TIMEOUT_S = 5.0
GROUP_ID = "leadflow-alerts"
OUTCOMES = ("delivered", "failed", "parked")  # of leadflow_webhook_deliveries_total


TOLERANCE_S = 300


def signature(secrets: list[bytes], body: bytes, at_s: int) -> str:
    """The ``X-Leadflow-Signature`` header value for ``body`` sent at ``at_s``."""
    signed = f"{at_s}.".encode() + body
    return ",".join(
        [f"t={at_s}", *(f"v1={hmac.new(s, signed, hashlib.sha256).hexdigest()}" for s in secrets)]
    )


def verify(
    header: str, body: bytes, secrets: list[bytes], now_s: float, tolerance_s: int = TOLERANCE_S
) -> bool:
    """Whether ``header`` signs ``body`` with one of ``secrets``, recently enough.

    What a receiver runs (README, "Receiving alerts"): any ``v1`` matching any of
    its secrets, and a timestamp within ``tolerance_s`` of its own clock.
    """
    parts = [p.split("=", 1) for p in header.split(",") if "=" in p]
    stamps = [v for k, v in parts if k == "t"]
    if len(stamps) != 1 or not stamps[0].isdigit():
        return False
    if abs(now_s - int(stamps[0])) > tolerance_s:
        return False
    signed = f"{stamps[0]}.".encode() + body
    expected = {hmac.new(s, signed, hashlib.sha256).hexdigest() for s in secrets}
    return any(hmac.compare_digest(v, e) for k, v in parts if k == "v1" for e in expected)


@dataclass
class AlertStats:
    """What a run delivered, retried and parked."""

    delivered: int = 0
    retries: int = 0
    parked: int = 0
    skipped: int = 0  # decisions of queues without a webhook
    errors: list[str] = field(default_factory=list)


def post(url: str, body: bytes, headers: dict[str, str]) -> int:
    """POST ``body``; return the HTTP status (raises on connection trouble)."""
    request = urllib.request.Request(url, data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response:  # configured URL
            return int(response.status)
    except urllib.error.HTTPError as e:
        return int(e.code)


class AlertSender:
    """Deliver decisions to webhooks with retries; park what cannot be delivered."""

    def __init__(
        self,
        settings: Settings,
        env: dict[str, str] | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ):
        self.settings = settings
        self.env = with_secret_files(os.environ if env is None else env)
        check_webhook_secrets(settings, self.env)
        for queue in settings.routing.queues:
            if queue.webhook_url:  # every series at 0 from the start: the first parking is an
                for outcome in OUTCOMES:  # increase() the alert rule can see
                    metrics().webhooks.labels(queue.name, outcome)
        self.sleep = sleep
        self.stats = AlertStats()
        self.producer = Producer(client_options(settings))

    def deliver(self, value: bytes) -> None:
        """Deliver one decision record (its JSON, as on the decisions topic)."""
        decision = orjson.loads(value)
        queue = next(
            (q for q in self.settings.routing.queues if q.name == decision.get("queue")), None
        )
        if queue is None or not queue.webhook_url:
            self.stats.skipped += 1
            return
        secrets = webhook_secrets(queue, self.env)
        headers = {
            "Content-Type": "application/json",
            "X-Leadflow-Decision": str(decision.get("decision_id", "")),
        }
        delay, problem = BACKOFF_FIRST_S, ""
        for attempt in range(1, MAX_ATTEMPTS + 1):
            if secrets:  # signed at each try: a retry is not stale
                headers["X-Leadflow-Signature"] = signature(secrets, value, int(time.time()))
            try:
                status = post(queue.webhook_url, value, headers)
                problem = f"HTTP {status}"
            except (OSError, urllib.error.URLError) as e:
                status, problem = 0, f"{type(e).__name__}: {e}"
            if 200 <= status < 300:
                self.stats.delivered += 1
                metrics().webhooks.labels(queue.name, "delivered").inc()
                return
            metrics().webhooks.labels(queue.name, "failed").inc()
            if attempt < MAX_ATTEMPTS:
                self.stats.retries += 1
                self.sleep(delay)
                delay = min(delay * 2, BACKOFF_CAP_S)
        self._park(value, queue.webhook_url, problem)
        metrics().webhooks.labels(queue.name, "parked").inc()

    def _park(self, value: bytes, url: str, problem: str) -> None:
        log.warning("webhook %s failed %d times (%s): parked", url, MAX_ATTEMPTS, problem)
        self.producer.produce(
            self.settings.topics.parked_alerts,
            value,
            headers=[
                ("leadflow.reason", b"webhook_failed"),
                ("leadflow.detail", problem.encode("utf-8", "replace")),
                ("leadflow.webhook", url.encode()),
                ("leadflow.attempts", str(MAX_ATTEMPTS).encode()),
            ],
        )
        if self.producer.flush(10) != 0:
            raise RuntimeError("could not park an alert: the broker did not take it")
        self.stats.parked += 1
        self.stats.errors.append(problem)


def run_alerts(
    settings: Settings,
    stop_at_end: bool = False,
    env: dict[str, str] | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> AlertStats:
    """Consume decisions and deliver them until stopped (or, with ``stop_at_end``, drained)."""
    if settings.metrics.alerts_port:
        start_http_server(settings.metrics.alerts_port, addr=settings.metrics.listen)
        log.info(
            "alerts metrics on http://%s:%d/metrics",
            settings.metrics.listen,
            settings.metrics.alerts_port,
        )
    sender = AlertSender(settings, env, sleep)
    consumer = Consumer(
        {
            **client_options(settings),
            "group.id": GROUP_ID,
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
            "enable.partition.eof": True,
            "fetch.wait.max.ms": settings.kafka.fetch_wait_max_ms,
        }
    )
    # Assigned, not subscribed: no group rebalance to wait for; offsets are still the
    # group's (committed ones, else the earliest).
    topic = settings.topics.decisions
    meta = consumer.list_topics(topic, timeout=10).topics[topic]
    consumer.assign([TopicPartition(topic, p) for p in meta.partitions])
    at_end: set[int] = set()
    try:
        while True:
            msg: Message | None = consumer.poll(0.5)
            if msg is None:
                if stop_at_end and at_end and _all_at_end(consumer, at_end):
                    return sender.stats
                continue
            error = msg.error()
            if error is not None:
                if error.code() == KafkaError._PARTITION_EOF:
                    at_end.add(msg.partition() or 0)
                    if stop_at_end and _all_at_end(consumer, at_end):
                        return sender.stats
                else:
                    log.warning("alerts consumer error: %s", error)
                continue
            at_end.discard(msg.partition() or 0)
            sender.deliver(msg.value() or b"{}")
            consumer.commit(message=msg, asynchronous=False)
    finally:
        consumer.close()


def _all_at_end(consumer: Consumer, at_end: set[int]) -> bool:
    assigned = {tp.partition for tp in consumer.assignment()}
    return bool(assigned) and assigned <= at_end
