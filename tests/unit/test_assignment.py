"""The SDR assignment rule (engine.routing.assign_lead) on its own, without a store.

tests/integration/test_routing.py checks that Redis' Lua twin chooses the same SDRs.
"""

from __future__ import annotations

from collections import Counter

from engine.routing import Assignment, Candidate, QueueBooks, assign_lead, release_lead


def sdr(name: str, weight: float = 1.0, available: bool = True, daily_cap: int = 0) -> Candidate:
    return Candidate(name, weight, available, daily_cap, 0, "2026-12-01", "2026-W49")


def ask(books: QueueBooks, n: int, *sdrs: Candidate, company: str = "") -> Counter[str | None]:
    """Assign ``n`` new decisions among ``sdrs``; who got how many."""
    start = len(books.assigned)
    return Counter(
        assign_lead(books, Assignment("inbound", f"d{start + i}", company, sdrs)) for i in range(n)
    )


def test_equal_sdrs_take_turns_and_weights_share_in_proportion() -> None:
    assert ask(QueueBooks(), 30, sdr("a"), sdr("b"), sdr("c")) == {"a": 10, "b": 10, "c": 10}
    assert ask(QueueBooks(), 40, sdr("a", 2), sdr("b"), sdr("c")) == {"a": 20, "b": 10, "c": 10}


def test_the_same_decision_asked_again_gets_the_same_sdr_and_counts_once() -> None:
    books = QueueBooks()
    request = Assignment("inbound", "d1", "", (sdr("a"), sdr("b")))
    assert assign_lead(books, request) == assign_lead(books, request) == "a"
    assert books.leads == {"a": 1, "b": 0}


def test_a_newcomer_starts_level_instead_of_taking_everything() -> None:
    books = QueueBooks()
    ask(books, 20, sdr("a"), sdr("b"))
    got = ask(books, 6, sdr("a"), sdr("b"), sdr("new"))
    assert got == {"a": 2, "b": 2, "new": 2}


def test_an_sdr_away_is_levelled_up_and_not_flooded_on_return() -> None:
    books = QueueBooks()
    ask(books, 10, sdr("a"), sdr("b", available=False))
    assert books.leads == {"a": 10, "b": 9}  # b kept level (with a before its lead) while away
    assert ask(books, 4, sdr("a"), sdr("b")) == {"a": 2, "b": 2}


def test_a_company_goes_to_its_owner_while_they_are_available() -> None:
    books = QueueBooks()
    first = ask(books, 1, sdr("a"), sdr("b"), company="acme.example")
    assert first == {"a": 1}
    assert ask(books, 3, sdr("a"), sdr("b"), company="acme.example") == {"a": 3}
    assert ask(books, 1, sdr("a", available=False), sdr("b"), company="acme.example") == {"b": 1}


def test_a_daily_cap_is_kept_and_then_nobody_can_take_the_lead() -> None:
    books = QueueBooks()
    got = ask(books, 5, sdr("a", daily_cap=2), sdr("b", daily_cap=1))
    assert got == {"a": 2, "b": 1, None: 2}


def test_a_release_gives_the_lead_back_once() -> None:
    books = QueueBooks()
    request = Assignment("inbound", "d1", "", (sdr("a", daily_cap=1), sdr("b")))
    assert assign_lead(books, request) == "a"
    assert release_lead(books, request, "a") and not release_lead(books, request, "a")
    assert books.leads["a"] == 0 and books.day_leads[("a", "2026-12-01")] == 0
    assert assign_lead(books, request) == "a"  # under the cap again


def test_a_lead_assigned_before_its_sdr_left_the_queue_is_still_given_back() -> None:
    """An earlier, unsaved attempt assigned the decision; the SDR has left the roster since."""
    books = QueueBooks()
    assert assign_lead(books, Assignment("inbound", "d1", "", (sdr("gone"), sdr("b")))) == "gone"
    now = Assignment("inbound", "d1", "", (sdr("b"),))
    assert assign_lead(books, now) == "gone"  # once per decision, whoever asks
    assert release_lead(books, now, "gone")
    assert books.leads["gone"] == 0 and "d1" not in books.assigned
