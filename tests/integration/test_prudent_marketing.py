"""Prudent marketing and security through the real dataflow, broker and Redis.

Consent per channel and country, suppression lists managed with ``leadflow
lists``, the untrusted events topic, the per-person rate limit, PII kept out of
logs, and Redis AUTH with a password-protected server.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import redis

from engine.settings import Settings
from leadflow.cli import main as leadflow
from leadflow.servers import LocalBroker, LocalRedis
from leadflow.topics import create_topics
from tests.conftest import local_settings
from tests.integration.flow import hot_lead, outputs, page, run_flow, send, track

PHONE = "+1 415 555 0134"


def buyer(anon: str, *, country: str = "US", consent: Any = None, **traits: Any) -> list[Any]:
    """A hot lead (105 points, fit 25) whose identify says where they are and what they allow."""
    events = hot_lead(anon)
    identify = events[0]["traits"]
    identify["country"] = country
    identify.update(traits)
    if consent is not None:
        identify["consent"] = consent
    return events


def lists(settings: Settings, *args: str) -> None:
    """``leadflow lists ...`` against the test's Redis."""
    env = {"LEADFLOW_REDIS_URL": settings.redis.url}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        assert leadflow(["lists", *args]) == 0
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    """``leadflow ARGS`` in a process of its own: its exit code and output, for the test."""
    command = [sys.executable, "-m", "leadflow.cli", *args]
    return subprocess.run(
        command, env=env, capture_output=True, text=True, timeout=120, check=False
    )


def decisions_by_anon(seen: Any) -> dict[str, dict[str, Any]]:
    return {d["trigger"]["message_id"].rsplit("-", 1)[0]: d for d in seen.decisions.values()}


def test_consent_suppression_and_trust_decide_the_channels(
    settings: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    lists(settings, "add", "dnc", "+1 (415) 555-0134")
    lists(settings, "add", "blacklist", "spam.example", "partner.example")
    lists(settings, "add", "whitelist", "vip@partner.example")
    lists(settings, "add", "unsubscribe", "gone@gone.example")
    capsys.readouterr()
    lists(settings, "check", "+14155550134", "nobody@nowhere.example", "spam.example")
    lists(settings, "show")
    shown = capsys.readouterr().out
    assert "value 1: dnc\nvalue 2: on no list\nvalue 3: blacklist\n" in shown
    assert "domain:spam.example" in shown and "gone@" not in shown and "4155550134" not in shown
    # Consent withdrawn in a preference centre (trusted), before the lead gets hot.
    revoke = track("rev-0", "revoker", "consent_override", 0)
    revoke["properties"] = {"channel": "email", "status": "revoked", "source": "preference_centre"}
    send(settings, [revoke], topic=settings.topics.feedback)
    send(settings, [{**buyer("revoker")[0], "messageId": "rev-1"}])
    run_flow(settings, 1)

    granted = {"email": {"status": "granted", "basis": "consent", "source": "form"}}
    pre_ticked = {"email": {"status": "granted", "pre_ticked": True, "source": "form"}}
    send(
        settings,
        [
            *buyer("eu-none", country="DE"),
            *buyer("eu-pre", country="FR", consent=pre_ticked),
            *buyer("eu-yes", country="IE", consent=granted),
            *buyer("us", country="US"),
            *buyer("dnc", phone=PHONE),
            *buyer("gone", email="gone@gone.example"),
            *buyer("spam", email="boss@spam.example"),
            *buyer("vip", email="vip@partner.example"),
            *buyer("other", email="other@partner.example"),
            *buyer("revoker")[1:],
            track("sneaky-1", "sneaky", "lead_accepted", 5),  # a browser posing as sales
        ],
    )
    run_flow(settings, 1)
    seen = outputs(settings)
    by_anon = decisions_by_anon(seen)

    channels = {anon: d["channels"] for anon, d in by_anon.items()}
    assert channels == {
        "eu-none": [],  # GDPR: no statement is no consent
        "eu-pre": [],  # GDPR: a pre-ticked box is no consent
        "eu-yes": ["email"],
        "us": ["email"],
        "dnc": ["email"],  # the number is on the DNC list (formatted differently)
        "gone": [],  # unsubscribed
        "vip": ["email"],  # its domain is blacklisted, the address whitelisted
        "revoker": [],
    }
    assert by_anon["eu-none"]["channels_withheld"]["email"] == "no_consent"
    assert by_anon["eu-pre"]["channels_withheld"]["email"] == "pre_ticked"
    assert by_anon["eu-none"]["contactable"] is False
    assert by_anon["dnc"]["channels_withheld"]["phone"] == "do_not_call"
    assert by_anon["dnc"]["channels_withheld"]["sms"] == "do_not_call"
    assert by_anon["gone"]["channels_withheld"]["email"] == "unsubscribed"
    assert by_anon["revoker"]["channels_withheld"]["email"] == "revoked"
    # Blacklisted people never alert: promoted, then disqualified, no decision.
    blacklisted = [r for r in seen.lifecycle.values() if r["cause"] == "blacklisted"]
    assert [(r["from"], r["to"]) for r in blacklisted] == [("mql", "disqualified")] * 2
    assert {r["one_id"] for r in blacklisted}.isdisjoint(d["one_id"] for d in by_anon.values())
    assert [r.reason for r in seen.dlq] == ["untrusted_source"]


def test_a_flood_from_one_cookie_is_capped(settings: Settings) -> None:
    limit = settings.limits.max_events_per_minute
    flood = [page(f"bot-{n}", "bot", "/pricing", n / 1000) for n in range(limit * 3)]
    send(settings, [*hot_lead("human"), *flood])
    run_flow(settings, 1)
    seen = outputs(settings)
    refused = [r for r in seen.dlq if r.reason == "rate_limited"]
    # Sent within a second or two: one broker minute, or two if it straddles one.
    assert limit * 3 - 2 * limit <= len(refused) <= limit * 3 - limit
    bot = [r for r in seen.lifecycle.values() if r["cause"] == "rate_limited"]
    assert [(r["from"], r["to"]) for r in bot] == [("lead", "disqualified")]
    assert len(seen.decisions) == 1  # the human, untouched by the bot next door


def test_logs_of_a_full_run_hold_no_email_or_phone(settings: Settings, tmp_path: Path) -> None:
    emails = [f"person{n}@pii-check.example" for n in range(5)]
    phones = ["+44 20 7946 0958", "+1 212 555 0199"]
    events: list[Any] = []
    for n, email in enumerate(emails):
        events += buyer(f"pii{n}", email=email, phone=phones[n % 2], first_name=f"Zelda{n}")
    events.append({"type": "identify", "messageId": "bad", "anonymousId": "x", "traits": 5})
    events.append(b'{"type": "track", "email": "person0@pii-check.example"')  # broken JSON
    send(settings, events)
    env = {
        **os.environ,
        "LEADFLOW_KAFKA_BOOTSTRAP": settings.kafka.bootstrap,
        "LEADFLOW_REDIS_URL": settings.redis.url,
        "LEADFLOW_RECOVERY_DIR": str(tmp_path / "recovery"),
        "LEADFLOW_METRICS_PORT": "0",
        "LEADFLOW_HEALTH_PORT": "0",
    }
    run = cli(env, "--log-level", "DEBUG", "run", "--stop-at-end")
    assert run.returncode == 0, run.stderr[-2000:]
    assert len(outputs(settings).decisions) == len(emails)
    log = run.stdout + run.stderr
    assert "DEBUG" in log  # the most talkative level was on
    digits = "".join(c for c in log if c.isdigit() or c == "\n")
    for value in [*emails, "Zelda", "pii-check.example"]:
        assert value not in log
    for phone in phones:
        assert "".join(c for c in phone if c.isdigit()) not in digits


def test_redis_auth_with_a_real_password_protected_server(
    broker: LocalBroker, tmp_path: Path
) -> None:
    with LocalRedis("redis", password="s3cret-pw") as server:
        assert isinstance(server, LocalRedis)
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(host="127.0.0.1", port=server.port).ping()
        secret = tmp_path / "redis-url"
        secret.write_text(server.url + "\n")
        settings = local_settings(broker, server, stop_at_end=True)
        create_topics(settings, partitions=1)
        send(settings, hot_lead("auth"))
        run_flow(settings, 1)
        assert len(outputs(settings).decisions) == 1
        env = {**os.environ, "LEADFLOW_REDIS_URL_FILE": str(secret)}
        env.pop("LEADFLOW_REDIS_URL", None)
        shown = cli(env, "config", "show")
        assert shown.returncode == 0, shown.stderr
        assert f":***@127.0.0.1:{server.port}" in shown.stdout
        assert "s3cret-pw" not in shown.stdout + shown.stderr
        # A wrong password stops a command at once, with a clear error and no password shown.
        env["LEADFLOW_REDIS_URL"] = server.url.replace("s3cret-pw", "wrong-pw")
        refused = cli(env, "lists", "show")
        assert refused.returncode == 3
        assert "Redis refused the credentials" in refused.stderr
        assert "wrong-pw" not in refused.stderr


def test_a_dnc_phone_owned_by_another_person_is_still_withheld(
    settings: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    """A refused merge leaves the number as a trait of a person who does not own it."""
    owner = {"type": "identify", "messageId": "own-0", "userId": "u-owner", "traits": {}}
    owner["traits"] = {"phone": PHONE}
    send(settings, [owner], key="u-owner")
    run_flow(settings, 1)  # u-owner owns the number
    events = buyer("other-user", phone=PHONE)
    events[0]["userId"] = "u-other"  # a second userId: the merge with u-owner is refused
    send(settings, events)
    lists(settings, "add", "dnc", PHONE)
    lists(settings, "add", "blacklist", "blocked.example")
    run_flow(settings, 1)
    seen = outputs(settings)
    refused = [r for r in seen.lifecycle.values() if r["cause"].startswith("merge_refused")]
    assert refused, "the scenario needs the merge to be refused"
    (decision,) = decisions_by_anon(seen).values()
    assert decision["channels_withheld"]["phone"] == "do_not_call"
    assert "phone" not in decision["channels"] and "sms" not in decision["channels"]
    capsys.readouterr()
    lists(settings, "check", "someone@blocked.example")
    assert "blacklist (domain)" in capsys.readouterr().out
    # inspect shows the channels the next decision would offer, with the same reasons.
    env = {**os.environ, "LEADFLOW_REDIS_URL": settings.redis.url}
    shown = cli(env, "inspect", "anon:other-user")
    assert shown.returncode == 0, shown.stderr
    offered = json.loads(shown.stdout)["next_decision_channels"]
    assert offered["withheld"]["phone"] == "do_not_call" and "phone" not in offered["offered"]
