"""One-ID: which person an event belongs to.

Every identifier of an event (``userId``, e-mail, ``anonymousId``, alias
``previousId``) is reduced to a salted digest; Redis maps each digest to the
One-ID that owns it. The rules here are pure: given the owners the store
already knows, :func:`resolve` says which One-ID the event belongs to and which
identifiers it newly claims for that person.

One-IDs are derived, not random: a new person's One-ID is the digest of its
highest-priority identifier, so two workers that see the same new person at
once, or a replay after a crash, arrive at the same One-ID.

Foundation limit (the One-ID issue replaces it with real merges): when an
event's identifiers already belong to two different people, the event goes to
the owner of its highest-priority identifier, nothing is merged, and the
result is flagged ``conflict``.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from engine.events import Event

# Highest priority first: a userId is the strongest claim on a person.
PRIORITY = ("user", "email", "anon")


@dataclass(frozen=True, slots=True)
class Identifier:
    """One normalised identifier and its salted digest."""

    kind: str
    digest: str


@dataclass(frozen=True, slots=True)
class Resolution:
    """Which person an event belongs to and what it teaches the store."""

    one_id: str
    claims: tuple[Identifier, ...]
    conflict: bool = False


def normalise_email(email: str) -> str:
    """Trim and lower-case an e-mail address."""
    return email.strip().lower()


def digest(salt: str, text: str) -> str:
    """A salted 64-bit hex digest: stable, short, and not reversible by guessing."""
    return hashlib.blake2b(text.encode(), digest_size=8, key=salt.encode()[:64]).hexdigest()


def identifiers_of(event: Event, salt: str) -> tuple[Identifier, ...]:
    """The event's identifiers, de-duplicated, highest priority first."""
    raw: list[tuple[str, str]] = []
    if event.user_id:
        raw.append(("user", event.user_id))
    if event.email:
        raw.append(("email", normalise_email(event.email)))
    if event.anonymous_id:
        raw.append(("anon", event.anonymous_id))
    if event.previous_id:
        # Segment's alias: previousId is the id the person had before (usually a cookie).
        raw.append(("anon", event.previous_id))
    seen: set[str] = set()
    out = []
    for kind, value in raw:
        d = digest(salt, f"{kind}:{value}")
        if d not in seen:
            seen.add(d)
            out.append(Identifier(kind, d))
    return tuple(out)


def resolve(identifiers: tuple[Identifier, ...], owners: list[str | None]) -> Resolution:
    """Decide the One-ID for an event whose identifiers currently have ``owners``.

    Args:
        identifiers: from :func:`identifiers_of`, highest priority first (non-empty).
        owners: the One-ID owning each identifier, or None where unknown.
    """
    known = [o for o in owners if o is not None]
    one_id = known[0] if known else identifiers[0].digest
    claims = tuple(i for i, o in zip(identifiers, owners, strict=True) if o is None)
    return Resolution(one_id, claims, conflict=len(set(known)) > 1)
