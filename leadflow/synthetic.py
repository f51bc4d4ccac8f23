"""A realistic synthetic click and form stream, for the demo, the tests and the benchmarks.

People arrive as anonymous cookies, browse (blog, product, customer stories,
pricing, careers), download white papers, attend webinars, identify themselves
in a form (company e-mail or a free mailbox, title in English or Chinese,
company size, country, phone), and some request a demo or start a trial. About
one in six is a hot lead that should qualify under the default model; one in
twenty-five is junk that cleansing must catch (a test account, a made-up phone
number, a disposable mailbox, a competitor). Journeys are interleaved the way a
site sees them. The stream is fully determined by the seed.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass

import orjson

_COMPANIES = (
    "acme",
    "globex",
    "initech",
    "umbrella",
    "hooli",
    "stark",
    "wayne",
    "tyrell",
    "cyberdyne",
    "soylent",
)
_FIRST = (
    "ana",
    "bruno",
    "carla",
    "diego",
    "elena",
    "fabio",
    "wei",
    "li",
    "mei",
    "jun",
    "sara",
    "tom",
)
_BLOG = ("/blog/lead-scoring-101", "/blog/routing-rules", "/blog/mql-vs-sql", "/blog/gdpr-consent")
_TITLES = (
    "CEO",
    "VP Sales",
    "Head of Marketing",
    "Marketing Manager",
    "Sales Operations Analyst",
    "销售总监",
    "市场部经理",
    "首席营销官",
    "Demand Generation Specialist",
    "Founder",
)
_COUNTRIES = ("US", "BR", "CN", "DE", "GB", "FR", "IN")
_INDUSTRIES = ("software", "financial services", "manufacturing", "retail", "education")
# What junk looks like, as (email, name, phone); each is caught by one cleansing rule.
_JUNK = (
    ("test@acme.example", "Test User", ""),
    ("jun.li@qq.com", "张三", ""),
    ("lead@mailinator.com", "Sam Doe", ""),
    ("ops@hubspot.com", "Competitor Research", ""),
    ("wei.chen@initech.example", "Wei Chen", "+86 133 3333 3333"),
    ("buyer@globex.example", "Pat Kim", "12345678"),
)


@dataclass(frozen=True)
class Persona:
    """A synthetic person and how keen a buyer they are."""

    index: int
    anonymous_id: str
    email: str
    kind: str  # "cold", "warm", "hot" or "junk"
    traits: dict[str, object]


def personas(people: int, seed: int) -> list[Persona]:
    """``people`` personas: about 56% cold, 25% warm, 15% hot, 4% junk."""
    rng = random.Random(seed)
    out = []
    for i in range(people):
        roll = rng.random()
        kind = (
            "junk" if roll < 0.04 else "hot" if roll < 0.19 else "warm" if roll < 0.44 else "cold"
        )
        first, company = rng.choice(_FIRST), rng.choice(_COMPANIES)
        domain = (
            f"{company}.example"
            if rng.random() < 0.8
            else rng.choice(("gmail.com", "qq.com", "163.com"))
        )
        traits: dict[str, object] = {
            "email": f"{first}.{i}@{domain}",
            "name": f"{first.title()} {company.title()}",
            "company": {
                "name": company.title(),
                "employee_count": rng.choice((8, 40, 150, 600, 5000)),
                "industry": rng.choice(_INDUSTRIES),
            },
            "title": rng.choice(_TITLES),
            "address": {"country": rng.choice(_COUNTRIES)},
        }
        if rng.random() < 0.5:
            traits["phone"] = f"+55 11 9{rng.randrange(10**7, 10**8)}"
        if kind == "junk":
            email, name, phone = rng.choice(_JUNK)
            traits.update(email=email, name=name, phone=phone)
        out.append(Persona(i, f"anon-{seed}-{i:06d}", str(traits["email"]), kind, traits))
    return out


def _journey(p: Persona, rng: random.Random) -> list[dict[str, object]]:
    def page(path: str) -> dict[str, object]:
        return {
            "type": "page",
            "name": path,
            "properties": {"path": path, "url": f"https://leadflow.example{path}"},
        }

    def track(name: str, **props: object) -> dict[str, object]:
        return {"type": "track", "event": name, "properties": props}

    identify: dict[str, object] = {"type": "identify", "traits": p.traits}
    steps: list[dict[str, object]] = [page("/")]
    steps += [page(rng.choice(_BLOG)) for _ in range(rng.randint(1, 4))]
    if p.kind == "cold":
        if rng.random() < 0.2:
            steps.append(page("/careers"))
        if rng.random() < 0.1:
            steps.append(track("Whitepaper Downloaded", title="State of B2B Leads"))
        return steps
    product = rng.choice(("analytics", "routing"))
    steps += [
        page(f"/product/{product}"),
        page(f"/customers/{rng.choice(_COMPANIES)}"),
        page("/pricing"),
    ]
    steps.append(identify)
    steps.append(track("Whitepaper Downloaded", title="Routing Playbook"))
    if rng.random() < 0.4:
        steps.append(track("Webinar Attended", webinar="Speed to Lead"))
    if p.kind in ("hot", "junk"):
        steps += [page("/pricing"), page("/pricing/enterprise")]
        steps.append(track("Webinar Attended", webinar="Live Demo"))
        closing = rng.choice(("Contact Form Submitted", "Trade Show Visited", "Trial Started"))
        steps.append(track(closing, product=product))
        steps.append(track("Demo Requested", plan=rng.choice(("enterprise", "team"))))
    return steps


def synthetic_events(people: int, seed: int = 7) -> Iterator[dict[str, object]]:
    """The interleaved events of ``people`` personas, without timestamps (set at send time)."""
    rng = random.Random(seed)
    journeys = []
    for p in personas(people, seed):
        steps = _journey(p, rng)
        for n, step in enumerate(steps):
            step["messageId"] = f"msg-{seed}-{p.index:06d}-{n:03d}"
            step["anonymousId"] = p.anonymous_id
            step.setdefault("context", {"campaign": {"source": "demo", "medium": "web"}})
        journeys.append(steps)
    active = [j for j in journeys if j]
    while active:
        j = rng.randrange(len(active))
        yield active[j].pop(0)
        if not active[j]:
            active[j] = active[-1]
            active.pop()


# Malformed input every real stream gets; each is rejected with the reason given.
MALFORMED: tuple[tuple[str, bytes], ...] = (
    ("invalid_json", b"{this is not json"),
    (
        "missing_message_id",
        orjson.dumps({"type": "track", "event": "Demo Requested", "anonymousId": "x"}),
    ),
    ("unknown_type", orjson.dumps({"type": "video", "messageId": "bad-1", "anonymousId": "x"})),
    (
        "untrusted_source",
        orjson.dumps({"type": "track", "event": "manual_mql", "messageId": "bad-2", "userId": "u"}),
    ),
    ("not_an_object", b"[1, 2, 3]"),
)
