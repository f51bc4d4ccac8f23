"""`leadflow api` as a process: keys and scopes, bad bodies, feedback through to the engine."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import orjson
import pytest
from openapi_spec_validator import validate

from engine.settings import Settings
from leadflow.api import OPENAPI, key_table
from leadflow.endpoints import new_key
from leadflow.servers import LocalBroker, LocalRedis
from leadflow.web import create_app
from tests.integration.flow import hot_lead, run_flow, send
from tests.integration.http_rig import http_server
from tests.integration.test_alerts import read_topic

KEYS = {"reader": ["read"], "pii": ["read", "read_pii"], "tool": ["feedback"]}


@dataclass
class Api:
    url: str
    keys: dict[str, str]  # holder -> key

    def get(self, path: str, holder: str | None = None) -> httpx.Response:
        return httpx.get(self.url + path, headers=self.auth(holder), timeout=30)

    def post(self, path: str, body: object, holder: str | None = "tool") -> httpx.Response:
        content = body if isinstance(body, bytes) else orjson.dumps(body)
        return httpx.post(self.url + path, content=content, headers=self.auth(holder), timeout=30)

    def auth(self, holder: str | None) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.keys[holder]}"} if holder else {}


@pytest.fixture
def api(
    settings: Settings, broker: LocalBroker, redis_server: LocalRedis, tmp_path: Path
) -> Iterator[Api]:
    keys = {holder: new_key() for holder in KEYS}
    tables = [key_table(holder, keys[holder], scopes) for holder, scopes in KEYS.items()]
    with http_server("api", tmp_path, broker.bootstrap, redis_server, tables) as server:
        yield Api(server.url, keys)


def test_the_openapi_document_is_valid_and_lists_every_route(api: Api, settings: Settings) -> None:
    served = api.get("/openapi.json").json()
    assert served == orjson.loads(orjson.dumps(OPENAPI))
    validate(served)
    app = create_app(settings)
    routes = {r.resource.canonical for r in app.router.routes() if r.resource} - {"/metrics"}
    assert set(served["paths"]) == routes


def test_keys_and_scopes_are_enforced_with_reasons(api: Api) -> None:
    event = {"type": "track", "event": "lead_accepted", "userId": "u1"}
    cases = [
        (api.post("/v1/feedback", event, holder=None), 401, "Authorization: Bearer"),
        (api.post("/v1/feedback", event, holder="reader"), 403, "lacks the 'feedback' scope"),
        (api.get("/v1/leads/u1", holder="tool"), 403, "lacks the 'read' scope"),
        (api.get("/v1/queues/inbound"), 401, "Authorization: Bearer"),
    ]
    api.keys["forged"] = api.keys["pii"] + "x"
    cases.append((api.get("/v1/leads/u1", holder="forged"), 401, "unknown API key"))
    for response, status, reason in cases:
        assert response.status_code == status
        assert reason in response.json()["reason"]
        assert response.json()["error"] in ("unauthorized", "forbidden")
    missing = api.get("/v1/nothing", holder="reader")
    assert missing.status_code == 404 and missing.json()["error"] == "not_found"


def test_bad_feedback_bodies_get_a_clear_4xx_and_produce_nothing(
    api: Api, settings: Settings
) -> None:
    cases = [
        (b"{not json", 400, "invalid_json"),
        (b"[1, 2]", 400, "not_an_object"),
        ({"type": "track", "event": "Demo Requested", "userId": "u1"}, 400, "not_feedback"),
        ({"type": "identify", "userId": "u1"}, 400, "not_feedback"),
        ({"type": "track", "event": "lead_accepted"}, 400, "no_identifier"),
        (
            {"type": "track", "event": "won", "userId": "u1", "timestamp": "soon"},
            400,
            "bad_timestamp",
        ),
        ({"type": "track", "event": "won", "userId": "u1", "properties": []}, 400, "bad_field"),
        (
            b'{"type": "track", "event": "won", "userId": "' + b"x" * 40_000 + b'"}',
            413,
            "oversized",
        ),
    ]
    for body, status, error in cases:
        response = api.post("/v1/feedback", body)
        assert (response.status_code, response.json()["error"]) == (status, error), response.text
        assert response.json()["reason"]
    assert read_topic(settings, settings.topics.feedback) == []


def test_feedback_over_http_moves_the_lead_and_the_lookups_show_it(
    api: Api, settings: Settings, broker: LocalBroker
) -> None:
    send(settings, hot_lead("api-lead"))
    run_flow(settings, 1)
    accepted = api.post(
        "/v1/feedback",
        {
            "type": "track",
            "event": "lead_accepted",
            "anonymousId": "api-lead",
            "properties": {"actor": "sdr-ana"},
        },
    )
    assert accepted.status_code == 202, accepted.text
    assert accepted.json()["actor"] == "tool/sdr-ana"
    (record,) = read_topic(settings, settings.topics.feedback)
    assert record["properties"]["actor"] == "tool/sdr-ana"
    assert record["messageId"] == accepted.json()["messageId"]
    run_flow(settings, 1)

    lead = api.get("/v1/leads/anon:api-lead", holder="reader")
    assert lead.status_code == 200, lead.text
    assert lead.json()["stage"] == "sal"
    assert lead.json()["identifier"] == "anon:***"
    assert all("value" not in i for i in lead.json()["identifiers"])
    clear = api.get("/v1/leads/api-lead@api-lead.example", holder="pii").json()
    assert clear["identifier"] == "email:api-lead@api-lead.example"
    assert {"kind": "email", "value": "api-lead@api-lead.example"}.items() <= next(
        i for i in clear["identifiers"] if "value" in i
    ).items()
    assert api.get("/v1/leads/nobody@nowhere.example", holder="reader").status_code == 404

    queue = api.get("/v1/queues/inbound", holder="reader").json()
    assert [s["sdr"] for s in queue["sdrs"]] == ["sdr-ana", "sdr-bruno", "sdr-chen"]
    assert sum(s["assigned"] for s in queue["sdrs"]) == 1
    assert api.get("/v1/queues/nope", holder="reader").status_code == 404

    scraped = httpx.get(api.url + "/metrics", timeout=10).text
    assert 'leadflow_api_requests_total{route="/v1/feedback",status="202"} 1.0' in scraped

    broker.stop()  # the broker is gone: not acknowledged, so not accepted
    down = api.post("/v1/feedback", {"type": "track", "event": "won", "userId": "u2"})
    assert down.status_code == 503 and down.headers["Retry-After"] == "5"
    assert down.json()["error"] == "unavailable"
