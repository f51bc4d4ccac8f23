from __future__ import annotations

from engine.events import Event
from engine.identity import Identifier, digest, identifiers_of, normalise_email, resolve

SALT = "test-salt"


def event(
    anonymous_id: str = "", email: str = "", user_id: str = "", previous_id: str = ""
) -> Event:
    return Event(
        type="identify",
        message_id="m",
        event_ms=0,
        ingested_ms=0,
        anonymous_id=anonymous_id,
        email=email,
        user_id=user_id,
        previous_id=previous_id,
    )


def test_identifiers_are_normalised_ordered_by_priority_and_deduplicated() -> None:
    ids = identifiers_of(
        event(anonymous_id="c1", email=" Ana@ACME.example ", user_id="u1", previous_id="c1"), SALT
    )
    assert [i.kind for i in ids] == ["user", "email", "anon"]
    assert ids[1].digest == digest(SALT, "email:ana@acme.example")
    assert normalise_email("  X@Y.Example ") == "x@y.example"


def test_digests_are_salted() -> None:
    assert digest("a", "email:x@y.example") != digest("b", "email:x@y.example")


def test_a_new_person_gets_the_digest_of_its_strongest_identifier() -> None:
    ids = (Identifier("email", "e1"), Identifier("anon", "c1"))
    r = resolve(ids, [None, None])
    assert r.one_id == "e1" and r.claims == ids and not r.conflict


def test_new_identifiers_join_the_known_person() -> None:
    ids = (Identifier("email", "e1"), Identifier("anon", "c1"))
    r = resolve(ids, [None, "P"])
    assert r.one_id == "P" and r.claims == (ids[0],)


def test_two_known_people_are_a_conflict_resolved_by_priority() -> None:
    ids = (Identifier("email", "e1"), Identifier("anon", "c1"))
    r = resolve(ids, ["P1", "P2"])
    assert r.one_id == "P1" and r.claims == () and r.conflict
