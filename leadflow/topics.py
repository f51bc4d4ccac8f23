"""Create Leadflow's topics on the configured cluster."""

from __future__ import annotations

import time

from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import AdminClient
from confluent_kafka.cimpl import NewTopic

from dataflows.kafka_io import client_options
from engine.settings import Settings

# Real clusters take a moment to propagate new topics to every broker's metadata.
METADATA_TIMEOUT_S = 30.0


def create_topics(
    settings: Settings, partitions: int | None = None, replication: int = 1
) -> list[str]:
    """Create every topic that does not exist yet; return the names created.

    Args:
        settings: where to connect and the topic names.
        partitions: partitions per topic (default ``topics.partitions``).
        replication: replication factor (1 for a single local broker).
    """
    admin = AdminClient(client_options(settings))
    count = partitions or settings.topics.partitions
    futures = admin.create_topics(
        [
            NewTopic(t, num_partitions=count, replication_factor=replication)
            for t in settings.topics.all()
        ]
    )
    created = []
    for topic, future in futures.items():
        try:
            future.result()
            created.append(topic)
        except KafkaException as e:
            if e.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                raise
    deadline = time.monotonic() + METADATA_TIMEOUT_S
    while time.monotonic() < deadline:
        known = admin.list_topics(timeout=5).topics
        if all(t in known and known[t].partitions for t in settings.topics.all()):
            return created
        time.sleep(0.1)
    raise TimeoutError(f"topics not visible in metadata after {METADATA_TIMEOUT_S}s")
