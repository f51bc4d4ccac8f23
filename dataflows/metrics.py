"""Leadflow's Prometheus metrics: one object, bounded labels, never a person.

Registered in the default registry, beside Bytewax's Kafka consumer-lag gauge,
and served from it by ``leadflow run`` (leadflow.runner.serve_metrics), so one
scrape sees both.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version

import numpy as np
from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram, Info
from prometheus_client.core import HistogramMetricFamily
from prometheus_client.registry import Collector

from engine.settings import RedisSettings
from engine.store import RedisStore

# Milliseconds-scale buckets: the promise is a decision within milliseconds.
LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
# Event time can be much older than ingest (offline clients, batch imports), and an
# alert may wait for retries over many minutes: up to an hour.
EVENT_AGE_BUCKETS_S = (*LATENCY_BUCKETS_S, 30.0, 60.0, 300.0, 900.0, 3600.0)
# The stages an event passes, in order (StageLatency).
STAGES = ("decoded", "resolved", "applied", "acknowledged")
REDIS_BUCKETS_S = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1.0)


class StageLatency(Collector):
    """Seconds from an event's broker ingest to each stage it passes, observed a batch at a time.

    ``leadflow_stage_latency_seconds{stage}``, a histogram per stage: ``decoded``
    (parsed and checked), ``resolved`` (its person found: by the lookup or the
    resolver), ``applied`` (scored, qualified, routed, saved) and ``acknowledged``
    (its records acknowledged by the broker; only events that produce records).
    A prometheus-client Histogram costs about a microsecond per observation and
    four stages per event would be a few percent of the engine: this one counts a
    whole batch with two numpy calls.
    """

    def __init__(self, name: str, registry: CollectorRegistry = REGISTRY):
        self.name = name
        self.bounds_ms = np.array(LATENCY_BUCKETS_S) * 1000
        self.counts = {stage: np.zeros(len(LATENCY_BUCKETS_S) + 1, np.int64) for stage in STAGES}
        self.sums_ms = dict.fromkeys(STAGES, 0)
        self.lock = threading.Lock()  # worker threads of one process share it
        registry.register(self)

    def observe(self, stage: str, ingested_ms: list[int], now_ms: int | None = None) -> None:
        """Count events ingested at ``ingested_ms`` (0: unknown, skipped) as at ``stage`` now."""
        if not ingested_ms:
            return
        now_ms = int(time.time() * 1000) if now_ms is None else now_ms
        ingested = np.array(ingested_ms, np.int64)
        ages = np.maximum(now_ms - ingested[ingested > 0], 0)
        # side="left": an age equal to a bound counts in that bound's bucket (le).
        counts = np.bincount(
            np.searchsorted(self.bounds_ms, ages, side="left"), minlength=len(self.bounds_ms) + 1
        )
        with self.lock:
            self.counts[stage] += counts
            self.sums_ms[stage] += int(ages.sum())

    def collect(self) -> Iterator[HistogramMetricFamily]:
        """The histograms, as prometheus-client serves them."""
        family = HistogramMetricFamily(
            self.name, "Broker ingest of an event to each stage it passes", labels=["stage"]
        )
        with self.lock:
            snapshot = {s: (c.cumsum(), self.sums_ms[s]) for s, c in self.counts.items()}
        bounds = [*(f"{b:g}" for b in LATENCY_BUCKETS_S), "+Inf"]
        for stage, (cumulative, sum_ms) in snapshot.items():
            buckets = [(le, float(n)) for le, n in zip(bounds, cumulative, strict=True)]
            family.add_metric([stage], buckets, sum_ms / 1000)
        yield family

    def describe(self) -> list[HistogramMetricFamily]:
        """Nothing to describe ahead of a scrape (prometheus-client then calls collect)."""
        return []


@dataclass(frozen=True)
class Metrics:
    """All of Leadflow's metrics."""

    events: Counter
    rejected: Counter
    promotions: Counter
    assignments: Counter
    kafka_errors: Counter
    merges: Counter
    merges_refused: Counter
    erasures: Counter
    erased_events: Counter
    identity_paths: Counter
    decision_latency: Histogram
    event_to_decision: Histogram
    transitions: Counter
    sla_breaches: Counter
    redis_seconds: Histogram
    redis_errors: Counter
    webhooks: Counter
    alert_latency: Histogram
    alerts_pending: Gauge
    api_requests: Counter
    timers_fired: Counter
    timers_pending: Gauge
    processing_errors: Counter
    resends: Counter
    input_reset: Counter
    state_loads: Counter
    owner_reads: Counter
    stage_latency: StageLatency
    build: Info

    @classmethod
    def create(cls, registry: CollectorRegistry = REGISTRY, prefix: str = "leadflow") -> Metrics:
        """Build and register the metrics."""
        return cls(
            events=Counter(
                f"{prefix}_events", "Valid events consumed", ["type", "source"], registry=registry
            ),
            rejected=Counter(
                f"{prefix}_dlq", "Messages sent to the DLQ", ["reason"], registry=registry
            ),
            promotions=Counter(
                f"{prefix}_mql_promotions", "Promotions to MQL", ["queue"], registry=registry
            ),
            assignments=Counter(
                f"{prefix}_assignments", "MQLs assigned", ["queue", "sdr"], registry=registry
            ),
            kafka_errors=Counter(
                f"{prefix}_kafka_errors", "Consumer errors reported by Kafka", registry=registry
            ),
            merges=Counter(f"{prefix}_merges", "People merged into one", registry=registry),
            merges_refused=Counter(
                f"{prefix}_merges_refused",
                "Merges refused, by reason",
                ["reason"],
                registry=registry,
            ),
            erasures=Counter(f"{prefix}_erasures", "People erased on request", registry=registry),
            erased_events=Counter(
                f"{prefix}_erased_events",
                "Events dropped for being older than their identifier's erasure",
                registry=registry,
            ),
            identity_paths=Counter(
                f"{prefix}_identity_events",
                "Events by how their person was found: lookup (known, on any worker) "
                "or resolver (the identity graph changes, one worker)",
                ["path"],
                registry=registry,
            ),
            decision_latency=Histogram(
                f"{prefix}_ingest_to_decision_seconds",
                "Broker ingest time of the triggering event to decision",
                ["queue"],
                buckets=LATENCY_BUCKETS_S,
                registry=registry,
            ),
            event_to_decision=Histogram(
                f"{prefix}_event_to_decision_seconds",
                "Event time of the triggering event to decision",
                ["queue"],
                buckets=EVENT_AGE_BUCKETS_S,
                registry=registry,
            ),
            transitions=Counter(
                f"{prefix}_stage_transitions",
                "Lifecycle stage transitions",
                ["from_stage", "to_stage"],
                registry=registry,
            ),
            sla_breaches=Counter(
                f"{prefix}_sla_breaches", "Leads not accepted in time", ["queue"], registry=registry
            ),
            redis_seconds=Histogram(
                f"{prefix}_redis_seconds",
                "Redis round trips (a pipeline or script call), by store operation",
                ["op"],
                buckets=REDIS_BUCKETS_S,
                registry=registry,
            ),
            redis_errors=Counter(
                f"{prefix}_redis_errors",
                "Redis calls failed (retried, or given up)",
                ["op"],
                registry=registry,
            ),
            webhooks=Counter(
                f"{prefix}_webhook_deliveries",
                "Webhook alerts: delivered, failed (an attempt), parked (gave up), "
                "duplicate (delivered before: not sent again)",
                ["queue", "outcome"],
                registry=registry,
            ),
            alert_latency=Histogram(
                f"{prefix}_alert_delivery_seconds",
                "From the decision (decided_at) to its webhook's 2xx",
                ["queue"],
                buckets=EVENT_AGE_BUCKETS_S,
                registry=registry,
            ),
            alerts_pending=Gauge(
                f"{prefix}_alerts_pending",
                "Alerts read and not yet delivered or parked (retries waiting included)",
                ["queue"],
                registry=registry,
            ),
            api_requests=Counter(
                f"{prefix}_api_requests",
                "HTTP API requests by route and status",
                ["route", "status"],
                registry=registry,
            ),
            timers_fired=Counter(
                f"{prefix}_timers_fired", "Timers fired", ["kind"], registry=registry
            ),
            timers_pending=Gauge(
                f"{prefix}_timers_pending", "Timers scheduled and not yet due", registry=registry
            ),
            processing_errors=Counter(
                f"{prefix}_processing_errors",
                "Events sent to the DLQ because applying them raised (poison-pill guard)",
                registry=registry,
            ),
            resends=Counter(
                f"{prefix}_resent_events",
                "Events a client sent again (same messageId): applied and emitted once",
                registry=registry,
            ),
            input_reset=Counter(
                f"{prefix}_input_resets",
                "Input partitions whose stored position was beyond their end (broker lost data)",
                ["topic"],
                registry=registry,
            ),
            state_loads=Counter(
                f"{prefix}_state_loads",
                "Person states loaded: kept (this worker's decoded state, unchanged in Redis) "
                "or read (sent by Redis and decoded)",
                ["how"],
                registry=registry,
            ),
            owner_reads=Counter(
                f"{prefix}_identity_owner_reads",
                "Identifier owners the resolver needed: kept (in its owner cache) "
                "or read (from Redis)",
                ["how"],
                registry=registry,
            ),
            stage_latency=StageLatency(f"{prefix}_stage_latency_seconds", registry),
            build=Info(f"{prefix}_build", "Leadflow build", registry=registry),
        )

    def observe_redis(self, op: str, seconds: float, failed: bool) -> None:
        """A Redis call's duration, or its failure (see engine.store.RedisStore.observer)."""
        if failed:
            self.redis_errors.labels(op).inc()
        else:
            self.redis_seconds.labels(op).observe(seconds)


_metrics: Metrics | None = None


def metrics() -> Metrics:
    """The process-wide metrics (created on first use)."""
    global _metrics  # noqa: PLW0603  # one registry per process, by design of prometheus-client
    if _metrics is None:
        _metrics = Metrics.create()
        _metrics.build.info({"version": _version(), "python": sys.version.split()[0]})
    return _metrics


def observed_store(settings: RedisSettings) -> RedisStore:
    """A Redis store whose every call is timed into the metrics."""
    store = RedisStore(settings)
    store.observer = metrics().observe_redis
    return store


def _version() -> str:
    try:
        return version("leadflow")
    except PackageNotFoundError:  # run from a checkout without installing
        return "unknown"
