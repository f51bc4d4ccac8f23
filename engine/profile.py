"""A person's profile: the facts fit and qualification need, read from event traits.

Leadflow stores *facts* about a person, not the raw personal data they came
from: whether a company name was given, the e-mail's domain and whether it is a
company or free mailbox, whether a usable mobile number was given, the title's
seniority level, company size, country, industry and which BANT questions were
answered. Names, e-mail addresses and phone numbers are read from the event,
checked, and not kept.

Where traits come from (first found wins): ``traits`` (identify calls), then
``context.traits`` (any call), as the Segment spec puts them. Never from
``properties``: those describe the event, and a white paper's ``title`` or a
webinar's ``name`` must not be read as a job title or a person's name. Form
backends send an ``identify`` call, or the form's fields in ``context.traits``.
Recognised keys:

=================  ==========================================================
``company``        a name, or Segment's object ``{name, employee_count, industry}``
``company_name``   a name
``title``          job title (``job_title`` too)
``phone``          phone number (``mobile`` too)
``employees``      company size (``employee_count``, ``company.employee_count``)
``country``        ISO 3166 alpha-2 (``address.country`` too)
``industry``       free text, compared lower-cased (``company.industry`` too)
``website``        the company's website: its domain is kept (``company.website`` too)
``bant_budget``... BANT answers: true/"yes"/1 (or an object ``bant: {budget: ...}``)
``name``           full name (``firstName``/``lastName``), only for cleansing
=================  ==========================================================

A ``group`` call's ``traits`` describe the person's company (Segment's ``name``,
``employees``, ``industry``, ``website``), read as ``company.*`` above; its
``context.traits`` are the person's (:func:`company_traits`).

Newer facts win: a fact from an event older than the profile's last update only
fills a gap, so replays and late events cannot roll a profile back.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from engine.events import Event
from engine.settings import BANT, CleansingSettings

_TRUE = {"true", "yes", "y", "1", "是"}
# Top-level keys that carry traits: a source with none of them is skipped at once
# (most events are page views and clicks that say nothing about the person).
_TRAIT_KEYS = frozenset(
    {
        "company",
        "company_name",
        "title",
        "job_title",
        "phone",
        "mobile",
        "employees",
        "employee_count",
        "address",
        "country",
        "industry",
        "website",
        "name",
        "firstName",
        "first_name",
        "lastName",
        "last_name",
        "bant",
        "bant_budget",
        "bant_authority",
        "bant_need",
        "bant_timing",
    }
)
_DIGITS = re.compile(r"\D+")


@dataclass(slots=True)
class Profile:
    """Facts about a person (stored)."""

    updated_ms: int = 0
    company_name: bool = False
    email_domain: str = ""
    email_kind: str = ""  # "company" or "free"
    mobile: bool = False
    title_level: str = ""  # a seniority level name, or "other"
    company_size: int = 0
    country: str = ""
    industry: str = ""
    website: str = ""  # the company's domain (a group call's website), for the alert
    bant: list[str] = field(default_factory=list)


def lead_summary(profile: Profile) -> dict[str, Any]:
    """Who the lead is, as far as the engine knows without personal data: for the alert.

    The engine keeps no names or addresses (identifiers are digests), so an SDR's
    alert says the company (its e-mail domain, when a company address), size,
    industry, country and seniority; the CRM link of the queue opens the rest.
    """
    return {
        "company_domain": profile.email_domain
        if profile.email_kind == "company"
        else profile.website,
        "company_size": profile.company_size or None,
        "industry": profile.industry,
        "country": profile.country,
        "seniority": profile.title_level,
    }


FACTS = (
    "company_name",
    "email_domain",
    "email_kind",
    "mobile",
    "title_level",
    "company_size",
    "country",
    "industry",
    "website",
)


@dataclass(slots=True)  # not frozen: one per event, see engine.events.Event
class Traits:
    """What one event says about its person, raw (checked by cleansing, then reduced to facts)."""

    name: str = ""
    email: str = ""
    phone: str = ""
    company_name: str = ""
    title: str = ""
    company_size: int = 0
    country: str = ""
    industry: str = ""
    website: str = ""  # the company's domain, from its website
    bant: tuple[str, ...] = ()


def company_traits(group_traits: Any) -> dict[str, Any] | None:
    """A ``group`` call's traits (they describe the company) in the shape of a person's.

    Segment's group traits: ``name``, ``employees``, ``industry``, ``website``. The
    person's own traits, if any, come in ``context.traits``.
    """
    if not isinstance(group_traits, dict):
        return None
    company = {
        "name": group_traits.get("name"),
        "employee_count": group_traits.get("employees"),
        "industry": group_traits.get("industry"),
    }
    return {"company": company, "website": group_traits.get("website")}


def traits_of(event: Event) -> Traits | None:
    """Read the traits an event carries; None when it carries none (most events)."""
    p = event.payload
    context = p.get("context")
    own = company_traits(p.get("traits")) if event.type == "group" else p.get("traits")
    candidates = [own, context.get("traits") if isinstance(context, dict) else None]
    sources = [s for s in candidates if isinstance(s, dict) and not _TRAIT_KEYS.isdisjoint(s)]
    if not sources:
        return Traits(email=event.email) if event.email else None

    def first(*keys: str) -> Any:
        for source in sources:
            for key in keys:
                value: Any = source
                for part in key.split("."):
                    value = value.get(part) if isinstance(value, dict) else None
                if value not in (None, ""):
                    return value
        return None

    company = first("company")
    company_name = company if isinstance(company, str) else first("company.name", "company_name")
    name = first("name")
    if not isinstance(name, str):
        parts = [first("firstName", "first_name"), first("lastName", "last_name")]
        name = " ".join(x for x in parts if isinstance(x, str))
    bant_obj = first("bant")
    bant = tuple(
        q
        for q in BANT
        if _truthy(first(f"bant_{q}")) or (isinstance(bant_obj, dict) and _truthy(bant_obj.get(q)))
    )
    return Traits(
        name=_text(name),
        email=event.email,
        phone=_text(first("phone", "mobile")),
        company_name=_text(company_name),
        title=_text(first("title", "job_title")),
        company_size=_count(first("company.employee_count", "employees", "employee_count")),
        country=_text(first("address.country", "country")).upper(),
        industry=_text(first("company.industry", "industry")).lower(),
        website=website_domain(first("website", "company.website")),
        bant=bant,
    )


def _truthy(value: Any) -> bool:
    return value is True or (isinstance(value, int | str) and str(value).strip().lower() in _TRUE)


def _text(value: Any) -> str:
    return value.strip()[:200] if isinstance(value, str) else ""


# No company has more employees; larger counts are junk (and would not fit the
# 64-bit integers of the stored state).
MAX_EMPLOYEES = 10_000_000


def _count(value: Any) -> int:
    """An employee count from a number or digits; 0 for anything else or implausible."""
    if isinstance(value, bool):
        return 0
    if isinstance(value, str) and value.strip().isdigit() and len(value.strip()) <= 9:
        value = int(value.strip())
    if isinstance(value, int | float) and 0 < value <= MAX_EMPLOYEES:
        return int(value)
    return 0


def website_domain(value: Any) -> str:
    """The lower-cased host of a website ("https://www.acme.com/x" -> "acme.com"), or ''."""
    if not isinstance(value, str) or not value.strip():
        return ""
    host = value.strip().lower().split("://", 1)[-1].split("/", 1)[0].split(":", 1)[0]
    host = host.removeprefix("www.")
    return host[:200] if "." in host else ""


def email_domain(email: str) -> str:
    """The lower-cased domain of an e-mail address ('' if none)."""
    return email.rpartition("@")[2].strip().lower() if "@" in email else ""


def phone_digits(phone: str) -> str:
    """The digits of a phone number, without an international prefix (+, 00)."""
    digits = _DIGITS.sub("", phone)
    return digits[2:] if phone.strip().startswith("00") else digits


def title_level(title: str, levels: list[tuple[str, re.Pattern[str]]]) -> str:
    """The first seniority level whose patterns match the title; "other" when none does."""
    if not title:
        return ""
    for name, pattern in levels:
        if pattern.search(title):
            return name
    return "other"


def merge_traits(
    profile: Profile,
    traits: Traits,
    event_ms: int,
    *,
    cleansing: CleansingSettings,
    levels: list[tuple[str, re.Pattern[str]]],
    valid_phone: bool,
) -> None:
    """Fold an event's traits into the profile (mutated); newer facts win."""
    newer = event_ms >= profile.updated_ms
    domain = email_domain(traits.email)
    facts: dict[str, Any] = {
        "company_name": bool(traits.company_name) or None,
        "email_domain": domain or None,
        "email_kind": ("free" if domain in cleansing.free_mail_domains else "company")
        if domain
        else None,
        "mobile": valid_phone or None,
        "title_level": title_level(traits.title, levels) or None,
        "company_size": traits.company_size or None,
        "country": traits.country or None,
        "industry": traits.industry or None,
        "website": traits.website or None,
    }
    changed = False
    for name, value in facts.items():
        if value is not None and (newer or not getattr(profile, name)):
            setattr(profile, name, value)
            changed = True
    for answer in traits.bant:
        if answer not in profile.bant:
            profile.bant.append(answer)
            changed = True
    if changed and newer:
        profile.updated_ms = event_ms


def merge_profiles(into: Profile, other: Profile) -> None:
    """Fold ``other`` into ``into`` (mutated): the newer profile's facts win, the older fills in."""
    newer, older = (other, into) if other.updated_ms > into.updated_ms else (into, other)
    for name in FACTS:
        setattr(into, name, getattr(newer, name) or getattr(older, name))
    into.bant = [*into.bant, *(a for a in other.bant if a not in into.bant)]
    into.updated_ms = newer.updated_ms


def present_fields(profile: Profile) -> list[str]:
    """Which of the MQL fields the person has given."""
    present = {
        "company_name": profile.company_name,
        "company_email": profile.email_kind == "company",
        "mobile": profile.mobile,
        "title": bool(profile.title_level),
        "company_size": profile.company_size > 0,
    }
    return [name for name, ok in present.items() if ok]
