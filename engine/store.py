"""The Redis state store: the only module of the engine that talks to Redis.

Key layout (``P`` = ``redis.key_prefix``, default ``lf:``). Every key carries
a hash tag, so the layout works on Redis Cluster, and no command touches two
tags, so no operation spans two people's slots:

==============================  ==========================================
``P id:{<identifier digest>}``  One-ID owning that identifier (string)
``P p:{<one_id>}``              the person's state (compact JSON, one value)
``P rr:{<queue>}``              the queue's round-robin counter
``P rr:{<queue>}:t:<decision>`` ticket drawn for a decision (expires)
==============================  ==========================================

Every method is one round trip for a whole batch, with as few commands as
possible (redis-py's per-command cost, not the network, dominated our profile):
reads are one ``MGET``, state writes one ``MSET``. Every write is idempotent under
replay: identifier claims are ``SET NX``, person states are written by their
single owning worker, and a ticket is drawn once per ``decision_id`` by a
server-side script. (``MGET``/``MSET`` span slots: on Redis Cluster they must be
split per slot; the One-ID issue brings the cluster client.)
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar, cast

import redis

from engine.identity import Identifier
from engine.settings import RedisSettings

log = logging.getLogger(__name__)
T = TypeVar("T")

# A replayed promotion must find its ticket again; replays happen within one
# recovery snapshot interval, so 30 days is generous and still bounded.
TICKET_TTL_S = 30 * 86_400
# Backoff between Redis retries: doubles from the first value up to the cap.
RETRY_FIRST_S = 0.05
RETRY_CAP_S = 5.0

# Draw the next ticket of a queue for a decision, once: a replay of the same
# decision gets the same ticket and does not advance the rotation.
_DRAW_TICKET = """
local t = redis.call('GET', KEYS[2])
if t then return tonumber(t) end
t = redis.call('INCR', KEYS[1])
redis.call('SET', KEYS[2], t, 'EX', ARGV[1])
return t
"""


class StoreUnavailable(RuntimeError):
    """Redis could not be reached after all retries."""


class RedisStore:
    """Per-person state, identifier ownership and routing counters in Redis."""

    def __init__(self, settings: RedisSettings, client: redis.Redis | None = None):
        self.settings = settings
        self.prefix = settings.key_prefix
        self.client = client or redis.Redis.from_url(
            settings.url, socket_timeout=10, socket_connect_timeout=5
        )
        self._draw_ticket = self.client.register_script(_DRAW_TICKET)

    # -- keys -------------------------------------------------------------
    def identifier_key(self, ident: Identifier) -> str:
        """Key mapping an identifier to its One-ID."""
        return f"{self.prefix}id:{{{ident.digest}}}"

    def person_key(self, one_id: str) -> str:
        """Key of a person's state."""
        return f"{self.prefix}p:{{{one_id}}}"

    def queue_key(self, queue: str) -> str:
        """Key of a queue's round-robin counter."""
        return f"{self.prefix}rr:{{{queue}}}"

    # -- identity -----------------------------------------------------------
    def owners(self, identifiers: Sequence[Identifier]) -> list[str | None]:
        """The One-ID owning each identifier, None where unknown."""
        values = self._mget([self.identifier_key(i) for i in identifiers])
        return [None if v is None else v.decode() for v in values]

    def claim(self, claims: Sequence[tuple[Identifier, str]]) -> list[str]:
        """Give each identifier to a One-ID unless someone owns it already.

        Returns the owner after the claim: the given One-ID, or whoever won.
        """
        if not claims:
            return []
        keys = [self.identifier_key(ident) for ident, _ in claims]

        def run() -> list[Any]:
            pipe = self.client.pipeline(transaction=False)
            for key, (_, one_id) in zip(keys, claims, strict=True):
                pipe.set(key, one_id, nx=True)
            return pipe.execute()

        won = self._retry(run)
        owners = [one_id for _, one_id in claims]
        # Races are rare: only identifiers someone else claimed first are read back.
        lost = [i for i, ok in enumerate(won) if not ok]
        for i, value in zip(lost, self._mget([keys[i] for i in lost]), strict=True):
            owners[i] = cast(bytes, value).decode()
        return owners

    # -- people ---------------------------------------------------------------
    def load_people(self, one_ids: Sequence[str]) -> list[bytes | None]:
        """The stored state of each person, None for people not seen before."""
        return self._mget([self.person_key(one_id) for one_id in one_ids])

    def save_people(self, states: Sequence[tuple[str, bytes]]) -> None:
        """Write each person's state; each person is one key, so each write is atomic."""
        if states:
            mapping = {self.person_key(one_id): raw for one_id, raw in states}
            self._retry(lambda: self.client.mset(mapping))

    # -- routing ---------------------------------------------------------------
    def draw_tickets(self, requests: Sequence[tuple[str, str]]) -> list[int]:
        """Draw one round-robin ticket per ``(queue, decision_id)``, idempotently."""
        if not requests:
            return []

        def run() -> list[Any]:
            pipe = self.client.pipeline(transaction=False)
            for queue, decision_id in requests:
                counter = self.queue_key(queue)
                self._draw_ticket(
                    keys=[counter, f"{counter}:t:{decision_id}"], args=[TICKET_TTL_S], client=pipe
                )
            return pipe.execute()

        return [int(t) for t in self._retry(run)]

    def _mget(self, keys: list[str]) -> list[bytes | None]:
        if not keys:
            return []
        return cast(list[bytes | None], self._retry(lambda: self.client.mget(keys)))

    def close(self) -> None:
        """Release the connection pool."""
        self.client.close()

    def _retry(self, op: Callable[[], T]) -> T:
        """Run ``op``; on connection trouble retry with backoff, then give up loudly."""
        delay = RETRY_FIRST_S
        for attempt in range(self.settings.retries + 1):
            try:
                return op()
            except (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError) as e:
                if attempt == self.settings.retries:
                    raise StoreUnavailable(
                        f"Redis unavailable after {attempt + 1} attempts: {e}"
                    ) from e
                log.warning(
                    "redis error (attempt %d, retrying in %.2fs): %s", attempt + 1, delay, e
                )
                time.sleep(delay)
                delay = min(delay * 2, RETRY_CAP_S)
        raise AssertionError("unreachable")
