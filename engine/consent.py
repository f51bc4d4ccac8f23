"""Consent per channel, country policies and suppression lists: whom an SDR may contact, and how.

Consent is kept per person and channel (``email``, ``sms``, ``phone``,
``push``) as the latest statement about it: ``granted``, ``denied`` or
``revoked`` (no statement: ``unknown``), with its source, legal basis, event
time and whether the box was pre-ticked. Statements arrive as

* ``identify`` traits from any topic (the form that captured them)::

      "traits": {"consent": {"email": {"status": "granted", "pre_ticked": false,
                                       "basis": "consent", "source": "webinar_form"},
                             "sms": "denied"}}

* a ``consent_override`` track event from the trusted feedback topic
  (properties ``channel``, ``status``, ``basis``, ``source``): a preference
  centre, a support agent, a CRM sync. On the events topic it is refused
  (``untrusted_source``).

Statements apply in event-time order: one older than the channel's latest is
ignored, whatever order they arrive in.

The channels an SDR may use are worked out when a decision is made, never
stored: the person's country picks a policy (engine.settings.ConsentSettings);
an ``opt_in`` channel of the policy needs a grant that was not pre-ticked
(GDPR: silence or a pre-ticked box is no consent); any other channel may be
used unless denied or revoked. Then the suppression lists: an unsubscribed
e-mail address removes ``email``, a number on the do-not-call list removes
``phone`` and ``sms``. A channel also needs a contact point: a valid e-mail
address, a phone number (``sms``: a mobile one), a push token seen in
``context.device.token``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import msgspec

from engine.events import Event
from engine.identity import digest, normalise_email, normalise_phone
from engine.settings import CHANNELS, ConsentSettings, IdentitySettings

GRANTED, DENIED, REVOKED, UNKNOWN = "granted", "denied", "revoked", "unknown"
STATUSES = (GRANTED, DENIED, REVOKED)
CONSENT_OVERRIDE = "consent_override"
_MAX_TEXT = 100
EMAIL = re.compile(r"[^@\s]+@[^@\s]+\.[^@\s]+")
PHONE_LIKE = re.compile(r"\+?[\d\s().-]+")
DOMAIN = re.compile(r"(?:[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\.)+[a-z]{2,63}")

# Why a channel may not be used (a decision's ``channels_withheld``).
NO_CONTACT = "no_contact_point"
NO_CONSENT = "no_consent"  # opt-in policy, nothing granted
PRE_TICKED = "pre_ticked"  # opt-in policy, granted with a pre-ticked box
UNSUBSCRIBED = "unsubscribed"
DO_NOT_CALL = "do_not_call"


@dataclass(slots=True)
class ConsentUpdate:
    """One statement about one channel."""

    channel: str
    status: str
    source: str
    basis: str
    pre_ticked: bool


@dataclass(frozen=True, slots=True)
class Suppression:
    """What the suppression lists say about a person (see engine.store lists)."""

    unsubscribed: bool = False  # an e-mail address of theirs is on the unsubscribe list
    do_not_call: bool = False  # a phone number of theirs is on the DNC list
    blacklisted: bool = False  # on the blacklist (an address, number or domain) and not whitelisted


NOT_SUPPRESSED = Suppression()


def consent_updates(
    event: Event, categories: Mapping[str, tuple[str, ...]] | None = None
) -> list[ConsentUpdate]:
    """The consent statements an event makes (none if it makes none; malformed ones skipped).

    A statement this cannot read (an unknown channel or status) is skipped
    rather than guessed: consent is never inferred. ``categories`` maps Segment
    consent-manager categories to channels (:func:`category_statements`).
    """
    payload = event.payload
    if event.trusted and event.name == CONSENT_OVERRIDE:
        props = payload.get("properties")
        return _statements({props.get("channel"): props} if isinstance(props, dict) else {})
    found = category_statements(payload, categories) if categories else []
    if event.type != "identify":
        return found
    traits = payload.get("traits")
    consent = traits.get("consent") if isinstance(traits, dict) else None
    return found + (_statements(consent) if isinstance(consent, dict) else [])


CONSENT_MANAGER = "consent_manager"


def category_statements(
    payload: Mapping[str, Any], categories: Mapping[str, tuple[str, ...]]
) -> list[ConsentUpdate]:
    """Statements from Segment's ``context.consent.categoryPreferences`` (any call).

    A category set to ``true`` grants its mapped channels, ``false`` denies them
    (source ``consent_manager``: the visitor's own choice, never pre-ticked); a
    category not in the table, or not a boolean, says nothing. When two categories
    map one channel, a denial wins.
    """
    context = payload.get("context")
    consent = context.get("consent") if isinstance(context, dict) else None
    prefs = consent.get("categoryPreferences") if isinstance(consent, dict) else None
    if not isinstance(prefs, dict):
        return []
    status: dict[str, str] = {}
    for category, chosen in prefs.items():
        if not isinstance(category, str) or not isinstance(chosen, bool):
            continue
        for channel in categories.get(category.lower(), ()):
            if status.get(channel) != DENIED:
                status[channel] = GRANTED if chosen else DENIED
    return [ConsentUpdate(c, v, CONSENT_MANAGER, "consent", False) for c, v in status.items()]


def _statements(raw: Mapping[Any, Any]) -> list[ConsentUpdate]:
    out = []
    for channel, value in raw.items():
        if channel not in CHANNELS:
            continue
        fields = value if isinstance(value, dict) else {"status": value}
        status = fields.get("status")
        if status not in STATUSES:
            continue
        out.append(
            ConsentUpdate(
                channel=channel,
                status=status,
                source=_text(fields.get("source")),
                basis=_text(fields.get("basis")),
                pre_ticked=fields.get("pre_ticked") is True,
            )
        )
    return out


def _text(value: Any) -> str:
    return value[:_MAX_TEXT] if isinstance(value, str) else ""


class ConsentStatement(msgspec.Struct, array_like=True, frozen=True):
    """The statement kept for one channel: the latest by event time (stored as is)."""

    status: str  # granted, denied, revoked
    at_ms: int  # event time of the statement
    source: str  # who recorded it (a consent manager, a preference centre, ...)
    basis: str  # its legal basis, when given
    pre_ticked: bool  # given through a pre-ticked box: no consent where opt-in rules


def apply_consent(
    consent: dict[str, ConsentStatement], updates: list[ConsentUpdate], at_ms: int
) -> bool:
    """Record ``updates`` made at ``at_ms`` unless a later statement is kept; True if any did."""
    changed = False
    for u in updates:
        kept = consent.get(u.channel)
        if kept is not None and kept.at_ms > at_ms:
            continue
        consent[u.channel] = ConsentStatement(u.status, at_ms, u.source, u.basis, u.pre_ticked)
        changed = True
    return changed


def merge_consent(into: dict[str, ConsentStatement], other: Mapping[str, ConsentStatement]) -> None:
    """Unite two people's consent: per channel the later statement wins."""
    for channel, statement in other.items():
        kept = into.get(channel)
        if kept is None or statement.at_ms > kept.at_ms:
            into[channel] = statement


def contact_points(known: list[str], mobile: bool) -> set[str]:
    """Channels the person can be reached on at all, from what is known of them."""
    points = {c for c in known if c in ("email", "push")}
    if "phone" in known:
        points.add("phone")
        if mobile:
            points.add("sms")
    return points


def channel_permissions(
    consent: Mapping[str, ConsentStatement],
    points: set[str],
    country: str,
    settings: ConsentSettings,
    suppression: Suppression,
) -> tuple[list[str], dict[str, str]]:
    """The channels that may be used now, and why each other one may not."""
    policy = settings.policy_for(country)
    permitted: list[str] = []
    withheld: dict[str, str] = {}
    for channel in CHANNELS:
        statement = consent.get(channel)
        status = statement.status if statement else UNKNOWN
        # The first reason that applies, lists first: they hold whatever consent says.
        if channel not in points:
            withheld[channel] = NO_CONTACT
        elif channel == "email" and suppression.unsubscribed:
            withheld[channel] = UNSUBSCRIBED
        elif channel in ("phone", "sms") and suppression.do_not_call:
            withheld[channel] = DO_NOT_CALL
        elif status in (DENIED, REVOKED):
            withheld[channel] = status
        elif channel in policy.opt_in and status == UNKNOWN:
            withheld[channel] = NO_CONSENT
        elif channel in policy.opt_in and statement and statement.pre_ticked:
            withheld[channel] = PRE_TICKED
        else:
            permitted.append(channel)
    return permitted, withheld


# Suppression lists, as kept in Redis (engine.store): members are ``email:<digest>``
# and ``phone:<digest>`` (the salted identifier digests of engine.identity, so the
# lists hold no address or number in clear and match a person's identifiers) and
# ``domain:<domain>``.
LISTS: Mapping[str, tuple[str, ...]] = {
    "unsubscribe": ("email",),
    "dnc": ("phone",),
    "blacklist": ("email", "phone", "domain"),
    "whitelist": ("email", "phone", "domain"),
}


class BadListEntry(ValueError):
    """A value that cannot go on a list, with the reason."""


def list_member(list_name: str, value: str, settings: IdentitySettings) -> str:
    """The stored form of ``value`` on ``list_name``; :class:`BadListEntry` if it cannot be.

    An e-mail address and a phone number are normalised as identity resolution
    normalises them, then digested; anything with no ``@`` and no digit-only
    form is a domain (blacklist and whitelist only).
    """
    kinds = LISTS.get(list_name)
    if kinds is None:
        raise BadListEntry(f"unknown list {list_name!r}; lists are {sorted(LISTS)}")
    text = value.strip()
    if "@" in text:
        kind, normal = "email", normalise_email(text, settings)
        if not EMAIL.fullmatch(normal):
            raise BadListEntry(f"{_masked(text)} is not an e-mail address")
    elif PHONE_LIKE.fullmatch(text):
        kind, normal = "phone", normalise_phone(text, settings.default_calling_code)
        if not normal:
            raise BadListEntry(f"{_masked(text)} has too few digits for a phone number")
    else:
        kind, normal = "domain", text.lower().lstrip("@")
        if not DOMAIN.fullmatch(normal):
            raise BadListEntry(f"{text!r} is not an e-mail address, phone number or domain")
    if kind not in kinds:
        raise BadListEntry(f"the {list_name} list takes {' or '.join(kinds)}, not a {kind}")
    if kind == "domain":
        return f"domain:{normal}"
    return f"{kind}:{digest(settings.salt, f'{kind}:{normal}')}"


def _masked(text: str) -> str:
    """Enough of a value to recognise it in an error, not enough to leak it."""
    return f"{text[:2]}***" if len(text) > 4 else "***"


def suppression_of(on_lists: Mapping[str, bool]) -> Suppression:
    """What list membership means: the whitelist outweighs the blacklist, nothing else."""
    return Suppression(
        unsubscribed=on_lists.get("unsubscribe", False),
        do_not_call=on_lists.get("dnc", False),
        blacklisted=on_lists.get("blacklist", False) and not on_lists.get("whitelist", False),
    )
