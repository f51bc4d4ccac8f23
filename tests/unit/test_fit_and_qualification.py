from __future__ import annotations

from typing import Any

import pytest

from engine.events import Event
from engine.fit import FitModel
from engine.profile import Profile, merge_traits, present_fields, traits_of
from engine.qualification import is_mql
from engine.settings import QualificationSettings, Settings, load_settings


@pytest.fixture(scope="module")
def settings() -> Settings:
    return load_settings(env={})


def identify(traits: dict[str, Any], t_ms: int = 1_000, email: str = "") -> Event:
    return Event(
        type="identify",
        message_id="m",
        event_ms=t_ms,
        ingested_ms=t_ms,
        anonymous_id="a",
        email=email or str(traits.get("email", "")),
        payload={"traits": traits},
    )


def profile_of(settings: Settings, *events: Event) -> Profile:
    fit = FitModel(settings.fit)
    p = Profile()
    for e in events:
        traits = traits_of(e)
        assert traits is not None
        merge_traits(
            p,
            traits,
            e.event_ms,
            cleansing=settings.cleansing,
            levels=fit.levels,
            valid_phone=False,
        )
    return p


@pytest.mark.parametrize(
    ("title", "level"),
    [
        ("CEO", "c_level"),
        ("Chief Revenue Officer", "c_level"),
        ("首席营销官", "c_level"),
        ("总经理", "c_level"),
        ("VP Sales", "vp"),
        ("销售副总裁", "vp"),
        ("副总经理", "vp"),
        ("Vice President, Sales", "vp"),
        ("President", "c_level"),
        ("Head of Marketing", "director"),
        ("市场总监", "director"),
        ("Marketing Manager", "manager"),
        ("销售经理", "manager"),
        ("Sales Operations Analyst", "individual"),
        ("软件工程师", "individual"),
        ("Intern", "other"),
    ],
)
def test_title_seniority_in_english_and_chinese(settings: Settings, title: str, level: str) -> None:
    assert profile_of(settings, identify({"title": title})).title_level == level


def test_fit_adds_up_the_traits_with_reasons(settings: Settings) -> None:
    p = profile_of(
        settings,
        identify(
            {
                "email": "ana@acme.example",
                "title": "VP Marketing",
                "company": {"name": "Acme", "employee_count": 600, "industry": "Software"},
                "address": {"country": "br"},
                "bant_budget": "yes",
                "bant": {"timing": True},
            }
        ),
    )
    score, factors = FitModel(settings.fit).score(p)
    as_dict = {f.factor: f.points for f in factors}
    assert as_dict == {
        "company_email": 15,
        "title:vp": 20,
        "company_size:201-1000": 15,
        "country:BR": 5,
        "industry:software": 10,
        "has:company_name": 5,
        "has:company_email": 5,
        "has:title": 5,
        "has:company_size": 5,
        "bant:budget": 5,
        "bant:timing": 5,
    }
    assert score == sum(as_dict.values())
    assert factors[0].factor == "title:vp"  # largest first


def test_a_free_mailbox_is_not_a_company_email(settings: Settings) -> None:
    p = profile_of(settings, identify({"email": "li.wei@qq.com"}))
    assert p.email_kind == "free" and "company_email" not in present_fields(p)
    score, _ = FitModel(settings.fit).score(p)
    assert score == 0


def test_newer_facts_win_and_older_ones_only_fill_gaps(settings: Settings) -> None:
    p = profile_of(
        settings,
        identify({"title": "Marketing Manager"}, t_ms=2_000),
        identify({"title": "CEO", "address": {"country": "DE"}}, t_ms=1_000),  # late and older
    )
    assert p.title_level == "manager" and p.country == "DE" and p.updated_ms == 2_000


def test_no_personal_data_is_kept_in_the_profile(settings: Settings) -> None:
    p = profile_of(
        settings,
        identify({"email": "ana@acme.example", "name": "Ana Souza", "phone": "+5511912345678"}),
    )
    assert "Ana" not in repr(p) and "5511" not in repr(p) and p.email_domain == "acme.example"


RULE = QualificationSettings(min_fit=25, required_fields=("company_email",))
THRESHOLDS = {"": 100.0, "analytics": 60.0}


@pytest.mark.parametrize(
    ("scores", "fit", "present", "dq", "qualified", "on", "blocked_by"),
    [
        ({"": 120.0}, 30, ["company_email"], False, True, ("total",), ""),
        ({"": 40.0, "analytics": 65.0}, 30, ["company_email"], False, True, ("analytics",), ""),
        ({"": 120.0}, 30, ["company_email"], True, False, ("total",), "disqualified"),
        ({"": 99.9}, 90, ["company_email"], False, False, (), "behavior_below_threshold"),
        ({"": 120.0}, 24.9, ["company_email"], False, False, ("total",), "fit_below_minimum"),
        ({"": 120.0}, 30, ["mobile"], False, False, ("total",), "missing_fields"),
    ],
)
def test_the_mql_rule(
    scores: dict[str, float],
    fit: float,
    present: list[str],
    dq: bool,
    qualified: bool,
    on: tuple[str, ...],
    blocked_by: str,
) -> None:
    verdict = is_mql(scores, THRESHOLDS, lambda: fit, present, dq, RULE)
    assert (verdict.qualified, verdict.on, verdict.blocked_by) == (qualified, on, blocked_by)


def test_event_properties_are_never_read_as_person_traits(settings: Settings) -> None:
    """A webinar called "Test drive" must not make its attendee a test account."""
    from engine.person import PersonState, Rulebook, apply_event

    rules = Rulebook(settings)
    webinar = Event(
        type="track",
        message_id="m",
        event_ms=1,
        ingested_ms=1,
        name="Webinar Attended",
        anonymous_id="a",
        payload={"properties": {"name": "Test drive", "title": "Routing Playbook"}},
    )
    p = PersonState("p", is_new=True)
    apply_event(p, webinar, rules, 1)
    assert p.stage == "lead" and p.profile.title_level == ""
    assert traits_of(webinar) is None


def test_a_grade_is_a_fit_band_and_an_engagement_band_with_its_reasons() -> None:
    from engine.grade import lead_grade
    from engine.settings import GradeSettings

    bands = GradeSettings()
    assert lead_grade(85, 160, bands).code == "A1"
    assert lead_grade(70, 149.9, bands).code == "A2"  # a minimum is reached at equality
    assert lead_grade(44.9, 50, bands).code == "C3"
    assert lead_grade(0, -20, bands).code == "D4"  # penalties below 0: still the lowest band
    assert lead_grade(50, 120, bands).explained(50, 120) == {
        "fit": {"score": 50, "band": "B", "minimum": 45.0},
        "engagement": {"score": 120, "band": "2", "minimum": 100.0},
    }
