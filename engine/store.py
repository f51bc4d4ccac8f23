"""The Redis state store: the only module of the engine that talks to Redis.

Key layout (``P`` = ``redis.key_prefix``, default ``lf:``). Every key carries a
hash tag; keys of one person share that person's tag:

==============================  ==============================================
``P id:{<identifier digest>}``  One-ID owning that identifier
``P e:{<identifier digest>}``   erasure time (ms) of that identifier; expires
``P p:{<one_id>}``              the person's state: ``<version>|<compact JSON>``
``P r:{<one_id>}``              One-ID that absorbed this person (a redirect)
``P pend:{<one_id>}``           people this person announced it will absorb (a set)
``P rr:{<queue>}``              the queue's round-robin counter
``P rr:{<queue>}:t:<decision>`` ticket drawn for a decision; expires
==============================  ==============================================

Writes are compare-and-set and idempotent, so any worker may touch any person
and a replay changes nothing:

* a person's state is saved only if its version is still the one read and the
  person has not been redirected (:data:`_SAVE`), else the caller re-reads;
* identifiers are claimed with "set if absent, tell me the owner" (:data:`_CLAIM`);
* a merge first *freezes* the absorbed person by setting its redirect and reads
  its state in the same script (:data:`_FREEZE`), so nothing written to it can
  be missed; later its identifiers are re-pointed only if they still point at it.

Each script touches the keys of one hash tag per item. On a standalone server one
call serves a whole batch; with ``redis.cluster = true`` calls are grouped per
hash slot, so no command ever spans two slots.
"""

from __future__ import annotations

import binascii
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any, TypeVar, cast

import redis
from redis.commands.core import Script

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

SAVED, CONFLICT, REDIRECTED = 0, 1, 2

# Draw the next ticket of a queue for a decision, once: a replay of the same
# decision gets the same ticket and does not advance the rotation.
_DRAW_TICKET = """
local t = redis.call('GET', KEYS[2])
if t then return tonumber(t) end
t = redis.call('INCR', KEYS[1])
redis.call('SET', KEYS[2], t, 'EX', ARGV[1])
return t
"""

# KEYS: (identifier key, its erasure key) per claim; ARGV: (One-ID, stale owner or
# '', event ms) per claim. Refuse an identifier erased at or after the event
# (false); else set it if absent, or if still owned by the stale owner (a person
# since absorbed by the claimer, or one that never came to exist); return the owner.
_CLAIM = """
local out = {}
for i = 1, #KEYS, 2 do
  local j = (i + 1) / 2
  local erased = redis.call('GET', KEYS[i + 1])
  if erased and tonumber(erased) >= tonumber(ARGV[3 * j]) then
    out[j] = false
  else
    local cur = redis.call('GET', KEYS[i])
    if (not cur) or (ARGV[3 * j - 1] ~= '' and cur == ARGV[3 * j - 1]) then
      redis.call('SET', KEYS[i], ARGV[3 * j - 2])
      cur = ARGV[3 * j - 2]
    end
    out[j] = cur
  end
end
return out
"""

# KEYS: (redirect key, person key, pending key) per absorbed person; ARGV:
# (survivor, version planned on) per person. Redirect to the survivor only if not
# redirected and unchanged since planned; return {redirect target or false,
# stored state, the people it announced it would absorb}.
_FREEZE = """
local out = {}
for i = 1, #KEYS, 3 do
  local j = (i + 2) / 3
  local cur = redis.call('GET', KEYS[i + 1])
  local r = redis.call('GET', KEYS[i])
  if not r then
    local v = 0
    if cur then v = tonumber(string.match(cur, '^(%d+)|')) end
    if v == tonumber(ARGV[2 * j]) then
      redis.call('SET', KEYS[i], ARGV[2 * j - 1])
      r = ARGV[2 * j - 1]
    end
  end
  out[j] = {r or false, cur or false, redis.call('SMEMBERS', KEYS[i + 2])}
end
return out
"""

# KEYS: (person key, redirect key) per person; ARGV: (expected version, new value,
# ttl ms or 0) per person. Save only an unchanged, unredirected person.
_SAVE = """
local out = {}
for i = 1, #KEYS, 2 do
  local j = (i + 1) / 2
  if redis.call('EXISTS', KEYS[i + 1]) == 1 then
    out[j] = 2
  else
    local cur = redis.call('GET', KEYS[i])
    local v = 0
    if cur then v = tonumber(string.match(cur, '^(%d+)|')) end
    if v ~= tonumber(ARGV[3 * j - 2]) then
      out[j] = 1
    else
      local ttl = tonumber(ARGV[3 * j])
      if ttl > 0 then
        redis.call('SET', KEYS[i], ARGV[3 * j - 1], 'PX', ttl)
      else
        redis.call('SET', KEYS[i], ARGV[3 * j - 1])
      end
      out[j] = 0
    end
  end
end
return out
"""

# KEYS: identifier keys; ARGV: (from, to) One-IDs per key. Move only what still
# points at `from`; an empty `to` deletes.
_REPOINT = """
local out = {}
for i, key in ipairs(KEYS) do
  out[i] = 0
  if redis.call('GET', key) == ARGV[2 * i - 1] then
    if ARGV[2 * i] == '' then redis.call('DEL', key) else redis.call('SET', key, ARGV[2 * i]) end
    out[i] = 1
  end
end
return out
"""


class StoreUnavailable(RuntimeError):
    """Redis could not be reached after all retries."""


@dataclass(frozen=True, slots=True)
class Stored:
    """A person as read: version, state, redirect (None if none), announced absorptions.

    ``pending`` is read only when freezing: the people this person announced it
    would absorb.
    """

    version: int
    state: bytes | None
    redirect: str | None
    pending: tuple[str, ...] = ()


def hash_slot(key: str) -> int:
    """The Redis Cluster slot of a key (CRC16 of its hash tag, mod 16384)."""
    start = key.find("{")
    if start >= 0:
        end = key.find("}", start + 1)
        if end > start + 1:
            key = key[start + 1 : end]
    # Redis Cluster uses CRC16-CCITT (XMODEM), which binascii.crc_hqx computes.
    return binascii.crc_hqx(key.encode(), 0) % 16384


class RedisStore:
    """Per-person state, identifier ownership and routing counters in Redis."""

    def __init__(self, settings: RedisSettings, client: Any = None):
        self.settings = settings
        self.prefix = settings.key_prefix
        if client is not None:
            self.client = client
        elif settings.cluster:
            self.client = redis.RedisCluster.from_url(
                settings.url, socket_timeout=10, socket_connect_timeout=5
            )
        else:
            self.client = redis.Redis.from_url(
                settings.url, socket_timeout=10, socket_connect_timeout=5
            )
        self.cluster = settings.cluster
        self._scripts: dict[str, Script] = {
            name: self.client.register_script(body)
            for name, body in (
                ("ticket", _DRAW_TICKET),
                ("claim", _CLAIM),
                ("freeze", _FREEZE),
                ("save", _SAVE),
                ("repoint", _REPOINT),
            )
        }

    # -- keys -------------------------------------------------------------
    def identifier_key(self, ident: Identifier | str) -> str:
        """Key mapping an identifier to its One-ID."""
        d = ident if isinstance(ident, str) else ident.digest
        return f"{self.prefix}id:{{{d}}}"

    def erasure_key(self, digest: str) -> str:
        """Key holding when an identifier was erased."""
        return f"{self.prefix}e:{{{digest}}}"

    def person_key(self, one_id: str) -> str:
        """Key of a person's state."""
        return f"{self.prefix}p:{{{one_id}}}"

    def pending_key(self, one_id: str) -> str:
        """Key of the set of people a person announced it will absorb."""
        return f"{self.prefix}pend:{{{one_id}}}"

    def redirect_key(self, one_id: str) -> str:
        """Key naming who absorbed a person."""
        return f"{self.prefix}r:{{{one_id}}}"

    def queue_key(self, queue: str) -> str:
        """Key of a queue's round-robin counter."""
        return f"{self.prefix}rr:{{{queue}}}"

    # -- identity -----------------------------------------------------------
    def owners(self, digests: Sequence[str]) -> tuple[list[str | None], list[int]]:
        """The owner of each identifier (None: nobody) and its erasure time (0: never erased)."""
        keys = [self.identifier_key(d) for d in digests] + [self.erasure_key(d) for d in digests]
        values = self._mget(keys)
        n = len(digests)
        return [_text(v) for v in values[:n]], [int(v) if v else 0 for v in values[n:]]

    def claim(self, claims: Sequence[tuple[str, str, str, int]]) -> list[str | None]:
        """Give ``(digest, One-ID, stale owner or '', event ms)`` identifiers away.

        Returns the owner after each claim, or None when the identifier was erased at or
        after the event's time. An identifier is taken when nobody owns it, or when it
        still points at the stale owner named.
        """
        items = [
            ([self.identifier_key(d), self.erasure_key(d)], [o, s, t]) for d, o, s, t in claims
        ]
        return [_text(v) for v in self._script("claim", items)]

    def repoint(self, moves: Sequence[tuple[str, str, str]]) -> None:
        """Move ``(digest, from, to)`` identifiers still owned by ``from`` ('' deletes)."""
        self._script("repoint", [([self.identifier_key(d)], [a, b]) for d, a, b in moves])

    def mark_erased(self, digests: Sequence[str], erased_ms: int, ttl_s: int) -> None:
        """Remember that these identifiers were erased at ``erased_ms`` (for ``ttl_s``)."""
        if digests:
            self._retry(
                lambda: self._pipeline(
                    [("set", self.erasure_key(d), erased_ms, ttl_s) for d in digests]
                )
            )

    # -- people ---------------------------------------------------------------
    def load_people(self, one_ids: Sequence[str]) -> list[Stored]:
        """Each person's version, state and redirect, in one round trip."""
        keys = [self.person_key(o) for o in one_ids] + [self.redirect_key(o) for o in one_ids]
        values = self._mget(keys)
        n = len(one_ids)
        return [_stored(values[i], values[n + i]) for i in range(n)]

    def freeze(self, plans: Sequence[tuple[str, str, int]]) -> list[Stored]:
        """Redirect ``(absorbed, survivor, version planned on)`` unless redirected/changed; read.

        The result's ``redirect`` is the survivor when frozen for it, another One-ID when
        someone else absorbed the person first, None when it changed since planned.
        """
        items = [
            ([self.redirect_key(a), self.person_key(a), self.pending_key(a)], [s, v])
            for a, s, v in plans
        ]
        out = []
        for target, state, pending in self._script("freeze", items):
            stored = _stored(state or None, target or None)
            out.append(replace(stored, pending=tuple(sorted(p.decode() for p in pending))))
        return out

    def announce(self, absorptions: Sequence[tuple[str, str]]) -> None:
        """Record ``(survivor, absorbed)`` intents in the survivor's slot, before freezing.

        Whoever later freezes the survivor reads them with it and absorbs what the
        survivor did not record: an absorption interrupted by a race or a crash is
        finished by the next survivor instead of being orphaned behind a redirect.
        """
        if absorptions:
            commands = [("sadd", self.pending_key(s), a) for s, a in absorptions]
            self._retry(lambda: self._pipeline(commands))

    def save_people(self, saves: Sequence[tuple[str, int, bytes, int]]) -> list[int]:
        """Compare-and-set ``(one_id, version read, state, ttl ms)``: SAVED/CONFLICT/REDIRECTED."""
        items = [
            ([self.person_key(o), self.redirect_key(o)], [v, str(v + 1).encode() + b"|" + raw, ttl])
            for o, v, raw, ttl in saves
        ]
        return [int(s) for s in self._script("save", items)]

    def drop_people(self, one_ids: Sequence[str]) -> None:
        """Delete absorbed people's frozen states and redirects (after an erasure)."""
        keys = [
            k
            for o in one_ids
            for k in (self.person_key(o), self.redirect_key(o), self.pending_key(o))
        ]
        if keys:
            self._retry(lambda: self._pipeline([("delete", k) for k in keys]))

    # -- routing ---------------------------------------------------------------
    def draw_tickets(self, requests: Sequence[tuple[str, str]]) -> list[int]:
        """Draw one round-robin ticket per ``(queue, decision_id)``, idempotently."""
        items = []
        for queue, decision_id in requests:
            counter = self.queue_key(queue)
            items.append(([counter, f"{counter}:t:{decision_id}"], [TICKET_TTL_S]))
        return [int(t) for t in self._script("ticket", items, one_call_each=True)]

    def close(self) -> None:
        """Release the connection pool."""
        self.client.close()

    # -- plumbing ----------------------------------------------------------------
    def _mget(self, keys: list[str]) -> list[bytes | None]:
        if not keys:
            return []
        if self.cluster:
            return cast(list[bytes | None], self._retry(lambda: self.client.mget_nonatomic(keys)))
        return cast(list[bytes | None], self._retry(lambda: self.client.mget(keys)))

    def _pipeline(self, commands: list[tuple[Any, ...]]) -> list[Any]:
        pipe = self.client.pipeline(transaction=False)
        for name, *args in commands:
            if name == "set":
                key, value, ttl = args
                pipe.set(key, value, ex=ttl)
            else:
                getattr(pipe, name)(*args)
        return cast(list[Any], pipe.execute())

    def _script(
        self, name: str, items: Sequence[tuple[list[str], list[Any]]], one_call_each: bool = False
    ) -> list[Any]:
        """Run a batch script over items (keys of one hash tag each); results in item order.

        One call for the batch on a standalone server; one call per hash slot in a cluster
        (and one per item for scripts whose items share keys, such as the ticket counter).
        """
        if not items:
            return []
        script = self._scripts[name]
        if one_call_each:
            groups = [[i] for i in range(len(items))]
        elif self.cluster:
            by_slot: dict[int, list[int]] = {}
            for i, (keys, _) in enumerate(items):
                by_slot.setdefault(hash_slot(keys[0]), []).append(i)
            groups = list(by_slot.values())
        else:
            groups = [list(range(len(items)))]

        def run() -> list[Any]:
            pipe = self.client.pipeline(transaction=False)
            for group in groups:
                keys = [k for i in group for k in items[i][0]]
                args = [a for i in group for a in items[i][1]]
                script(keys=keys, args=args, client=pipe)
            return cast(list[Any], pipe.execute())

        results: list[Any] = [None] * len(items)
        for group, reply in zip(groups, self._retry(run), strict=True):
            replies = reply if isinstance(reply, list) and not one_call_each else [reply]
            for i, value in zip(group, replies, strict=True):
                results[i] = value
        return results

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


def _text(value: bytes | None) -> str | None:
    return None if value is None else value.decode()


def _stored(state: bytes | None, redirect: bytes | None) -> Stored:
    if state is None:
        return Stored(0, None, _text(redirect))
    version, _, body = state.partition(b"|")
    return Stored(int(version), body, _text(redirect))
