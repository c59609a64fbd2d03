"""Admission: whether a PUT is stored now, waits for room, or is refused - the queue was
shut down, no reply could carry a message, the batch can never fit, the broker remembers
its limit of dedup ids, or the connection's parked puts hold their budget.

A put whose dedup ids the queue all remembers stores nothing and is confirmed (once what
it repeats is: the server's commit gate holds the reply). A put that waits for room holds
its payloads, and headers and framing per message, against the parked-bytes limits.
"""

from __future__ import annotations

from pigeon.protocol import Put, PutBatch
from pigeon.protocol.codes import Code
from pigeon.protocol.messages import Confirmed
from pigeon.server.core.delivery import serve
from pigeon.server.core.holdings import park, parked_bytes_refused
from pigeon.server.core.model import DELIVERY_OVERHEAD, PutWaiter, headers_size
from pigeon.server.core.placement import add, dedup_full, forget_dedup
from pigeon.server.core.state import BrokerState, Conn, Out, err

__all__ = ["put"]


def put(b: BrokerState, conn: Conn, m: Put | PutBatch) -> list[Out]:
    """PUT and PUT_BATCH."""
    if isinstance(m, Put):
        payloads, dedup_ids, largest = [m.payload], None, len(m.payload)
    else:
        payloads, dedup_ids = m.payloads, m.dedup_ids
        largest = max(map(len, payloads), default=0)
    opts = m.options
    q = b._queue(m.queue)
    if q.shutdown:
        return [err(conn, m.req, Code.SHUTDOWN, f"queue {q.name!r} was shut down; put refused")]
    hsize = 0
    if opts is not None:
        if opts.dedup_id:
            dedup_ids = [opts.dedup_id]
        hsize = headers_size(opts.headers)
    if largest + hsize + DELIVERY_OVERHEAD > b.limits.max_reply_bytes:
        why = (
            f"a message of {largest} bytes with {hsize} bytes of headers is more than one "
            f"reply may carry (max_reply_bytes={b.limits.max_reply_bytes}, from --max-frame-size "
            "and --max-pending-output); nothing was stored: send less, or raise those limits"
        )
        return [err(conn, m.req, Code.TOO_LARGE, why)]
    new = len(payloads)  # what it would store: repeats of remembered dedup ids do not count
    if dedup_ids is not None:
        forget_dedup(b, q)
        if q.dedup_window > 0:  # a repeat within the batch is one, as it is remembered
            new = len(set(dedup_ids).difference(q.dedup))
        else:  # nothing new is remembered: only the ids remembered before are repeats
            new = sum(d not in q.dedup for d in dedup_ids)
        if not new:  # all repeats: confirmed (once what they repeat is), not stored
            return [(conn, Confirmed(m.req, len(payloads)))]
    if q.maxsize and new > q.maxsize:
        why = f"batch of {new} new messages can never fit in maxsize={q.maxsize}"
        return [err(conn, m.req, Code.BAD_REQUEST, why)]
    q.compact()
    if dedup_ids is not None and dedup_full(b, q, dedup_ids):
        why = (
            f"this broker remembers {b.dedup_ids} dedup ids "
            f"(max_dedup_ids={b.limits.max_dedup_ids}); "
            "nothing was stored: retry once older ids' windows pass, or shorten dedup_window"
        )
        return [err(conn, m.req, Code.LIMIT, why)]
    room = q.room()
    if (room is None or room >= new) and not q.putters:
        add(b, q, payloads, opts, dedup_ids)
        return [(conn, Confirmed(m.req, len(payloads))), *serve(b, q)]
    if m.wait == 0:
        why = f"queue {q.name!r} is full ({q.held} of maxsize={q.maxsize})"
        return [err(conn, m.req, Code.FULL, why)]
    # What it holds while it waits: payloads, and headers and framing per message (a
    # batch of 100,000 empty payloads is not free)
    size = sum(map(len, payloads)) + len(payloads) * (hsize + DELIVERY_OVERHEAD)
    cs = b._conn(conn)
    refused = parked_bytes_refused(b, cs, size, "puts waiting for room")
    if refused is not None:
        return [err(conn, m.req, Code.LIMIT, refused)]
    w = PutWaiter(conn, m.req, b._deadline(m.wait), q.name, payloads=payloads, size=size,
                  options=opts, dedup_ids=dedup_ids, new=new)  # fmt: skip
    cs.parked_bytes += size
    b.parked_bytes += size
    if dedup_ids is not None:  # its new ids count for max_dedup_ids while it waits
        w.ids_held = new
        b.dedup_ids_parked += new
    q.putters.append(w)
    park(b, w)
    return serve(b, q)
