"""Sales: what happens to a person once they are an MQL.

* **Assignment** (:func:`route_promotion`, :func:`complete_routing`): a new MQL is
  routed to a queue (:func:`engine.routing.choose_queue`) and assigned to one of its
  SDRs (atomically in Redis, see :mod:`engine.routing`), or waits in the queue until
  somebody is available, with a timer for that moment.
* **Feedback** (:func:`apply_feedback`): trusted events from sales move people along
  the lifecycle; an illegal move is refused with a DLQ record, not applied.
* **Timers** (:func:`fire_timer`), kept in the person's state and scheduled in Redis:
  ``sla`` (an MQL not accepted in time goes to the next SDR; the first is recorded as
  breached), ``demote`` (the moment decay takes an unaccepted MQL's qualifying score
  below its threshold: back to nurture), ``nurture`` (a recycled person becomes a lead
  again after ``recycle_days``) and ``assign`` (a waiting MQL tries again when an SDR
  becomes available, or moves to the queue's fallback). A timer fires once: its due
  time is part of its message id, so a replay is recognised, and a timer whose due
  time no longer matches the state (accepted, rescheduled) does nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final

from engine import lifecycle
from engine.consent import NOT_SUPPRESSED, Suppression, channel_permissions, contact_points
from engine.events import Event
from engine.lifecycle import IllegalTransition
from engine.person import (
    DECISION,
    DLQ,
    MINUTE_MS,
    Output,
    PersonState,
    Promotion,
    Rulebook,
    Seen,
    already_applied,
    decision_record,
    iso,
    mark_applied,
    message_digest,
    note,
    outputs_again,
    promote,
    qualification,
    refusal,
    remember,
    transition,
)
from engine.person_records import Work
from engine.routing import Candidate, capacity_periods, company_of, is_available, next_available_ms
from engine.scoring import TOTAL, falls_below_ms, scale_scores
from engine.settings import RosterSettings, Sdr

TIMER: Final = "timer"  # the event type of a fired timer
BLACKLISTED: Final = "blacklisted"  # the disqualification of a lead on the blacklist
SLA, DEMOTE, NURTURE, ASSIGN = "sla", "demote", "nurture", "assign"
DAY_MS = 86_400_000
# With nobody available in the look-ahead window, try again this often.
RETRY_MS = 3_600_000

# Feedback event -> the stage it moves a person to (lead_rejected: see apply_feedback).
FEEDBACK: Final[dict[str, str]] = {
    "lead_accepted": lifecycle.SAL,
    "lead_rejected": lifecycle.RECYCLED,
    "sql": lifecycle.SQL,
    "opportunity": lifecycle.OPPORTUNITY,
    "won": lifecycle.CUSTOMER,
    "lost": lifecycle.RECYCLED,
    "recycle": lifecycle.RECYCLED,
    "disqualify": lifecycle.DISQUALIFIED,
}


@dataclass(slots=True)
class Routing:
    """A decision that needs an SDR in this batch."""

    person: PersonState
    queue: str
    key: str  # the assignment's idempotency key: the decision id (or a re-route's)
    company: str  # sticky-owner key, or ''
    exclude: tuple[str, ...]  # SDRs who breached this lead's SLA
    event: Event  # the event or timer that caused it
    outputs: list[Output]  # records to emit with the decision
    # What the suppression lists say about the person, looked up before assignment.
    suppression: Suppression = NOT_SUPPRESSED


def timer_event(one_id: str, kind: str, due_ms: int, now_ms: int) -> Event:
    """The event a due timer becomes (trusted; its id makes a second firing a replay)."""
    return Event(
        type=TIMER,
        message_id=f"timer|{one_id}|{kind}|{due_ms}",
        event_ms=due_ms,
        ingested_ms=now_ms,
        name=kind,
        trusted=True,
    )


def candidates(
    roster: RosterSettings, queue: str, at_ms: int, exclude: tuple[str, ...] = ()
) -> tuple[Candidate, ...]:
    """The queue's SDRs as an assignment at ``at_ms`` sees them."""
    out = []
    for sdr in roster.for_queue(queue):
        day, week = capacity_periods(sdr, at_ms)
        available = sdr.id not in exclude and is_available(sdr, at_ms)
        out.append(
            Candidate(sdr.id, sdr.weight, available, sdr.daily_cap, sdr.weekly_cap, day, week)
        )
    return tuple(out)


def route_promotion(promotion: Promotion, rules: Rulebook, now_ms: int) -> Routing:
    """Open the work item of a new MQL and ask for its SDR."""
    p = promotion.person
    p.work = Work(
        decision_id=promotion.decision_id,
        queue=promotion.queue,
        qualified_on=list(promotion.verdict.on),
        since_ms=now_ms,
        record=decision_record(promotion, rules, now_ms),
    )
    p.queue, p.owner = promotion.queue, ""
    p.timers.pop(SLA, None)
    _schedule_demotion(p, rules, now_ms)
    return Routing(
        p,
        promotion.queue,
        promotion.decision_id,
        _company(p, promotion.queue, rules),
        (),
        promotion.event,
        promotion.outputs,
    )


def complete_routing(
    r: Routing, sdr: Sdr | None, roster: RosterSettings, rules: Rulebook, now_ms: int
) -> list[Output]:
    """Emit the decision for the SDR assigned, or record that the lead waits, and why."""
    p, work = r.person, r.person.work
    # route_promotion opened the work item; only acceptance (no more routing) closes its record.
    assert work is not None and work.record is not None, "routed without an open work item"
    queue = rules.settings.routing.queue(r.queue)
    if sdr is None:
        due = next_available_ms(roster.for_queue(r.queue), now_ms + 1) or now_ms + RETRY_MS
        if queue.max_wait_minutes and queue.fallback_queue:
            due = min(due, max(now_ms + 1, work.since_ms + int(queue.max_wait_minutes * MINUTE_MS)))
        p.timers[ASSIGN] = due
        waiting = note(p, "waiting_for_sdr", r.event, rules, now_ms, queue=r.queue)
        waiting.value["retry_at"] = iso(due)
        outputs = [*r.outputs, waiting]
    else:
        sla_ms = int(queue.sla_minutes * MINUTE_MS)
        # The channels as they are now: consent may have changed since the promotion.
        permitted, withheld = channel_permissions(
            p.consent,
            contact_points(p.channels, p.profile.mobile),
            p.profile.country,
            rules.settings.consent,
            r.suppression,
        )
        decision: dict[str, Any] = {
            **work.record,
            "channels": permitted,
            "channels_withheld": withheld,
            "contactable": bool(permitted),
            "decision_id": r.key,
            "one_id": p.one_id,  # the survivor's, when the lead was merged since its promotion
            "queue": r.queue,
            "sdr": sdr.id,
            "sdr_name": sdr.name,
            "decided_at": iso(now_ms),
            "sla_deadline": iso(now_ms + sla_ms),
        }
        if r.key != work.decision_id:
            decision["replaces"] = work.decision_id
        if work.breached:
            decision["breached"] = list(work.breached)
        p.queue, p.owner = r.queue, sdr.id
        work.sdr, work.assigned_ms, work.queue = sdr.id, now_ms, r.queue
        p.timers.pop(ASSIGN, None)
        p.timers[SLA] = now_ms + sla_ms
        outputs = [*r.outputs, Output(DECISION, p.one_id, decision)]
    remember(p, message_digest(r.event.message_id), outputs, rules.settings.limits.outbox_size)
    return outputs


def withhold_from_sales(r: Routing, rules: Rulebook, now_ms: int) -> list[Output]:
    """A blacklisted lead: disqualified instead of routed, so no decision and no alert."""
    p = r.person
    p.work = None
    p.queue, p.owner = "", ""
    for kind in (SLA, ASSIGN):
        p.timers.pop(kind, None)
    if lifecycle.DISQUALIFIED in lifecycle.ALLOWED[p.stage]:
        p.disqualified = BLACKLISTED
        record = transition(p, lifecycle.DISQUALIFIED, BLACKLISTED, r.event, rules, now_ms)
    else:  # a stage sales already works (re-routed after an SLA breach): no alert, say why
        record = note(p, "withheld_blacklisted", r.event, rules, now_ms)
    outputs = [*r.outputs, record]
    remember(p, message_digest(r.event.message_id), outputs, rules.settings.limits.outbox_size)
    return outputs


def apply_feedback(
    p: PersonState, event: Event, rules: Rulebook, now_ms: int, seen: Seen | None = None
) -> list[Output]:
    """Move ``p`` as a trusted sales event says; an illegal move becomes a DLQ record.

    ``seen``: :func:`already_applied`'s answer, when the caller asked it already.
    """
    settings = rules.settings
    if p.is_new:  # nobody is known by its identifiers: nothing to move, no one to create
        detail = f"{event.name}: no lead is known by this event's identifiers"
        return [Output(DLQ, p.one_id, refusal(event, "illegal_transition", detail))]
    digest = message_digest(event.message_id)
    if seen is None:
        seen = already_applied(p, event, digest)
    if seen:
        return outputs_again(p, event, seen, digest)
    mark_applied(p, event, digest, settings.limits.dedup_window)
    props = event.payload.get("properties") or {}
    actor = str(props.get("actor") or props.get("sdr") or "sales")[:100]
    target = FEEDBACK[event.name]
    extra: dict[str, Any] = {}
    if event.name == "lead_rejected":
        reason = str(props.get("reason") or "unspecified")[:100]
        extra["reason"] = reason
        if reason in settings.lifecycle.disqualify_reasons:
            target = lifecycle.DISQUALIFIED
    try:
        record = transition(p, target, event.name, event, rules, now_ms, actor=actor, **extra)
    except IllegalTransition as e:
        outputs = [Output(DLQ, p.one_id, refusal(event, "illegal_transition", str(e)))]
    else:
        outputs = [record]
        _after_feedback(p, target, rules, now_ms)
    remember(p, digest, outputs, settings.limits.outbox_size)
    return outputs


def _after_feedback(p: PersonState, stage: str, rules: Rulebook, now_ms: int) -> None:
    if stage == lifecycle.SAL:
        p.timers.pop(SLA, None)
        p.timers.pop(DEMOTE, None)
        if p.work is not None:  # accepted without a routing (a manual SAL): nothing to close
            p.work.record, p.work.accepted_ms = None, now_ms
    elif stage == lifecycle.RECYCLED:
        _recycle(p, rules, now_ms)
    elif stage in (lifecycle.DISQUALIFIED, lifecycle.CUSTOMER):
        p.timers.clear()
        p.work = None


def _recycle(p: PersonState, rules: Rulebook, now_ms: int) -> None:
    """Back to nurture: scores reduced, the owner released, a lead again after recycle_days."""
    lc = rules.settings.lifecycle
    scale_scores(p.score, lc.recycle_score_factor)
    p.owner = ""
    p.work = None
    p.timers = {NURTURE: now_ms + int(lc.recycle_days * DAY_MS)}


def fire_timer(
    p: PersonState, event: Event, rules: Rulebook, now_ms: int, seen: Seen | None = None
) -> tuple[list[Output], Routing | None, Promotion | None]:
    """Fire a due timer: records to emit now, or a routing / promotion to complete.

    ``seen``: :func:`already_applied`'s answer, when the caller asked it already.
    """
    kind, due = event.name, event.event_ms
    digest = message_digest(event.message_id)
    if seen is None:
        seen = already_applied(p, event, digest)
    if seen:
        return outputs_again(p, event, seen, digest), None, None
    if p.timers.get(kind) != due:
        return [], None, None  # cancelled or moved since it was scheduled
    mark_applied(p, event, digest, rules.settings.limits.dedup_window)
    del p.timers[kind]
    work = p.work if p.stage == lifecycle.MQL else None  # unaccepted work
    outputs: list[Output] = []
    if kind == SLA and work and work.sdr:
        work.breached.append(work.sdr)
        work.reroutes += 1
        outputs.append(note(p, "sla_breached", event, rules, now_ms, sdr=work.sdr))
        key = f"{work.decision_id}-r{work.reroutes}"
        routing = Routing(
            p,
            work.queue,
            key,
            _company(p, work.queue, rules),
            tuple(work.breached),
            event,
            outputs,
        )
        return outputs, routing, None
    if kind == ASSIGN and work and not work.sdr:
        queue = rules.settings.routing.queue(work.queue)
        waited = now_ms - work.since_ms
        key = work.decision_id
        if (
            queue.fallback_queue
            and queue.max_wait_minutes
            and waited >= queue.max_wait_minutes * MINUTE_MS
        ):
            outputs.append(
                note(p, "fallback_queue", event, rules, now_ms, queue=queue.fallback_queue)
            )
            work.queue = p.queue = queue.fallback_queue
            key = f"{work.decision_id}@{queue.fallback_queue}"
        company = _company(p, work.queue, rules)
        return outputs, Routing(p, work.queue, key, company, (), event, outputs), None
    if kind == DEMOTE and work:
        _schedule_demotion(p, rules, now_ms)  # new points since may have moved the moment
        if p.timers.get(DEMOTE, now_ms + 1) <= now_ms:
            del p.timers[DEMOTE]
            sdr = p.owner
            outputs.append(
                transition(
                    p, lifecycle.RECYCLED, "decay_below_threshold", event, rules, now_ms, sdr=sdr
                )
            )
            _recycle(p, rules, now_ms)
    elif kind == NURTURE and p.stage == lifecycle.RECYCLED:
        outputs.append(transition(p, lifecycle.LEAD, "nurture_reentry", event, rules, now_ms))
        verdict = qualification(p, rules)
        if verdict.qualified:
            return (
                outputs,
                None,
                promote(p, event, rules, verdict, "score_threshold", outputs, now_ms),
            )
    remember(p, digest, outputs, rules.settings.limits.outbox_size)
    return outputs, None, None


def _schedule_demotion(p: PersonState, rules: Rulebook, now_ms: int) -> None:
    """Set the ``demote`` timer: when every score the person qualified on falls below its bar."""
    named = [TOTAL if d == "total" else d for d in (p.work.qualified_on if p.work else ())]
    on = [d for d in named if d in rules.scoring.threshold]
    if not rules.settings.lifecycle.demote_on_decay or not on:
        p.timers.pop(DEMOTE, None)  # a manual MQL is not undone by decay
        return
    after = max(now_ms, p.score.last_ms)
    moments = [
        falls_below_ms(p.score, rules.scoring.threshold[d], after, rules.scoring, d) for d in on
    ]
    if any(m is None for m in moments):
        p.timers.pop(DEMOTE, None)
    else:
        p.timers[DEMOTE] = max(m for m in moments if m is not None)


def _company(p: PersonState, queue: str, rules: Rulebook) -> str:
    return company_of(p.profile) if rules.settings.routing.queue(queue).sticky else ""
