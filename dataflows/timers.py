"""The timer input: due lifecycle timers from Redis, as events for the person stage.

Timers live in the people's states and in one Redis sorted set (see
:mod:`engine.sales` and :meth:`engine.store.RedisStore.sync_timers`), so they
survive restarts without Bytewax state. One partition (so one worker) polls the
set every ``poll_s`` and emits each due timer as a trusted event for its person;
the person stage strikes a timer off once the person is saved. A timer polled
again before that (a slow batch, a restart) is not re-emitted within
``LEASE_S``; if it is re-emitted anyway, its message id makes it a replay.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, datetime

from bytewax.inputs import FixedPartitionedSource, StatefulSourcePartition

from dataflows.kafka_io import STOPPING
from dataflows.metrics import metrics
from engine.batch import Resolved
from engine.sales import timer_event
from engine.store import RedisStore

# Timers fetched per poll; more wait for the next poll.
POLL_LIMIT = 1_000
# A timer emitted and still in the set is emitted again only after this long.
LEASE_S = 60.0


class TimerPoller:
    """Due timers as resolved events, each emitted once per lease."""

    def __init__(self, store: RedisStore, clock: Callable[[], float] = time.time):
        self.store = store
        self.clock = clock
        self.emitted: dict[tuple[str, str, int], float] = {}

    def poll(self) -> list[Resolved]:
        """Every timer due now that was not emitted within the lease."""
        now = self.clock()
        now_ms = int(now * 1000)
        due = self.store.due_timers(now_ms, POLL_LIMIT)
        metrics().timers_pending.set(self.store.timers_pending())
        live = set(due)
        self.emitted = {t: at for t, at in self.emitted.items() if t in live}
        out = []
        for timer in due:
            if now - self.emitted.get(timer, -LEASE_S) >= LEASE_S:
                self.emitted[timer] = now
                one_id, kind, due_ms = timer
                out.append(Resolved(one_id, timer_event(one_id, kind, due_ms, now_ms)))
        return out


class _TimerPartition(StatefulSourcePartition[Resolved, None]):
    def __init__(self, poller: TimerPoller, poll_s: float, stop_at_end: bool):
        self.poller = poller
        self.poll_s = poll_s
        self.stop_at_end = stop_at_end
        self.next_poll = time.time()

    def next_batch(self) -> list[Resolved]:
        if self.stop_at_end or STOPPING.is_set():
            raise StopIteration  # a bounded run has no future to wait for; a stop is a stop
        self.next_poll = time.time() + self.poll_s
        return self.poller.poll()

    def next_awake(self) -> datetime | None:
        return datetime.fromtimestamp(self.next_poll, UTC)

    def snapshot(self) -> None:
        return None


class TimerSource(FixedPartitionedSource[Resolved, None]):
    """One partition polling Redis for due timers."""

    def __init__(self, make_store: Callable[[], RedisStore], poll_s: float, stop_at_end: bool):
        self.make_store = make_store
        self.poll_s = poll_s
        self.stop_at_end = stop_at_end

    def list_parts(self) -> list[str]:
        """One partition: the poller."""
        return ["timers"]

    def build_part(self, step_id: str, for_part: str, resume_state: None) -> _TimerPartition:
        """The poller, with its own Redis connection."""
        return _TimerPartition(TimerPoller(self.make_store()), self.poll_s, self.stop_at_end)
