"""Shared fixtures: real servers on free loopback ports, settings pointing at them."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from msgspec.structs import replace

from engine.settings import Settings, load_settings
from leadflow.servers import LocalBroker, LocalRedis
from leadflow.topics import create_topics

# Every identifier in the tests is made up: the shipped salt is fine here (and in the
# `leadflow` processes the tests start, which inherit this), refused everywhere else.
os.environ.setdefault("LEADFLOW_ALLOW_SHIPPED_SALT", "1")


@pytest.fixture
def broker() -> Iterator[LocalBroker]:
    """A tansu broker, stopped after the test."""
    with LocalBroker() as b:
        assert isinstance(b, LocalBroker)
        yield b


@pytest.fixture
def redis_server() -> Iterator[LocalRedis]:
    """A Redis 6.2 server (the oldest we support), stopped after the test."""
    with LocalRedis("redis") as r:
        assert isinstance(r, LocalRedis)
        yield r


def local_settings(broker: LocalBroker, redis: LocalRedis, **dataflow: object) -> Settings:
    """The default configuration pointed at the local servers."""
    s = load_settings(
        env={
            "LEADFLOW_KAFKA_BOOTSTRAP": broker.bootstrap,
            "LEADFLOW_REDIS_URL": redis.url,
            "LEADFLOW_ALERTS_METRICS_PORT": "0",
        }
    )
    return replace(s, dataflow=replace(s.dataflow, **dataflow))


@pytest.fixture
def settings(broker: LocalBroker, redis_server: LocalRedis) -> Settings:
    """Default settings on the local servers; stop at end of input; 2-partition topics."""
    s = local_settings(broker, redis_server, stop_at_end=True)
    create_topics(s, partitions=2)
    return s
