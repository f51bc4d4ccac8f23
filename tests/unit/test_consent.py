"""Consent per channel, country policies, suppression lists and the per-person rate limit."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest

from engine.consent import (
    NO_CONSENT,
    NO_CONTACT,
    PRE_TICKED,
    BadListEntry,
    ConsentStatement,
    Suppression,
    apply_consent,
    channel_permissions,
    consent_updates,
    contact_points,
    list_member,
    suppression_of,
)
from engine.events import Event
from engine.person import DLQ, LIFECYCLE, PersonState, Rulebook, apply_event, current_scores
from engine.sales import complete_routing, fire_timer, route_promotion
from engine.settings import ConsentSettings, load_settings

NOW_MS = 1_793_000_000_000
RULES = Rulebook(load_settings(env={}))
CONSENT = RULES.settings.consent
ALL = {"email", "sms", "phone", "push"}


def identify(message_id: str, t_ms: int, **traits: Any) -> Event:
    return Event(
        type="identify",
        message_id=message_id,
        event_ms=t_ms,
        ingested_ms=t_ms,
        anonymous_id="a",
        email=str(traits.get("email", "")),
        payload={"traits": traits},
    )


def override(message_id: str, t_ms: int, channel: str, status: str) -> Event:
    props = {"channel": channel, "status": status, "source": "preference_centre"}
    return Event(
        type="track",
        message_id=message_id,
        event_ms=t_ms,
        ingested_ms=t_ms,
        name="consent_override",
        anonymous_id="a",
        trusted=True,
        payload={"properties": props},
    )


def permitted(consent: dict[str, ConsentStatement], country: str, **suppressed: bool) -> list[str]:
    return channel_permissions(consent, ALL, country, CONSENT, Suppression(**suppressed))[0]


def test_the_shipped_policies_cover_gdpr_uk_and_china() -> None:
    assert ConsentSettings() == CONSENT
    assert CONSENT.policy_for("DE").name == CONSENT.policy_for("GB").name == "gdpr"
    assert CONSENT.policy_for("CN").name == "pipl"
    assert CONSENT.policy_for("US").name == CONSENT.policy_for("").name == "default"


@pytest.mark.parametrize("country", ["DE", "FR", "GB", "CN"])
def test_an_opt_in_country_needs_a_grant_that_was_not_pre_ticked(country: str) -> None:
    consent: dict[str, ConsentStatement] = {}
    permissions = channel_permissions(consent, ALL, country, CONSENT, Suppression())
    assert permissions == ([], dict.fromkeys(("email", "sms", "phone", "push"), NO_CONSENT))
    pre = identify("m1", 1, consent={"email": {"status": "granted", "pre_ticked": True}})
    apply_consent(consent, consent_updates(pre), 1)
    _, withheld = channel_permissions(consent, ALL, country, CONSENT, Suppression())
    assert withheld["email"] == PRE_TICKED
    real = identify("m2", 2, consent={"email": {"status": "granted", "basis": "consent"}})
    apply_consent(consent, consent_updates(real), 2)
    assert permitted(consent, country) == ["email"]
    assert consent["email"] == ConsentStatement("granted", 2, "", "consent", pre_ticked=False)


def test_elsewhere_email_and_phone_are_permitted_unless_denied_sms_and_push_need_a_grant() -> None:
    consent: dict[str, ConsentStatement] = {}
    assert permitted(consent, "US") == ["email", "phone"]
    apply_consent(consent, consent_updates(identify("m", 1, consent={"phone": "denied"})), 1)
    assert permitted(consent, "US") == ["email"]
    apply_consent(consent, consent_updates(identify("n", 2, consent={"sms": "granted"})), 2)
    assert permitted(consent, "US") == ["email", "sms"]


def test_statements_apply_in_event_time_order_whatever_the_arrival_order() -> None:
    grant = identify("g", 10, consent={"email": "granted"})
    revoke = override("r", 20, "email", "revoked")
    for order in ([grant, revoke], [revoke, grant]):
        consent: dict[str, ConsentStatement] = {}
        for e in order:
            apply_consent(consent, consent_updates(e), e.event_ms)
        assert (consent["email"].status, consent["email"].at_ms) == ("revoked", 20)
        assert consent["email"].source == "preference_centre"
        assert "email" not in permitted(consent, "US")


def test_unreadable_statements_are_skipped_never_guessed() -> None:
    e = identify("m", 1, consent={"email": "yes", "fax": "granted", "sms": {"status": 1}})
    assert consent_updates(e) == []
    untrusted = replace(override("o", 1, "email", "granted"), trusted=False)
    assert consent_updates(untrusted) == []


def test_suppression_lists_withhold_email_and_phone_and_need_a_contact_point() -> None:
    assert permitted({}, "US", unsubscribed=True) == ["phone"]
    granted = ConsentStatement("granted", 1, "", "", pre_ticked=False)
    assert permitted({"sms": granted}, "US", do_not_call=True) == ["email"]
    assert contact_points(["email"], mobile=False) == {"email"}
    assert contact_points(["phone"], mobile=True) == {"phone", "sms"}
    _, withheld = channel_permissions({}, {"email"}, "US", CONSENT, Suppression())
    assert withheld["phone"] == withheld["push"] == NO_CONTACT
    assert suppression_of({"blacklist": True}).blacklisted
    assert not suppression_of({"blacklist": True, "whitelist": True}).blacklisted


def test_list_entries_are_normalised_like_identifiers_and_never_kept_in_clear() -> None:
    identity = RULES.settings.identity
    a = list_member("unsubscribe", "  Ana.Souza@Acme.example ", identity)
    assert a == list_member("unsubscribe", "ana.souza@acme.example", identity)
    assert a.startswith("email:") and "acme" not in a
    assert list_member("dnc", "+1 (415) 555-0134", identity) == list_member(
        "dnc", "+14155550134", identity
    )
    assert list_member("blacklist", "Spam.Example", identity) == "domain:spam.example"
    with pytest.raises(BadListEntry, match="takes phone"):
        list_member("dnc", "ana@acme.example", identity)
    with pytest.raises(BadListEntry, match="not an e-mail address"):
        list_member("blacklist", "ana@", identity)
    with pytest.raises(BadListEntry, match="unknown list"):
        list_member("greylist", "acme.example", identity)


def test_a_revoked_channel_disappears_from_the_next_decision() -> None:
    p = PersonState("p1", is_new=True)
    traits = {"email": "ana@acme.example", "company": {"name": "Acme"}, "country": "US"}
    apply_event(p, identify("id", NOW_MS, **traits), RULES, NOW_MS)
    promotion = None
    for n, name in enumerate(["Demo Requested", "Webinar Attended", "Contact Form Submitted"]):
        track = Event("track", f"t{n}", NOW_MS + n, NOW_MS + n, name=name, anonymous_id="a")
        _, promotion = apply_event(p, track, RULES, NOW_MS) if promotion is None else (0, promotion)
    assert promotion is not None
    roster = RULES.settings.roster
    sdr = roster.sdrs[0]
    first = complete_routing(route_promotion(promotion, RULES, NOW_MS), sdr, roster, RULES, NOW_MS)
    assert first[-1].value["channels"] == ["email"]
    apply_event(p, override("rv", NOW_MS + 10, "email", "revoked"), RULES, NOW_MS)
    # The SDR lets the SLA pass: the lead is re-routed with a new decision.
    due = p.timers["sla"]
    timer = Event("timer", f"timer|p1|sla|{due}", due, due, name="sla", trusted=True)
    _, routing, _ = fire_timer(p, timer, RULES, due)
    assert routing is not None
    again = complete_routing(routing, roster.sdrs[1], roster, RULES, due)
    decision = again[-1].value
    assert decision["replaces"] == first[-1].value["decision_id"]
    assert decision["channels"] == [] and decision["channels_withheld"]["email"] == "revoked"
    assert decision["contactable"] is False


def test_a_flood_from_one_cookie_is_capped_and_disqualified() -> None:
    p = PersonState("bot", is_new=True)
    outputs = []
    for n in range(300):
        view = Event("page", f"v{n}", NOW_MS, NOW_MS + n, path="/pricing", anonymous_id="bot")
        outputs += apply_event(p, view, RULES, NOW_MS)[0]
    limit = RULES.settings.limits.max_events_per_minute
    refused = [o for o in outputs if o.kind == DLQ]
    assert len(refused) == 300 - limit
    assert {o.value["reason"] for o in refused} == {"rate_limited"}
    assert [o.value["cause"] for o in outputs if o.kind == LIFECYCLE] == [
        "first_event",
        "rate_limited",
    ]
    assert p.stage == "disqualified"
    # The next broker minute counts afresh, but a disqualified person never becomes an MQL.
    later = Event("track", "d", NOW_MS, NOW_MS + 60_000, name="Demo Requested", anonymous_id="bot")
    assert apply_event(p, later, RULES, NOW_MS)[1] is None
    assert current_scores(p, RULES)[""] == 10 + 30 + 50  # one page view each, capped, and the demo


def test_segment_consent_categories_map_to_channels_and_unmapped_ones_say_nothing() -> None:
    def page(prefs: dict[str, Any]) -> Event:
        return Event(
            type="page",
            message_id="p",
            event_ms=1,
            ingested_ms=1,
            anonymous_id="a",
            payload={"context": {"consent": {"categoryPreferences": prefs}}},
        )

    table = {"marketing": ("email", "sms"), "advertising": ("sms",)}
    updates = consent_updates(page({"Marketing": True, "Advertising": False, "C0004": True}), table)
    assert {(u.channel, u.status, u.source, u.pre_ticked) for u in updates} == {
        ("email", "granted", "consent_manager", False),
        ("sms", "denied", "consent_manager", False),  # a denial wins over a grant
    }
    assert consent_updates(page({"Marketing": True})) == []  # no table: never guessed
    assert consent_updates(page({"Marketing": "yes"}), table) == []  # not a boolean
