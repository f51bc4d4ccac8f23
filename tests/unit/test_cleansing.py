from __future__ import annotations

import pytest

from engine.cleansing import CLEANSING_REASONS, Cleanser
from engine.profile import Traits
from engine.settings import load_settings

CLEANSER = Cleanser(load_settings(env={}).cleansing)  # the shipped default rules


@pytest.mark.parametrize(
    ("traits", "reason"),
    [
        # test accounts: e-mail patterns
        (Traits(email="test@acme.example"), "test_account"),
        (Traits(email="Test.2@initech.example"), "test_account"),
        (Traits(email="qa+signup@globex.example"), "test_account"),
        (Traits(email="noreply@hooli.example"), "test_account"),
        (Traits(email="ana@example.com"), "test_account"),
        (Traits(email="ceshi01@163.com"), "test_account"),
        # test accounts: names
        (Traits(name="Test User"), "test_account"),
        (Traits(name="asdf"), "test_account"),
        (Traits(name="测试"), "test_account"),
        (Traits(name="测试账号"), "test_account"),
        (Traits(name="张三"), "test_account"),
        (Traits(name=" 李四 "), "test_account"),
        (Traits(name="aaaa"), "test_account"),
        # our own people, competitors, throw-away mailboxes
        (Traits(email="sdr@leadflow.example"), "internal"),
        (Traits(email="ops@eu.leadflow.example"), "internal"),
        (Traits(email="research@hubspot.com"), "competitor"),
        (Traits(email="someone@marketo.com"), "competitor"),
        (Traits(email="lead@mailinator.com"), "disposable_email"),
        (Traits(email="x9@10minutemail.com"), "disposable_email"),
        (Traits(email="tmp@linshiyouxiang.net"), "disposable_email"),
        # made-up phone numbers
        (Traits(phone="12345678"), "fake_phone"),
        (Traits(phone="98765432"), "fake_phone"),
        (Traits(phone="1111111"), "fake_phone"),
        (Traits(phone="13333333333"), "fake_phone"),  # Chinese mobile, one digit after the 1
        (Traits(phone="+86 188 8888 8888"), "fake_phone"),
        (Traits(phone="0086-13800138000"), "fake_phone"),  # China Mobile's service number
        (Traits(phone="+1 (234) 567-890"), "fake_phone"),  # 1234567890: the keyboard's top row
        (Traits(phone="000000"), "fake_phone"),
        (Traits(phone="n/a"), "fake_phone"),
    ],
)
def test_junk_is_disqualified_with_its_reason(traits: Traits, reason: str) -> None:
    assert CLEANSER.disqualification(traits) == reason
    assert reason in CLEANSING_REASONS


@pytest.mark.parametrize(
    "traits",
    [
        Traits(email="ana.souza@acme.example", name="Ana Souza", phone="+55 11 91234-5678"),
        Traits(email="li.wei@initech.example", name="李伟", phone="+86 138 1234 5678"),
        Traits(
            email="zhang.san.ltd@qq.com", name="张三丰"
        ),  # a real name that starts like a placeholder
        Traits(
            email="testa.rossi@globex.example", name="Testa Rossi"
        ),  # Italian surname, not a test
        Traits(email="contact@hubspotter.example"),  # not a subdomain of a competitor
        Traits(phone="13912345678"),
        Traits(phone="+49 30 1234567"),
        Traits(phone="1234"),  # too short to judge a run
    ],
)
def test_real_people_pass(traits: Traits) -> None:
    assert CLEANSER.disqualification(traits) == ""
