"""One-ID: which person an event belongs to, and when two people are one.

Identifiers. Every identifier of an event is normalised and reduced to a
salted digest (kind + value): ``userId`` (kind ``user``), e-mail (trimmed,
lower-cased, ``+tag`` and Gmail-style dots folded as configured), phone
(E.164, the default calling code added when missing), ``anonymousId`` and an
``alias`` call's ``previousId`` (``anon``), and any kind declared in config
(a CRM id, a WeChat openid...) read from the paths it names. Each kind has a
priority (lower is stronger) and a limit: how many values of that kind one
person may hold (one ``userId``, five cookies by default), so one shared office
computer cannot glue a company into one person.

Resolution. One resolver decides, event after event, who each event belongs
to (:func:`resolve`): the *anchor* is the person owning its strongest identifier
that has an owner, or, if none has, a new person whose One-ID is derived from
its strongest identifier. A new identifier is attached if the kind's limit
allows; an identifier owned by someone else means the two are one person and
are merged, unless the merge would break a limit or join two different
``userId`` values; then it is refused and recorded instead.
"""

from __future__ import annotations

import functools
import hashlib
import re
import unicodedata
from collections import Counter
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from engine.events import Event
from engine.settings import IdentitySettings

_NON_DIGIT = re.compile(r"\D+")
_MIN_PHONE_DIGITS = 6


@dataclass(slots=True)  # not frozen: one per event, see engine.events.Event
class Identifier:
    """One normalised identifier and its salted digest."""

    kind: str
    digest: str


@functools.lru_cache(maxsize=65_536)
def digest(salt: str, text: str) -> str:
    """A salted 64-bit hex digest: stable, short, and not reversible by guessing.

    Remembered for the last 65,536 identifiers: a visitor's cookie comes back with
    most of their events, and the resolver and the lookups digest it each time.
    """
    return hashlib.blake2b(text.encode(), digest_size=8, key=salt.encode()[:64]).hexdigest()


def normalise_email(email: str, settings: IdentitySettings | None = None) -> str:
    """NFKC, trim and lower-case; fold ``+tag`` and Gmail-style dots when configured.

    NFKC folds width and compatibility variants (fullwidth ``a``, U+FF41, is
    ``a``), but look-alikes from other scripts (Cyrillic ``a``, U+0430) stay different mailboxes:
    folding them would let anyone take over a lead with a look-alike address.
    """
    email = unicodedata.normalize("NFKC", email).strip().lower()
    if settings is None or "@" not in email:
        return email
    local, _, domain = email.rpartition("@")
    if settings.fold_plus:
        local = local.split("+", 1)[0]
    if domain in settings.fold_dots_domains:
        local = local.replace(".", "")
    return f"{local}@{domain}"


def normalise_phone(phone: str, default_calling_code: str) -> str:
    """E.164 (``+<digits>``); '' when there are too few digits to be a number.

    ``+`` or ``00`` mark an international number; otherwise a national trunk
    ``0`` is dropped and the default calling code added.
    """
    text = phone.strip()
    digits = _NON_DIGIT.sub("", text)
    if len(digits) < _MIN_PHONE_DIGITS:
        return ""
    if text.startswith("+"):
        return "+" + digits
    if digits.startswith("00"):
        return "+" + digits[2:]
    return "+" + default_calling_code + digits.lstrip("0")


def _lookup(payload: dict[str, Any], dotted: str) -> Any:
    value: Any = payload
    for part in dotted.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value


def _trait(event: Event, key: str) -> Any:
    for holder in (event.payload.get("traits"), (event.payload.get("context") or {}).get("traits")):
        if isinstance(holder, dict) and holder.get(key) not in (None, ""):
            return holder[key]
    return None


def raw_identifiers(event: Event, settings: IdentitySettings) -> list[tuple[str, str]]:
    """The event's identifiers as normalised ``(kind, value)`` pairs, in no particular order."""
    found: list[tuple[str, str]] = []
    if event.user_id:
        found.append(("user", event.user_id))
    if event.email:
        found.append(("email", normalise_email(event.email, settings)))
    phone = _trait(event, "phone")
    if isinstance(phone, str) and (e164 := normalise_phone(phone, settings.default_calling_code)):
        found.append(("phone", e164))
    for anon in (event.anonymous_id, event.previous_id):
        if anon:
            found.append(("anon", anon))
    for kind in settings.kinds:
        for path in kind.paths:
            value = _lookup(event.payload, path)
            if isinstance(value, str | int) and not isinstance(value, bool) and str(value).strip():
                found.append((kind.name, str(value).strip()))
    return found


def identifiers_of(event: Event, settings: IdentitySettings) -> tuple[Identifier, ...]:
    """The event's identifiers, de-duplicated, strongest first."""
    rank = {k.name: k.priority for k in settings.kinds}
    seen: set[str] = set()
    out = []
    for kind, value in raw_identifiers(event, settings):
        if kind not in rank:
            continue
        d = digest(settings.salt, f"{kind}:{value}")
        if d not in seen:
            seen.add(d)
            out.append(Identifier(kind, d))
    out.sort(key=lambda i: rank[i.kind])
    return tuple(out)


def anchor(identifiers: Sequence[Identifier], owners: Sequence[str | None]) -> str:
    """The person an event goes to: its strongest owned identifier's owner, else a new One-ID."""
    for owner in owners:
        if owner is not None:
            return owner
    return identifiers[0].digest


def reborn_id(one_id: str, erased_ms: int) -> str:
    """The One-ID of a new person whose anchor identifier was erased at ``erased_ms``.

    A new person is named after their strongest identifier's digest; after an
    erasure that name may still belong to the erased person's tombstone, or to a
    person merged away under it. A person who comes back after an erasure is a
    new person with a name of their own (deterministic: every worker and every
    replay picks the same), never linked to who was erased.
    """
    return hashlib.blake2b(f"{one_id}:{erased_ms}".encode(), digest_size=8).hexdigest()


@dataclass(slots=True)  # not frozen: one per event, see engine.events.Event
class Resolution:
    """Who an event belongs to, and what it changes in the identity graph."""

    one_id: str  # the person the event goes to
    claims: tuple[Identifier, ...]  # identifiers nobody owned, now the person's
    merges: tuple[str, ...]  # people the event shows to be this one: absorbed into it
    refusals: tuple[tuple[str, str], ...]  # (other person, reason) merges refused
    over_limit: tuple[Identifier, ...]  # new identifiers a kind's limit kept out


def resolve(
    identifiers: Sequence[Identifier],
    owners: Sequence[str | None],
    held: Mapping[str, Collection[tuple[str, str]]],
    settings: IdentitySettings,
) -> Resolution:
    """Resolve one event: the person it belongs to, its new identifiers, its merges.

    Args:
        identifiers: the event's identifiers, strongest first.
        owners: their current owners (None: nobody's).
        held: ``(kind, digest)`` identifiers of every person named in ``owners``.
        settings: kinds, priorities and limits.

    The event goes to the :func:`anchor`, except that a new strongest identifier
    its anchor may not hold (a second ``userId`` on a shared computer) makes a new
    person, whose tie to the anchor is then refused. New identifiers are claimed
    within the kinds' limits; every other owner is merged into the person unless
    :func:`merge_refusal` objects.
    """
    limits = {k.name: k.limit for k in settings.kinds}

    def has_room(ids: Iterable[tuple[str, str]], kind: str) -> bool:
        return sum(1 for k, _ in ids if k == kind) < limits[kind]

    target = anchor(identifiers, owners)
    strongest = identifiers[0]
    if owners[0] is None and not has_room(held.get(target, ()), strongest.kind):
        target = strongest.digest
    trial = set(held.get(target, ()))
    claims, over = [], []
    for ident, owner in zip(identifiers, owners, strict=True):
        if owner is None and (ident.kind, ident.digest) not in trial:
            if has_room(trial, ident.kind):
                claims.append(ident)
                trial.add((ident.kind, ident.digest))
            else:
                over.append(ident)
    merges, refusals = [], []
    for other in dict.fromkeys(o for o in owners if o is not None and o != target):
        reason = merge_refusal(trial, held.get(other, ()), settings)
        if reason:
            refusals.append((other, reason))
        else:
            trial |= set(held.get(other, ()))
            merges.append(other)
    return Resolution(target, tuple(claims), tuple(merges), tuple(refusals), tuple(over))


def merge_refusal(
    survivor: Iterable[tuple[str, str]],
    absorbed: Iterable[tuple[str, str]],
    settings: IdentitySettings,
) -> str:
    """Why two people's identifiers cannot be one person's ('' when they can).

    Reasons: ``conflicting_user_id`` (two different ``userId`` values) and
    ``identifier_limit`` (more values of a kind than its limit).
    """
    a, b = set(survivor), set(absorbed)
    users = {d for kind, d in a | b if kind == "user"}
    if len(users) > 1:
        return "conflicting_user_id"
    limits = {k.name: k.limit for k in settings.kinds}
    counts = Counter(kind for kind, _ in a | b)
    if any(counts[kind] > limits.get(kind, 0) for kind in counts):
        return "identifier_limit"
    return ""
