"""A queue's settings: DECLARE sets them (and the store keeps them), INFO reports them
with the queue's counts."""

from __future__ import annotations

from typing import Any

from pigeon.protocol import Declare, Info, Ok
from pigeon.protocol.codes import Code
from pigeon.server.core.delivery import serve
from pigeon.server.core.holdings import finish
from pigeon.server.core.model import QueueState
from pigeon.server.core.state import BrokerState, Conn, Out, err

__all__ = ["declare", "info"]


def declare(b: BrokerState, conn: Conn, m: Declare) -> list[Out]:
    """DECLARE: the settings given change (none given: a mere reference to the queue)."""
    q = b._queue(m.queue)
    out: list[Out] = []
    given = {
        "maxsize": m.maxsize,
        "lease": m.lease,
        "max_deliveries": m.max_deliveries,
        "dedup_window": m.dedup_window,
    }
    settings: dict[str, Any] = {k: v for k, v in given.items() if v is not None}
    if settings:
        q.configure(settings)
        b.store.declared(q.name, q.settings())
        if q.maxsize:  # parked batches that can never fit now are refused at once
            for p in q.putters:
                if not p.done and p.new > q.maxsize:
                    finish(b, p)
                    out.append(
                        err(
                            p.conn,
                            p.req,
                            Code.BAD_REQUEST,
                            f"batch of {len(p.payloads)} can never fit in maxsize="
                            f"{q.maxsize} (the queue was redeclared)",
                        )
                    )
    return [(conn, Ok(m.req, q.info())), *out, *serve(b, q)]


def info(b: BrokerState, conn: Conn, m: Info) -> list[Out]:
    """INFO: the queue's settings and counts (those of an empty queue if it is unknown)."""
    q = b.queues.get(m.queue)
    return [(conn, Ok(m.req, (q or QueueState(m.queue)).info()))]
