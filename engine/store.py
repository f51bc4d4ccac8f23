"""The Redis state store: the only module of the engine that talks to Redis.

Key layout (``P`` = ``redis.key_prefix``, default ``lf:``). Every key carries a
hash tag; keys of one person share that person's tag:

==============================  ==============================================
``P id:{<identifier digest>}``  One-ID owning that identifier, or its kind
                                when it is its owner's founding identifier
``P e:{<identifier digest>}``   erasure time (ms) of that identifier; expires
``P ids:{<one_id>}``            the person's other identifiers, ``kind:digest``
                                (a hash; absent while the founding one is all)
``P p:{<one_id>}``              the person's state: ``<version>|<state>`` (engine.person)
``P r:{<one_id>}``              One-ID that absorbed this person (a redirect); expires
``P pend:{<one_id>}``           people merged into this one, to absorb (a set)
``P q:{<queue>}``               leads assigned per SDR of the queue (a hash)
``P q:{<queue>}:a:<decision>``  the SDR a decision was assigned to; expires
``P q:{<queue>}:co:<company>`` the company's (e-mail domain's) owner; expires
``P q:{<queue>}:d:<sdr>:<day>`` leads an SDR took that local day (``w:`` week)
``P roster``                    the roster applied: ``<version>|<JSON>``
``P timers``                    due time of every pending timer (a sorted set)
``P input``                     per input source, the offset read up to and done
``P input:gen``                 per input partition, how often its log was found lost
``P list:<name>``               a suppression list's members (a set; engine.consent)
``P alert:{<decision>}``        a webhook alert: the sender POSTing it, then
                                ``delivered``; expires (``leadflow alerts``)
``P alerts:redrives``           parked alerts sent again, per ``queue|outcome``
==============================  ==============================================

A new person is named after the digest of their strongest identifier
(engine.identity.anchor), so that identifier's key is in the person's hash slot
and says its owner by naming its kind: a person known by one identifier, most
people, needs no ``ids`` hash (about 120 bytes each at a million people). A
person's identifiers are the ``ids`` hash and, when ``id:{<one_id>}`` says so,
the founding one. Keys written as ``<one_id>`` plus an ``ids`` entry, as before
this, read the same.

The identity graph (``id``, ``e``, ``ids``, ``r``, ``pend``) has one writer,
the identity resolver (:class:`IdentityWrites`), which the dataflow runs on a
single worker; its writes are plain idempotent sets, replayed as they are.
People's states have many writers (a merge moves events across workers), so a
state is saved only if its version is still the one read and the person has not
been redirected (:data:`_SAVE`): once the resolver sets a person's redirect, its
state is final and whoever absorbs it reads all of it.

Each script touches the keys of one hash tag per item. On a standalone server one
call serves a whole batch; with ``redis.cluster = true`` calls are grouped per
hash slot, so no command ever spans two slots.
"""

from __future__ import annotations

import binascii
import logging
import re
import ssl
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, TypeVar, cast
from urllib.parse import unquote, urlsplit

import redis
from redis.cluster import ClusterNode
from redis.commands.core import Script

from engine.batch import SaveStatus, Stored
from engine.identity import Identifier
from engine.routing import Assignment, capped_periods
from engine.settings import RedisSettings

log = logging.getLogger(__name__)
T = TypeVar("T")

# A replayed promotion must find its assignment again; replays happen within one
# recovery snapshot interval, so 30 days is generous and still bounded.
ASSIGNMENT_TTL_S = 30 * 86_400
# A company's owner in a queue stays its owner this long after its last lead.
COMPANY_OWNER_TTL_S = 180 * 86_400
# An identifier key holds its owner's One-ID (16 hex digits), or, when the identifier
# founded its owner (the One-ID is the identifier's digest), the identifier's kind:
# "anon" fits Redis's smallest value allocation (24 bytes, not 32 with a marker). No kind
# may be named like a One-ID (engine.settings refuses it).
ONE_ID = re.compile(rb"[0-9a-f]{16}")


def founding_kind(value: bytes) -> str | None:
    """The kind an identifier key's value names, or None when it names a One-ID."""
    return None if ONE_ID.fullmatch(value) else value.decode()


# Backoff between Redis retries: doubles from the first value up to the cap.
RETRY_FIRST_S = 0.05
RETRY_CAP_S = 5.0


# What :meth:`RedisStore.claim_alert` answers besides the milliseconds another sender
# still holds the alert.
CLAIMED, DELIVERED = "claimed", "delivered"

# Claim a webhook alert before POSTing it. KEYS: the alert. ARGV: sender, lease ms.
# Returns "delivered", "claimed" (it is this sender's now), or the ms another
# sender's claim has left.
_CLAIM_ALERT = """
local v = redis.call('GET', KEYS[1])
if v == 'delivered' then return v end
if v and v ~= ARGV[1] then return math.max(redis.call('PTTL', KEYS[1]), 1) end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 'claimed'
"""

# Give a claim back after a failed POST (only one's own). KEYS: the alert. ARGV: sender.
_UNCLAIM_ALERT = """
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end
return 0
"""
# The done offset of an input source whose log the broker lost: above every offset.
RETIRED = 2**62

# Assign a decision to an SDR of its queue, once. KEYS: queue counts (hash SDR ->
# leads), the decision's assignment, the company's owner in the queue, then per
# candidate its day and week counters. ARGV: ttl s, company or '', the company
# owner's ttl s, then per candidate: id, weight, available (1/0), daily cap,
# weekly cap (0: none).
# Fewest leads relative to weight wins, ties to roster order; a company's owner
# wins while available; newcomers join at the current level; SDRs away are
# levelled up so they are not flooded on return. Returns the SDR, or false when
# nobody can take the lead now (it waits).
_ASSIGN = """
local done = redis.call('GET', KEYS[2])
if done then return done end
local n = (#ARGV - 3) / 5
local owner = false
if ARGV[2] ~= '' then owner = redis.call('GET', KEYS[3]) end
local counts, level, member = {}, nil, false
for i = 1, n do
  local b = 3 + 5 * (i - 1)
  if ARGV[b + 1] == owner then member = true end
  local c = redis.call('HGET', KEYS[1], ARGV[b + 1])
  if c then
    counts[i] = tonumber(c)
    local v = counts[i] / tonumber(ARGV[b + 2])
    if level == nil or v < level then level = v end
  end
end
level = level or 0
local best, bestv, besti = false, nil, nil
for i = 1, n do
  local b = 3 + 5 * (i - 1)
  local id, w = ARGV[b + 1], tonumber(ARGV[b + 2])
  if counts[i] == nil then
    counts[i] = math.floor(level * w)
    redis.call('HSET', KEYS[1], id, counts[i])
  end
  if ARGV[b + 3] == '1' then
    local dcap, wcap = tonumber(ARGV[b + 4]), tonumber(ARGV[b + 5])
    local d = tonumber(redis.call('GET', KEYS[2 + 2 * i]) or '0')
    local wk = tonumber(redis.call('GET', KEYS[3 + 2 * i]) or '0')
    if (dcap == 0 or d < dcap) and (wcap == 0 or wk < wcap) then
      local v = counts[i] / w
      if id == owner then v = -1 end
      if bestv == nil or v < bestv then best, bestv, besti = id, v, i end
    end
  end
end
if not best then return false end
redis.call('HINCRBY', KEYS[1], best, 1)
if bestv >= 0 then
  for i = 1, n do
    local b = 3 + 5 * (i - 1)
    local w = tonumber(ARGV[b + 2])
    if ARGV[b + 3] == '0' and counts[i] / w < bestv then
      redis.call('HSET', KEYS[1], ARGV[b + 1], math.ceil(bestv * w))
    end
  end
end
redis.call('INCR', KEYS[2 + 2 * besti])
redis.call('EXPIRE', KEYS[2 + 2 * besti], 3 * 86400)
redis.call('INCR', KEYS[3 + 2 * besti])
redis.call('EXPIRE', KEYS[3 + 2 * besti], 15 * 86400)
redis.call('SET', KEYS[2], best, 'EX', ARGV[1])
if ARGV[2] ~= '' and not member then redis.call('SET', KEYS[3], best, 'EX', ARGV[3]) end
if ARGV[2] ~= '' and member then redis.call('EXPIRE', KEYS[3], ARGV[3]) end
return best
"""

# Undo an assignment whose decision was never emitted (its person lost a compare-and-set
# race). KEYS: queue counts, the decision's assignment, the SDR's day and week counters;
# ARGV: the SDR. Only if the decision is still assigned to that SDR, so twice is once.
_RELEASE = """
if redis.call('GET', KEYS[2]) ~= ARGV[1] then return 0 end
redis.call('HINCRBY', KEYS[1], ARGV[1], -1)
if tonumber(redis.call('GET', KEYS[3]) or '0') > 0 then redis.call('DECR', KEYS[3]) end
if tonumber(redis.call('GET', KEYS[4]) or '0') > 0 then redis.call('DECR', KEYS[4]) end
redis.call('DEL', KEYS[2])
return 1
"""

# KEYS: (person key, redirect key, pending key) per person; ARGV: the version the
# caller holds decoded per person (0: none). Read them all at once; a state still at
# the version the caller holds comes back as 1, not as its bytes.
_LOAD = """
local out = {}
for i = 1, #KEYS, 3 do
  local j = (i + 2) / 3
  local state = redis.call('GET', KEYS[i]) or false
  if state and ARGV[j] ~= '0' and string.match(state, '^(%d+)|') == ARGV[j] then
    state = 1
  end
  out[j] = {
    state,
    redis.call('GET', KEYS[i + 1]) or false,
    redis.call('SMEMBERS', KEYS[i + 2]),
  }
end
return out
"""

# Raise an input source's done offset, never lower it. KEYS: input key; ARGV: source, offset.
_ADVANCE_INPUT = """
local cur = tonumber(redis.call('HGET', KEYS[1], ARGV[1]) or '-1')
if tonumber(ARGV[2]) > cur then redis.call('HSET', KEYS[1], ARGV[1], ARGV[2]) end
return 0
"""

# The roster, unless it is at the version the caller holds (then only that version).
# KEYS: roster key; ARGV: version held (-1: none).
_ROSTER_IF_CHANGED = """
local cur = redis.call('GET', KEYS[1])
if not cur then return false end
local v = string.match(cur, '^(%d+)|')
if v == ARGV[1] then return tonumber(v) end
return cur
"""

# Store a new roster under the next version. KEYS: roster key; ARGV: roster JSON.
_APPLY_ROSTER = """
local cur = redis.call('GET', KEYS[1])
local v = 0
if cur then v = tonumber(string.match(cur, '^(%d+)|')) end
redis.call('SET', KEYS[1], (v + 1) .. '|' .. ARGV[1])
return v + 1
"""

# KEYS: (person key, redirect key) per person; ARGV: (expected version, new value
# "version|state", ttl ms or 0) per person. Save only an unchanged, unredirected person.
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


class StoreUnavailable(RuntimeError):
    """Redis could not be reached after all retries."""


@dataclass(frozen=True, slots=True)
class GraphNode:
    """A person in the identity graph: identifiers, people to absorb, redirect."""

    identifiers: set[tuple[str, str]]
    pending: set[str]
    redirect: str | None


class IdentityWrites:
    """The resolver's writes of one batch, in the order they must happen.

    Every write is idempotent, and a merge writes the absorbed person's redirect
    first (freezing its state), then the survivor's pending set, then moves the
    identifiers, so a crash part-way leaves a state the replay completes.
    """

    def __init__(self, store: RedisStore, redirect_ttl_s: int | None = None):
        self.store = store
        # A redirect outlives its absorption (stray events and timers of the absorbed
        # One-ID still find the survivor), but not the retention of people.
        self.redirect_ttl_s = redirect_ttl_s or None
        self.commands: list[tuple[Any, ...]] = []

    def claim(self, one_id: str, kind: str, digest: str) -> None:
        """Give an identifier nobody owns to ``one_id``."""
        s = self.store
        if digest == one_id:  # the founding identifier: its key says so, no ids entry
            self.commands.append(("set", s.identifier_key(digest), kind, None))
        else:
            self.commands.append(("set", s.identifier_key(digest), one_id, None))
            self.commands.append(("hset", s.identifiers_key(one_id), f"{kind}:{digest}", ""))

    def merge(
        self, absorbed: str, survivor: str, ids: Iterable[tuple[str, str]], pending: Iterable[str]
    ) -> None:
        """Redirect ``absorbed`` to ``survivor`` and move its identifiers and pending people."""
        s = self.store
        self.commands.append(("set", s.redirect_key(absorbed), survivor, self.redirect_ttl_s))
        self.commands.append(("sadd", s.pending_key(survivor), absorbed, *pending))
        for k, d in sorted(ids):
            self.claim(survivor, k, d)
        self.commands.append(("delete", s.identifiers_key(absorbed)))

    def erase(
        self, one_id: str, ids: Iterable[tuple[str, str]], erased_ms: int, ttl_s: int
    ) -> None:
        """Forget a person's identifiers; remember when, so older events cannot return."""
        s = self.store
        for _, d in sorted(ids):
            self.commands.append(("set", s.erasure_key(d), erased_ms, ttl_s))
            self.commands.append(("delete", s.identifier_key(d)))
        self.commands.append(("delete", s.identifiers_key(one_id)))


def hash_slot(key: str) -> int:
    """The Redis Cluster slot of a key (CRC16 of its hash tag, mod 16384)."""
    start = key.find("{")
    if start >= 0:
        end = key.find("}", start + 1)
        if end > start + 1:
            key = key[start + 1 : end]
    # Redis Cluster uses CRC16-CCITT (XMODEM), which binascii.crc_hqx computes.
    return binascii.crc_hqx(key.encode(), 0) % 16384


def cluster_client(url: str) -> redis.RedisCluster:
    """A Redis Cluster client from ``redis[s]://[user:password@]host:port[,host:port...]``.

    Every node listed is a seed: the client starts from the first that answers, so a
    restart does not depend on one node being up.
    """
    parts = urlsplit(url)
    seeds = parts.netloc.rpartition("@")[2].split(",")
    nodes = []
    for seed in seeds:
        host, _, port = seed.strip().rpartition(":")
        nodes.append(ClusterNode(host or seed.strip(), int(port) if host else 6379))
    return redis.RedisCluster(
        startup_nodes=nodes,
        username=unquote(parts.username) if parts.username else None,
        password=unquote(parts.password) if parts.password else None,
        ssl=parts.scheme == "rediss",
        socket_timeout=10,
        socket_connect_timeout=5,
    )


class RedisStore:
    """Per-person state, identifier ownership and routing counters in Redis."""

    def __init__(self, settings: RedisSettings, client: Any = None):
        self.settings = settings
        self.prefix = settings.key_prefix
        if client is not None:
            self.client = client
        elif settings.cluster:
            self.client = cluster_client(settings.url)
        else:
            self.client = redis.Redis.from_url(
                settings.url, socket_timeout=10, socket_connect_timeout=5
            )
        self.cluster = settings.cluster
        # Told of every Redis call: (store method or script, seconds, failed). The
        # dataflow sets it to its metrics; the engine stays free of them.
        self.observer: Callable[[str, float, bool], None] | None = None
        self._scripts: dict[str, Script] = {
            name: self.client.register_script(body)
            for name, body in (
                ("advance", _ADVANCE_INPUT),
                ("assign", _ASSIGN),
                ("claim_alert", _CLAIM_ALERT),
                ("unclaim_alert", _UNCLAIM_ALERT),
                ("release", _RELEASE),
                ("load", _LOAD),
                ("roster", _APPLY_ROSTER),
                ("roster_if_changed", _ROSTER_IF_CHANGED),
                ("save", _SAVE),
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

    def identifiers_key(self, one_id: str) -> str:
        """Key of a person's identifiers but the founding one: a hash of ``kind:digest`` -> ''.

        A hash, not a set: Redis before 7.2 stores small sets as hash tables
        (256 bytes for one member) but small hashes as a ziplist (112 bytes).
        """
        return f"{self.prefix}ids:{{{one_id}}}"

    def pending_key(self, one_id: str) -> str:
        """Key of the set of people merged into a person and not yet absorbed by it."""
        return f"{self.prefix}pend:{{{one_id}}}"

    def redirect_key(self, one_id: str) -> str:
        """Key naming who absorbed a person."""
        return f"{self.prefix}r:{{{one_id}}}"

    def queue_key(self, queue: str) -> str:
        """Key of a queue's per-SDR lead counts."""
        return f"{self.prefix}q:{{{queue}}}"

    def timers_key(self) -> str:
        """Key of the sorted set of pending timers (score: due epoch ms)."""
        return f"{self.prefix}timers"

    def roster_key(self) -> str:
        """Key of the roster applied to running engines."""
        return f"{self.prefix}roster"

    def list_key(self, name: str) -> str:
        """Key of a suppression list (unsubscribe, dnc, blacklist, whitelist)."""
        return f"{self.prefix}list:{name}"

    def input_key(self) -> str:
        """Key of the input sources' done offsets (a hash: source -> offset)."""
        return f"{self.prefix}input"

    # -- identity graph (one writer: the resolver) -----------------------------
    def owners(self, digests: Sequence[str]) -> tuple[list[str | None], list[int]]:
        """The owner of each identifier (None: nobody) and its erasure time (0: never erased)."""
        keys = [self.identifier_key(d) for d in digests] + [self.erasure_key(d) for d in digests]
        values = self._mget(keys)
        n = len(digests)
        owners = [_owner(d, v) for d, v in zip(digests, values[:n], strict=True)]
        return owners, [int(v) if v else 0 for v in values[n:]]

    def graph(self, one_ids: Sequence[str]) -> list[GraphNode]:
        """Each person's identifiers, pending absorptions and redirect, in one round trip."""
        if not one_ids:
            return []

        def read() -> list[Any]:
            pipe = self.client.pipeline(transaction=False)
            for o in one_ids:
                pipe.hkeys(self.identifiers_key(o))
                pipe.get(self.identifier_key(o))
                pipe.smembers(self.pending_key(o))
                pipe.get(self.redirect_key(o))
            return cast(list[Any], pipe.execute())

        rows = self._retry(read)
        nodes = []
        for i, o in enumerate(one_ids):
            ids, founding, pending, redirect = rows[4 * i : 4 * i + 4]
            held = {_pair(m) for m in ids}
            if founding is not None and (kind := founding_kind(founding)) is not None:
                held.add((kind, o))
            nodes.append(GraphNode(held, {m.decode() for m in pending}, _text(redirect)))
        return nodes

    def identifiers(self, one_id: str) -> list[tuple[str, str]]:
        """A person's identifiers as ``(kind, digest)``, sorted."""
        return sorted(self.graph([one_id])[0].identifiers)

    def write_graph(self, writes: IdentityWrites) -> None:
        """Apply the resolver's writes, in order, in one round trip."""
        if writes.commands:
            self._retry(lambda: self._pipeline(writes.commands))

    # -- people ---------------------------------------------------------------
    def load_people(
        self, one_ids: Sequence[str], pending: bool = False, held: Sequence[int] = ()
    ) -> list[Stored]:
        """Each person's version, state and redirect (and pending absorptions), in one trip.

        ``held`` (with ``pending``) gives the version the caller holds decoded per
        person (0: none): a state still at it is not sent back, only marked
        ``unchanged`` (engine.state_cache).
        """
        if not one_ids:
            return []
        keys = [self.person_key(o) for o in one_ids] + [self.redirect_key(o) for o in one_ids]
        n = len(one_ids)
        if not pending:
            values = self._mget(keys)
            return [_stored(values[i], values[n + i]) for i in range(n)]

        versions = held or [0] * n
        items: list[tuple[list[str], list[Any]]] = [
            ([keys[i], keys[n + i], self.pending_key(one_ids[i])], [versions[i]]) for i in range(n)
        ]
        out = []
        for (state, redirect, pend), version in zip(
            self._script("load", items), versions, strict=True
        ):
            if state == 1:
                stored = Stored(version, None, _text(redirect or None), unchanged=True)
            else:
                stored = _stored(state or None, redirect or None)
            stored.pending = tuple(sorted(_texts(pend)))
            out.append(stored)
        return out

    def save_people(self, saves: Sequence[tuple[str, int, int, bytes, int]]) -> list[SaveStatus]:
        """Compare-and-set ``(one_id, version read, version to write, state, ttl ms)``.

        Returns a :class:`SaveStatus` per person. The version to write is
        :func:`next_version` of the one read.
        """
        items = [
            ([self.person_key(o), self.redirect_key(o)], [v, b"%d|" % new + raw, ttl])
            for o, v, new, raw, ttl in saves
        ]
        return [SaveStatus(s) for s in self._script("save", items)]

    def absorbed(self, done: Sequence[tuple[str, Sequence[str]]]) -> None:
        """Strike ``(survivor, absorbed people)`` off the survivors' pending sets (after a save)."""
        commands: list[tuple[Any, ...]] = [
            ("srem", self.pending_key(s), *people) for s, people in done if people
        ]
        if commands:
            self._retry(lambda: self._pipeline(commands))

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
    def assign(self, requests: Sequence[Assignment]) -> list[str | None]:
        """Assign each decision to an SDR of its queue, idempotently (None: nobody can now)."""
        items = []
        for r in requests:
            q = self.queue_key(r.queue)
            keys = [q, f"{q}:a:{r.decision_id}", f"{q}:co:{r.company}"]
            args: list[Any] = [ASSIGNMENT_TTL_S, r.company, COMPANY_OWNER_TTL_S]
            for c in r.candidates:
                keys += [f"{q}:d:{c.sdr}:{c.day}", f"{q}:w:{c.sdr}:{c.week}"]
                args += [c.sdr, c.weight, int(c.available), c.daily_cap, c.weekly_cap]
            items.append((keys, args))
        return [_text(v) if v else None for v in self._script("assign", items, one_call_each=True)]

    def release(self, assignments: Sequence[tuple[Assignment, str]]) -> int:
        """Give back ``(request, sdr)`` assignments whose decisions were never emitted.

        A person's routing is assigned before its state is saved; when the save
        then loses a race, the decision is not emitted and the batch is applied
        again from fresh reads, which may not promote the same way. Releasing the
        assignment keeps an SDR's counts equal to the decisions they received.
        """
        items = []
        for r, sdr in assignments:
            q = self.queue_key(r.queue)
            day, week = capped_periods(r, sdr)
            counters = [f"{q}:d:{sdr}:{day}", f"{q}:w:{sdr}:{week}"]
            items.append(([q, f"{q}:a:{r.decision_id}", *counters], [sdr]))
        return sum(int(v) for v in self._script("release", items, one_call_each=True))

    def queue_counts(self, queue: str) -> dict[str, int]:
        """Leads assigned so far per SDR of ``queue``."""
        raw = self._retry(lambda: self.client.hgetall(self.queue_key(queue)))
        return {k.decode(): int(v) for k, v in raw.items()}

    def load_roster(self) -> tuple[int, bytes] | None:
        """The roster applied to Redis as ``(version, JSON)``, or None if none was."""
        raw = self._retry(lambda: self.client.get(self.roster_key()))
        if raw is None:
            return None
        version, _, body = raw.partition(b"|")
        return int(version), body

    def roster_if_changed(self, held: int) -> tuple[int, bytes | None] | None:
        """As :meth:`load_roster`, but the JSON is None while the version is ``held``.

        Routing batches check the version and read the roster only when it changed.
        """
        (raw,) = self._script("roster_if_changed", [([self.roster_key()], [held])])
        if raw is None:
            return None
        if isinstance(raw, int):
            return raw, None
        version, _, body = raw.partition(b"|")
        return int(version), body

    def apply_roster(self, roster_json: bytes) -> int:
        """Store a roster under the next version; return that version."""
        (version,) = self._script("roster", [([self.roster_key()], [roster_json])])
        return int(version)

    def sync_timers(
        self, scheduled: Sequence[tuple[str, str, int]], removed: Sequence[tuple[str, str, int]]
    ) -> None:
        """Schedule ``(one_id, kind, due ms)`` timers (idempotent); strike ``removed`` ones off.

        Removed are timers fired, moved, cancelled, or held by a person merged away,
        each named as it was scheduled (the One-ID it was scheduled for).
        """
        key = self.timers_key()
        commands: list[tuple[Any, ...]] = (
            [("zadd", key, {f"{o}|{k}|{due}": due for o, k, due in scheduled})] if scheduled else []
        )
        if removed:
            commands.append(("zrem", key, *(f"{o}|{k}|{due}" for o, k, due in removed)))
        if commands:
            self._retry(lambda: self._pipeline(commands))

    def timers_pending(self) -> int:
        """How many timers are scheduled."""
        return int(self._retry(lambda: self.client.zcard(self.timers_key())))

    def due_timers(self, now_ms: int, limit: int) -> list[tuple[str, str, int]]:
        """Up to ``limit`` timers due at ``now_ms``, earliest first, as ``(one_id, kind, due)``."""
        raw = self._retry(
            lambda: self.client.zrangebyscore(self.timers_key(), "-inf", now_ms, start=0, num=limit)
        )
        out = []
        for member in raw:
            one_id, kind, due = member.decode().split("|")
            out.append((one_id, kind, int(due)))
        return out

    # -- suppression lists ----------------------------------------------------------
    def change_list(self, name: str, members: Sequence[str], add: bool) -> int:
        """Add (or remove) list members; how many were not (or were) there."""
        op = self.client.sadd if add else self.client.srem
        return int(self._retry(lambda: op(self.list_key(name), *members)))

    def on_list(self, name: str, member: str) -> bool:
        """Whether ``member`` (a stored form, engine.consent.list_member) is on the list."""
        return bool(self._retry(lambda: self.client.sismember(self.list_key(name), member)))

    def list_members(self, name: str) -> list[str]:
        """A list's members, sorted."""
        return sorted(_texts(self._retry(lambda: self.client.smembers(self.list_key(name)))))

    def lists_holding(
        self, people: Sequence[tuple[str, str, Sequence[str] | None]], names: Sequence[str]
    ) -> list[dict[str, bool]]:
        """For each ``(one_id, e-mail domain, contact points)``: which lists hold one of theirs.

        A person's members are the contact points their events gave
        (engine.person.note_contact) and their e-mail domain; for a state stored
        before contact points were kept (None), the e-mails and phones the identity
        graph gives them. One round trip for the whole batch (two with such states).
        """
        if not people:
            return []
        legacy = [one_id for one_id, _, contacts in people if contacts is None]
        graph = dict(zip(legacy, self.graph(legacy), strict=True)) if legacy else {}
        candidates = [
            sorted(
                set(contacts)
                if contacts is not None
                else {
                    f"{kind}:{d}"
                    for kind, d in graph[one_id].identifiers
                    if kind in ("email", "phone")
                }
            )
            + ([f"domain:{domain}"] if domain else [])
            for one_id, domain, contacts in people
        ]

        asked = [(i, name) for i, members in enumerate(candidates) if members for name in names]

        def read() -> list[Any]:
            pipe = self.client.pipeline(transaction=False)
            for i, name in asked:
                pipe.smismember(self.list_key(name), candidates[i])
            return cast(list[Any], pipe.execute())

        held: list[dict[str, bool]] = [dict.fromkeys(names, False) for _ in people]
        for (i, name), reply in zip(asked, self._retry(read) if asked else [], strict=True):
            held[i][name] = any(reply)
        return held

    def inputs_done(self) -> dict[str, int]:
        """Per input source, the offset below which every event is applied and delivered."""
        raw = self._retry(lambda: self.client.hgetall(self.input_key()))
        return {k.decode(): int(v) for k, v in raw.items()}

    def input_generation(self, base: str) -> int:
        """How many times the input partition named ``base`` was found reset (see retire_input)."""
        raw = self._retry(lambda: self.client.hget(self.input_key() + ":gen", base))
        return int(raw or 0)

    def retire_input(self, base: str, old_source: str, generation: int) -> None:
        """A partition's log was lost: positions under ``old_source`` can never be read again.

        Its done offset becomes :data:`RETIRED` (people forget every position under
        it, engine.person.settle) and the partition's generation ``generation``, so
        the offsets of the new log get a source name of their own.
        """
        key = self.input_key()
        self._retry(
            lambda: self._pipeline(
                [("hset", key, old_source, RETIRED), ("hset", key + ":gen", base, generation)]
            )
        )

    def recovery_key(self, input_tag: str) -> str:
        """Key of the recovery layout on an input: first members, and who made their share."""
        return f"{self.prefix}recovery:{input_tag}"

    def recovery_layout(self, input_tag: str, member: int, members: int) -> tuple[int, bool]:
        """The first cluster's size on this input, and whether ``member``'s share exists.

        The size is set once per input (``members`` if this is the first cluster);
        a share is recorded once made (leadflow.runner.prepare_recovery).
        """
        key = self.recovery_key(input_tag)
        _, first, made = self._retry(
            lambda: self._pipeline(
                [("hsetnx", key, "members", members), ("hget", key, "members"),
                 ("hget", key, f"made:{member}")]
            )
        )  # fmt: skip
        return int(first), made is not None

    def recovery_made(self, input_tag: str, member: int) -> None:
        """Record that ``member``'s share of the recovery partitions exists on its host."""
        key = self.recovery_key(input_tag)
        self._retry(lambda: self.client.hset(key, f"made:{member}", 1))

    def advance_input(self, source: str, offset: int) -> None:
        """Record that ``source`` is done below ``offset`` (a lower offset changes nothing)."""
        self._script("advance", [([self.input_key()], [source, offset])])

    # -- webhook alerts (leadflow alerts) ----------------------------------------------
    def alert_key(self, decision_id: str) -> str:
        """Key of a webhook alert's delivery: the sender holding it, or ``delivered``."""
        return f"{self.prefix}alert:{{{decision_id}}}"

    def claim_alert(self, decision_id: str, sender: str, lease_ms: int) -> str | int:
        """Take ``decision_id`` for ``sender`` to POST.

        Returns :data:`CLAIMED`, :data:`DELIVERED` (never POST it again), or the
        milliseconds another sender's claim has left.
        """
        (answer,) = self._script(
            "claim_alert", [([self.alert_key(decision_id)], [sender, lease_ms])]
        )
        return int(answer) if isinstance(answer, int) else answer.decode()

    def unclaim_alert(self, decision_id: str, sender: str) -> None:
        """Give back ``sender``'s claim after a failed POST, so a retry by anyone may send."""
        self._script("unclaim_alert", [([self.alert_key(decision_id)], [sender])])

    def alert_delivered(self, decision_id: str, remember_s: int) -> None:
        """Record that ``decision_id`` reached its webhook: it is never POSTed again."""
        key = self.alert_key(decision_id)
        self._retry(lambda: self.client.set(key, DELIVERED, ex=remember_s))

    def alerts_delivered(self, decision_ids: Sequence[str]) -> list[bool]:
        """Which of ``decision_ids`` reached their webhook."""
        values = self._mget([self.alert_key(d) for d in decision_ids])
        return [v == DELIVERED.encode() for v in values]

    def count_redrive(self, queue: str, outcome: str) -> None:
        """Count one parked alert sent again (``leadflow_alert_redrives_total``)."""
        key = f"{self.prefix}alerts:redrives"
        self._retry(lambda: self.client.hincrby(key, f"{queue}|{outcome}", 1))

    def redrives(self) -> dict[tuple[str, str], int]:
        """Parked alerts sent again so far, per ``(queue, outcome)``."""
        raw = self._retry(lambda: self.client.hgetall(f"{self.prefix}alerts:redrives"))
        out: dict[tuple[str, str], int] = {}
        for field_, count in raw.items():
            queue, _, outcome = field_.decode().partition("|")
            out[queue, outcome] = int(count)
        return out

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
        (and one per item for scripts whose items share keys, such as a queue's counts).
        A standalone server gets them in one round trip: one ``EVALSHA``, or a pipeline of
        them. Not redis-py's pipelined ``Script``, which asks ``SCRIPT EXISTS`` before
        every pipeline, a second round trip each time; a server that lost its scripts
        (restarted, ``SCRIPT FLUSH``) answers ``NOSCRIPT``, and they are loaded again.
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

        def flat(group: list[int]) -> tuple[list[str], list[Any]]:
            return [k for i in group for k in items[i][0]], [a for i in group for a in items[i][1]]

        def call(group: list[int], client: Any) -> Any:
            keys, args = flat(group)
            return script(keys=keys, args=args, client=client)

        def run() -> list[Any]:
            if len(groups) == 1:
                return [call(groups[0], self.client)]  # EVALSHA, loaded again on NOSCRIPT

            def pipelined() -> list[Any]:
                pipe = self.client.pipeline(transaction=False)
                for group in groups:
                    keys, args = flat(group)
                    pipe.evalsha(script.sha, len(keys), *keys, *args)
                return cast(list[Any], pipe.execute())

            try:
                return pipelined()
            except redis.exceptions.NoScriptError:  # every call failed alike: none ran
                self.client.script_load(script.script)
                return pipelined()

        if self.cluster:
            # A cluster pipeline refuses EVALSHA: one direct call per slot group (the
            # client sends each to the slot's master), each retried on its own.
            replies = [self._retry(partial(call, group, self.client), name) for group in groups]
        else:
            replies = self._retry(run, name)
        results: list[Any] = [None] * len(items)
        for group, reply in zip(groups, replies, strict=True):
            replies = reply if isinstance(reply, list) and not one_call_each else [reply]
            for i, value in zip(group, replies, strict=True):
                results[i] = value
        return results

    def _retry(self, op: Callable[[], T], what: str = "") -> T:
        """Run ``op``; on connection trouble retry with backoff, then give up loudly.

        Every attempt is reported to :attr:`observer` (if set) as ``(what, seconds,
        failed)``; ``what`` defaults to the store method that made the call.
        """
        what = what or op.__qualname__.split(".")[1].lstrip("_")
        delay = RETRY_FIRST_S
        for attempt in range(self.settings.retries + 1):
            started = time.perf_counter()
            try:
                result = op()
            except (redis.AuthenticationError, redis.ResponseError) as e:
                self._observe(what, started, True)
                if not _refused_credentials(e):
                    raise
                # Retrying wrong credentials only delays the error the operator must see.
                raise StoreUnavailable(f"Redis refused the credentials: {e}") from None
            except (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError) as e:
                self._observe(what, started, True)
                if (problem := certificate_problem(e)) is not None:
                    # Retrying a certificate the client does not trust only hides the cause.
                    raise StoreUnavailable(problem) from None
                if attempt == self.settings.retries:
                    raise StoreUnavailable(
                        f"Redis unavailable after {attempt + 1} attempts: {e}"
                    ) from e
                log.warning(
                    "redis error (attempt %d, retrying in %.2fs): %s", attempt + 1, delay, e
                )
                time.sleep(delay)
                delay = min(delay * 2, RETRY_CAP_S)
            else:
                self._observe(what, started, False)
                return result
        raise AssertionError("unreachable")

    def _observe(self, what: str, started: float, failed: bool) -> None:
        if self.observer is not None:
            self.observer(what, time.perf_counter() - started, failed)


def certificate_problem(e: redis.RedisError) -> str | None:
    """What to say when a TLS handshake failed on Redis's certificate (CA or host name)."""
    if "CERTIFICATE_VERIFY_FAILED" not in str(e) and not isinstance(
        e.__cause__ or e.__context__, ssl.SSLCertVerificationError
    ):
        return None
    return (
        f"Redis's TLS certificate is not trusted: {e} (redis.url: "
        "rediss://...?ssl_ca_certs=<the CA that signed it>)"
    )


def _refused_credentials(e: redis.RedisError) -> bool:
    """A wrong or missing password or ACL user (redis-py raises several kinds)."""
    text = str(e)
    return isinstance(e, redis.AuthenticationError) or text.startswith(("NOAUTH", "WRONGPASS"))


def _owner(digest: str, value: bytes | None) -> str | None:
    """The One-ID an ``id`` key names: its own digest when it names a kind."""
    if value is None:
        return None
    return digest if founding_kind(value) is not None else value.decode()


def _text(value: bytes | None) -> str | None:
    return None if value is None else value.decode()


def _texts(members: list[bytes]) -> list[str]:
    return [m.decode() for m in members]


def _pair(member: bytes) -> tuple[str, str]:
    kind, _, digest = member.decode().partition(":")
    return kind, digest


def _stored(state: bytes | None, redirect: bytes | None) -> Stored:
    if state is None:
        return Stored(0, None, _text(redirect))
    version, _, body = state.partition(b"|")
    return Stored(int(version), body, _text(redirect))
