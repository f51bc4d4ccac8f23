"""A realistic synthetic click and form stream, for the demo, the tests and the benchmarks.

People arrive as anonymous cookies, browse (blog, product, customer stories,
pricing, careers), download white papers, attend webinars, identify themselves
with a company e-mail in a form, and some request a demo. About one in six is
a hot lead that should qualify under the default scoring model. Journeys are
interleaved the way a site sees them. The stream is fully determined by the
seed, so a run can be repeated exactly.
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


@dataclass(frozen=True)
class Persona:
    """A synthetic person and how keen a buyer they are."""

    index: int
    anonymous_id: str
    email: str
    kind: str  # "cold", "warm" or "hot"


def personas(people: int, seed: int) -> list[Persona]:
    """``people`` personas: about 60% cold, 25% warm, 15% hot."""
    rng = random.Random(seed)
    out = []
    for i in range(people):
        roll = rng.random()
        kind = "hot" if roll < 0.15 else "warm" if roll < 0.40 else "cold"
        email = f"{rng.choice(_FIRST)}.{i}@{rng.choice(_COMPANIES)}.example"
        out.append(Persona(i, f"anon-{seed}-{i:06d}", email, kind))
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

    identify: dict[str, object] = {
        "type": "identify",
        "traits": {"email": p.email, "company": p.email.split("@")[1].split(".")[0]},
    }
    steps: list[dict[str, object]] = [page("/")]
    steps += [page(rng.choice(_BLOG)) for _ in range(rng.randint(1, 4))]
    if p.kind == "cold":
        if rng.random() < 0.2:
            steps.append(page("/careers"))
        if rng.random() < 0.1:
            steps.append(track("Whitepaper Downloaded", title="State of B2B Leads"))
        return steps
    steps += [page("/product"), page(f"/customers/{rng.choice(_COMPANIES)}"), page("/pricing")]
    steps.append(identify)
    steps.append(track("Whitepaper Downloaded", title="Routing Playbook"))
    if rng.random() < 0.4:
        steps.append(track("Webinar Attended", webinar="Speed to Lead"))
    if p.kind == "hot":
        steps += [
            page("/pricing"),
            page("/pricing/enterprise"),
            track("Webinar Attended", webinar="Live Demo"),
        ]
        steps.append(
            track(rng.choice(("Demo Requested", "Contact Form Submitted", "Trade Show Visited")))
        )
        steps.append(track("Demo Requested", plan="enterprise"))
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
    ("unknown_type", orjson.dumps({"type": "screen", "messageId": "bad-1", "anonymousId": "x"})),
    (
        "untrusted_source",
        orjson.dumps({"type": "track", "event": "manual_mql", "messageId": "bad-2", "userId": "u"}),
    ),
    ("not_an_object", b"[1, 2, 3]"),
)
