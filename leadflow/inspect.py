"""``leadflow inspect <identifier>``: everything Leadflow knows about one person.

Identifiers are stored only as salted digests (no e-mail or phone in Redis
keys), so the person's identifiers are listed by kind and digest; the one asked
about is shown in clear, as typed.
"""

from __future__ import annotations

import json
from typing import Any

from engine.consent import LISTS, channel_permissions, contact_points, suppression_of
from engine.grade import lead_grade
from engine.identity import digest, normalise_email, normalise_phone
from engine.person import PersonState, Rulebook, current_scores, decode_state, iso
from engine.person_records import Touch
from engine.scoring import TOTAL, effective_score, top_contributions
from engine.settings import Settings
from engine.store import RedisStore


def parse_identifier(text: str, settings: Settings) -> tuple[str, str]:
    """``kind:value``, or a bare value of a guessed kind (@: e-mail, +: phone, else user)."""
    kinds = {k.name for k in settings.identity.kinds}
    kind, sep, value = text.partition(":")
    if not sep or kind not in kinds:
        kind, value = (
            ("email" if "@" in text else "phone" if text.startswith("+") else "user"),
            text,
        )
    if kind == "email":
        value = normalise_email(value, settings.identity)
    elif kind == "phone":
        value = normalise_phone(value, settings.identity.default_calling_code)
    return kind, value.strip()


def inspect_person(settings: Settings, identifier: str, now_ms: int) -> dict[str, Any] | None:
    """The person owning ``identifier`` as plain data, or None when nobody does."""
    kind, value = parse_identifier(identifier, settings)
    d = digest(settings.identity.salt, f"{kind}:{value}")
    store = RedisStore(settings.redis)
    try:
        (owner,), (erased_ms,) = store.owners([d])
        if owner is None:
            return (
                {"identifier": f"{kind}:{value}", "erased_at": iso(erased_ms)}
                if erased_ms
                else None
            )
        path = [owner]
        while (stored := store.load_people([path[-1]])[0]).redirect and len(path) < 50:
            path.append(stored.redirect)
        person = decode_state(path[-1], stored.state, stored.version)
        ids = store.identifiers(person.one_id)
        described = _describe(person, ids, Rulebook(settings), f"{kind}:{value}", d, path, now_ms)
        if not person.erased_ms:
            # What the next decision would offer: the same lists, consent and policy.
            (on_lists,) = store.lists_holding(
                [(person.one_id, person.profile.email_domain, person.contacts)], tuple(LISTS)
            )
            offered, withheld = channel_permissions(
                person.consent,
                contact_points(person.channels, person.profile.mobile),
                person.profile.country,
                settings.consent,
                suppression_of(on_lists),
            )
            described["next_decision_channels"] = {"offered": offered, "withheld": withheld}
            described["on_lists"] = sorted(name for name, held in on_lists.items() if held)
        return described
    finally:
        store.close()


def _describe(
    p: PersonState,
    ids: list[tuple[str, str]],
    rules: Rulebook,
    asked: str,
    asked_digest: str,
    path: list[str],
    now_ms: int,
) -> dict[str, Any]:
    if p.erased_ms:
        return {"one_id": p.one_id, "identifier": asked, "erased_at": iso(p.erased_ms)}
    model = rules.scoring
    fit, factors = rules.fit.score(p.profile)
    total_now = effective_score(p.score, now_ms, model, TOTAL)
    grade = lead_grade(fit, total_now, rules.settings.grade)
    return {
        "one_id": p.one_id,
        "redirects": path[:-1],
        "identifier": asked,
        "identifiers": [
            {
                "kind": k,
                "digest": d,
                **({"value": asked.split(":", 1)[1]} if d == asked_digest else {}),
            }
            for k, d in ids
        ],
        "stage": p.stage,
        "disqualified": p.disqualified or None,
        "owner": {"queue": p.queue, "sdr": p.owner} if p.owner else None,
        "promotions": p.promotions,
        "scores": {
            ("total" if dim == TOTAL else dim): {
                "at_last_event": round(score, 3),
                "now": round(effective_score(p.score, now_ms, model, dim), 3),
                "top": [
                    {"rule": c.rule, "points": c.points, "last_event_time": iso(c.last_ms)}
                    for c in top_contributions(
                        p.score, p.score.last_ms, model, rules.settings.scoring.reasons, dim
                    )
                ],
            }
            for dim, score in current_scores(p, rules).items()
        },
        "last_event_time": iso(p.score.last_ms) if p.score.last_ms else None,
        "fit": {
            "score": fit,
            "factors": [{"factor": f.factor, "points": f.points} for f in factors],
        },
        "grade_now": grade.code,
        "grade_reasons": grade.explained(fit, total_now),
        "channels": p.channels,
        "first_touch": _touch(p.first_touch),
        "last_touch": _touch(p.last_touch),
        "merged_from": [{"one_id": m.one_id, "at": iso(m.at_ms)} for m in p.merged_from],
        "refused_merges": [
            {"one_id": m.one_id, "reason": m.reason, "at": iso(m.at_ms)} for m in p.refused
        ],
    }


def _touch(touch: Touch | None) -> dict[str, Any] | None:
    if touch is None:
        return None
    return {
        "campaign": touch.campaign,
        "source": touch.source,
        "medium": touch.medium,
        "event_time": iso(touch.at_ms),
    }


def render(person: dict[str, Any]) -> str:
    """Pretty JSON for a terminal."""
    return json.dumps(person, indent=2, ensure_ascii=False)
