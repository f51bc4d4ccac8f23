"""A model-based test of the engine: random sequences, random batch cuts, one and two workers.

A hypothesis state machine draws sequences of page/track/identify/alias events,
links between people (merges and refused merges), sales feedback of every kind,
erasures, consent changes, floods, client resends, the passing of time (timers
firing), roster changes and suppression-list changes. Events are cut into
random batches and run through the real identity and person stages against a
real Redis, on one or two person-stage workers (each person shard has one
home worker, as in the dataflow; on two, each batch goes through the identity
lookup first, and known people's events skip the resolver, as in the
dataflow); the same events run through a reference engine one at a time, on
the same clock, in a key space of its own. The batched engine's workers keep
three decoded states each between batches (engine.state_cache), so states are
reused, evicted and found stale, and its resolver five identifier owners
(engine.owner_cache); the reference keeps neither.

Invariants, checked after every step:

1. No exception, and no event quarantined by the poison-pill guard
   (``processing_error``): the guard must never hide a bug here.
2. Every promotion (a lifecycle record into ``mql``) ends in exactly one
   first decision, or in a ``waiting_for_sdr`` record (its decision may follow
   when somebody is free), or in a blacklisting; never two first decisions.
3. Every SDR's assignments in Redis (the day counters the caps read) equal the
   decisions emitted to them.
4. No decision while its person's last recorded stage is ``disqualified``; no
   decision for a person on the blacklist; no channel offered that a list
   suppresses (unsubscribe: e-mail; do-not-call: phone and SMS) — the lists are
   checked against the person as they were when the decision was made, on the
   one-at-a-time engine (the batched one must end the same: 6).
5. Every timer a live person holds is scheduled, and every scheduled timer
   belongs to a live person who holds it.
6. Cut into batches or applied one at a time, the same events leave every
   person with the same stage, disqualification, scores, promotions, owner
   and timers. On two workers the owner is left out: each worker assigns its
   own promotions, in event-time order, but two workers' promotions of one
   batch race for the rotation (as they do in the dataflow, where the workers
   run at once; README, "Delivery guarantees"); invariant 3 still holds there.
   So are the scores, consent, profile and reason for disqualification (not
   whether disqualified) of a person who flooded (had events
   refused by the rate limit, ``rate_limited``, whatever disqualified them): a
   flood's first events in a broker minute count and the rest are refused whole
   (what they score, what consent they state, what traits they carry), so which
   count follows their arrival. On two workers a merge may overtake the absorbed person's events
   still in flight (as in the dataflow), which then reach the survivor after its
   own later ones, past the limit its flood already reached.

``make test`` runs a bounded number of examples; ``make fuzz MINUTES=N`` runs it
with fresh seeds for N minutes (``LEADFLOW_MODEL_EXAMPLES`` sets examples per run).
"""

from __future__ import annotations

import itertools
import os
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule
from msgspec.structs import replace

from dataflows.pipeline import PERSON_SHARDS, person_shard
from dataflows.stages import (
    Decoder,
    IdentityLookup,
    IdentityStage,
    PersonStage,
    RawMessage,
)
from dataflows.timers import TimerPoller
from engine.batch import Resolved
from engine.consent import LISTS, list_member, suppression_of
from engine.events import RESERVED_EVENTS, Event, Origin, Rejection
from engine.identity import identifiers_of
from engine.person import (
    DECISION,
    DLQ,
    LIFECYCLE,
    Output,
    Rulebook,
    current_scores,
    decode_state,
)
from engine.settings import Settings, load_settings, roster_to_data
from engine.store import RedisStore
from leadflow.servers import LocalRedis

PEOPLE = 4
TRACKS = ["Demo Requested", "Webinar Attended", "Contact Form Submitted", "Whitepaper Downloaded"]
# Every sales event (the others of engine.events.RESERVED_EVENTS have rules of their own).
FEEDBACK = sorted(RESERVED_EVENTS - {"erase", "consent_override"})
EXAMPLES = int(os.environ.get("LEADFLOW_MODEL_EXAMPLES", "12"))
STEPS = int(os.environ.get("LEADFLOW_MODEL_STEPS", "30"))
START_MS = int(datetime(2026, 11, 2, 9, tzinfo=UTC).timestamp() * 1000)
MINUTE_MS = 60_000
_prefixes = itertools.count()


def email(i: int) -> str:
    return f"p{i}@co{i}.example"


def phone(i: int) -> str:
    return f"+1 415 555 01{i:02d}"


class Engine:
    """The identity stage and ``workers`` person stages on one Redis key space and clock."""

    def __init__(self, settings: Settings, workers: int, clock: list[int]):
        self.settings = settings
        self.store = RedisStore(settings.redis)
        self.clock = clock
        now = self.now
        self.decoder = Decoder(settings, lambda topic, p: f"{topic[9]}{p}", now)
        self.identity = IdentityStage(settings, self.store)
        # As in the dataflow: with more than one worker, known people's events skip the
        # resolver (dataflow.identity_lookup = "auto"); every batch is applied before the
        # next is read, so each batch's events are done when the next one is looked up.
        self.done: dict[str, int] = {}
        self.lookup = (
            IdentityLookup(settings, self.store, lambda source: self.done.get(source, -1))
            if settings.dataflow.looks_up_identity(workers)
            else None
        )
        self.people = [PersonStage(settings, self.store, now) for _ in range(workers)]
        self.poller = TimerPoller(self.store, now)
        self.offsets: Counter[str] = Counter()
        self.outputs: list[Output] = []

    def now(self) -> float:
        return self.clock[0] / 1000

    def raw(self, event: dict[str, Any], trusted: bool) -> RawMessage:
        topic = self.settings.topics.feedback if trusted else self.settings.topics.events
        offset = self.offsets[topic]
        self.offsets[topic] += 1
        return RawMessage(orjson.dumps(event), Origin(topic, 0, offset), self.clock[0])

    def apply(self, batch: list[tuple[dict[str, Any], bool]]) -> list[Output]:
        """Decode, resolve and apply one batch, each person on their shard's worker."""
        decoded = self.decoder([self.raw(e, trusted) for e, trusted in batch])
        events = [e for e in decoded if isinstance(e, Event)]
        assert not [r for r in decoded if isinstance(r, Rejection)], decoded
        known, unknown = self.lookup(events) if self.lookup else ([], events)
        # The known first: in the dataflow they may overtake the resolver's (other people's,
        # the lookup keeps one person's in order).
        out = self.run(known + self.identity(unknown))
        for e in events:
            self.done[e.source] = max(self.done.get(e.source, -1), e.offset)
        return out

    def run(self, resolved: list[Resolved]) -> list[Output]:
        out: list[Output] = []
        for n, stage in enumerate(self.people):
            mine = [r for r in resolved if int(person_shard(r)) % len(self.people) == n]
            if mine:
                out += stage(mine)
        self.outputs += out
        return out

    def fire_timers(self, cut: list[int]) -> list[Output]:
        """Every due timer, in the poll's order, cut into batches at ``cut``."""
        due = self.poller.poll()
        out = []
        for part in split(due, cut):
            out += self.run(part)
        return out

    def person_of(self, anon: str) -> dict[str, Any] | None:
        """What invariant 6 compares of the person behind a cookie (None: nobody)."""
        probe = Event(type="page", message_id="p", event_ms=0, ingested_ms=0, anonymous_id=anon)
        (one_id,), _ = self.store.owners([identifiers_of(probe, self.settings.identity)[0].digest])
        if one_id is None:
            return None
        while (stored := self.store.load_people([one_id])[0]).redirect:
            one_id = stored.redirect
        p = decode_state(one_id, stored.state, stored.version)
        if p.erased_ms:
            return {"erased": p.erased_ms}
        scores = current_scores(p, Rulebook(self.settings))
        return {
            "stage": p.stage,
            "disqualified": p.disqualified,
            "scores": {d: round(s, 6) for d, s in scores.items()},
            "promotions": p.promotions,
            "owner": p.owner,
            "timers": dict(p.timers),
            "profile": p.profile,
            "consent": {c: statement.status for c, statement in p.consent.items()},
            "flooded": bool(p.rate and p.rate.flooded),  # not compared: see invariant 6
        }


def split(items: list[Any], cut: list[int]) -> Iterator[list[Any]]:
    """``items`` in consecutive batches whose sizes come from ``cut`` (cycled)."""
    sizes = itertools.cycle(cut or [len(items) or 1])
    i = 0
    while i < len(items):
        n = max(1, next(sizes))
        yield items[i : i + n]
        i += n


class EngineModel(RuleBasedStateMachine):
    """The engine against the invariants in the module docstring."""

    workers = 1
    redis_url = ""

    def __init__(self) -> None:
        super().__init__()
        base = load_settings(env={"LEADFLOW_REDIS_URL": self.redis_url})
        # A consent manager's "Marketing" category grants or denies e-mail and SMS.
        categories = {"marketing": ("email", "sms")}
        base = replace(base, consent=replace(base.consent, categories=categories))
        # No rate limit on the cookies of this test except in the flood rule's own minute.
        self.clock = [START_MS]
        n = next(_prefixes)
        # The batched engine keeps few decoded states between batches, so they are evicted
        # as well as reused; the reference keeps none and decodes every state it loads.
        # Its resolver keeps five owners (engine.owner_cache): kept, evicted, erased, merged.
        batched = replace(
            base, dataflow=replace(base.dataflow, state_cache_size=3, owner_cache_size=5)
        )
        single = replace(
            base, dataflow=replace(base.dataflow, state_cache_size=0, owner_cache_size=0)
        )
        self.batched = Engine(self.with_prefix(batched, f"mb{n}:"), self.workers, self.clock)
        self.single = Engine(self.with_prefix(single, f"ms{n}:"), 1, self.clock)
        self.pending: list[tuple[dict[str, Any], bool]] = []
        self.sent: list[tuple[dict[str, Any], bool]] = []
        self.ids = itertools.count()
        self.checked = 0  # outputs of the batched engine already checked by invariant 4
        self.stage_of: dict[str, str] = {}  # one_id -> last stage recorded

    @staticmethod
    def with_prefix(s: Settings, prefix: str) -> Settings:
        return replace(s, redis=replace(s.redis, key_prefix=prefix))

    def teardown(self) -> None:
        for engine in (self.batched, self.single):
            keys = list(engine.store.client.scan_iter(f"{engine.store.prefix}*", count=1000))
            if keys:
                engine.store.client.delete(*keys)
            engine.store.close()

    # -- what happens ---------------------------------------------------------------
    def add(self, event: dict[str, Any], trusted: bool = False) -> None:
        event.setdefault("messageId", f"m{next(self.ids)}")
        # Every event at its own millisecond: assignment order is event-time order.
        event.setdefault("timestamp", iso(self.clock[0] + len(self.sent) + len(self.pending)))
        self.pending.append((event, trusted))

    @rule(
        i=st.integers(0, PEOPLE - 1),
        path=st.sampled_from(["/", "/pricing", "/blog"]),
        marketing=st.sampled_from([None, True, False]),
    )
    def page(self, i: int, path: str, marketing: bool | None) -> None:
        """A page view; with a consent manager's choice when ``marketing`` is not None."""
        event: dict[str, Any] = {"type": "page", "anonymousId": f"c{i}"}
        event["properties"] = {"path": path}
        if marketing is not None:
            prefs = {"Marketing": marketing}
            event["context"] = {"consent": {"categoryPreferences": prefs}}
        self.add(event)

    @rule(i=st.integers(0, PEOPLE - 1), name=st.sampled_from(["Pricing", "Home"]))
    def screen(self, i: int, name: str) -> None:
        """An app's screen: scores like a page (page rules match its name)."""
        self.add({"type": "screen", "anonymousId": f"c{i}", "name": f"/{name.lower()}"})

    @rule(
        i=st.integers(0, PEOPLE - 1),
        employees=st.sampled_from([5, 400, 5000]),
        industry=st.sampled_from(["software", "retail"]),
    )
    def group(self, i: int, employees: int, industry: str) -> None:
        """Cookie i's company: its traits feed the profile fit reads."""
        traits = {"name": f"Co{i}", "employees": employees, "industry": industry,
                  "website": f"https://www.co{i}.example"}  # fmt: skip
        self.add({"type": "group", "anonymousId": f"c{i}", "groupId": f"g{i}", "traits": traits})

    @rule(i=st.integers(0, PEOPLE - 1), name=st.sampled_from(TRACKS), v=st.integers(0, 1))
    def track(self, i: int, name: str, v: int) -> None:
        self.add({"type": "track", "event": name, "anonymousId": f"c{i}", "properties": {"v": v}})

    @rule(
        i=st.integers(0, PEOPLE - 1),
        with_phone=st.booleans(),
        consent=st.sampled_from([None, "granted", "revoked"]),
        country=st.sampled_from(["US", "DE"]),
    )
    def identify(self, i: int, with_phone: bool, consent: str | None, country: str) -> None:
        traits: dict[str, Any] = {
            "email": email(i),
            "company": {"name": f"Co{i}", "employee_count": 200},
            "title": "CMO",
            "country": country,
        }
        if with_phone:
            traits["phone"] = phone(i)
        if consent:
            traits["consent"] = {c: {"status": consent} for c in ("email", "phone", "sms")}
        self.add({"type": "identify", "anonymousId": f"c{i}", "traits": traits})

    @rule(i=st.integers(0, PEOPLE - 1), j=st.integers(0, PEOPLE - 1), login=st.booleans())
    def link(self, i: int, j: int, login: bool) -> None:
        """Cookie i shows j's e-mail (a merge), with i's userId when ``login`` (may be refused)."""
        event: dict[str, Any] = {"type": "identify", "anonymousId": f"c{i}"}
        event["traits"] = {"email": email(j)}
        if login:
            event["userId"] = f"u{i}"
        self.add(event)

    @rule(i=st.integers(0, PEOPLE - 1), j=st.integers(0, PEOPLE - 1))
    def alias(self, i: int, j: int) -> None:
        self.add({"type": "alias", "userId": f"u{i}", "previousId": f"c{j}"})

    @rule(
        i=st.integers(0, PEOPLE - 1),
        name=st.sampled_from(FEEDBACK),
        reason=st.sampled_from(["timing", "spam"]),
    )
    def feedback(self, i: int, name: str, reason: str) -> None:
        props = {"actor": "sdr-ana", "reason": reason}
        event = {"type": "track", "event": name, "anonymousId": f"c{i}", "properties": props}
        self.add(event, trusted=True)

    @rule(i=st.integers(0, PEOPLE - 1), status=st.sampled_from(["granted", "revoked"]))
    def consent_override(self, i: int, status: str) -> None:
        props = {"channel": "email", "status": status, "source": "preference_centre"}
        event = {"type": "track", "event": "consent_override", "anonymousId": f"c{i}"}
        self.add({**event, "properties": props}, trusted=True)

    @rule(i=st.integers(0, PEOPLE - 1))
    def spoil(self, i: int) -> None:
        """A disposable mailbox: cleansing disqualifies."""
        self.add({"type": "identify", "anonymousId": f"c{i}", "traits": {"email": "x@yopmail.com"}})

    @rule(i=st.integers(0, PEOPLE - 1))
    def erase(self, i: int) -> None:
        self.add({"type": "track", "event": "erase", "anonymousId": f"c{i}"}, trusted=True)

    @precondition(lambda self: bool(self.sent))
    @rule(k=st.integers(0, 10_000))
    def resend(self, k: int) -> None:
        """A client sends an event again: same messageId, new input position."""
        event, trusted = self.sent[k % len(self.sent)]
        self.pending.append((dict(event), trusted))

    @rule(i=st.integers(0, PEOPLE - 1))
    def flood(self, i: int) -> None:
        for _ in range(125):
            self.add({"type": "page", "anonymousId": f"c{i}", "properties": {"path": "/x"}})

    @precondition(lambda self: bool(self.pending))
    @rule(cut=st.lists(st.integers(1, 8), min_size=1, max_size=4))
    def process(self, cut: list[int]) -> None:
        """Pending events: cut into batches for the batched engine, one at a time for the other."""
        pending, self.pending = self.pending, []
        for batch in split(pending, cut):
            self.batched.apply(batch)
        for one in pending:
            self.check_suppression(self.single, self.single.apply([one]))
        self.sent += pending

    @rule(
        minutes=st.sampled_from([1, 16, 60 * 24, 60 * 24 * 3, 60 * 24 * 31]),
        cut=st.lists(st.integers(1, 4), min_size=1, max_size=3),
    )
    def time_passes(self, minutes: int, cut: list[int]) -> None:
        if self.pending:
            self.process([len(self.pending)])
        self.clock[0] += minutes * MINUTE_MS
        for _ in range(5):  # a timer firing may schedule another that is already due
            self.batched.fire_timers(cut)
            self.check_suppression(self.single, self.single.fire_timers([1]))

    @rule(variant=st.sampled_from(["weights", "two", "all"]))
    def roster_change(self, variant: str) -> None:
        if self.pending:
            self.process([len(self.pending)])
        roster = self.batched.settings.roster
        data = roster_to_data(roster)
        if variant == "weights":
            data["sdrs"][0]["weight"] = 2
        elif variant == "two":
            data["sdrs"] = data["sdrs"][:2]
        for engine in (self.batched, self.single):
            engine.store.apply_roster(orjson.dumps(data))

    @rule(
        name=st.sampled_from(["blacklist", "unsubscribe", "dnc", "whitelist"]),
        i=st.integers(0, PEOPLE - 1),
        add=st.booleans(),
    )
    def list_change(self, name: str, i: int, add: bool) -> None:
        if self.pending:
            self.process([len(self.pending)])
        value = phone(i) if name == "dnc" else email(i)
        member = list_member(name, value, self.batched.settings.identity)
        for engine in (self.batched, self.single):
            engine.store.change_list(name, [member], add)

    # -- invariants -----------------------------------------------------------------
    @invariant()
    def nothing_quarantined(self) -> None:
        for engine in (self.batched, self.single):
            failed = [o.value for o in engine.outputs if o.kind == DLQ]
            assert not [v for v in failed if v["reason"] == "processing_error"], failed

    @invariant()
    def every_promotion_ends_once(self) -> None:
        for engine in (self.batched, self.single):
            records = {o.value["record_id"]: o.value for o in engine.outputs if o.kind == LIFECYCLE}
            decisions = {
                o.value["decision_id"]: o.value for o in engine.outputs if o.kind == DECISION
            }
            first = Counter(
                d["trigger"]["message_id"] for d in decisions.values() if "replaces" not in d
            )
            assert max(first.values(), default=0) <= 1, first
            ends = Counter(
                r["message_id"]
                for r in records.values()
                if r["cause"] in ("waiting_for_sdr", "blacklisted", "withheld_blacklisted")
            )
            for r in records.values():
                if r["to"] == "mql" and r["from"] != "mql" and r["cause"] != "merge":
                    assert first[r["message_id"]] + ends[r["message_id"]] >= 1, r

    @invariant()
    def sdr_counts_match_decisions(self) -> None:
        for engine in (self.batched, self.single):
            sent = Counter(
                d.value["sdr"]
                for d in {
                    o.value["decision_id"]: o for o in engine.outputs if o.kind == DECISION
                }.values()
            )
            store = engine.store
            counted: Counter[str] = Counter()
            for key in store.client.scan_iter(f"{store.prefix}q:*:d:*", count=1000):
                sdr = key.decode().split(":d:")[1].rsplit(":", 1)[0]
                counted[sdr] += int(store.client.get(key) or 0)
            assert +counted == +sent, (counted, sent)

    @invariant()
    def no_decision_for_the_disqualified_or_suppressed(self) -> None:
        engine = self.batched
        for o in engine.outputs[self.checked :]:
            if o.kind == LIFECYCLE:
                self.stage_of[o.one_id] = o.value["to"]
                if o.value["cause"] == "merge":
                    self.stage_of[o.value["merged_from"]] = "merged"
            elif o.kind == DECISION:
                assert self.stage_of.get(o.one_id) != "disqualified", o.value
        self.checked = len(engine.outputs)

    def check_suppression(self, engine: Engine, outputs: list[Output]) -> None:
        """Lists against the decisions of one event, as the person was right after it.

        Checked on the one-at-a-time engine, where the state after the event is the
        state at the decision; the batched engine must end the same (invariant 6).
        """
        for decision in (o for o in outputs if o.kind == DECISION):
            one_id = decision.one_id
            stored = engine.store.load_people([one_id])[0]
            if stored.redirect or stored.state is None:
                continue  # merged or erased by the same event
            p = decode_state(one_id, stored.state, stored.version)
            if p.erased_ms:
                continue
            (held,) = engine.store.lists_holding(
                [(one_id, p.profile.email_domain, p.contacts)], tuple(LISTS)
            )
            suppression = suppression_of(held)
            channels = decision.value["channels"]
            assert not suppression.blacklisted, decision.value
            if suppression.unsubscribed:
                assert "email" not in channels, decision.value
            if suppression.do_not_call:
                assert not {"phone", "sms"} & set(channels), decision.value

    @invariant()
    def timers_are_scheduled_and_alive(self) -> None:
        for engine in (self.batched, self.single):
            store = engine.store
            scheduled = set(store.due_timers(10**15, 10_000))
            held = set()
            for key in store.client.scan_iter(f"{store.prefix}p:*", count=1000):
                one_id = key.decode().split("{", 1)[1].rstrip("}")
                stored = store.load_people([one_id])[0]
                if stored.redirect or stored.state is None:
                    continue
                p = decode_state(one_id, stored.state, stored.version)
                held |= {(one_id, k, due) for k, due in p.timers.items()}
            assert held == scheduled, (held - scheduled, scheduled - held)

    @invariant()
    def batches_give_what_one_at_a_time_gives(self) -> None:
        if self.pending:
            return  # compared once both engines have applied the same events
        for i in range(PEOPLE):
            got = self.batched.person_of(f"c{i}")
            want = self.single.person_of(f"c{i}")
            flooded = bool(got and got.pop("flooded", False))
            flooded |= bool(want and want.pop("flooded", False))
            if self.workers > 1 and got and want:
                got.pop("owner", None)
                want.pop("owner", None)
                if flooded:
                    # Disqualified on both, but which reason came first (a flood, a
                    # cleansing) follows arrival too.
                    assert bool(got.pop("disqualified")) == bool(want.pop("disqualified"))
                    for learned_from_events in ("scores", "consent", "profile"):
                        got.pop(learned_from_events)
                        want.pop(learned_from_events)
            assert got == want, (i, got, want)


def iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="milliseconds")


@pytest.fixture(scope="module")
def model_redis() -> Iterator[LocalRedis]:
    with LocalRedis("redis") as r:
        assert isinstance(r, LocalRedis)
        yield r


@pytest.mark.parametrize("workers", [1, 2])
def test_the_engine_model(model_redis: LocalRedis, workers: int) -> None:
    class Machine(EngineModel):
        pass

    Machine.workers = workers
    Machine.redis_url = model_redis.url
    Machine.TestCase.settings = settings(
        max_examples=EXAMPLES,
        stateful_step_count=STEPS,
        deadline=None,
        suppress_health_check=list(HealthCheck),
    )
    Machine.TestCase().runTest()


assert PERSON_SHARDS % 2 == 0  # two workers split the shards evenly
