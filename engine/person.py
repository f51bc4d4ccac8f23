"""A person's state and what one event does to it.

This is where the rules meet: de-duplication, cleansing, profile, scoring,
fit, qualification, lifecycle and routing, applied to one person at a time.
Nothing here does I/O; the dataflow loads states, calls :func:`apply_event`
for each event, has every promotion assigned to an SDR (see engine.sales and
the store), and saves the states.

Nothing lost, nothing doubled: the state remembers the digests of the last
``limits.dedup_window`` messageIds it applied (a client's retry; and the
content of its recent ``track`` events: the same form submitted twice scores
once), the input positions (Kafka partition and offset) of every event it
applied that could still be read again after a crash (see :func:`settle`),
and, in an *outbox*, the output records of its last ``limits.outbox_size``
output-producing events. An event seen again (a client retry, or Bytewax
replaying input after a crash) changes nothing and re-emits the records it
produced the first time, with the same ids.
"""

from __future__ import annotations

import enum
import functools
import hashlib
import zlib
from bisect import bisect_right
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from datetime import UTC, date, datetime, timedelta
from typing import Any

import msgspec
import orjson

from engine import lifecycle
from engine.cleansing import Cleanser
from engine.consent import ConsentStatement, apply_consent, consent_updates, merge_consent
from engine.events import Event
from engine.fit import FitFactor, FitModel
from engine.grade import lead_grade
from engine.identity import digest, normalise_email, normalise_phone
from engine.person_records import Absorbed, RateWindow, RefusedMerge, StoredPerson, Touch, Work
from engine.profile import (
    Profile,
    lead_summary,
    merge_profiles,
    merge_traits,
    present_fields,
    traits_of,
)
from engine.qualification import Verdict, is_mql
from engine.routing import choose_queue
from engine.scoring import (
    TOTAL,
    BehaviorScore,
    Contribution,
    ScoringModel,
    award,
    merge_scores,
    observe,
    score_at,
    top_contributions,
)
from engine.settings import LimitSettings, Settings

PROFILE_FIELDS = tuple(f.name for f in fields(Profile))
DECISION = "decision"
LIFECYCLE = "lifecycle"
DLQ = "dlq"  # the output kind of an event refused after decoding (a DLQ record)
MINUTE_MS = 60_000
RATE_LIMITED = "rate_limited"  # the DLQ reason, and the disqualification, of a flood
MANUAL_MQL = "manual_mql"
ERASE = "erase"


class Rulebook:
    """The configuration, compiled once: everything :func:`apply_event` applies."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.scoring = ScoringModel(settings.scoring)
        self.fit = FitModel(settings.fit)
        self.cleanser = Cleanser(settings.cleansing)


@dataclass(slots=True)
class Output:
    """A record for an output topic, keyed by One-ID."""

    kind: str  # DECISION, LIFECYCLE or DLQ
    one_id: str
    value: dict[str, Any]
    # Re-emitted from the outbox: emitted before, not new (for the metrics). Not part of
    # equality: a replayed record is the same record.
    replayed: bool = field(default=False, compare=False)
    # Broker ingest time of the event the record came from (0: none): the stage latency.
    ingested_ms: int = field(default=0, compare=False)


@dataclass(slots=True)
class PersonState:
    """Everything Leadflow keeps about one person (stored as one Redis value)."""

    one_id: str
    stage: str = lifecycle.LEAD
    score: BehaviorScore = field(default_factory=BehaviorScore)
    profile: Profile = field(default_factory=Profile)
    disqualified: str = ""  # the cleansing reason, once disqualified
    seen: list[bytes] = field(default_factory=list)  # recent message/content digests, oldest first
    # Input source -> the offsets of events applied from it that may still be replayed,
    # as ascending runs of consecutive offsets, (first, count): see add_position.
    unsettled: dict[str, list[tuple[int, int]]] = field(default_factory=dict)
    transitions: int = 0  # lifecycle records written so far (makes record ids stable)
    promotions: int = 0
    queue: str = ""
    owner: str = ""
    channels: list[str] = field(default_factory=list)
    # [[event digest, [[kind, record], ...]], ...], oldest first; read it with outbox_of().
    # A first event's lifecycle record alone is kept as [digest, recorded ms(, One-ID)]
    # and rebuilt from the event when it is replayed (see remember).
    outbox: list[list[Any]] = field(default_factory=list)
    outbox_stored: bytes = b""  # the outbox as stored (deflated), until outbox_of() opens it
    merged_from: list[Absorbed] = field(default_factory=list)  # latest first
    refused: list[RefusedMerge] = field(default_factory=list)  # latest last
    first_touch: Touch | None = None  # the earliest campaign touch by event time
    last_touch: Touch | None = None  # the latest
    erased_ms: int = 0  # a tombstone: erased at this time; everything else is empty
    work: Work | None = None  # the current sales work item, while an MQL is worked
    timers: dict[str, int] = field(default_factory=dict)  # timer kind -> due epoch ms
    consent: dict[str, ConsentStatement] = field(default_factory=dict)  # channel -> latest
    rate: RateWindow | None = None  # untrusted events in the latest broker minute
    # Recent track submissions: [[content digest (bytes), event ms], ...] (is_duplicate_submission)
    submissions: list[list[Any]] = field(default_factory=list)
    # Contact points its events gave, as list members (``email:<digest>``; note_contact);
    # None for a state stored before they were kept (the identity graph stands in).
    contacts: list[str] | None = field(default_factory=list)
    version: int = 0  # the stored version this state was read at (compare-and-set); not stored
    is_new: bool = False  # not stored


@dataclass(slots=True)
class Promotion:
    """A promotion to MQL awaiting its SDR, with the facts as they were at that moment.

    SDRs are assigned once per batch, after later events of the same person may
    have been applied: the decision must describe the moment of promotion.
    """

    person: PersonState
    event: Event
    decision_id: str
    queue: str
    rule: str  # the routing rule that chose the queue ("default" if none)
    verdict: Verdict
    cause: str
    outputs: list[Output]  # the event's other records, emitted with the decision
    scores: dict[str, float]
    fit: float
    fit_factors: list[FitFactor]
    reasons: dict[str, list[Contribution]]  # "" (total) and each dimension qualified on


@functools.lru_cache(maxsize=16_384)
def message_digest(message_id: str) -> bytes:
    """48-bit digest of a messageId: collisions within one person's window are ~1e-11.

    Remembered for the last 16,384 messageIds: an event's digest is asked for by the
    replay check, the outbox and the sales records of one batch, and made once.
    """
    return hashlib.blake2b(message_id.encode(), digest_size=6).digest()


def content_digest(event: Event) -> bytes:
    """Digest of what a track event says (name and properties), to spot a form sent twice.

    ``c`` and 6 bytes: never equal to a messageId's 6-byte digest in the same window.
    """
    body = orjson.dumps(
        [event.name, event.payload.get("properties") or {}], option=orjson.OPT_SORT_KEYS
    )
    return b"c" + hashlib.blake2b(body, digest_size=6).digest()


def stable_id(one_id: str, kind: str, n: int) -> str:
    """Deterministic id of the ``n``-th record of ``kind`` for a person."""
    return hashlib.blake2b(f"{one_id}:{kind}:{n}".encode(), digest_size=10).hexdigest()


@functools.lru_cache(maxsize=4_096)
def iso(ms: int) -> str:
    """Epoch milliseconds as ISO-8601 UTC with millisecond precision.

    Remembered for the last 4,096 instants: a batch's records stamp the same few
    (the batch's now, each event's time) several times each. The time of day is
    written by arithmetic, the date looked up: ``datetime.fromtimestamp(...).isoformat()``
    took about 22,000 instructions per new instant (callgrind), 4.9 % of the process's.
    """
    day, in_day = divmod(ms, _DAY_MS)
    seconds, millis = divmod(in_day, 1000)
    minutes, second = divmod(seconds, 60)
    hour, minute = divmod(minutes, 60)
    # Padded from tables: a format spec (`:02d`) costs a __format__ call each.
    return (
        f"{_iso_date(day)}T{_TWO_DIGITS[hour]}:{_TWO_DIGITS[minute]}:"
        f"{_TWO_DIGITS[second]}.{_THREE_DIGITS[millis]}Z"
    )


_DAY_MS = 86_400_000
_TWO_DIGITS = tuple(f"{n:02d}" for n in range(60))
_THREE_DIGITS = tuple(f"{n:03d}" for n in range(1000))
_EPOCH_DAY = date(1970, 1, 1)


@functools.lru_cache(maxsize=64)
def _iso_date(day: int) -> str:
    """The date ``day`` days after 1 Jan 1970, as ISO-8601."""
    return (_EPOCH_DAY + timedelta(days=day)).isoformat()


def epoch_ms(value: object) -> float | None:
    """Epoch milliseconds of an ISO-8601 time (UTC when it names no zone); None if not one."""
    if not isinstance(value, str):
        return None
    try:
        moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).timestamp() * 1000


# The outbox is kept deflated (StoredPerson.outbox), behind a format byte, and inflated
# only when a replay or a merge reads it: most events produce no records, so most loads
# and saves pass it through untouched. A preset dictionary of the records' own
# vocabulary shrinks a first-event lifecycle record from 277 to 104 bytes. Never change
# a format's dictionary: stored outboxes need it; add a format instead.
OUTBOX_FORMAT = b"2"  # "1": every entry's records in full; "2" adds first-event entries
_OUTBOX_FORMATS = (b"1", OUTBOX_FORMAT)  # one dictionary for both
_OUTBOX_DICTIONARY = (
    b'"decision_id":"","trigger":{"type":"track","event":"","message_id":"","promoted_at":"'
    b'"fit":{"score":,"fit_minimum":,"fit_reasons":[{"factor":"","points":'
    b'"dimension_reasons":{},"qualified_on":["total"],"threshold":100.0,"channels":["email"]'
    b'"queue":"inbound","routing_rule":"default","ingested_at":"2026-","stage":"mql",'
    b'"reasons":[{"rule":"","points":,"at":"2026-"}],"dimensions":{"analytics":'
    b'"decision",{"record_id":"","one_id":"","from":"lead","to":"mql","cause":"score_threshold"'
    b'"actor":"engine","message_id":"","event_time":"2026-11-T:.Z","recorded_at":"2026-11-T:.Z"'
    b'[["lifecycle",{"record_id":"","one_id":"","from":null,"to":"lead","cause":"first_event",'
    b'"actor":"engine","message_id":"","event_time":"2026-","recorded_at":"2026-","score":0.0}]]]'
)
_DEFLATE_WBITS = -12  # raw deflate, 4 KiB window: cheap to set up, room for the dictionary


# Nearly every person's outbox is their first event's entry alone ([digest, recorded ms]):
# it is kept as OUTBOX_FIRST, the digest's 6 bytes and the time's 6 (13 bytes, not 34).
# Another outbox this short is kept as plain JSON behind OUTBOX_PLAIN: deflate would not
# shrink it, and setting up a compressor costs more than the rest of the save.
OUTBOX_FIRST = b"f"
_PLAIN_UP_TO = 64
OUTBOX_PLAIN = b"0"


def _deflate(outbox: list[list[Any]]) -> bytes:
    if len(outbox) == 1 and len(entry := outbox[0]) == 2 and _fits_first(*entry):
        digest: str = entry[0]
        recorded_ms: int = entry[1]
        return OUTBOX_FIRST + bytes.fromhex(digest) + recorded_ms.to_bytes(6, "big")
    text = orjson.dumps(outbox)
    if len(text) <= _PLAIN_UP_TO:
        return OUTBOX_PLAIN + text
    packer = zlib.compressobj(
        6, zlib.DEFLATED, _DEFLATE_WBITS, 4, zlib.Z_DEFAULT_STRATEGY, _OUTBOX_DICTIONARY
    )
    return OUTBOX_FORMAT + packer.compress(text) + packer.flush()


def _fits_first(digest: str, recorded: object) -> bool:
    """Whether an entry is a first event's that OUTBOX_FIRST holds (6-byte digest and time)."""
    return len(digest) == 12 and isinstance(recorded, int) and 0 <= recorded < 2**48


def _inflate(stored: bytes) -> list[list[Any]]:
    if stored[:1] == OUTBOX_FIRST:
        return [[stored[1:7].hex(), int.from_bytes(stored[7:], "big")]]
    if stored[:1] == OUTBOX_PLAIN:
        return list(orjson.loads(stored[1:]))
    if stored[:1] not in _OUTBOX_FORMATS:
        raise ValueError(f"unknown outbox format {stored[:1]!r}")
    unpacker = zlib.decompressobj(_DEFLATE_WBITS, _OUTBOX_DICTIONARY)
    return list(orjson.loads(unpacker.decompress(stored[1:])))


def outbox_of(p: PersonState) -> list[list[Any]]:
    """The person's outbox (mutable), inflated from its stored form on first use."""
    if p.outbox_stored:
        p.outbox = _inflate(p.outbox_stored)
        p.outbox_stored = b""
    return p.outbox


# How a person's state is stored. Format 3 (this byte, then a msgpack array declared by
# StoredPerson, its score compact: see _compact_score) since 1 Dec 2026. Format 2 (the
# same array, the score as nested maps) and format 1 (compact JSON, then NUL and the
# deflated outbox) are still read, and become format 3 at the person's next save.
STATE_FORMAT = b"\x03"
_FORMAT_2 = b"\x02"


_STATE_ENCODER = msgspec.msgpack.Encoder()
_STATE_DECODER = msgspec.msgpack.Decoder(StoredPerson)


def encode_state(p: PersonState) -> bytes:
    """The state as Redis keeps it (format 3, :class:`StoredPerson`).

    A changed outbox is deflated here and kept deflated on the state
    (``outbox_stored``): a state kept between batches (engine.state_cache) is then
    not deflated again until its outbox changes.
    """
    if p.outbox and not p.outbox_stored:
        p.outbox_stored, p.outbox = _deflate(p.outbox), []
    if p.erased_ms:
        stored = StoredPerson(
            "", 0, 0, [], [], [], {}, {}, "", 0, 0, "", "", [], p.outbox_stored,
            [], [], None, None, None, {}, {}, None, [], None, p.erased_ms,
        )  # fmt: skip
    else:
        score, profile = p.score, p.profile
        rules, contributions, caps = _compact_score(score)
        stored = StoredPerson(
            p.stage,
            score.ref_ms,
            score.last_ms - score.ref_ms,
            contributions,
            _joined(p.seen),
            caps,
            p.unsettled,
            # Not dataclasses.asdict: its recursive deep copy was the costliest call per batch.
            {name: v for name in PROFILE_FIELDS if (v := getattr(profile, name))},
            p.disqualified,
            p.transitions,
            p.promotions,
            p.queue,
            p.owner,
            p.channels,
            p.outbox_stored,
            p.merged_from,
            p.refused,
            p.first_touch,
            p.last_touch,
            p.work,
            p.timers,
            p.consent,
            p.rate,
            p.submissions,
            p.contacts,
            0,
            rules,
        )
    return STATE_FORMAT + _STATE_ENCODER.encode(stored)


def _compact_score(
    score: BehaviorScore,
) -> tuple[
    list[str],
    list[tuple[str, list[tuple[int, float | int, int]]]],
    list[tuple[int, list[tuple[int, list[int]]]]],
]:
    """The score as format 3 stores it: rule names once, times from the latest event.

    A rule's name appears in every dimension it scores and in its caps, and its times
    are near the person's latest event: named once and counted from ``last_ms``, a
    typical visitor's score takes half the bytes.
    """
    names: dict[str, int] = {}
    index = names.setdefault
    base = score.last_ms
    contributions = []
    for dim, rules in score.contributions.items():
        entries = []
        for rule, (points, at) in rules.items():
            # Whole points (no decay yet) as integers: exact below 2**53, one byte not nine.
            whole = points.is_integer() and -_WHOLE_BELOW < points < _WHOLE_BELOW
            entries.append((index(rule, len(names)), int(points) if whole else points, at - base))
        contributions.append((dim, entries))
    caps = [
        (
            index(rule, len(names)),
            [(int(period), [at - base for at in times]) for period, times in periods.items()],
        )
        for rule, periods in score.caps.items()
    ]
    return list(names), contributions, caps


_WHOLE_BELOW = 2.0**53
_DIGEST_BYTES = 6  # message_digest's


def _joined(seen: list[bytes]) -> bytes | list[bytes]:
    """The seen digests as format 3 keeps them: joined (2 bytes each fewer), if all are 6."""
    joined = b"".join(seen)
    # Digests are 6 bytes, or 7 (a format-1 content digest): the sum tells if all are 6.
    return joined if len(joined) == _DIGEST_BYTES * len(seen) else seen


def _split(seen: bytes | list[bytes]) -> list[bytes]:
    if isinstance(seen, list):
        return seen
    return [seen[i : i + _DIGEST_BYTES] for i in range(0, len(seen), _DIGEST_BYTES)]


def _score_of(d: StoredPerson, stored_format: bytes) -> BehaviorScore:
    """The score of a format-3 (or format-2) stored state, as the rules hold it."""
    if stored_format == _FORMAT_2:
        if not isinstance(d.contributions, dict) or not isinstance(d.caps, dict):
            raise msgspec.ValidationError("a format-2 state with a format-3 score")
        return BehaviorScore(d.ref_ms, d.last_ms, d.contributions, d.caps)
    if isinstance(d.contributions, dict) or isinstance(d.caps, dict):
        raise msgspec.ValidationError("a format-3 state with a format-2 score")
    names, base = d.score_rules, d.ref_ms + d.last_ms
    try:
        contributions = {
            dim: {names[rule]: [float(points), base + at] for rule, points, at in rules}
            for dim, rules in d.contributions
        }
        caps = {
            names[rule]: {str(period): [base + at for at in times] for period, times in periods}
            for rule, periods in d.caps
        }
    except IndexError:
        raise msgspec.ValidationError("a score names a rule missing from score_rules") from None
    return BehaviorScore(d.ref_ms, base, contributions, caps)


def decode_state(one_id: str, raw: bytes | None, version: int = 0) -> PersonState:
    """The state stored for ``one_id`` at ``version``, or a fresh lead when there is none.

    Raises ``msgspec.DecodeError`` (a ``ValueError``; ``msgspec.ValidationError`` when a
    field has the wrong type) when the bytes are not a :class:`StoredPerson`.
    """
    if raw is None:
        return PersonState(one_id, is_new=True, version=version)
    if raw[:1] not in (STATE_FORMAT, _FORMAT_2):
        return _decode_format_1(one_id, raw, version)
    d = _STATE_DECODER.decode(raw[1:])
    if d.erased_ms:
        return PersonState(one_id, erased_ms=d.erased_ms, outbox_stored=d.outbox, version=version)
    return PersonState(
        one_id=one_id,
        stage=d.stage,
        score=_score_of(d, raw[:1]),
        profile=Profile(**d.profile),
        disqualified=d.disqualified,
        seen=_split(d.seen),
        unsettled=d.unsettled,
        transitions=d.transitions,
        promotions=d.promotions,
        queue=d.queue,
        owner=d.owner,
        channels=d.channels,
        outbox_stored=d.outbox,
        merged_from=d.merged_from,
        refused=d.refused,
        first_touch=d.first_touch,
        last_touch=d.last_touch,
        work=d.work,
        timers=d.timers,
        consent=d.consent,
        rate=d.rate,
        submissions=d.submissions,
        contacts=d.contacts,
        version=version,
    )


def _digest_from_hex(text: str) -> bytes:
    """A format-1 digest (12 hex digits; a content digest ``c`` + 12) as format 2's bytes."""
    if len(text) == 13:
        return b"c" + bytes.fromhex(text[1:])
    return bytes.fromhex(text)


def _work_from_format_1(w: dict[str, Any]) -> Work:
    return Work(
        w["id"], w["queue"], w["on"], w["since"], w["sdr"], w["at"], w["breached"], w["n"],
        w.get("record"), w.get("accepted", 0),
    )  # fmt: skip


def _decode_format_1(one_id: str, raw: bytes, version: int) -> PersonState:
    """A state stored as compact JSON (short keys), then NUL and the deflated outbox."""
    body, _, outbox = raw.partition(b"\0")
    d = orjson.loads(body)
    if "e" in d:
        return PersonState(one_id, erased_ms=d["e"], outbox_stored=outbox, version=version)
    transitions, promotions = d.get("n", (0, 0))
    queue, owner = d.get("o", ("", ""))
    ref_ms, last_ms = d["t"]
    return PersonState(
        one_id=one_id,
        stage=d["s"],
        score=BehaviorScore(ref_ms, last_ms, d["c"], d.get("k", {})),
        profile=Profile(**d.get("p", {})),
        disqualified=d.get("dq", ""),
        seen=[_digest_from_hex(h) for h in d["m"]],
        unsettled={source: runs_of(offsets) for source, offsets in d.get("u", {}).items()},
        transitions=transitions,
        promotions=promotions,
        queue=queue,
        owner=owner,
        channels=d.get("h", []),
        outbox_stored=outbox,
        merged_from=[Absorbed(o, at) for o, at in d.get("mf", ())],
        refused=[RefusedMerge(o, reason, at) for o, reason, at in d.get("mr", ())],
        first_touch=Touch(*d["ft"]) if d.get("ft") else None,
        last_touch=Touch(*d["lt"]) if d.get("lt") else None,
        work=_work_from_format_1(d["w"]) if d.get("w") else None,
        timers=d.get("tm", {}),
        consent={
            channel: ConsentStatement(status, at_ms, source, basis, bool(pre_ticked))
            for channel, (status, at_ms, source, basis, pre_ticked) in d.get("cn", {}).items()
        },
        rate=RateWindow(d["rl"][0], d["rl"][1], d["rl"][2:] == [1]) if d.get("rl") else None,
        submissions=[[_digest_from_hex(h), ms] for h, ms in d.get("sb", [])],
        contacts=d.get("ct"),
        version=version,
    )


def replayed_outputs(p: PersonState, event: Event, digest: bytes) -> list[Output]:
    """Records an already-applied event (``event`` again) produced, in order, for re-emission."""
    key = digest.hex()  # the outbox is JSON inside: its digests are hex
    out = []
    for entry in outbox_of(p):
        if entry[0] != key:
            continue
        if isinstance(entry[1], int):  # a first event's record, kept as its time
            one_id = entry[2] if len(entry) > 2 else p.one_id
            record = first_event_record(one_id, event, entry[1])
            out.append(Output(LIFECYCLE, p.one_id, record, replayed=True))
        else:
            out += [Output(kind, p.one_id, value, replayed=True) for kind, value in entry[1]]
    return out


def current_scores(p: PersonState, rules: Rulebook) -> dict[str, float]:
    """Every behaviour score of the person at their latest event time."""
    model = rules.scoring
    return {dim: score_at(p.score, p.score.last_ms, model, dim) for dim in model.threshold}


def apply_event(
    p: PersonState, event: Event, rules: Rulebook, now_ms: int, seen: Seen | None = None
) -> tuple[list[Output], Promotion | None]:
    """Apply ``event`` to ``p`` (mutated) and say what it produced.

    Returns the output records to emit now, and a :class:`Promotion` when the
    event made the person an MQL; its decision is completed once an SDR is
    assigned (:func:`engine.sales.complete_routing`). ``seen`` is
    :func:`already_applied`'s answer when the caller asked it already (the batch does,
    for every event), so that it is asked once.
    """
    settings = rules.settings
    if p.erased_ms:
        if event.event_ms <= p.erased_ms:
            # Events from before an erasure cannot bring the person back; the erasure
            # itself, replayed, sends its record again.
            return replayed_outputs(p, event, message_digest(event.message_id)), None
        _revive(p)
        seen = None  # asked of the erased state: the new person has seen nothing
    digest = message_digest(event.message_id)
    if seen is None:
        seen = already_applied(p, event, digest)
    if seen:
        return outputs_again(p, event, seen, digest), None
    if not event.trusted and over_rate(p, event, settings.limits.max_events_per_minute):
        return refuse_flood(p, event, digest, rules, now_ms), None
    mark_applied(p, event, digest, settings.limits.dedup_window)
    if event.email:
        note_contact(p, "email", event.email, settings)

    outputs: list[Output] = []
    if p.is_new:
        outputs.append(
            transition(
                p, lifecycle.LEAD, "first_event", event, rules, now_ms,
                attribution=attribution(event),
            )
        )  # fmt: skip
        p.is_new = False
    changed = _learn(p, event, rules, outputs, now_ms)
    apply_consent(
        p.consent,
        consent_updates(event, rules.settings.consent.categories),
        event.event_ms,
    )
    _touch(p, event)

    duplicate_submission = event.type == "track" and is_duplicate_submission(
        p, content_digest(event), event.event_ms, settings.limits
    )
    if not duplicate_submission:
        for rule in rules.scoring.matching_rules(event):
            changed |= award(p.score, rule, event.event_ms, rules.scoring)
    observe(p.score, event.event_ms, rules.scoring)

    if p.stage in lifecycle.NURTURE and event.trusted and event.name == MANUAL_MQL:
        manual = Verdict(True, ("manual",))
        return outputs, promote(p, event, rules, manual, MANUAL_MQL, outputs, now_ms)
    # Without new points or new facts the rule cannot have become true: scores only
    # decay. Its cheap conditions go first: most visitors never give the required fields.
    if (
        p.stage in lifecycle.PROMOTABLE
        and changed
        and may_qualify(p, rules)
        and (verdict := qualification(p, rules)).qualified
    ):
        if settings.lifecycle.alert_late_promotions or not is_late(p, verdict, rules, now_ms):
            return outputs, promote(p, event, rules, verdict, "score_threshold", outputs, now_ms)
        outputs.append(late_promotion(p, verdict, event, rules, now_ms))
    remember(p, digest, outputs, settings.limits.outbox_size, event, now_ms)
    return outputs, None


def is_late(p: PersonState, verdict: Verdict, rules: Rulebook, now_ms: int) -> bool:
    """Whether a score the person qualified on has decayed below its bar by ``now_ms``.

    Scores are history at event time, so a backfill of old events can satisfy the
    MQL rule at a moment long past; an SDR is paged only for a lead that is still
    above the bar when the engine sees it (``lifecycle.alert_late_promotions``).
    """
    at = max(now_ms, p.score.last_ms)
    model = rules.scoring
    return any(
        score_at(p.score, at, model, dim) < model.threshold[dim]
        for dim in (TOTAL if d == "total" else d for d in verdict.on)
        if dim in model.threshold
    )


def late_promotion(
    p: PersonState, verdict: Verdict, event: Event, rules: Rulebook, now_ms: int
) -> Output:
    """The audit record of a promotion that held at event time but no longer does."""
    at = max(now_ms, p.score.last_ms)
    model = rules.scoring
    return note(
        p,
        "late_promotion",
        event,
        rules,
        now_ms,
        qualified_on=list(verdict.on),
        score_now=round(score_at(p.score, at, model), 3),
    )


def is_duplicate_submission(
    p: PersonState, fingerprint: bytes, event_ms: int, limits: LimitSettings
) -> bool:
    """Whether the same track was seen within ``limits.duplicate_submission_hours``; remember it.

    The same form sent twice within the window scores once; weeks later it is a
    new submission and scores again.
    """
    window_ms = int(limits.duplicate_submission_hours * 3_600_000)
    if any(d == fingerprint and abs(event_ms - at) < window_ms for d, at in p.submissions):
        return True  # the window stays anchored at the submission that scored
    p.submissions = [
        s for s in p.submissions if abs(event_ms - s[1]) < window_ms and s[0] != fingerprint
    ]
    if window_ms:
        p.submissions.append([fingerprint, event_ms])
        del p.submissions[: -limits.dedup_window]
    return False


def _leave_sales(p: PersonState) -> None:
    """A disqualified person holds no work item, owner or sales timer."""
    p.work = None
    p.owner = ""
    p.timers.clear()


def may_qualify(p: PersonState, rules: Rulebook) -> bool:
    """The MQL rule's conditions that need no score: not disqualified, required fields given."""
    if p.disqualified:
        return False
    present = present_fields(p.profile)
    return all(f in present for f in rules.settings.qualification.required_fields)


def qualification(p: PersonState, rules: Rulebook) -> Verdict:
    """The MQL rule applied to the person as they are now."""
    return is_mql(
        current_scores(p, rules),
        rules.scoring.threshold,
        lambda: rules.fit.score(p.profile)[0],
        present_fields(p.profile),
        bool(p.disqualified),
        rules.settings.qualification,
    )


def _learn(
    p: PersonState, event: Event, rules: Rulebook, outputs: list[Output], now_ms: int
) -> bool:
    """Cleanse the event's traits and fold them into the profile and channels; False if none."""
    traits = traits_of(event)
    if traits is None:
        return False
    reason = rules.cleanser.disqualification(traits)
    valid_phone = bool(traits.phone) and not rules.cleanser.is_fake_phone(traits.phone)
    merge_traits(
        p.profile,
        traits,
        event.event_ms,
        cleansing=rules.settings.cleansing,
        levels=rules.fit.levels,
        valid_phone=valid_phone,
    )
    if valid_phone:
        note_contact(p, "phone", traits.phone, rules.settings)
    push = _push_token(event)
    for channel, known in (
        ("email", bool(traits.email) and not reason),
        ("phone", valid_phone),
        ("push", push),
    ):
        if known and channel not in p.channels:
            p.channels.append(channel)
    if reason and not p.disqualified and lifecycle.DISQUALIFIED in lifecycle.ALLOWED[p.stage]:
        p.disqualified = reason
        outputs.append(
            transition(p, lifecycle.DISQUALIFIED, f"cleansing:{reason}", event, rules, now_ms)
        )
        _leave_sales(p)
    return True


MAX_CONTACTS_KEPT = 8


def note_contact(p: PersonState, kind: str, value: str, settings: Settings) -> None:
    """Remember a contact point the person's events gave, for the suppression lists.

    Every address and number a decision may offer is checked against the lists,
    owned as an identifier or not (a refused merge leaves a trait unowned), and
    as the person's events gave them up to that moment, whatever the identity
    graph learnt later in the same batch.
    """
    if p.contacts is not None and (point := contact_point(kind, value, settings)):
        p.contacts = [*(c for c in p.contacts if c != point), point][-MAX_CONTACTS_KEPT:]


def contact_point(kind: str, value: str, settings: Settings) -> str:
    """``kind:digest`` of an e-mail or phone, as the suppression lists store it ('' if unusable)."""
    identity = settings.identity
    normal = (
        normalise_email(value, identity)
        if kind == "email"
        else normalise_phone(value, identity.default_calling_code)
    )
    return f"{kind}:{digest(identity.salt, f'{kind}:{normal}')}" if normal else ""


def promote(
    p: PersonState,
    event: Event,
    rules: Rulebook,
    verdict: Verdict,
    cause: str,
    outputs: list[Output],
    now_ms: int,
) -> Promotion:
    """Make ``p`` an MQL now; the SDR is assigned by the caller (see engine.sales)."""
    outputs.append(transition(p, lifecycle.MQL, cause, event, rules, now_ms))
    p.promotions += 1
    fit, fit_factors = rules.fit.score(p.profile)
    campaigns = [t.campaign for t in (p.first_touch, p.last_touch) if t]
    queue, rule = choose_queue(rules.settings.routing, p.profile, verdict.on, campaigns)
    return Promotion(
        person=p,
        event=event,
        decision_id=stable_id(p.one_id, DECISION, p.promotions),
        queue=queue,
        rule=rule,
        verdict=verdict,
        cause=cause,
        outputs=outputs,
        scores=current_scores(p, rules),
        fit=fit,
        fit_factors=fit_factors,
        reasons={
            dim: top_contributions(
                p.score, p.score.last_ms, rules.scoring, rules.settings.scoring.reasons, dim
            )
            for dim in (TOTAL, *(d for d in verdict.on if d in rules.scoring.threshold))
        },
    )


def decision_record(promotion: Promotion, rules: Rulebook, now_ms: int) -> dict[str, Any]:
    """The decision (lead alert) of a promotion, all but the SDR it goes to."""
    settings = rules.settings
    p, event = promotion.person, promotion.event
    scores = promotion.scores
    grade = lead_grade(promotion.fit, scores[TOTAL], settings.grade)
    return {
        "decision_id": promotion.decision_id,
        "one_id": p.one_id,
        "stage": lifecycle.MQL,
        "promotion": p.promotions,
        "cause": promotion.cause,
        "queue": promotion.queue,
        "routing_rule": promotion.rule,
        "lead": lead_summary(p.profile),
        "score": round(scores[TOTAL], 3),
        "threshold": settings.scoring.mql_threshold,
        "grade": grade.code,
        "grade_reasons": grade.explained(promotion.fit, scores[TOTAL]),
        "dimensions": {dim: round(s, 3) for dim, s in scores.items() if dim != TOTAL},
        "qualified_on": list(promotion.verdict.on),
        "fit": round(promotion.fit, 3),
        "fit_minimum": settings.qualification.min_fit,
        "fit_reasons": [{"factor": f.factor, "points": f.points} for f in promotion.fit_factors],
        "reasons": _cite(promotion.reasons[TOTAL]),
        "dimension_reasons": {
            dim: _cite(r) for dim, r in promotion.reasons.items() if dim != TOTAL
        },
        "channels": list(p.channels),
        "trigger": {
            "message_id": event.message_id,
            "type": event.type,
            "event": event.name,
            "event_time": iso(event.event_ms),
            "ingested_at": iso(event.ingested_ms),
        },
        "promoted_at": iso(now_ms),
    }


MAX_REFUSALS_KEPT = 10


def absorb(
    p: PersonState, other: PersonState, event: Event, rules: Rulebook, now_ms: int
) -> Output:
    """Merge ``other`` into ``p`` (mutated): one person, as if all events had arrived under one id.

    Scores combine exactly (caps included), facts by newer-wins, the stage is
    the further one (:func:`engine.lifecycle.further_stage`), the owner, work
    item and timers come with the stage, campaign touches keep the first and the latest, seen
    messages, outbox and merge history are united. (Identifiers belong to the
    identity graph, which the resolver has already merged.)
    """
    settings = rules.settings
    from_stage = None if p.is_new else p.stage
    p.is_new = False
    merge_scores(p.score, other.score, rules.scoring)
    merge_profiles(p.profile, other.profile)
    p.seen = [*(d for d in other.seen if d not in p.seen), *p.seen][-settings.limits.dedup_window :]
    p.submissions = sorted([*other.submissions, *p.submissions], key=lambda s: s[1])[
        -settings.limits.dedup_window :
    ]
    for source, runs in other.unsettled.items():
        union = {*offsets_of(p.unsettled.get(source, [])), *offsets_of(runs)}
        p.unsettled[source] = runs_of(sorted(union))
    stage = lifecycle.further_stage(p.stage if from_stage else other.stage, other.stage)
    if other.owner and (not p.owner or (stage == other.stage and stage != p.stage)):
        p.queue, p.owner = other.queue, other.owner
    # The sales work item and its timers (SLA, demotion, nurture) come with the stage:
    # an MQL absorbed by a lead is still owed its SLA, under the survivor's One-ID.
    if stage == other.stage and (stage != p.stage or (other.work and not p.work)):
        p.work, p.timers = other.work, dict(other.timers)
    p.stage = stage
    p.disqualified = p.disqualified or other.disqualified
    p.transitions += other.transitions
    p.promotions += other.promotions
    p.channels += [c for c in other.channels if c not in p.channels]
    if p.contacts is not None and other.contacts is not None:
        p.contacts = [*(c for c in other.contacts if c not in p.contacts), *p.contacts][
            -MAX_CONTACTS_KEPT:
        ]
    else:
        p.contacts = None  # a legacy state on either side: the identity graph stands in
    merge_consent(p.consent, other.consent)
    p.rate = merged_rate(p.rate, other.rate)
    absorbed = [
        [*entry[:2], other.one_id] if isinstance(entry[1], int) and len(entry) == 2 else entry
        for entry in outbox_of(other)
    ]
    p.outbox = (absorbed + outbox_of(p))[-settings.limits.outbox_size :]
    p.merged_from += [Absorbed(other.one_id, now_ms), *other.merged_from]
    touches = [t for t in (p.first_touch, other.first_touch, p.last_touch, other.last_touch) if t]
    if touches:
        p.first_touch = min(touches, key=lambda t: t.at_ms)
        p.last_touch = max(touches, key=lambda t: t.at_ms)
    return _record(p, from_stage, p.stage, "merge", event, rules, now_ms, merged_from=other.one_id)


def refuse_merge(
    p: PersonState, other: str, reason: str, event: Event, rules: Rulebook, now_ms: int
) -> Output:
    """Record that ``other`` and ``p`` were not merged, and why (audit only: no stage change)."""
    p.refused = [*p.refused, RefusedMerge(other, reason, now_ms)][-MAX_REFUSALS_KEPT:]
    return _record(
        p, p.stage, p.stage, f"merge_refused:{reason}", event, rules, now_ms, other=other
    )


def erase(p: PersonState, event: Event, rules: Rulebook, now_ms: int) -> Output:
    """Forget the person (mutated into a tombstone); the record says so, without personal data."""
    record = _record(p, p.stage, "erased", "erase", event, rules, now_ms)
    record.value["score"] = 0.0
    erased_ms = max(event.event_ms, p.erased_ms)
    _revive(p)
    p.is_new = False
    p.erased_ms = erased_ms
    # The tombstone keeps this one record (no personal data in it) so that a replay
    # of the erasure after a crash sends it again.
    remember(p, message_digest(event.message_id), [record], 1)
    return record


def _revive(p: PersonState) -> None:
    """Empty ``p`` into a new person under the same One-ID (after an erasure)."""
    fresh = PersonState(p.one_id, is_new=True, version=p.version)
    for f in fields(PersonState):
        setattr(p, f.name, getattr(fresh, f.name))


def attribution(event: Event) -> dict[str, str]:
    """Where a new lead came from, for the funnel report.

    Campaign, source and medium (Segment's ``context.campaign``) and the landing page
    (the URL path of its first event); '' where the event does not say.
    """
    context = event.payload.get("context")
    campaign = context.get("campaign") if isinstance(context, dict) else None
    campaign = campaign if isinstance(campaign, dict) else {}
    return {
        "campaign": str(campaign.get("name") or "")[:100],
        "source": str(campaign.get("source") or "")[:100],
        "medium": str(campaign.get("medium") or "")[:100],
        "landing_page": (event.path or _context_path(context))[:200],
    }


def _context_path(context: Any) -> str:
    page = context.get("page") if isinstance(context, dict) else None
    path = page.get("path") if isinstance(page, dict) else None
    return path if isinstance(path, str) else ""


def _touch(p: PersonState, event: Event) -> None:
    campaign = (event.payload.get("context") or {}).get("campaign")
    if not isinstance(campaign, dict) or not campaign:
        return
    name, source, medium = (str(campaign.get(k) or "")[:100] for k in ("name", "source", "medium"))
    touch = Touch(name, source, medium, event.event_ms)
    if not p.first_touch or event.event_ms < p.first_touch.at_ms:
        p.first_touch = touch
    if not p.last_touch or event.event_ms >= p.last_touch.at_ms:
        p.last_touch = touch


def _cite(contributions: list[Contribution]) -> list[dict[str, Any]]:
    return [
        {"rule": c.rule, "points": c.points, "last_event_time": iso(c.last_ms)}
        for c in contributions
    ]


def transition(
    p: PersonState,
    to_stage: str,
    cause: str,
    event: Event,
    rules: Rulebook,
    now_ms: int,
    actor: str = "engine",
    **extra: Any,
) -> Output:
    """Move ``p`` to ``to_stage`` (raises lifecycle.IllegalTransition) and say so."""
    from_stage = None if p.is_new else p.stage
    if from_stage is not None:
        lifecycle.check_transition(from_stage, to_stage)
    record = _record(p, from_stage, to_stage, cause, event, rules, now_ms, **extra)
    record.value["actor"] = actor
    return record


def note(
    p: PersonState, cause: str, event: Event, rules: Rulebook, now_ms: int, **extra: Any
) -> Output:
    """A lifecycle record that changes no stage (an SLA breach, a wait for an SDR)."""
    return _record(p, p.stage, p.stage, cause, event, rules, now_ms, **extra)


def _record(
    p: PersonState,
    from_stage: str | None,
    to_stage: str,
    cause: str,
    event: Event,
    rules: Rulebook,
    now_ms: int,
    **extra: Any,
) -> Output:
    p.stage = to_stage
    p.transitions += 1
    record = {
        "record_id": stable_id(p.one_id, LIFECYCLE, p.transitions),
        "one_id": p.one_id,
        "from": from_stage,
        "to": to_stage,
        "cause": cause,
        "actor": "engine",
        "message_id": event.message_id,
        "event_time": iso(event.event_ms),
        "recorded_at": iso(now_ms),
        "score": round(score_at(p.score, p.score.last_ms, rules.scoring), 3),
        **extra,
    }
    return Output(LIFECYCLE, p.one_id, record)


def _push_token(event: Event) -> bool:
    """Whether the event names a device to push to (Segment ``context.device.token``)."""
    context = event.payload.get("context")
    device = context.get("device") if isinstance(context, dict) else None
    token = device.get("token") if isinstance(device, dict) else None
    return isinstance(token, str) and bool(token.strip())


def refuse_flood(
    p: PersonState, event: Event, digest: bytes, rules: Rulebook, now_ms: int
) -> list[Output]:
    """Refuse an event over the rate limit; the first refusal disqualifies the person as a bot.

    No person sends that much: a bot. Its events stop counting, and it is
    disqualified once, so what it scored before the limit buys nothing.
    """
    limits = rules.settings.limits
    detail = f"more than {limits.max_events_per_minute} events in a minute"
    refused = [Output(DLQ, p.one_id, refusal(event, RATE_LIMITED, detail))]
    if p.disqualified or not (
        p.stage == lifecycle.DISQUALIFIED or lifecycle.DISQUALIFIED in lifecycle.ALLOWED[p.stage]
    ):
        return refused
    p.disqualified = RATE_LIMITED
    # One already disqualified (by sales) is marked a bot all the same, with no second
    # record, as a merge with the cookie that flooded would have marked it: what a later
    # merge brings together then cannot qualify, whichever of the two arrived first.
    if p.stage != lifecycle.DISQUALIFIED:
        refused.append(transition(p, lifecycle.DISQUALIFIED, RATE_LIMITED, event, rules, now_ms))
        _leave_sales(p)
    # Only the refusal that changed the person is remembered: a flood must not push
    # real records out of the outbox, nor grow the input positions kept. The others
    # are refused again if replayed (see over_rate), with the same ids.
    mark_applied(p, event, digest, limits.dedup_window)
    remember(p, digest, refused, limits.outbox_size)
    return refused


def over_rate(p: PersonState, event: Event, per_minute: int) -> bool:
    """Count the event in its broker minute; True when that minute is over the limit.

    Broker time, not event time: a client chooses its timestamps, and a replay
    sees the same broker times, so the same events are refused again.
    """
    if not per_minute:
        return False
    minute = event.ingested_ms // MINUTE_MS
    rate = p.rate
    if rate and minute < rate.minute and rate.flooded:
        # An earlier minute than the one counted: a refused event read again (refusals
        # are not remembered), or a straggler from a person already caught flooding.
        return True
    if rate and rate.minute == minute:
        rate.count += 1
    else:
        rate = p.rate = RateWindow(minute, 1, rate.flooded if rate else False)
    if rate.count > per_minute:
        rate.flooded = True  # has been refused: see above
        return True
    return False


def merged_rate(rate: RateWindow | None, other: RateWindow | None) -> RateWindow | None:
    """The rate window of two people merged: as if all their events had come under one id.

    Counts of one broker minute add up; otherwise the later minute's count stands. A
    flood caught on either side stays caught, so a bot cannot shed its count by
    showing a second cookie, and an event of the absorbed person that reaches the
    survivor after the merge is refused as it would have been before it.
    """
    if rate is None or other is None:
        kept = rate or other
        return None if kept is None else RateWindow(kept.minute, kept.count, kept.flooded)
    flooded = rate.flooded or other.flooded
    if rate.minute == other.minute:
        return RateWindow(rate.minute, rate.count + other.count, flooded)
    later = max(rate, other, key=lambda w: w.minute)
    return RateWindow(later.minute, later.count, flooded)


def refusal(event: Event, reason: str, detail: str) -> dict[str, Any]:
    """A DLQ record for an event refused after decoding: the reason and the event itself."""
    return {
        "reason": reason,
        "detail": detail,
        "message_id": event.message_id,
        "event": event.payload,
        "record_id": stable_id(event.message_id, DLQ, 0),
    }


def see(p: PersonState, digest: bytes, window: int) -> None:
    """Remember a digest (the last ``window`` are kept) so it never counts twice."""
    p.seen.append(digest)
    del p.seen[:-window]


class Seen(enum.Enum):
    """What the person already knows of an event (see :func:`already_applied`)."""

    NEW = "new"
    # The event was applied and is read again at the same input position (Bytewax
    # replaying input after a crash), or it has no input position (a timer): its
    # records are re-emitted, since the first emission may have been lost.
    REPLAY = "replay"
    # The same messageId at another input position: a client sent it twice. It was
    # applied and its records emitted; nothing is emitted again.
    RESEND = "resend"

    def __bool__(self) -> bool:
        return self is not Seen.NEW


def already_applied(p: PersonState, event: Event, digest: bytes) -> Seen:
    """Whether ``event`` was applied: at its input position, or by its messageId recently.

    The position catches Bytewax replaying input after a crash, however many
    events the person had since (the digest window alone would miss a busy
    person's); the digest catches a client sending the same event twice.
    """
    runs = p.unsettled.get(event.source)
    if runs is not None and holds_position(runs, event.offset):
        return Seen.REPLAY
    if digest in p.seen:
        return Seen.RESEND if event.source else Seen.REPLAY
    return Seen.NEW


def outputs_again(p: PersonState, event: Event, seen: Seen, digest: bytes) -> list[Output]:
    """The records to emit for an event seen before: a replay's again, a resend's none."""
    return replayed_outputs(p, event, digest) if seen is Seen.REPLAY else []


def mark_applied(p: PersonState, event: Event, digest: bytes, window: int) -> None:
    """Remember that ``event`` was applied, by messageId digest and by input position."""
    see(p, digest, window)
    if event.source:
        add_position(p.unsettled.setdefault(event.source, []), event.offset)


def _first(run: tuple[int, int]) -> int:
    return run[0]


def holds_position(runs: list[tuple[int, int]], offset: int) -> bool:
    """Whether ``offset`` is in one of the ascending runs ``(first, count)``."""
    i = bisect_right(runs, offset, key=_first)
    return i > 0 and offset < runs[i - 1][0] + runs[i - 1][1]


def add_position(runs: list[tuple[int, int]], offset: int) -> None:
    """Add ``offset`` to the ascending runs, extending or joining runs it touches.

    Positions are kept as runs because a busy cookie's events can fill a partition for
    a while: its thousands of positions are then one run, checked, grown and saved in
    constant time, not a list re-encoded at every save.
    """
    i = bisect_right(runs, offset, key=_first)  # runs[:i] start at or before offset
    if i and offset < runs[i - 1][0] + runs[i - 1][1]:
        return  # already there
    after_previous = i > 0 and runs[i - 1][0] + runs[i - 1][1] == offset
    before_next = i < len(runs) and runs[i][0] == offset + 1
    if after_previous and before_next:
        runs[i - 1] = (runs[i - 1][0], runs[i - 1][1] + 1 + runs[i][1])
        del runs[i]
    elif after_previous:
        runs[i - 1] = (runs[i - 1][0], runs[i - 1][1] + 1)
    elif before_next:
        runs[i] = (offset, runs[i][1] + 1)
    else:
        runs.insert(i, (offset, 1))


def runs_of(offsets: list[int]) -> list[tuple[int, int]]:
    """Ascending offsets as runs of consecutive ones, ``(first, count)``."""
    runs: list[tuple[int, int]] = []
    for offset in offsets:
        add_position(runs, offset)
    return runs


def offsets_of(runs: list[tuple[int, int]]) -> list[int]:
    """The offsets of ascending runs, ascending."""
    return [offset for first, count in runs for offset in range(first, first + count)]


def settle(p: PersonState, done: Mapping[str, int]) -> None:
    """Forget the input positions below each source's done offset.

    ``done`` holds, per input source, an offset below which every event has
    been applied and its records delivered (see dataflows.kafka_io): input is
    never read again from below it, so those positions can never be replayed.
    """
    for source in list(p.unsettled):
        runs = p.unsettled[source]
        cut = done.get(source, 0)
        i = bisect_right(runs, cut, key=_first)  # runs[i:] start above cut: all kept
        if i and runs[i - 1][0] + runs[i - 1][1] > cut:  # the run holding cut: trimmed
            first, count = runs[i - 1]
            runs[i - 1] = (cut, first + count - cut)
            i -= 1
        del runs[:i]
        if not runs:
            del p.unsettled[source]


def remember(
    p: PersonState,
    digest: bytes,
    outputs: list[Output],
    size: int,
    event: Event | None = None,
    now_ms: int = 0,
) -> None:
    """Keep the records an event produced, to re-emit them if it is replayed.

    Given the ``event`` and ``now_ms``, a first event's lifecycle record, when it is all
    the event produced, is kept as its time alone: the replayed event rebuilds it
    (:func:`first_event_record`), checked here to give the very same record. Nearly
    every person keeps that record, so this is most of the outbox's bytes.
    """
    if not outputs:
        return
    outbox = outbox_of(p)
    entry: list[Any] = [digest.hex(), [[o.kind, o.value] for o in outputs]]
    if event is not None and len(outputs) == 1 and outputs[0].kind == LIFECYCLE:
        record = outputs[0].value
        if record.get("cause") == "first_event" and list(record.items()) == list(
            first_event_record(p.one_id, event, now_ms).items()
        ):
            entry[1] = now_ms
    outbox.append(entry)
    del outbox[:-size]


def first_event_record(one_id: str, event: Event, now_ms: int) -> dict[str, Any]:
    """The lifecycle record a new person's first event makes, as :func:`apply_event` makes it."""
    return {
        "record_id": stable_id(one_id, LIFECYCLE, 1),
        "one_id": one_id,
        "from": None,
        "to": lifecycle.LEAD,
        "cause": "first_event",
        "actor": "engine",
        "message_id": event.message_id,
        "event_time": iso(event.event_ms),
        "recorded_at": iso(now_ms),
        "score": 0.0,
        "attribution": attribution(event),
    }
