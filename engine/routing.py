"""Routing: which queue a new MQL goes to, and which SDR of that queue takes it.

Fairness across workers and processes comes from one atomic counter per queue
in Redis (see :mod:`engine.store`): each promotion draws a ticket, and the
ticket picks the SDR in roster order, so N consecutive MQLs of a queue with N
SDRs reach each SDR once whichever worker promoted them.
"""

from __future__ import annotations

from engine.settings import RoutingSettings, Sdr


def choose_queue(routing: RoutingSettings) -> str:
    """The queue for a new MQL (foundation: the default queue)."""
    return routing.default_queue


def pick_sdr(ticket: int, sdrs: tuple[Sdr, ...]) -> Sdr:
    """Round robin: the ``ticket``-th assignment of a queue (1-based) goes to this SDR."""
    return sdrs[(ticket - 1) % len(sdrs)]
