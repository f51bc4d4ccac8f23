"""``leadflow alerts``: each decision POSTed once to its queue's webhook, signed.

A process of its own, beside the dataflow: it reads the decisions topic in the
consumer group ``leadflow-alerts`` (replicas share the partitions; one that dies
hands its partitions to the others), so a slow or broken endpoint never slows
scoring or routing. README, "Receiving alerts", is the user's side of this.

**Once.** Before a POST the sender claims the decision id in Redis (a lease of three
times ``alerts.timeout_s``); after a 2xx it records the id as delivered for
``alerts.remember_days``. A decision read again (the engine re-emitting it after a
crash, this process replaying uncommitted offsets, another replica after a
rebalance, a redrive) is never POSTed again, and two senders never POST one decision
at the same time. The one case left: a sender killed while its POST is in flight
cannot know whether the receiver got it; its lease expires and the decision is sent
again, with the same ``X-Leadflow-Decision`` header for the receiver to drop.

**Independent queues.** Each queue has its own delivery thread, HTTP client and
retry schedule: a dead endpoint holds back only its own queue's alerts.

**Retries.** A failure (connection error, timeout, any non-2xx) is tried again after
``retry_first_s``, doubling up to ``retry_max_s``, each wait jittered to 50-100 % (so
replicas and alerts do not retry in lock-step), until ``give_up_after_s`` after its
first try; then the alert is *parked*: written, unchanged, to ``topics.parked_alerts``
with headers saying why, and counted. ``leadflow alerts redrive`` sends parked alerts
again. Offsets are committed only up to the oldest decision not yet delivered or
parked, so a crash loses no alert.

**Signed.** ``X-Leadflow-Signature: t=<unix s>,v1=<hex HMAC-SHA256 of "<t>." + body>``,
one ``v1`` per secret in the queue's ``webhook_secret_env`` variable (``new,old`` during
a rotation); a receiver checks it with :func:`verify`. A queue with a webhook and no
secret stops start-up, unless marked ``webhook_unsigned``.
"""

from __future__ import annotations

import hashlib
import heapq
import hmac
import itertools
import logging
import os
import random
import signal
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from types import FrameType

import httpx
import orjson
from confluent_kafka import (
    OFFSET_BEGINNING,
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    Producer,
    TopicPartition,
)
from prometheus_client import REGISTRY, start_http_server
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

from dataflows.kafka_io import client_options
from dataflows.metrics import metrics, observed_store
from engine.person import epoch_ms
from engine.settings import (
    AlertSettings,
    QueueSettings,
    Settings,
    check_webhook_secrets,
    webhook_secrets,
    with_secret_files,
)
from engine.store import DELIVERED, RedisStore
from leadflow.alert_formats import render_alert

log = logging.getLogger(__name__)

GROUP_ID = "leadflow-alerts"
# Outcomes of leadflow_webhook_deliveries_total; "failed" counts attempts.
OUTCOMES = ("delivered", "failed", "parked", "duplicate")
TOLERANCE_S = 300
COMMIT_EVERY_S = 0.5
SESSION_TIMEOUT_MS = 6_000  # the least Kafka allows by default: a dead sender's partitions move
CLOSE_TIMEOUT_S = 10.0


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


def retry_delay(tries: int, settings: AlertSettings, rand: Callable[[], float]) -> float:
    """Seconds to wait after the ``tries``-th failed POST of an alert: exponential, jittered.

    ``retry_first_s * 2^(tries-1)`` capped at ``retry_max_s``, then 50-100 % of it.
    """
    ceiling = min(settings.retry_first_s * 2.0 ** min(tries - 1, 30), settings.retry_max_s)
    return float(ceiling * (0.5 + 0.5 * rand()))


@dataclass
class Alert:
    """One decision on its way to a webhook."""

    decision_id: str
    queue: str
    body: bytes  # what is POSTed (rendered in the queue's format)
    value: bytes  # the decision record as read (what is parked)
    partition: int
    offset: int
    decided_s: float | None  # the decision's decided_at, for the delivery latency
    tries: int = 0
    first_try_s: float | None = None  # monotonic
    retry_in_s: float = 0.0
    problem: str = ""


@dataclass
class AlertStats:
    """What a run delivered, retried and parked."""

    delivered: int = 0
    retries: int = 0
    parked: int = 0
    duplicates: int = 0  # delivered before (by anyone): not POSTed again
    skipped: int = 0  # decisions of queues without a webhook
    errors: list[str] = field(default_factory=list)


class Offsets:
    """Per partition, the offset below which every decision read is delivered or parked."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.open: dict[int, set[int]] = {}
        self.next: dict[int, int] = {}

    def read(self, partition: int, offset: int) -> None:
        """A decision was read (and is now in hand)."""
        with self.lock:
            self.open.setdefault(partition, set()).add(offset)
            self.next[partition] = offset + 1

    def done(self, partition: int, offset: int) -> None:
        """A decision was delivered, parked or skipped."""
        with self.lock:
            self.open.get(partition, set()).discard(offset)

    def forget(self, partitions: Sequence[int]) -> None:
        """Partitions given to another replica: what was in hand is theirs to re-read."""
        with self.lock:
            for p in partitions:
                self.open.pop(p, None)
                self.next.pop(p, None)

    def committable(self) -> dict[int, int]:
        """The offset to commit per partition: the oldest in hand, else the next to read."""
        with self.lock:
            return {p: min(self.open[p]) if self.open.get(p) else n for p, n in self.next.items()}

    def in_hand(self) -> int:
        """How many decisions read are not yet done."""
        with self.lock:
            return sum(len(o) for o in self.open.values())


class AlertSender:
    """Deliver decisions to webhooks, once each, per queue independently; park what fails."""

    def __init__(
        self,
        settings: Settings,
        env: dict[str, str] | None = None,
        rand: Callable[[], float] = random.random,
    ):
        self.settings = settings
        self.env = with_secret_files(os.environ if env is None else env)
        check_webhook_secrets(settings, self.env)
        self.rand = rand
        self.id = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.lease_ms = int(3 * settings.alerts.timeout_s * 1000)
        self.stats = AlertStats()
        self.stats_lock = threading.Lock()
        self.store = observed_store(settings.redis)
        self.producer = Producer(client_options(settings))
        self.hooked = {q.name: q for q in settings.routing.queues if q.webhook_url}
        for name in self.hooked:  # every series at 0 from the start: the first parking is
            for outcome in OUTCOMES:  # an increase() the alert rule can see
                metrics().webhooks.labels(name, outcome)
            metrics().alerts_pending.labels(name)
        self.clients = {name: self._client() for name in self.hooked}

    def _client(self) -> httpx.Client:
        # One pooled client per queue: keep-alive to its endpoint, HTTP/2 where TLS offers it.
        return httpx.Client(
            http2=True, timeout=httpx.Timeout(self.settings.alerts.timeout_s), trust_env=False
        )

    def alert_of(self, value: bytes, partition: int = 0, offset: int = 0) -> Alert | None:
        """The alert of a decision record, or None when its queue has no webhook."""
        decision = orjson.loads(value)
        queue = self.hooked.get(str(decision.get("queue")))
        if queue is None:
            return None
        return Alert(
            decision_id=str(decision.get("decision_id", "")),
            queue=queue.name,
            body=render_alert(queue, decision, value),
            value=value,
            partition=partition,
            offset=offset,
            decided_s=_seconds(epoch_ms(decision.get("decided_at"))),
        )

    def attempt(self, alert: Alert, give_up_after_s: float | None = None) -> str:
        """Try to deliver ``alert`` once; say what happened.

        ``delivered``; ``duplicate`` (delivered before, by anyone: not POSTed);
        ``retry`` (try again after ``alert.retry_in_s``: a failure, or another sender
        holding it right now); ``gave_up`` (still failing ``give_up_after_s`` after
        the first try, by default ``alerts.give_up_after_s``).
        """
        claim = self.store.claim_alert(alert.decision_id, self.id, self.lease_ms)
        if claim == DELIVERED:
            self._count(alert.queue, "duplicate")
            return "duplicate"
        if isinstance(claim, int):  # another sender is POSTing it right now
            alert.retry_in_s = claim / 1000
            return "retry"
        queue = self.hooked[alert.queue]
        now = time.monotonic()
        if alert.first_try_s is None:
            alert.first_try_s = now
        alert.tries += 1
        status, alert.problem = self.post(queue, alert)
        if 200 <= status < 300:
            remember_s = int(self.settings.alerts.remember_days * 86_400)
            self.store.alert_delivered(alert.decision_id, remember_s)
            self._count(alert.queue, "delivered")
            if alert.decided_s is not None:
                metrics().alert_latency.labels(alert.queue).observe(
                    max(0.0, time.time() - alert.decided_s)
                )
            return "delivered"
        self.store.unclaim_alert(alert.decision_id, self.id)
        self._count(alert.queue, "failed")
        limit = self.settings.alerts.give_up_after_s if give_up_after_s is None else give_up_after_s
        if time.monotonic() - alert.first_try_s >= limit:
            return "gave_up"
        alert.retry_in_s = retry_delay(alert.tries, self.settings.alerts, self.rand)
        return "retry"

    def post(self, queue: QueueSettings, alert: Alert) -> tuple[int, str]:
        """POST ``alert`` to ``queue``'s webhook: the HTTP status (0: no answer) and a problem."""
        headers = {"Content-Type": "application/json", "X-Leadflow-Decision": alert.decision_id}
        secrets = webhook_secrets(queue, self.env)
        if secrets:  # signed at each try: a retry is not stale
            headers["X-Leadflow-Signature"] = signature(secrets, alert.body, int(time.time()))
        try:
            response = self.clients[queue.name].post(
                queue.webhook_url, content=alert.body, headers=headers
            )
        except httpx.HTTPError as e:
            return 0, f"{type(e).__name__}: {e}"
        return response.status_code, f"HTTP {response.status_code}"

    def park(self, alert: Alert) -> None:
        """Write ``alert``'s decision to the parked topic, with why; raise if the broker won't."""
        url = self.hooked[alert.queue].webhook_url
        log.warning(
            "alert %s to %s failed %d times (%s): parked",
            alert.decision_id,
            url,
            alert.tries,
            alert.problem,
        )
        self.producer.produce(
            self.settings.topics.parked_alerts,
            alert.value,
            key=alert.decision_id.encode(),
            headers=[
                ("leadflow.reason", b"webhook_failed"),
                ("leadflow.detail", alert.problem.encode("utf-8", "replace")),
                ("leadflow.queue", alert.queue.encode()),
                ("leadflow.webhook", url.encode()),
                ("leadflow.attempts", str(alert.tries).encode()),
            ],
        )
        if self.producer.flush(10) != 0:
            raise RuntimeError("could not park an alert: the broker did not take it")
        self._count(alert.queue, "parked", alert.problem)

    def _count(self, queue: str, outcome: str, problem: str = "") -> None:
        metrics().webhooks.labels(queue, outcome).inc()
        with self.stats_lock:
            if outcome == "delivered":
                self.stats.delivered += 1
            elif outcome == "failed":
                self.stats.retries += 1
            elif outcome == "duplicate":
                self.stats.duplicates += 1
            else:
                self.stats.parked += 1
                self.stats.errors.append(problem)

    def close(self) -> None:
        """Close the HTTP clients and the Redis pool; flush the producer."""
        for client in self.clients.values():
            client.close()
        self.producer.flush(10)
        self.store.close()


class QueueDelivery(threading.Thread):
    """One queue's alerts: tried when due, earliest first, on a thread of its own."""

    def __init__(self, sender: AlertSender, queue: str, done: Callable[[Alert], None]):
        super().__init__(name=f"alerts-{queue}", daemon=True)
        self.sender = sender
        self.queue = queue
        self.done = done
        self.due: list[tuple[float, int, Alert]] = []
        self.seq = itertools.count()
        self.wake = threading.Condition()
        self.busy = False
        self.stopping = False
        self.failure: BaseException | None = None
        self.dropped: set[int] = set()  # partitions another replica now owns

    def submit(self, alert: Alert, after_s: float = 0.0) -> None:
        """Try ``alert`` after ``after_s`` seconds."""
        with self.wake:
            heapq.heappush(self.due, (time.monotonic() + after_s, next(self.seq), alert))
            metrics().alerts_pending.labels(self.queue).set(len(self.due) + self.busy)
            self.wake.notify()

    def drop(self, partitions: Sequence[int]) -> None:
        """Forget alerts read from ``partitions`` (revoked: their new owner reads them)."""
        with self.wake:
            self.due = [d for d in self.due if d[2].partition not in partitions]
            heapq.heapify(self.due)
            self.dropped.update(partitions)

    def adopt(self, partitions: Sequence[int]) -> None:
        """``partitions`` are ours (again)."""
        with self.wake:
            self.dropped.difference_update(partitions)

    def idle(self) -> bool:
        """Nothing waiting and nothing in flight."""
        with self.wake:
            return not self.due and not self.busy

    def stop(self) -> None:
        """Stop after the attempt in flight."""
        with self.wake:
            self.stopping = True
            self.wake.notify()

    def run(self) -> None:
        """Deliver until stopped; a Redis or broker failure ends the thread, reported."""
        try:
            for alert in self._next():
                outcome = self.sender.attempt(alert)
                with self.wake:
                    self.busy = False
                    gone = alert.partition in self.dropped
                if outcome == "retry" and not gone:
                    self.submit(alert, alert.retry_in_s)
                    continue
                if outcome == "gave_up":
                    self.sender.park(alert)
                self.done(alert)
        except BaseException as e:  # reported to the consumer loop, which stops the process
            log.exception("alert delivery for queue %s failed", self.queue)
            self.failure = e

    def _next(self) -> Iterator[Alert]:
        while True:
            with self.wake:
                while not self.stopping and (not self.due or self.due[0][0] > time.monotonic()):
                    self.wake.wait(self.due[0][0] - time.monotonic() if self.due else None)
                if self.stopping:
                    return
                _, _, alert = heapq.heappop(self.due)
                self.busy = True
                metrics().alerts_pending.labels(self.queue).set(len(self.due) + 1)
            yield alert


class RedriveCounts(Collector):
    """``leadflow_alert_redrives_total``, read from Redis.

    ``leadflow alerts redrive`` is a short-lived command: it counts in Redis, and the
    long-lived sender exports the counts.
    """

    def __init__(self, store: RedisStore):
        self.store = store

    def collect(self) -> Iterator[CounterMetricFamily]:
        """The redrive counts, read at each scrape."""
        family = CounterMetricFamily(
            "leadflow_alert_redrives",
            "Parked alerts sent again by `leadflow alerts redrive`",
            labels=["queue", "outcome"],
        )
        for (queue, outcome), count in sorted(self.store.redrives().items()):
            family.add_metric([queue, outcome], count)
        yield family


@contextmanager
def _stop_on_signals() -> Iterator[threading.Event]:
    """An event set by SIGTERM or Ctrl-C while the block runs (the old handlers after)."""
    stop = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return

    def handler(_sig: int, _frame: FrameType | None) -> None:
        stop.set()

    old = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield stop
    finally:
        for s, h in old.items():
            signal.signal(s, h)


class DecisionReader:
    """The consumer side of ``leadflow alerts``.

    Reads decisions in the group, hands them to the queues' threads, commits what is
    done, and follows rebalances.
    """

    def __init__(self, settings: Settings, sender: AlertSender):
        self.sender = sender
        self.topic = settings.topics.decisions
        self.offsets = Offsets()
        self.workers = {name: QueueDelivery(sender, name, self.finished) for name in sender.hooked}
        self.owned: set[int] = set()
        self.at_end: set[int] = set()
        self.last_commit = 0.0
        self.consumer = Consumer(
            {
                **client_options(settings),
                "group.id": GROUP_ID,
                "enable.auto.commit": False,
                "auto.offset.reset": "earliest",
                "enable.partition.eof": True,
                "fetch.wait.max.ms": settings.kafka.fetch_wait_max_ms,
                "partition.assignment.strategy": "cooperative-sticky",
                "on_commit": _commit_failed,
                # A replica that dies hands its partitions over within this.
                "session.timeout.ms": SESSION_TIMEOUT_MS,
                "heartbeat.interval.ms": 1_000,
            }
        )
        self.consumer.subscribe(
            [self.topic], on_assign=self.assigned, on_revoke=self.revoked, on_lost=self.revoked
        )
        for w in self.workers.values():
            w.start()

    def finished(self, alert: Alert) -> None:
        """An alert was delivered or parked: its offset may be committed."""
        self.offsets.done(alert.partition, alert.offset)

    def assigned(self, _consumer: Consumer, partitions: list[TopicPartition]) -> None:
        """The group gave us ``partitions``."""
        self.owned.update(tp.partition for tp in partitions)
        for w in self.workers.values():
            w.adopt([tp.partition for tp in partitions])

    def revoked(self, _consumer: Consumer, partitions: list[TopicPartition]) -> None:
        """``partitions`` go to another replica: commit what is done, drop the rest."""
        gone = [tp.partition for tp in partitions]
        self.commit(gone)
        for w in self.workers.values():
            w.drop(gone)
        self.offsets.forget(gone)
        self.owned.difference_update(gone)
        self.at_end.difference_update(gone)

    def poll(self) -> None:
        """Read one decision (or an end of partition) and hand it on; commit now and then."""
        for w in self.workers.values():
            if w.failure is not None:
                raise w.failure
        msg: Message | None = self.consumer.poll(0.2)
        if msg is not None:
            error, partition = msg.error(), msg.partition() or 0
            if error is None:
                self.at_end.discard(partition)
                self.dispatch(msg)
            elif error.code() == KafkaError._PARTITION_EOF:
                self.at_end.add(partition)
            else:
                log.warning("alerts consumer error: %s", error)
        if time.monotonic() - self.last_commit >= COMMIT_EVERY_S:
            self.commit(sorted(self.owned))
            self.last_commit = time.monotonic()

    def dispatch(self, msg: Message) -> None:
        """Give a decision to its queue's thread (or mark it done: no webhook)."""
        partition, offset = msg.partition() or 0, msg.offset() or 0
        try:
            alert = self.sender.alert_of(msg.value() or b"", partition, offset)
        except orjson.JSONDecodeError as e:  # the engine writes this topic: a bug, not input
            log.error("decision at %d:%d is not JSON (%s): skipped", partition, offset, e)
            alert = None
        self.offsets.read(partition, offset)
        if alert is None:
            self.sender.stats.skipped += 1
            self.offsets.done(partition, offset)
            return
        self.workers[alert.queue].submit(alert)

    def drained(self) -> bool:
        """Every partition we own read to its end, and every alert read done."""
        return (
            bool(self.owned)
            and self.owned <= self.at_end
            and self.offsets.in_hand() == 0
            and all(w.idle() for w in self.workers.values())
        )

    def commit(self, partitions: Sequence[int]) -> None:
        """Commit, per partition, the offset below which every decision is done.

        Asynchronously: a synchronous commit can block for as long as the group is
        rebalancing (seen as a sender that never stopped), and a commit lost to a
        rebalance only makes the next owner read those decisions again, which the
        delivered set answers without a POST.
        """
        positions = self.offsets.committable()
        marks = [TopicPartition(self.topic, p, positions[p]) for p in partitions if p in positions]
        if marks:
            try:
                self.consumer.commit(offsets=marks, asynchronous=True)
            except KafkaException as e:
                _commit_failed(e.args[0], marks)

    def close(self, join_s: float) -> None:
        """Stop the threads after the POSTs in flight, commit, leave the group."""
        for w in self.workers.values():
            w.stop()
        for w in self.workers.values():
            w.join(join_s)
        self.commit(sorted(self.owned))
        # Leaving the group can hang in librdkafka when the other members are rebalancing
        # at the same moment (seen with two senders stopped together). The commit above
        # goes out before the close; a close that takes too long is left behind: the
        # group drops this member when its session expires.
        closing = threading.Thread(target=self.consumer.close, name="alerts-close", daemon=True)
        closing.start()
        closing.join(CLOSE_TIMEOUT_S)
        if closing.is_alive():
            log.warning(
                "did not leave the consumer group within %.0f s: the other senders take its "
                "partitions when its %d s session expires",
                CLOSE_TIMEOUT_S,
                SESSION_TIMEOUT_MS // 1000,
            )


def _commit_failed(error: KafkaError | None, _partitions: list[TopicPartition]) -> None:
    if error is not None:  # lost to a rebalance: re-read by the next owner, not resent
        log.info("offset commit not taken (%s): the next owner re-reads, not resends", error)


def run_alerts(
    settings: Settings,
    stop_at_end: bool = False,
    env: dict[str, str] | None = None,
    rand: Callable[[], float] = random.random,
) -> AlertStats:
    """Consume decisions and deliver them until stopped (or, with ``stop_at_end``, drained).

    SIGTERM or Ctrl-C stops after the POSTs in flight, committing what is done.
    """
    sender = AlertSender(settings, env, rand)
    redrives = RedriveCounts(sender.store)
    REGISTRY.register(redrives)
    try:
        if settings.metrics.alerts_port:
            start_http_server(settings.metrics.alerts_port, addr=settings.metrics.listen)
            log.info(
                "alerts metrics on http://%s:%d/metrics",
                settings.metrics.listen,
                settings.metrics.alerts_port,
            )
        reader = DecisionReader(settings, sender)
        try:
            with _stop_on_signals() as stop:
                while not stop.is_set() and not (stop_at_end and reader.drained()):
                    reader.poll()
        finally:
            reader.close(3 * settings.alerts.timeout_s)
    finally:
        REGISTRY.unregister(redrives)
        sender.close()
    return sender.stats


@dataclass
class RedriveStats:
    """What ``leadflow alerts redrive`` did with the parked alerts it selected."""

    selected: int = 0  # distinct decisions parked (matching --queue / --since)
    delivered: int = 0
    duplicates: int = 0  # delivered before (an earlier redrive, a replay): not sent again
    no_webhook: int = 0  # their queue has no webhook any more
    failed: list[tuple[str, str]] = field(default_factory=list)  # (decision id, problem)


def read_parked(
    settings: Settings, queue: str | None = None, since_ms: int | None = None
) -> dict[str, bytes]:
    """The parked decisions (latest record per decision id) of ``queue``, parked since ``since_ms``.

    Reads the whole parked topic up to its current end, without a consumer group: a
    redrive never moves anybody's offsets, and the parked records stay (a second
    redrive finds them again, and the delivered set makes it a no-op).
    """
    topic = settings.topics.parked_alerts
    consumer = Consumer(
        {
            **client_options(settings),
            "group.id": f"leadflow-redrive-{uuid.uuid4().hex}",
            "enable.auto.commit": False,
            "fetch.wait.max.ms": settings.kafka.fetch_wait_max_ms,
        }
    )
    try:
        partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
        ends = {
            p: consumer.get_watermark_offsets(TopicPartition(topic, p), 10)[1] for p in partitions
        }
        left = {p for p, end in ends.items() if end > 0}
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in left])
        found: dict[str, bytes] = {}
        while left:
            msg = consumer.poll(10)
            if msg is None:
                raise RuntimeError(f"{topic}: no record within 10 s before its end")
            if msg.error() is not None:
                continue
            partition, offset = msg.partition() or 0, msg.offset() or 0
            if offset + 1 >= ends[partition]:
                left.discard(partition)
            value = msg.value() or b""
            decision = orjson.loads(value)
            if queue is not None and decision.get("queue") != queue:
                continue
            if since_ms is not None and msg.timestamp()[1] < since_ms:
                continue
            found[str(decision.get("decision_id"))] = value
        return found
    finally:
        consumer.close()


def redrive(
    settings: Settings,
    queue: str | None = None,
    since_ms: int | None = None,
    env: dict[str, str] | None = None,
    give_up_after_s: float = 10.0,
    progress: Callable[[str], None] = lambda _line: None,
) -> RedriveStats:
    """Send parked alerts again, once each; those still failing stay parked.

    Each alert is tried on the retry schedule for at most ``give_up_after_s``. An
    alert delivered before (by an earlier redrive, or because the engine re-emitted
    its decision) is not sent again. Counted in Redis per queue and outcome
    (``leadflow_alert_redrives_total``, exported by ``leadflow alerts``).
    """
    parked = read_parked(settings, queue, since_ms)
    stats = RedriveStats(selected=len(parked))
    sender = AlertSender(settings, env)
    try:
        for n, (decision_id, value) in enumerate(parked.items(), 1):
            alert = sender.alert_of(value)
            if alert is None:
                stats.no_webhook += 1
                continue
            outcome = sender.attempt(alert, give_up_after_s)
            while outcome == "retry":
                time.sleep(alert.retry_in_s)
                outcome = sender.attempt(alert, give_up_after_s)
            if outcome == "delivered":
                stats.delivered += 1
            elif outcome == "duplicate":
                stats.duplicates += 1
            else:
                stats.failed.append((decision_id, alert.problem))
            sender.store.count_redrive(alert.queue, outcome)
            progress(f"{n}/{len(parked)} {decision_id}: {outcome} {alert.problem}".rstrip())
    finally:
        sender.close()
    return stats


def parse_since(text: str, now_s: float) -> int:
    """``--since``: an ISO-8601 time, or an age such as ``30m``, ``2h``, ``7d``; epoch ms."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86_400}
    if text[:-1].isdigit() and text[-1:] in units:
        return int((now_s - int(text[:-1]) * units[text[-1]]) * 1000)
    moment = epoch_ms(text)
    if moment is None:
        raise ValueError(f"--since {text!r}: expected an ISO-8601 time or an age like 30m, 2h, 7d")
    return int(moment)


def _seconds(ms: float | None) -> float | None:
    return None if ms is None else ms / 1000
