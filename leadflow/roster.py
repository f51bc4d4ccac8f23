"""``leadflow roster apply|show``: the SDR roster of running engines, versioned in Redis.

Sales management edits ``roster.toml`` (or another file) and applies it; every
engine picks the new version up at its next assignment, without a restart. The
rotation is not reset: each SDR keeps their count, a newcomer joins at the
current level, and someone removed simply stops receiving leads.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import orjson

from engine.routing import capacity_periods, is_available
from engine.settings import (
    RosterSettings,
    Settings,
    check_roster,
    read_toml,
    roster_data,
    roster_to_data,
)
from engine.store import RedisStore


def read_roster_file(path: Path, settings: Settings) -> RosterSettings:
    """Read and validate a roster file against the configured queues."""
    roster = roster_data(read_toml(path), str(path))
    check_roster(roster, settings.routing, str(path))
    return roster


def apply_roster(settings: Settings, path: Path) -> int:
    """Validate ``path`` and store it in Redis as the next version; return the version."""
    roster = read_roster_file(path, settings)
    store = RedisStore(settings.redis)
    try:
        return store.apply_roster(orjson.dumps(roster_to_data(roster)))
    finally:
        store.close()


def show_roster(settings: Settings, now_ms: int | None = None) -> dict[str, Any]:
    """The roster in force (Redis, else roster.toml) with each SDR's availability and load."""
    now_ms = int(time.time() * 1000) if now_ms is None else now_ms
    store = RedisStore(settings.redis)
    try:
        stored = store.load_roster()
        if stored is None:
            roster, source = settings.roster, f"{settings.config_dir}/roster.toml (not applied)"
        else:
            roster = roster_data(orjson.loads(stored[1]), "redis roster", stored[0])
            source = f"redis, version {stored[0]}"
        queues = {}
        for queue in settings.routing.queues:
            counts = store.queue_counts(queue.name)
            queues[queue.name] = [
                {
                    "sdr": s.id,
                    "name": s.name,
                    "weight": s.weight,
                    "available_now": is_available(s, now_ms),
                    "assigned": counts.get(s.id, 0),
                    "caps": {"daily": s.daily_cap, "weekly": s.weekly_cap},
                    "periods": list(capacity_periods(s, now_ms)),
                }
                for s in roster.for_queue(queue.name)
            ]
        return {"source": source, "queues": queues}
    finally:
        store.close()
