"""Leadflow's Prometheus metrics: one object, bounded labels, never a person.

Registered in the default registry, which Bytewax's own ``/metrics`` endpoint
serves (``BYTEWAX_DATAFLOW_API_ENABLED``), so one scrape sees both.
"""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Histogram

# Milliseconds-scale buckets: the promise is a decision within milliseconds.
LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


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
    decision_latency: Histogram

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
            decision_latency=Histogram(
                f"{prefix}_ingest_to_decision_seconds",
                "Broker ingest time of the triggering event to decision",
                ["queue"],
                buckets=LATENCY_BUCKETS_S,
                registry=registry,
            ),
        )


_metrics: Metrics | None = None


def metrics() -> Metrics:
    """The process-wide metrics (created on first use)."""
    global _metrics  # noqa: PLW0603  # one registry per process, by design of prometheus-client
    if _metrics is None:
        _metrics = Metrics.create()
    return _metrics
