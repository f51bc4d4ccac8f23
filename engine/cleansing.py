"""Lead cleansing: what disqualifies a lead before anything counts.

A cleansed lead is not dropped: it moves to the Disqualified stage with its
reason (one of :data:`CLEANSING_REASONS`), on the lifecycle topic, and its
events keep being recorded. Duplicate form submissions are handled where
events are de-duplicated (:mod:`engine.person`).
"""

from __future__ import annotations

import itertools
import re

from engine.profile import Traits, email_domain, phone_digits
from engine.settings import CleansingSettings

CLEANSING_REASONS = (
    "test_account",  # e-mail or name matches a test pattern
    "internal",  # e-mail at one of our own domains
    "competitor",  # e-mail at a competitor's domain
    "disposable_email",  # e-mail at a disposable mailbox provider
    "fake_phone",  # one repeated digit, one consecutive run, or a configured pattern
)
# A phone of one digit repeated this many times or more is made up.
MIN_REPEATED_DIGITS = 7


class Cleanser:
    """The cleansing rules of the configuration, compiled."""

    def __init__(self, settings: CleansingSettings):
        self.settings = settings
        self._test_email = [re.compile(p, re.I) for p in settings.test_email_patterns]
        self._test_name = [re.compile(p, re.I) for p in settings.test_name_patterns]
        self._fake_phone = [re.compile(p) for p in settings.fake_phone_patterns]

    def disqualification(self, traits: Traits) -> str:  # noqa: PLR0911  # one return per rule reads best
        """The reason these traits disqualify their person, or '' when they do not."""
        s = self.settings
        if traits.email:
            email = traits.email.lower()
            domain = email_domain(email)
            if any(p.search(email) for p in self._test_email):
                return "test_account"
            if _within(domain, s.internal_domains):
                return "internal"
            if _within(domain, s.competitor_domains):
                return "competitor"
            if domain in s.disposable_domains:
                return "disposable_email"
        if traits.name and any(p.search(traits.name) for p in self._test_name):
            return "test_account"
        if traits.phone and self.is_fake_phone(traits.phone):
            return "fake_phone"
        return ""

    def is_fake_phone(self, phone: str) -> bool:
        """True for numbers nobody has: 1111111, 12345678, 98765432, configured patterns."""
        digits = phone_digits(phone)
        if not digits:
            return True
        if len(digits) >= MIN_REPEATED_DIGITS and len(set(digits)) == 1:
            return True
        if len(digits) >= self.settings.consecutive_phone_digits and _one_run(digits):
            return True
        return any(p.search(digits) for p in self._fake_phone)


def _within(domain: str, domains: tuple[str, ...]) -> bool:
    """``domain`` is one of ``domains`` or a subdomain of one."""
    return any(domain == d or domain.endswith("." + d) for d in domains)


def _one_run(digits: str) -> bool:
    """All digits step up by one (12345678) or all down (98765432), in keyboard order.

    Steps are taken modulo 10, so 1234567890 and 0987654321, the top row of a
    keyboard typed to fill a required field, count as one run too.
    """
    steps = {(int(b) - int(a)) % 10 for a, b in itertools.pairwise(digits)}
    return steps in ({1}, {9})
