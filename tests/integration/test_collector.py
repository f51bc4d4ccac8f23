"""`leadflow collect` with the trackers' own clients, a browser, bad requests and a lost broker."""

from __future__ import annotations

import functools
import gzip
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from engine.settings import Settings
from leadflow.collector import write_key_table
from leadflow.servers import LocalBroker, LocalRedis, free_port
from leadflow.topics import create_topics
from tests.conftest import local_settings
from tests.integration.flow import outputs, person_of, run_flow
from tests.integration.http_rig import http_server
from tests.integration.test_alerts import read_topic
from tests.integration.test_reliability import Blackout

EXAMPLES = Path(__file__).parents[2] / "examples"
KEYS = {"website": "lf_test_website_key", "crm": "lf_test_crm_key", "slow": "lf_test_slow_key"}
TABLES = [
    write_key_table("website", KEYS["website"]),
    write_key_table("crm", KEYS["crm"], topic="feedback"),
    write_key_table("slow", KEYS["slow"], rate_per_s=2),
]


@dataclass
class Collect:
    url: str

    def post(
        self, path: str, body: Any, key: str | None = "website", **headers: str
    ) -> httpx.Response:
        content = body if isinstance(body, bytes) else orjson.dumps(body)
        auth = (KEYS[key], "") if key else None
        return httpx.post(self.url + path, content=content, auth=auth, headers=headers, timeout=30)


@pytest.fixture
def collect(
    settings: Settings, broker: LocalBroker, redis_server: LocalRedis, tmp_path: Path
) -> Iterator[Collect]:
    with http_server("collect", tmp_path, broker.bootstrap, redis_server, TABLES) as server:
        yield Collect(server.url)


def events(settings: Settings, topic: str = "") -> list[dict[str, Any]]:
    return [
        {k: v for k, v in e.items() if k != "_headers"}
        for e in read_topic(settings, topic or settings.topics.events)
    ]


def test_segment_and_rudderstack_sdks_deliver_through_the_collector(
    collect: Collect, settings: Settings
) -> None:
    from rudderstack.analytics import Client as RudderClient
    from segment.analytics import Client as SegmentClient

    errors: list[Any] = []
    segment = SegmentClient(
        KEYS["website"], host=collect.url, sync_mode=True, on_error=lambda e, b: errors.append(e)
    )
    segment.identify("u-seg", {"email": "ana@acme.example", "title": "VP Marketing"})
    segment.group(
        "u-seg",
        "acme",
        {
            "name": "Acme",
            "employees": 400,
            "industry": "Software",
            "website": "https://acme.example",
        },
    )
    segment.track("u-seg", "Demo Requested", {"plan": "enterprise"})
    segment.page("u-seg", "Docs", "Pricing", {"path": "/pricing"})
    segment.screen("u-seg", "App", "Pricing")
    segment.alias("u-seg-old", "u-seg")
    rudder = RudderClient(
        KEYS["website"], host=collect.url, sync_mode=True, on_error=lambda e, b: errors.append(e)
    )  # gzip by default
    rudder.track("u-rudder", "Webinar Attended", {"webinar": "w1"})
    rudder.identify("u-rudder", {"email": "bo@beta.example"})
    trusted = SegmentClient(
        KEYS["crm"], host=collect.url, sync_mode=True, on_error=lambda e, b: errors.append(e)
    )
    trusted.track("u-seg", "manual_mql", {"actor": "sdr-ana"})
    assert errors == []

    got = events(settings)
    assert sorted((e["type"], e.get("userId")) for e in got) == sorted(
        [
            ("identify", "u-seg"),
            ("group", "u-seg"),
            ("track", "u-seg"),
            ("page", "u-seg"),
            ("screen", "u-seg"),
            ("alias", "u-seg"),
            ("track", "u-rudder"),
            ("identify", "u-rudder"),
        ]
    )
    for e in got:
        assert "writeKey" not in e and e["receivedAt"].endswith("Z")
        assert e["context"]["ip"] == "127.0.0.1"
        assert e["messageId"] and e["originalTimestamp"]
        # The client's clock and ours agree here: skew correction moves it by milliseconds.
        skew = abs(
            time.mktime(time.strptime(e["timestamp"][:19], "%Y-%m-%dT%H:%M:%S"))
            - time.mktime(time.strptime(e["receivedAt"][:19], "%Y-%m-%dT%H:%M:%S"))
        )
        assert skew <= 2
    (feedback,) = events(settings, settings.topics.feedback)
    assert (feedback["event"], feedback["userId"]) == ("manual_mql", "u-seg")

    run_flow(settings, 1)
    assert outputs(settings).dlq == []  # every event the collector took, the engine takes
    person = person_of(settings, {"userId": "u-seg"})
    assert person.stage == "mql"  # the trusted key's manual_mql
    assert (person.profile.company_size, person.profile.industry, person.profile.website) == (
        400,
        "software",
        "acme.example",
    )


def test_bad_requests_get_a_clear_4xx_and_produce_nothing(
    collect: Collect, settings: Settings
) -> None:
    good = {"type": "track", "event": "Demo Requested", "anonymousId": "a1", "messageId": "m1"}
    cases: list[tuple[httpx.Response, int, str]] = [
        (collect.post("/v1/track", good, key=None), 401, "unauthorized"),
        (
            httpx.post(
                collect.url + "/v1/track",
                content=orjson.dumps(good),
                auth=("lf_wrong", ""),
                timeout=10,
            ),
            401,
            "unauthorized",
        ),
        (
            collect.post("/v1/track", {**good, "writeKey": "lf_wrong"}, key=None),
            401,
            "unauthorized",
        ),
        (collect.post("/v1/track", b"{nope"), 400, "invalid_json"),
        (collect.post("/v1/track", [good]), 400, "not_an_object"),
        (collect.post("/v1/track", {**good, "pad": "x" * 40_000}), 413, "oversized"),
        (collect.post("/v1/batch", {"batch": [good] * 8000}), 413, "oversized"),
        (collect.post("/v1/track", {**good, "userId": {"id": 1}}), 400, "bad_field"),
        (collect.post("/v1/track", {"anonymousId": "a1"}), 400, "missing_event_name"),
        (
            collect.post("/v1/identify", {"traits": {"email": "x@y.example"}, "timestamp": "soon"}),
            400,
            "bad_timestamp",
        ),
        (collect.post("/v1/track", {**good, "event": "lead_accepted"}), 400, "untrusted_source"),
        (collect.post("/v1/batch", {"events": [good]}), 400, "not_a_batch"),
        (
            collect.post("/v1/track", b"\x1f\x8bnot gzip", **{"Content-Encoding": "gzip"}),
            400,
            "bad_encoding",
        ),
        (collect.post("/v1/video", good), 404, "not_found"),
    ]
    for response, status, error in cases:
        assert (response.status_code, response.json().get("error")) == (status, error), (
            response.text
        )
        assert response.json()["reason"]
    assert "not a trusted server-side key" in cases[10][0].json()["reason"]
    assert events(settings) == []

    mixed = collect.post(
        "/v1/batch",
        {"batch": [good, {**good, "type": "video"}, {**good, "messageId": "m3", "userId": []}]},
    )
    assert mixed.status_code == 200
    assert [(r["index"], r["error"]) for r in mixed.json()["rejected"]] == [
        (1, "unknown_type"),
        (2, "bad_field"),
    ]
    assert [e["messageId"] for e in events(settings)] == ["m1"]  # the good one went on


def test_gzip_cors_settings_and_rate_limits(collect: Collect, settings: Settings) -> None:
    body = gzip.compress(
        orjson.dumps(
            {"batch": [{"type": "page", "anonymousId": "g1", "properties": {"path": "/pricing"}}]}
        )
    )
    zipped = collect.post("/v1/batch", body, **{"Content-Encoding": "gzip"})
    assert zipped.status_code == 200 and zipped.json()["accepted"] == 1

    preflight = httpx.options(
        collect.url + "/v1/b",
        headers={
            "Origin": "https://www.acme.example",
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type",
        },
        timeout=10,
    )
    assert preflight.status_code == 204
    assert preflight.headers["access-control-allow-origin"] in ("*", "https://www.acme.example")

    cdn = httpx.get(f"{collect.url}/v1/projects/{KEYS['website']}/settings", timeout=10).json()
    host = collect.url.removeprefix("http://")
    assert cdn["integrations"]["Segment.io"] == {
        "apiKey": KEYS["website"],
        "apiHost": f"{host}/v1",
        "protocol": "http",
        "unbundledIntegrations": [],
        "addBundledMetadata": True,
    }
    for unknown in ("lf_nope", KEYS["crm"]):  # a server key is never handed to a browser
        assert httpx.get(f"{collect.url}/v1/projects/{unknown}/settings").status_code == 404

    batch = {"batch": [{"type": "track", "event": "x", "anonymousId": "r"}] * 5}
    assert collect.post("/v1/batch", batch, key="slow").status_code == 200  # into debt
    limited = collect.post("/v1/batch", batch, key="slow")
    assert limited.status_code == 429 and limited.json()["error"] == "rate_limited"
    assert int(limited.headers["Retry-After"]) >= 1
    assert len(events(settings)) == 1 + 5


def test_an_unreachable_broker_is_a_503_and_nothing_is_lost_once_it_is_back(
    tmp_path: Path, redis_server: LocalRedis
) -> None:
    proxy_port = free_port()
    with LocalBroker(advertised_port=proxy_port) as broker:
        assert isinstance(broker, LocalBroker)
        proxy = Blackout(proxy_port, broker.port)
        try:
            settings = local_settings(broker, redis_server)
            create_topics(settings, partitions=1)
            with http_server(
                "collect", tmp_path, f"127.0.0.1:{proxy_port}", redis_server, TABLES
            ) as server:
                c = Collect(server.url)
                event = {
                    "type": "track",
                    "event": "Demo Requested",
                    "anonymousId": "o1",
                    "messageId": "outage-1",
                }
                assert c.post("/v1/track", {**event, "messageId": "before"}).status_code == 200
                cut = threading.Thread(target=proxy.cut, args=(14.0,))
                cut.start()
                time.sleep(0.5)
                down = c.post("/v1/track", event)
                assert down.status_code == 503, down.text
                assert down.json()["error"] == "unavailable" and down.headers["Retry-After"]
                cut.join()
                deadline = time.monotonic() + 30
                while (again := c.post("/v1/track", event)).status_code == 503:
                    assert time.monotonic() < deadline, again.text
                    time.sleep(1)
                assert again.status_code == 200
            ids = [e["messageId"] for e in events(settings)]  # through the proxy: advertised
            assert ids.count("outage-1") == 1 and "before" in ids
        finally:
            proxy.close()


@pytest.fixture
def examples_page() -> Iterator[str]:
    """The example page and its node_modules, served as a site would (another origin)."""
    if shutil.which("chromium") is None:
        pytest.skip("chromium not on PATH: apt-get install chromium (.ci/run does)")
    bundle = EXAMPLES / "node_modules/@segment/analytics-next/dist/umd/index.js"
    assert bundle.exists(), "run `make examples/node_modules` (make test does)"

    class Quiet(SimpleHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            return None

    site = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(EXAMPLES)))
    threading.Thread(target=site.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{site.server_address[1]}/index.html"
    site.shutdown()
    site.server_close()


def test_analytics_next_in_headless_chromium_turns_a_visitor_into_an_mql(
    collect: Collect, settings: Settings, examples_page: str
) -> None:
    url = f"{examples_page}?collector={collect.url}&writeKey={KEYS['website']}&visit=demo"
    page = subprocess.run(
        [
            "chromium",
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--virtual-time-budget=30000",
            "--dump-dom",
            url,
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert '<p id="status">sent ' in page.stdout, page.stdout[-2000:] + page.stderr[-2000:]
    anonymous_id = page.stdout.split('<p id="status">sent ', 1)[1].split("<", 1)[0]
    got = events(settings)
    assert [(e["type"], e.get("event")) for e in got] == [
        ("page", None),
        ("identify", None),
        ("track", "Demo Requested"),
        ("track", "Webinar Attended"),
        ("track", "Contact Form Submitted"),
    ]
    assert {e["anonymousId"] for e in got} == {anonymous_id}
    assert all(e["messageId"].startswith("ajs-next-") for e in got)

    run_flow(settings, 1)
    (decision,) = outputs(settings).decisions.values()
    person = person_of(settings, {"anonymousId": anonymous_id})
    assert decision["one_id"] == person.one_id and person.stage == "mql"
    assert decision["lead"]["company_domain"] == "acme-analytics.example"
