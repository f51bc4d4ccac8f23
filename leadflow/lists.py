"""``leadflow lists``: the suppression lists (unsubscribe, dnc, blacklist, whitelist) in Redis.

Values are normalised as identity resolution normalises them, and e-mail
addresses and phone numbers are stored as salted digests (engine.consent), so
``show`` prints digests and domains, never an address or a number; ``check``
says whether a given value is listed. Values come from the command line or,
to keep them out of shell history, from a file (``--file``, one per line,
``-`` for standard input). Running engines see a change at their next decision.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from pathlib import Path

from engine.consent import LISTS, BadListEntry, list_member
from engine.settings import ConfigError, Settings
from engine.store import RedisStore

EXIT_BAD_ENTRY = 2


def read_values(values: Iterable[str], file: str | None) -> list[str]:
    """Values from the command line, then from ``file`` (blank lines and ``#`` comments skipped)."""
    out = [v for v in values if v.strip()]
    if file:
        text = sys.stdin.read() if file == "-" else Path(file).read_text()
        out += [
            line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")
        ]
    return out


def members_of(settings: Settings, name: str, values: list[str]) -> list[str]:
    """The stored forms of ``values``; every bad one is reported before anything changes."""
    members, problems = [], []
    for n, value in enumerate(values, 1):
        try:
            members.append(list_member(name, value, settings.identity))
        except BadListEntry as e:
            problems.append(f"value {n}: {e}")
    if problems:
        raise ConfigError("lists", name, "; ".join(problems))
    return members


def change_list(settings: Settings, name: str, values: list[str], add: bool) -> str:
    """Add or remove values; a one-line report of what changed."""
    if not values:
        raise ConfigError("lists", name, "no values given (arguments or --file)")
    members = members_of(settings, name, values)
    store = RedisStore(settings.redis)
    try:
        changed = store.change_list(name, members, add)
        size = len(store.list_members(name))
    finally:
        store.close()
    verb = "added to" if add else "removed from"
    return f"{changed} of {len(members)} {verb} {name} ({size} on the list)"


def show_lists(settings: Settings, names: list[str]) -> dict[str, list[str]]:
    """The members of each list named (all lists when none is)."""
    unknown = [n for n in names if n not in LISTS]
    if unknown:
        raise ConfigError("lists", unknown[0], f"unknown list; lists are {sorted(LISTS)}")
    store = RedisStore(settings.redis)
    try:
        return {name: store.list_members(name) for name in names or sorted(LISTS)}
    finally:
        store.close()


def check_values(settings: Settings, values: list[str]) -> list[tuple[str, list[str]]]:
    """For each value, the lists holding it (an address also by its domain, as routing checks).

    A list that holds an address's domain, not the address, is reported as
    ``blacklist (domain)``: the engine withholds such a lead all the same.
    """
    store = RedisStore(settings.redis)
    try:
        out = []
        for value in values:
            held = []
            domain = value.strip().rsplit("@", 1)[1] if "@" in value else ""
            for name in sorted(LISTS):
                for candidate, label in ((value, name), (domain, f"{name} (domain)")):
                    try:
                        member = (
                            list_member(name, candidate, settings.identity) if candidate else ""
                        )
                    except BadListEntry:
                        continue
                    if member and store.on_list(name, member):
                        held.append(label)
                        break
            out.append((value, held))
        return out
    finally:
        store.close()
