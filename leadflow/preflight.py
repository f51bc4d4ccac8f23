"""Checks before the engine starts (and ``leadflow config check --connect``).

Each failure is one line that names what failed and how to fix it; the CLI maps
each kind to its exit code (README, "Exit codes"):

* Redis unreachable or refusing the credentials (:class:`engine.store.StoreUnavailable`);
* Redis under an evicting ``maxmemory-policy`` (:class:`RedisUnsafe`): eviction
  silently drops people, assignments and timers, so the engine refuses to start;
* Kafka unreachable, a topic missing, or access refused (:class:`KafkaUnavailable`).

A Redis database holding keys that are not Leadflow's only warns: sharing a
database is allowed, but it should be a choice.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import redis
from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import AdminClient

from dataflows.kafka_io import client_options
from engine.settings import Settings, mask_url
from engine.store import RedisStore, StoreUnavailable, certificate_problem

log = logging.getLogger(__name__)

SAFE_POLICIES = ("noeviction",)
KAFKA_TIMEOUT_S = 10.0
FOREIGN_KEYS_SAMPLE = 500


class RedisUnsafe(RuntimeError):
    """Redis would evict keys: people and assignments would vanish without a word."""


class KafkaUnavailable(RuntimeError):
    """The Kafka cluster cannot serve the engine (unreachable, topic missing, not allowed)."""


def check_redis(settings: Settings) -> list[str]:
    """Reach Redis, refuse an evicting policy; return what is worth a warning."""
    url = mask_url(settings.redis.url)
    client: Any = RedisStore(settings.redis).client  # one call each: no retries wanted here
    warnings = []
    try:
        try:
            client.ping()
        except redis.AuthenticationError as e:
            raise StoreUnavailable(
                f"Redis at {url} refused the credentials ({e}): fix the user and password "
                "in redis.url / LEADFLOW_REDIS_URL (or LEADFLOW_REDIS_URL_FILE)"
            ) from e
        except redis.RedisError as e:
            if (problem := certificate_problem(e)) is not None:
                raise StoreUnavailable(f"Redis at {url}: {problem}") from e
            raise StoreUnavailable(
                f"Redis at {url} is unreachable ({type(e).__name__}: {e}): start it, or point "
                "redis.url / LEADFLOW_REDIS_URL at it"
            ) from e
        try:
            policies = client.config_get("maxmemory-policy")
        except redis.ResponseError:  # CONFIG is disabled on some managed services
            warnings.append(
                f"Redis at {url} does not say its maxmemory-policy (CONFIG is disabled): "
                "make sure it is noeviction"
            )
        else:
            values = policies.values() if isinstance(policies, dict) else [policies]
            for policy in {str(v) for v in values}:
                if policy not in SAFE_POLICIES:
                    raise RedisUnsafe(
                        f"Redis at {url} has maxmemory-policy {policy}: eviction silently loses "
                        "people, SDR assignments and timers; set maxmemory-policy noeviction "
                        "(and size maxmemory for the people you keep: README, Memory)"
                    )
        if not settings.redis.cluster:
            _, keys = client.scan(0, count=FOREIGN_KEYS_SAMPLE)
            prefix = settings.redis.key_prefix.encode()
            foreign = [k for k in keys if not k.startswith(prefix)]
            if foreign:
                warnings.append(
                    f"Redis at {url} holds keys that are not Leadflow's (e.g. {foreign[0]!r}): "
                    "a database of its own, or a key_prefix of its own, keeps them apart"
                )
    finally:
        client.close()
    return warnings


def check_kafka(settings: Settings) -> int:
    """Reach Kafka and find every topic the engine uses; return how many there are.

    A TLS or SASL failure (an untrusted certificate, wrong credentials) is reported at
    once with librdkafka's own words, instead of as a timeout.
    """
    bootstrap = settings.kafka.bootstrap
    refused: list[str] = []

    def on_error(error: KafkaError) -> None:
        if error.code() in (KafkaError._SSL, KafkaError._AUTHENTICATION):
            refused.append(error.str())

    options: dict[str, Any] = {**client_options(settings), "error_cb": on_error}
    admin = AdminClient(options)
    deadline = time.monotonic() + KAFKA_TIMEOUT_S
    while True:
        try:
            found = admin.list_topics(timeout=1.0)
            break
        except KafkaException as e:
            admin.poll(0)
            if refused:
                raise KafkaUnavailable(
                    f"Kafka at {bootstrap} refused the connection: {refused[0]}: check "
                    "kafka.options (ssl.ca.location, sasl.username / LEADFLOW_KAFKA_OPT_...)"
                ) from e
            if time.monotonic() > deadline:
                raise KafkaUnavailable(
                    f"Kafka at {bootstrap} did not answer in {KAFKA_TIMEOUT_S:.0f} s "
                    f"({e.args[0]}): start it, or fix kafka.bootstrap / "
                    "LEADFLOW_KAFKA_BOOTSTRAP and kafka.options"
                ) from e
    topics = settings.topics.all()
    for name in topics:
        topic = found.topics.get(name)
        if topic is None:
            raise KafkaUnavailable(
                f"topic {name!r} does not exist at {bootstrap}: create the topics with "
                "`leadflow topics create --partitions N`, or fix the names in [topics]"
            )
        if topic.error is not None:
            raise KafkaUnavailable(
                f"topic {name!r} at {bootstrap}: {topic.error.str()}: grant this client "
                "read and write on it (kafka.options carry its credentials)"
            )
    return len(topics)


def preflight(settings: Settings) -> None:
    """Both checks, warnings logged: raise on the first problem the engine cannot run with."""
    for warning in check_redis(settings):
        log.warning("%s", warning)
    check_kafka(settings)
