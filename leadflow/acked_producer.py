"""A Kafka producer for HTTP handlers: a request is answered only once the broker has it.

Used by ``leadflow collect`` and ``leadflow api``: idempotent (``acks=all``, no
duplicates from its own retries), polled on a thread of its own, and awaited per
request through one asyncio future however many records the request carries.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Sequence

from confluent_kafka import KafkaError, Message, Producer

from dataflows.kafka_io import client_options
from engine.settings import Settings

log = logging.getLogger(__name__)

ACK_TIMEOUT_S = 10.0  # a request waits this long for the broker, then is answered 503


# Errors after which an idempotent producer keeps failing every record: its producer id
# or epoch is no longer accepted (seen with the embedded broker after an outage).
BROKEN = frozenset(
    {
        KafkaError._FATAL,
        KafkaError.PRODUCER_FENCED,
        KafkaError.INVALID_PRODUCER_EPOCH,
        KafkaError.UNKNOWN_PRODUCER_ID,
        KafkaError.OUT_OF_ORDER_SEQUENCE_NUMBER,
    }
)


class BrokerUnavailable(Exception):
    """The broker did not acknowledge every record of a request in time."""


class AckedProducer:
    """Produce a request's records and wait until the broker has acknowledged them all."""

    def __init__(self, settings: Settings):
        self.options = {
            **client_options(settings),
            "enable.idempotence": True,
            "message.timeout.ms": int(ACK_TIMEOUT_S * 1000),
            "linger.ms": 1,
            "compression.type": "lz4",
        }
        self.producer = Producer(self.options)
        self.replacing = threading.Lock()
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._poll, name="acked-producer", daemon=True)
        self.thread.start()

    def _poll(self) -> None:
        while not self.stopping.is_set():
            self.producer.poll(0.05)

    async def send(self, records: Sequence[tuple[str, bytes | None, bytes]]) -> None:
        """Produce ``(topic, key, value)`` records; return once all are acknowledged.

        Raises:
            BrokerUnavailable: a record was refused, or not acknowledged within
                :data:`ACK_TIMEOUT_S` (the broker unreachable): the request must be
                answered as not taken (503), never as taken.
        """
        if not records:
            return
        loop = asyncio.get_running_loop()
        done: asyncio.Future[str] = loop.create_future()
        left = [len(records)]
        failure: list[str] = []
        lock = threading.Lock()

        def settle() -> None:
            if not done.done():
                done.set_result(failure[0] if failure else "")

        producer = self.producer

        def acknowledged(error: KafkaError | None, _msg: Message) -> None:
            if error is not None and (error.fatal() or error.code() in BROKEN):
                self._replace(producer, error)
            with lock:
                if error is not None and not failure:
                    failure.append(str(error))
                left[0] -= 1
                finished = left[0] == 0
            if finished or error is not None:
                loop.call_soon_threadsafe(settle)

        try:
            for topic, key, value in records:
                producer.produce(topic, value, key, on_delivery=acknowledged)
        except BufferError:
            raise BrokerUnavailable("the broker is not keeping up (local queue full)") from None
        try:
            problem = await asyncio.wait_for(done, ACK_TIMEOUT_S + 5)
        except TimeoutError:
            problem = "no acknowledgement"
        if problem:
            log.warning("records not acknowledged by the broker: %s", problem)
            raise BrokerUnavailable(f"the broker did not acknowledge them: {problem}")

    def _replace(self, failed: Producer, error: KafkaError) -> None:
        """An idempotent producer that is fenced or failed for good: use a new one from now on.

        Seen after a broker outage (fenced by the embedded broker). Records it had not
        delivered were answered 503, so the clients send them again.
        """
        with self.replacing:
            if self.producer is failed:
                log.warning("producer failed for good (%s): starting a new one", error)
                self.producer = Producer(self.options)

    def close(self) -> None:
        """Flush what is in flight and stop polling."""
        self.producer.flush(ACK_TIMEOUT_S)
        self.stopping.set()
        self.thread.join()
