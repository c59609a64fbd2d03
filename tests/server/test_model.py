"""The broker's rules, checked against a plain reference model, on every store, with a
crash at any step.

A Hypothesis ``RuleBasedStateMachine`` sends the sans-IO broker every request kind with
every option (tests/server/_reference.py is the model), advances a fake clock, loses
connections, and - on the durable stores - crashes: ``kill -9`` (the bytes written
survive, the changes still in the process do not), a power cut (only fsynced bytes
survive; the last record cut in half), a clean stop, and a failed fsync. After each step
it compares the broker's public replies (every reply, INFO and PEEK of each queue) with
the model; after a crash it compares what the store recovered with what the model says
the fsync policy promised (tests/server/_crash.py simulates the disk).

What a crash may keep: a confirmation goes out once the store says the batch holding the
change has committed (the server's commit gate, ``BrokerServer.apply``, run here on the
broker). After a crash the store must hold the model's state after some batch ``k``:
every batch up to the last one whose reply went out (or that the store confirmed) and
no more than was written - so every confirmed put is there with its options, a batch is
whole or absent, an ACK that committed never comes back, and delivery counts never go
down.

Known findings (review round 4) the model meets are gated on the flags below, so the
tests stay green until they are fixed; turn a flag off when its fix is merged.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar
from unittest import mock

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import event as _hypothesis_event
from hypothesis import strategies as st
from hypothesis.errors import InvalidArgument
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
)

from pigeon.protocol import (
    Ack,
    Cancel,
    Declare,
    Delete,
    Deliver,
    Error,
    Extend,
    Get,
    Info,
    Join,
    Move,
    Nack,
    Ok,
    Peek,
    Purge,
    Put,
    PutBatch,
    PutOptions,
    QueueShutdown,
    Shutdown,
    TaskDone,
)
from pigeon.protocol.messages import Confirmed
from pigeon.server.core import Broker, Out
from pigeon.server.model import Store
from pigeon.server.store import Durable, LogStore, SQLiteStore
from pigeon.server.store import log as logstore
from pigeon.server.store.records import FILE_HEADER_SIZE
from tests.server._crash import (
    Disk,
    FakeLoop,
    Gate,
    abandon,
    image_of,
    syncer_pass,
    writer_pass,
)
from tests.server._reference import DEAD, Image, Known, Model

# --- known findings: True while open ----------------------------------------------------

KNOWN = Known()
for _name in filter(None, os.environ.get("PIGEON_MODEL_FIXED", "").split(",")):
    if not hasattr(KNOWN, _name):
        raise ValueError(f"PIGEON_MODEL_FIXED names no known finding: {_name!r}")
    setattr(KNOWN, _name, False)  # check a fix: PIGEON_MODEL_FIXED=nack_delay_lost,...

# --- the run ---------------------------------------------------------------------------------

WALL = 4_000_000_000.0  # the fake wall clock at the start: ahead of time.time(), which
# the stores prune dedup ids by (they must keep what the broker's clock still remembers)
SEGMENT = 4096  # small log segments: rolls, forwarding and reclaiming happen often
SHM = "/dev/shm" if os.path.isdir("/dev/shm") else None
NAMES = ("a", "b", "a.dead", "b.dead")
SLOTS = 3  # client connections at a time
OBSERVER = 1_000_000  # the connection that reads INFO and PEEK
COUNTS: collections.Counter[str] = collections.Counter()  # crash points reached, per store


def _name(payload: bytes) -> str:
    """A message's name: its payload up to the padding."""
    return payload.split(b":")[0].decode()


def event(label: str) -> None:
    """``hypothesis.event``, also in the scenarios below (not run by Hypothesis)."""
    with contextlib.suppress(InvalidArgument):
        _hypothesis_event(label)


# Times are multiples of 1/8 s, so every sum is exact in binary floating point; waits end
# on odd eighths, deliveries and delays on quarters, so a wait never ends at the instant a
# message comes back (the order of two things at one instant is not the contract's).
_delay = st.sampled_from([0.0, 0.0, 0.0, 0.25, 1.0, 4.0])
_nack_delay = st.sampled_from([0.0, 0.0, 0.25, 1.0, 4.0, 60.0])  # 60: outlives a short crash
_ttl = st.sampled_from([0.0, 0.0, 0.0, 0.5, 2.0, 8.0])
_priority = st.sampled_from([0, 0, 0, 1, 5, 9])
_headers = st.sampled_from([None, None, {"k": "v"}, {"trace": "00-1", "é": "ü"}])
_wait = st.sampled_from([0.0, 0.0, 0.0, 0.375, 1.125, None])
_lease = st.sampled_from([None, None, 0.5, 2.0, 8.0])
_dedup = st.sampled_from(["x", "y", "z", "w"])
_slot = st.integers(0, SLOTS - 1)
_size = st.sampled_from([20, 300, 1500, 3000])  # a 4 KiB log segment: 1 to 100 messages
_put_queue = st.sampled_from(["a", "a", "b", "a.dead"])
_any_queue = st.sampled_from(NAMES)


@st.composite
def _options(draw: st.DrawFn, queue: str) -> dict[str, Any]:
    opts: dict[str, Any] = {}
    for name, strategy in (("delay", _delay), ("ttl", _ttl), ("priority", _priority)):
        value = draw(strategy)
        if value:
            opts[name] = value
    if queue.endswith(DEAD) and KNOWN.dead_queue_ttl:
        opts.pop("delay", None)
        opts.pop("ttl", None)
    headers = draw(_headers)
    if headers:
        opts["headers"] = headers
    return opts


class BrokerMachine(RuleBasedStateMachine):
    """The broker on one store, against the model."""

    KIND: ClassVar[str] = "memory"
    FSYNC: ClassVar[str] = "batch"
    NATIVE: ClassVar[bool] = False  # the log store's C syncer (--fsync batch) in place

    def __init__(self) -> None:
        super().__init__()
        self.root = Path(tempfile.mkdtemp(prefix="pigeon-model-", dir=SHM))
        self.disk = Disk(self.root)
        self.patches = [
            *self.disk.patches(),
            mock.patch.object(os, "pwritev", self._pwritev),
            mock.patch.object(os, "statvfs", self._statvfs),
        ]
        self.no_space: str | None = None  # the disk is full: see _pwritev
        self.stays_full = False  # the disk has no room beyond what the store frees
        for p in self.patches:
            p.start()
        self.segment_patch = None
        if self.KIND == "log":  # forward a few messages a turn: compaction spans turns
            self.segment_patch = pytest.MonkeyPatch()
            self.segment_patch.setattr(logstore, "_FORWARD_CHUNK", 2)
            # while the disk is full, the dead prefix of the oldest segment is punched
            # out after every write, however short
            self.segment_patch.setattr(logstore, "_PUNCH_EVERY", 1)
            self.segment_patch.setattr(logstore, "_PUNCH_MIN", 0)
            self.segment_patch.setattr(logstore, "_FORWARD_MIN", 1)
        self.epoch = 0
        self.next_conn = 0
        self.req = 0
        self.payloads = 0
        self.model = Model(KNOWN, now=0.0, offset=WALL)
        self.store = self._open(self.root / "data0")
        self.images: dict[int, Image] = {0: self.model.image()}
        self._start_broker(self.model.now, WALL)

    # --- the store and the broker ------------------------------------------------------

    @property
    def durable(self) -> bool:
        return self.KIND != "memory"

    def _open(self, path: Path) -> Store:
        self.loop = FakeLoop()
        store: Store
        if self.KIND == "memory":
            return Store()
        if self.KIND == "log":
            store = LogStore(path, self.FSYNC, segment_bytes=SEGMENT)  # type: ignore[arg-type]
            if self.NATIVE and store._use_native() is None:
                store.close()
                if os.environ.get("CI") and not os.environ.get("PIGEON_PURE_PYTHON"):
                    pytest.fail("the log store's C syncer is not built (CI builds it)")
                pytest.skip("the log store's C syncer is not built here (pigeon._fastring)")
        else:
            store = SQLiteStore(path, self.FSYNC)  # type: ignore[arg-type]
        store.attach(self.loop)  # type: ignore[attr-defined]
        return store

    def _start_broker(self, now: float, wall: float) -> None:
        self.broker = Broker(self.store, clock=lambda: now, wall_clock=lambda: wall)
        self.gate = Gate(self.broker, self._released)
        if isinstance(self.store, Durable):
            self.store.on_commit = self._committed
        self.conns = [self._connect() for _ in range(SLOTS)]
        # (queue, delivery id) each client holds; after a crash, the ones from before it
        # (an ack of those settles nothing: ids start at a random epoch at each start)
        fresh: list[list[tuple[str, int]]] = [[] for _ in range(SLOTS)]
        self.held: list[list[tuple[str, int]]] = getattr(self, "held", fresh)
        self.parked: list[list[int]] = [[] for _ in range(SLOTS)]  # reqs that may be parked
        self.in_read = False
        self.syncer_alive = True
        self.calls: dict[int, int | None] = {}  # broker call -> the batch holding its changes
        self.outs_of: dict[int, tuple[Any, int]] = {}  # id(reply) -> (reply, call)
        self.promised: set[int] = set()  # calls whose changes a reply that went out vouches for
        self.repeats: dict[int, list[int | None]] = {}  # call -> calls of its repeats' originals
        self.confirmed = 0  # the last batch the store confirmed
        self.max_handed: dict[bytes, int] = {}
        self.seen = self.store.batch if isinstance(self.store, Durable) else 0

    def _connect(self) -> int:
        self.next_conn += 1
        self.broker.connection_made(self.next_conn)
        return self.next_conn

    def _committed(self, batch: int) -> None:
        self.confirmed = max(self.confirmed, batch)
        self.gate.committed(batch)

    def _released(self, outs: list[Out]) -> None:
        """Replies went out: what each vouches for is promised."""
        for _, m in outs:
            entry = self.outs_of.pop(id(m), None)
            if entry is None:
                continue
            call = entry[1]
            self.promised.add(call)
            if not KNOWN.dedup_repeat_early:
                self.promised.update(c for c in self.repeats.get(call, []) if c is not None)

    def _written(self) -> None:
        """Note the model's state as of each batch the store has written."""
        if not isinstance(self.store, Durable):
            return
        while self.seen < self.store.batch:
            self.seen += 1
            self.images[self.seen] = self.model.image()

    def teardown(self) -> None:
        try:
            if isinstance(self.store, Durable) and self.store._lock_fd >= 0:
                self.store.close()
        finally:
            for p in self.patches:
                p.stop()
            if self.segment_patch is not None:
                self.segment_patch.undo()
            shutil.rmtree(self.root, ignore_errors=True)

    # --- applying one broker call, as the server does --------------------------------------

    def _call(self, fn: Any, expected: list[Out], repeats: list[int | None] | None = None) -> None:
        """Run ``fn`` (a broker call) through the commit gate; its replies must be
        ``expected``."""
        call = self.model.call
        store = self.store
        before = store.changes
        got: list[Out] = []

        def run() -> list[Out]:
            got.extend(fn())
            for _, m in got:  # each reply knows the call it came from
                self.outs_of[id(m)] = (m, call)
            return got

        if repeats:
            self.repeats[call] = repeats
        self.gate.apply(run)
        self.calls[call] = store.last_tag if store.changes != before else None
        self._compare_replies(expected, got)

    def _request(
        self, slot: int, msg: Any, expected: list[Out], repeats: list[int | None] | None = None
    ) -> None:
        conn = self.conns[slot]
        if not self.in_read:
            self.store.flush_follows()
        self._call(lambda: self.broker.handle(conn, msg, self.model.now), expected, repeats)
        if not self.in_read:
            self.store.flush()
            self._written()

    def _next(self) -> int:
        self.req += 1
        self.model.call += 1
        return self.req

    def _compare_replies(self, expected: list[Out], got: list[Out]) -> None:
        actual = [self._norm(c, m) for c, m in got]
        key = repr
        assert sorted(actual, key=key) == sorted(expected, key=key), (
            f"replies differ:\n  broker: {sorted(actual, key=key)}\n  model:  "
            f"{sorted(expected, key=key)}"
        )
        for c, m in got:
            if isinstance(m, Deliver):
                for d in m.messages:
                    self.max_handed[d.payload] = max(
                        self.max_handed.get(d.payload, 0), d.delivery_count
                    )
                if m.messages[0].id:
                    self._bind(c, m)

    def _bind(self, conn: int, m: Deliver) -> None:
        flights = [
            f
            for q in self.model.queues.values()
            for f in q.flights
            if f.conn == conn and f.req == m.req and not f.did
        ]
        assert len(flights) == len(m.messages)
        slot = self.conns.index(conn)
        for f, d in zip(flights, m.messages, strict=True):
            assert d.id and f.msg.key == d.payload
            f.did = d.id
            self.held[slot].append((f.queue, d.id))

    @staticmethod
    def _norm(conn: int, m: Any) -> tuple[int, tuple[Any, ...]]:
        if isinstance(m, Confirmed):
            return conn, ("confirmed", m.req, m.value)
        if isinstance(m, Deliver):
            items = tuple(
                (
                    d.payload,
                    d.delivery_count,
                    tuple(sorted((getattr(d, "headers", None) or {}).items())),
                )
                for d in m.messages
            )
            return conn, ("deliver", m.req, items, bool(m.messages[0].id))
        if isinstance(m, Error):
            return conn, ("error", m.req, m.code)
        if isinstance(m, QueueShutdown):
            return conn, ("queue_shutdown", m.queue, m.immediate)
        if isinstance(m, Ok):
            v = m.value
            if isinstance(v, dict) and "settled" in v:
                v = ("settled", v["settled"], tuple(v["unknown"]))
            elif isinstance(v, dict) and "name" in v:
                v = "info"
            return conn, ("ok", m.req, v)
        return conn, ("other", repr(m))

    # --- requests ---------------------------------------------------------------------------

    def _payloads(self, n: int, size: int) -> list[bytes]:
        """Unique payloads (each names its message) of about ``size`` bytes."""
        self.payloads += n
        return [b"m%d:" % i + b"." * size for i in range(self.payloads - n + 1, self.payloads + 1)]

    @rule(
        slot=_slot,
        queue=_put_queue,
        data=st.data(),
        dedup=st.one_of(st.none(), _dedup),
        wait=_wait,
        size=_size,
    )
    def put(
        self,
        slot: int,
        queue: str,
        data: st.DataObject,
        dedup: str | None,
        wait: float | None,
        size: int,
    ) -> None:
        self.send_put(
            slot, queue, 1, data.draw(_options(queue)), [dedup] if dedup else None, wait, size
        )

    @rule(
        slot=_slot,
        queue=_put_queue,
        n=st.integers(2, 6),
        data=st.data(),
        with_ids=st.booleans(),
        wait=_wait,
        size=_size,
    )
    def put_batch(
        self,
        slot: int,
        queue: str,
        n: int,
        data: st.DataObject,
        with_ids: bool,
        wait: float | None,
        size: int,
    ) -> None:
        opts = data.draw(_options(queue))
        ids = data.draw(st.lists(_dedup, min_size=n, max_size=n)) if with_ids else None
        self.send_put(slot, queue, n, opts, ids, wait, size)

    def send_put(
        self,
        slot: int,
        queue: str,
        n: int,
        opts: dict[str, Any],
        ids: list[str] | None,
        wait: float | None = 0.0,
        size: int = 20,
    ) -> None:
        """A PUT (``n`` 1, ``ids`` None or one dedup id) or a PUT_BATCH."""
        if wait != 0:
            ids = None  # a parked put's confirmation vouches for its own call only
        req = self._next()
        payloads = self._payloads(n, size)
        expected, repeats = self.model.put(self.conns[slot], req, queue, payloads, opts, ids, wait)
        if n == 1:
            dedup = ids[0] if ids else ""
            options = PutOptions(**opts, dedup_id=dedup) if opts or dedup else None
            msg: Any = Put(req, queue, payloads[0], wait, options)
        else:
            msg = PutBatch(req, queue, payloads, wait, PutOptions(**opts) if opts else None, ids)
        self._request(slot, msg, expected, repeats)
        self.parked[slot].append(req)
        event(f"put: {'options' if opts or ids else 'plain'}")

    @rule(
        slot=_slot,
        queue=_any_queue,
        max_items=st.integers(1, 4),
        wait=_wait,
        manual=st.booleans(),
        lease=_lease,
    )
    def get(
        self,
        slot: int,
        queue: str,
        max_items: int,
        wait: float | None,
        manual: bool,
        lease: float | None,
    ) -> None:
        req = self._next()
        conn = self.conns[slot]
        expected = self.model.get(conn, req, queue, max_items, wait, manual, lease)
        self._request(slot, Get(req, queue, max_items, wait, manual, lease), expected)
        self.parked[slot].append(req)

    def _pick(self, slot: int, data: st.DataObject) -> tuple[str, list[int]] | None:
        held = self.held[slot]
        if not held:
            return None
        queue = data.draw(st.sampled_from(sorted({q for q, _ in held})))
        mine = [d for q, d in held if q == queue]
        dids = data.draw(st.lists(st.sampled_from(mine), min_size=1, max_size=3, unique=True))
        self.held[slot] = [(q, d) for q, d in held if d not in dids]
        return queue, dids

    @rule(slot=_slot, data=st.data(), quiet=st.booleans())
    def ack(self, slot: int, data: st.DataObject, quiet: bool) -> None:
        picked = self._pick(slot, data)
        if picked is not None:
            self.send_ack(slot, *picked, quiet)

    def send_ack(self, slot: int, queue: str, dids: list[int], quiet: bool = False) -> None:
        req = self._next()
        expected = self.model.ack(self.conns[slot], req, queue, dids, quiet)
        self._request(slot, Ack(req, queue, dids, quiet), expected)

    @rule(
        slot=_slot,
        data=st.data(),
        requeue=st.booleans(),
        delay=_nack_delay,
        reason=st.sampled_from(["", "bad input"]),
        quiet=st.booleans(),
    )
    def nack(
        self, slot: int, data: st.DataObject, requeue: bool, delay: float, reason: str, quiet: bool
    ) -> None:
        picked = self._pick(slot, data)
        if picked is not None:
            self.send_nack(slot, *picked, requeue, delay, reason, quiet)

    def send_nack(
        self,
        slot: int,
        queue: str,
        dids: list[int],
        requeue: bool = True,
        delay: float = 0.0,
        reason: str = "",
        quiet: bool = False,
    ) -> None:
        req = self._next()
        expected = self.model.nack(
            self.conns[slot], req, queue, dids, requeue, delay, reason, quiet
        )
        self._request(slot, Nack(req, queue, dids, requeue, delay, reason, quiet), expected)

    @rule(slot=_slot, data=st.data(), seconds=st.sampled_from([0.25, 2.0, 8.0]))
    def extend(self, slot: int, data: st.DataObject, seconds: float) -> None:
        held = self.held[slot]
        if not held:
            return
        queue = data.draw(st.sampled_from(sorted({q for q, _ in held})))
        dids = data.draw(
            st.lists(
                st.sampled_from([d for q, d in held if q == queue]),
                min_size=1,
                max_size=3,
                unique=True,
            )
        )
        req = self._next()
        expected = self.model.extend(self.conns[slot], req, queue, dids, seconds)
        self._request(slot, Extend(req, queue, dids, seconds), expected)

    @rule(
        queue=_any_queue,
        maxsize=st.sampled_from([None, None, 0, 1, 2, 6]),
        lease=st.sampled_from([None, None, 1.0, 4.0]),
        max_deliveries=st.sampled_from([None, None, 1, 2, 3]),
        dedup_window=st.sampled_from([None, None, 0.0, 2.0, 30.0]),
    )
    def declare(
        self,
        queue: str,
        maxsize: int | None,
        lease: float | None,
        max_deliveries: int | None,
        dedup_window: float | None,
    ) -> None:
        settings_ = {
            k: v
            for k, v in (
                ("maxsize", maxsize),
                ("lease", lease),
                ("max_deliveries", max_deliveries),
                ("dedup_window", dedup_window),
            )
            if v is not None
        }
        req = self._next()
        expected = self.model.declare(self.conns[0], req, queue, settings_)
        msg = Declare(req, queue, maxsize, lease, max_deliveries, dedup_window)
        self._request(0, msg, expected)

    @rule(queue=_any_queue)
    def purge(self, queue: str) -> None:
        req = self._next()
        self._request(0, Purge(req, queue), self.model.purge(self.conns[0], req, queue))

    @rule(queue=_any_queue)
    def delete(self, queue: str) -> None:
        req = self._next()
        self._request(0, Delete(req, queue), self.model.delete(self.conns[0], req, queue))

    @rule(
        route=st.sampled_from([("a.dead", "a"), ("a", "b"), ("b", "a"), ("b.dead", "b")]),
        limit=st.sampled_from([None, 1, 2]),
    )
    def move(self, route: tuple[str, str], limit: int | None) -> None:
        src, dst = route
        parked = self.model.queues.get(src)
        if (
            KNOWN.move_leaves_puts_parked
            and parked
            and any(w.kind == "put" for w in parked.waiters)
        ):
            return  # its parked puts would wait on until another request served the queue
        req = self._next()
        expected = self.model.move(self.conns[0], req, src, dst, limit)
        self._request(0, Move(req, src, dst, limit), expected)

    @rule(queue=st.sampled_from(["a", "b"]), immediate=st.booleans())
    def shutdown(self, queue: str, immediate: bool) -> None:
        req = self._next()
        expected = self.model.shutdown(self.conns[0], req, queue, immediate, list(self.conns))
        self._request(0, Shutdown(req, queue, immediate), expected)

    @rule(queue=_any_queue, count=st.integers(1, 3))
    def task_done(self, queue: str, count: int) -> None:
        req = self._next()
        expected = self.model.task_done(self.conns[0], req, queue, count)
        self._request(0, TaskDone(req, queue, count), expected)

    @rule(slot=_slot, queue=_any_queue, wait=st.sampled_from([0.0, 0.625, 4.125, None]))
    def join(self, slot: int, queue: str, wait: float | None) -> None:
        req = self._next()
        expected = self.model.join(self.conns[slot], req, queue, wait)
        self._request(slot, Join(req, queue, wait), expected)
        self.parked[slot].append(req)

    @rule(slot=_slot, data=st.data())
    def cancel(self, slot: int, data: st.DataObject) -> None:
        """The client gives up a parked request (or one already answered)."""
        conn = self.conns[slot]
        waiting = [
            w.req
            for q in self.model.queues.values()
            for w in q.waiters
            if w.conn == conn and not (KNOWN.cancelled_put_blocks and w.kind == "put")
        ]
        if not waiting and not self.parked[slot]:
            return
        req = data.draw(st.sampled_from(waiting or self.parked[slot]))
        self._next()
        self._request(slot, Cancel(req), self.model.cancel(conn, req))

    @rule(slot=_slot)
    def lose_connection(self, slot: int) -> None:
        """A client goes away: what it held comes back, what it waited for is withdrawn;
        it connects again (a new connection)."""
        self._end_read()
        conn = self.conns[slot]
        self._next()
        expected = self.model.connection_lost(conn)
        self._call(lambda: self.broker.connection_lost(conn), expected)
        self.conns[slot] = self._connect()
        self.held[slot] = []
        self.parked[slot] = []

    def late_get(self, slot: int, queue: str, dt: float) -> None:
        """The loop is late: a GET is handled ``dt`` later, before the timer for what came
        due meanwhile has run (then the timer runs). Not a rule: the model's view of what
        a late broker may still show is only defined for a queue with nothing else due."""
        self._end_read()
        at = self.model.now + dt
        self._next()
        expected_tick = self.model.tick(at)  # what the contract says is true at ``at``
        req = self._next()
        expected = expected_tick + self.model.get(self.conns[slot], req, queue, 10, 0.0, False,
                                                  None)  # fmt: skip
        self._request(slot, Get(req, queue, 10, 0.0), expected)
        self._next()
        self._call(lambda: self.broker.tick(at), [])

    @rule(dt=st.sampled_from([0.125, 0.25, 0.5, 1.0, 2.0, 5.0, 40.0, 400.0]))
    def advance(self, dt: float) -> None:
        """Time passes: the broker's timer fires at each deadline on the way (its changes
        are written at the end of that turn of the loop, or by the next read's flush)."""
        self._end_read()
        target = self.model.now + dt
        while True:
            due = [d for d in self.model.deadlines() if d <= target]
            at = due[0] if due else target
            self._next()
            expected = self.model.tick(at)
            self._call(lambda at=at: self.broker.tick(at), expected)  # type: ignore[misc]
            if at == target:
                break

    @rule()
    def begin_read(self) -> None:
        """Requests arrive together (one read): their changes go to the store as one."""
        if not self.in_read:
            self.store.flush_follows()
            self.in_read = True

    @rule()
    def end_read(self) -> None:
        self._end_read()

    def _end_read(self) -> None:
        if self.in_read:
            self.in_read = False
            self.store.flush()
            self._written()

    @precondition(lambda self: self.durable)
    @rule()
    def loop_turn(self) -> None:
        """The event loop ends its turn: timers' changes are written, housekeeping runs."""
        self._end_read()
        self.loop.turn()
        self._written()

    @precondition(lambda self: self.durable)
    @rule()
    def disk_catches_up(self) -> None:
        """The syncer thread fsyncs what was written and confirms what waited for it (SQLite
        --fsync always: its writer commits, which fsyncs)."""
        if isinstance(self.store, SQLiteStore) and self.store._loop is None:
            writer_pass(self.store, self.disk)
        elif self.syncer_alive:
            self.syncer_alive = syncer_pass(self.store, self.disk)  # type: ignore[arg-type]
        self._written()

    _real_pwritev = staticmethod(os.pwritev)

    def _pwritev(self, fd: int, buffers: Any, offset: int) -> int:
        """The log's writes. While the disk is full ("reserve": the store still holds its
        reserve) they fail with ENOSPC until the store lets the reserve go, whose room the
        write it makes again then uses; with no reserve left ("retry"), one write fails
        and the store retries it later (the disk made room meanwhile)."""
        if self.no_space == "reserve" and self._reserve().exists():
            raise OSError(errno.ENOSPC, "No space left on device (simulated)")
        if self.no_space == "retry":
            self.no_space = None
            raise OSError(errno.ENOSPC, "No space left on device (simulated)")
        self.no_space = None
        return self._real_pwritev(fd, buffers, offset)

    _real_statvfs = staticmethod(os.statvfs)

    def _statvfs(self, path: Any) -> os.statvfs_result:
        """The disk's free space: while it stays full, 1.5 reserves (the store then keeps
        its reserve let go, writes forward and again only what fits beside what settles
        need, and punches what settles freed out of the log)."""
        st = self._real_statvfs(path)
        if not self.stays_full:
            return st
        free = 3 * min(logstore.RESERVE_BYTES, SEGMENT) // 2 // st.f_frsize
        return os.statvfs_result(
            (st.f_bsize, st.f_frsize, st.f_blocks, free, free, st.f_files, 0, 0, st.f_flag,
             st.f_namemax)
        )  # fmt: skip

    def _reserve(self) -> Path:
        return self.store.path / logstore.RESERVE_NAME  # type: ignore[attr-defined, no-any-return]

    @precondition(lambda self: self.KIND == "log")
    @rule()
    def disk_fills(self) -> None:
        """The disk is full: the log's next write fails with ENOSPC."""
        self.no_space = "reserve" if self._reserve().exists() else "retry"

    @precondition(lambda self: self.KIND == "log")
    @rule(full=st.sampled_from([True, False, False]))  # (short spells: compaction runs too)
    def disk_stays_full(self, full: bool) -> None:
        """The disk has no room left beyond what the broker frees (or has room again):
        once the reserve is let go (``disk_fills``), the store stays full - puts are
        still applied here, as the model sends them past the server - and punches the
        dead prefix of its oldest segment out of the file after each write."""
        self.stays_full = full

    @precondition(lambda self: self.durable)
    @rule(where=st.sampled_from(["syncer", "loop"]))
    def fsync_fails(self, where: str) -> None:
        """The next fsync made by the syncer (or the loop: a segment rolled or compacted)
        fails with EIO."""
        if KNOWN.roll_fsync_confirmed:
            where = "syncer"
        self.disk.fail = where

    # --- crashes ------------------------------------------------------------------------------

    @precondition(lambda self: self.durable)
    @rule(
        kind=st.sampled_from(["kill", "kill", "power", "power", "stop"]),
        tear=st.sampled_from([0.0, 0.5, 1.0]),
        downtime=st.sampled_from([0.25, 3.0, 600.0]),
    )
    def crash(self, kind: str, tear: float, downtime: float) -> None:
        """The broker dies (kill -9, a power cut) or stops, and starts again on what its
        store kept."""
        if kind == "power" and self.FSYNC != "always":
            kind = "kill"  # --fsync batch promises what was confirmed survives kill -9 only
        if kind == "power" and KNOWN.drop_before_sync and self.disk.removed_before_sync:
            tear = 1.0
        store = self.store
        assert isinstance(store, Durable)
        self._count(kind, tear, store)
        self.epoch += 1
        path = self.root / f"data{self.epoch}"
        if kind == "stop":
            self._end_read()
            broken = store._error is not None
            store.close()
            self._written()
            if not broken:  # a clean stop keeps everything (a broken store writes nothing)
                self.confirmed = max(self.images) + 1
                self.images[self.confirmed] = self.model.image()
            image_of(store, self.disk, path, "kill", 1.0)
        else:
            image_of(store, self.disk, path, kind, tear)
            abandon(store)
        wall = self.model.wall + downtime
        now = 1000.0 * self.epoch  # a new process: its monotonic clock starts anywhere
        self.disk.adopt(path)
        self.disk.fail = None
        self.disk.failures = []
        self.store = self._open(path)
        image, found = self._match(wall, kind)
        self.model.restart(image, found, now, wall - now)
        self.images = {0: self.model.recovered}
        self.model.call += 1
        self._start_broker(now, wall)
        # The server arms its timer as it starts: what came due while it was down (delays,
        # ttls) is due now. (A GET before that tick is the late_get scenario below.)
        expected = self.model.tick(now)
        self._call(lambda: self.broker.tick(now), expected)

    def _count(self, kind: str, tear: float, store: Durable) -> None:
        """Count the crash point reached: its kind, and each condition it met."""
        what = [kind if kind != "power" else f"power cut, {tear:.0%} of the unsynced tail kept"]
        conditions = {
            "in the middle of a read": self.in_read,
            "changes not yet written": bool(store._ops),
            "batches written, not yet confirmed": store.batch > self.confirmed,
            "after a failed fsync (syncer)": "syncer" in self.disk.failures,
            "after a failed fsync (loop: a roll, a compaction)": "loop" in self.disk.failures,
            "a segment dropped before the write that emptied it was synced": (
                self.disk.removed_before_sync
            ),
            "a queue with tasks taken and not yet done": bool(self.model.image().taken),
        }
        if isinstance(store, LogStore):
            conditions["two or more log segments"] = len(store._sizes) > 1
            conditions["compaction under way"] = bool(store._forwarding)
            conditions["after a compaction"] = store.compactions > 0
            conditions["a dead prefix punched out of a segment"] = any(
                at > FILE_HEADER_SIZE for at in store._holes.values()
            )
        what += [label for label, met in conditions.items() if met]
        for label in what:
            COUNTS[f"{self.KIND}/{self.FSYNC}: {label}"] += 1
        event(f"crash: {', '.join(what)}")

    def _match(self, wall: float, kind: str) -> tuple[Image, dict[bytes, int]]:
        """The model's state after the batch the recovered store holds: the latest batch
        that matches, no earlier than what a reply that went out vouched for, no later
        than what was written."""
        store = self.store
        found = {
            m.payload: (
                q,
                m.id,
                m.priority,
                tuple(sorted(((m.extra and m.extra.headers) or {}).items())),
                m.extra.due if m.extra else 0.0,
                m.extra.expires if m.extra else 0.0,
                m.deliveries,
                m.origin,
                m.reason,
            )
            for q, m in store.recover()
        }
        queues = store.recover_queues()
        dedup = {
            (q, d): until
            for q, ids in store.recover_dedup().items()
            for d, until in ids.items()
            if until > wall
        }
        taken = store.recover_taken()
        lowest = self.confirmed
        unwritten = []
        for call in self.promised:
            tag = self.calls.get(call)
            if tag is not None:
                if tag not in self.images:
                    unwritten.append(call)
                lowest = max(lowest, tag)
        problems: dict[int, list[str]] = {}
        for k in sorted(self.images, reverse=True):
            if k < lowest:
                break
            problems[k] = self._differences(self.images[k], found, queues, dedup, taken, wall)
            if not problems[k] and not unwritten:
                if k < max(self.images):  # an unconfirmed batch was lost: allowed
                    COUNTS[f"{self.KIND}/{self.FSYNC}: recovered an earlier batch"] += 1
                return self.images[k], {key: v[6] for key, v in found.items()}
        report = "\n".join(f"  after batch {k}: {'; '.join(p[:6])}" for k, p in problems.items())
        raise AssertionError(
            f"after a {kind} crash the store holds no state the fsync policy allows "
            f"(confirmed up to batch {lowest}, written {max(self.images)}; replies vouched "
            f"for calls never written: {unwritten}):\n{report}"
        )

    def _differences(
        self,
        image: Image,
        found: dict[bytes, tuple[Any, ...]],
        queues: dict[str, Any],
        dedup: dict[tuple[str, str], float],
        taken: dict[str, int],
        wall: float,
    ) -> list[str]:
        out = []
        for key in sorted(set(image.messages) | set(found)):
            want, got = image.messages.get(key), found.get(key)
            if want is None or got is None:
                out.append(f"{_name(key)} {'missing' if got is None else 'not expected'}")
                continue
            name, prio, headers, put_due, due, expires, recorded, handed, origin, reason, _ = want
            q, _, gprio, gheaders, gdue, gexpires, deliveries, gorigin, greason = got
            if KNOWN.nack_delay_lost:
                due = put_due

            def pending(t: float) -> float:
                return t if t > wall else 0.0

            checks = [
                ("queue", name, q),
                ("priority", prio, gprio),
                ("headers", headers, gheaders),
                ("origin", origin, gorigin),
                ("reason", reason, greason),
            ]
            if not (name.endswith(DEAD) and KNOWN.dead_queue_ttl):
                checks += [("due", pending(due), pending(gdue)), ("expires", expires, gexpires)]
            for what, a, b in checks:
                if a != b:
                    out.append(f"{_name(key)} {what} {b!r}, not {a!r}")
            low = recorded if KNOWN.inflight_not_counted else handed
            if not low <= deliveries <= max(handed, self.max_handed.get(key, 0)):
                out.append(f"{_name(key)} delivery count {deliveries}, not {low}..{handed}")
        order = [k for k, _ in sorted(found.items(), key=lambda kv: kv[1][1])]
        if not out and order != sorted(order, key=lambda k: image.messages[k][-1]):
            out.append(f"ids out of put order: {[_name(k) for k in order]}")
        if queues != image.settings:
            out.append(f"settings {queues}, not {image.settings}")
        want_dedup = {k: u for k, u in image.dedup.items() if u > wall}
        if dedup != want_dedup:
            out.append(f"dedup ids {sorted(dedup)}, not {sorted(want_dedup)}")
        if taken != image.taken:
            out.append(f"tasks taken and not done {taken}, not {image.taken}")
        return out

    # --- after every step: the broker says what the model says ------------------------------

    @invariant()
    def same_queues(self) -> None:
        m = self.model
        for name in NAMES:
            info = self.broker.handle(OBSERVER, Info(1, name), m.now)[0][1].value
            q = m.queues.get(name) or m.q(name)
            want = {
                "depth": len(q.waiting),
                "delayed": len(m.delayed(q)),
                "in_flight": len(q.flights),
                "maxsize": q.maxsize,
                "unfinished": q.unfinished,
                "shutdown": q.shutdown,
                "lease": q.lease,
                "max_deliveries": q.max_deliveries,
                "dedup_window": q.dedup_window,
                "consumers_waiting": sum(w.kind == "get" for w in q.waiters),
            }
            got = {k: info[k] for k in want}
            assert got == want, f"INFO {name}: broker {got}, model {want}"
            peek = self.broker.handle(OBSERVER, Peek(1, name, 1000), m.now)[0][1].value
            shown = [
                (
                    p["payload"],
                    p["delivery_count"],
                    p["priority"],
                    p["headers"],
                    p["origin"],
                    p["reason"],
                )
                for p in peek
                if "due" not in p  # delayed ones come last, with their due time
            ]
            ready = [
                (x.key, x.handed, x.priority, x.headers, x.origin, x.reason) for x in m.ready(q)
            ]
            if KNOWN.peek_order:  # the order within a priority is checked by GETs only
                shown.sort(key=lambda s: (-s[2], s[0]))
                ready.sort(key=lambda s: (-s[2], s[0]))
            assert shown == ready, f"PEEK {name}: broker {shown}, model {ready}"


def _profile(examples: int, steps: int) -> settings:
    return settings(
        max_examples=examples,
        stateful_step_count=steps,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
    )


# CI: each store for ~10 s. The slow profile (durable stores, longer runs: more segments,
# compactions and crashes in one run) ~40 s each. Either, longer: the variables below.
_ci = _profile(
    int(os.environ.get("PIGEON_MODEL_EXAMPLES", "120")),
    int(os.environ.get("PIGEON_MODEL_STEPS", "60")),
)
_long = _profile(
    int(os.environ.get("PIGEON_MODEL_LONG_EXAMPLES", "200")),
    int(os.environ.get("PIGEON_MODEL_LONG_STEPS", "150")),
)

MACHINES: dict[tuple[str, str], type[BrokerMachine]] = {}


def _machine(kind: str, fsync: str, native: bool = False) -> Any:
    attrs = {"KIND": kind, "FSYNC": fsync, "NATIVE": native}
    machine = type(f"Broker_{kind}_{fsync}{'_c' * native}", (BrokerMachine,), attrs)
    if not native:
        MACHINES[kind, fsync] = machine
    return _ci(machine).TestCase


def _long_run(kind: str, fsync: str) -> Any:
    attrs = {"KIND": kind, "FSYNC": fsync}
    machine = type(f"Broker_{kind}_{fsync}_long", (BrokerMachine,), attrs)
    # 200 runs of 150 steps: ~35 s here, but this VM's speed swings 3-4x under load, and
    # one CI run passed the suite's 120 s timeout (the runs are bounded by their count).
    return pytest.mark.timeout(900)(pytest.mark.slow(_long(machine).TestCase))


TestMemoryStore = _machine("memory", "batch")
TestLogStoreFsyncBatch = _machine("log", "batch")  # the Python syncer
TestLogStoreFsyncBatchCSyncer = _machine("log", "batch", native=True)  # the C one, as served
TestLogStoreFsyncAlways = _machine("log", "always")
TestSQLiteStoreFsyncBatch = _machine("sqlite", "batch")
TestSQLiteStoreFsyncAlways = _machine("sqlite", "always")
TestLogStoreFsyncBatchLongRuns = _long_run("log", "batch")
TestLogStoreFsyncAlwaysLongRuns = _long_run("log", "always")
TestSQLiteStoreFsyncBatchLongRuns = _long_run("sqlite", "batch")
TestSQLiteStoreFsyncAlwaysLongRuns = _long_run("sqlite", "always")


# --- each known finding, as a scenario of the same machine --------------------------------
#
# Random runs reach a finding's conditions only now and then (a MOVE that empties the
# oldest segment just before a power cut); these drive the machine through each one. Its
# flag is off for the run, so the model expects what the contract says: a scenario fails
# while its finding is open (a strict xfail) and passes once it is fixed - then turn the
# flag off.


class _Drawn:
    """Stands for ``st.data()`` in a scenario: every draw gives ``value``."""

    def __init__(self, value: Any) -> None:
        self.value = value

    def draw(self, strategy: Any) -> Any:
        return self.value


@contextlib.contextmanager
def _scenario(kind: str, fsync: str, *fixed: str) -> Iterator[BrokerMachine]:
    saved = {name: getattr(KNOWN, name) for name in fixed}
    for name in fixed:
        setattr(KNOWN, name, False)
    machine = MACHINES[kind, fsync]()
    try:
        yield machine
        machine.same_queues()
    finally:
        machine.teardown()
        for name, value in saved.items():
            setattr(KNOWN, name, value)


def _open(flag: str, finding: str) -> Any:
    return pytest.mark.xfail(KNOWN.__dict__[flag], reason=finding, raises=AssertionError,
                             strict=True)  # fmt: skip


@_open("drop_before_sync", "FINDINGS-broker.md #1")
def test_a_move_that_empties_the_oldest_segment_keeps_its_messages_through_a_power_cut() -> None:
    with _scenario("log", "always", "drop_before_sync") as m:
        m.send_put(0, "a", 2, {}, None, size=1500)  # in segment 1
        m.send_put(0, "b", 1, {}, None, size=1500)  # segment 1 is full: segment 2 begins
        m.get(0, "b", 1, 0.0, False, None)  # segment 1 now holds only a's two
        m.disk_catches_up()
        m.move(("a", "b"), None)  # a's two leave segment 1 for segment 2: 1 is dropped
        m.crash("power", 0.0, 0.25)  # before the syncer's fdatasync


@_open("roll_fsync_confirmed", "FINDINGS-broker.md #4")
def test_a_failed_fsync_at_a_segment_roll_is_never_confirmed_by_the_syncer() -> None:
    with _scenario("log", "always", "roll_fsync_confirmed") as m:
        m.disk.fail = "loop"
        m.send_put(0, "a", 1, {}, None, size=3000)
        m.send_put(0, "a", 1, {}, None, size=3000)  # segment full: the roll's fdatasync fails
        m.disk_catches_up()  # the syncer's own fdatasync succeeds
        m.crash("power", 0.0, 0.25)


@_open("dedup_repeat_early", "FINDINGS-broker.md #2")
def test_a_repeat_is_confirmed_only_once_its_original_is_stored() -> None:
    with _scenario("log", "batch", "dedup_repeat_early") as m:
        m.begin_read()
        m.send_put(0, "a", 1, {}, ["order-42"])
        m.send_put(1, "a", 1, {}, ["order-42"])  # a client's retry, in the same read
        m.crash("kill", 0.0, 0.25)  # before the read's changes were written


@_open("ttl_after_restart", "FINDINGS-broker.md #13 and its suspected sibling")
def test_a_get_before_the_timer_ran_never_takes_an_expired_message() -> None:
    # After a restart the first GET may come before the first tick (#13); so may any GET
    # while the loop is late (FINDINGS-broker.md, suspected: _take never checks expiry).
    with _scenario("memory", "batch", "ttl_after_restart") as m:
        m.send_put(0, "a", 1, {"ttl": 0.5}, None)
        m.send_put(0, "a", 1, {}, None)
        m.late_get(1, "a", 1.0)


@_open("nack_delay_lost", "FINDINGS-broker.md #14")
def test_a_nack_delay_survives_a_restart() -> None:
    with _scenario("sqlite", "batch", "nack_delay_lost") as m:
        m.send_put(0, "a", 1, {}, None)
        m.get(0, "a", 1, 0.0, True, None)
        m.send_nack(0, "a", [m.held[0][0][1]], delay=60.0)
        m.crash("kill", 0.0, 0.25)


@_open("dead_queue_ttl", "FINDINGS-broker.md #15")
def test_a_put_into_a_dead_letter_queue_keeps_its_delay_and_ttl() -> None:
    # docs/protocol.md §4.3 (as settled): it keeps its ttl, and is dropped when that runs
    # out (nowhere further to go); its delay outlives a restart like any other.
    with _scenario("log", "batch", "dead_queue_ttl") as m:
        m.send_put(0, "a.dead", 1, {"delay": 1.0, "ttl": 2.0}, None)
        m.crash("kill", 0.0, 0.25)
        m.same_queues()
        m.advance(5.0)


@_open("inflight_not_counted", "FINDINGS-spec.md #5")
def test_a_delivery_in_flight_at_a_crash_is_counted() -> None:
    with _scenario("log", "batch", "inflight_not_counted") as m:
        m.send_put(0, "a", 1, {}, None)
        m.get(0, "a", 1, 0.0, True, None)  # delivered once, in flight
        m.send_put(0, "b", 1, {}, None)  # a later batch, written
        m.crash("kill", 0.0, 0.25)


@_open("repeats_count_for_maxsize", "FINDINGS-spec.md #20")
def test_repeats_in_a_batch_do_not_count_against_maxsize() -> None:
    with _scenario("memory", "batch", "repeats_count_for_maxsize") as m:
        m.declare("a", 1, None, None, None)
        m.send_put(0, "a", 1, {}, ["x"])
        m.send_put(0, "a", 2, {}, ["x", "x"])  # stores nothing: confirmed


@_open("join_not_answered", "new: a timer or a lost connection ends the last task")
def test_a_join_is_answered_when_a_ttl_dead_letters_the_last_task() -> None:
    with _scenario("memory", "batch", "join_not_answered") as m:
        m.send_put(0, "a", 1, {"ttl": 1.0}, None)
        m.join(1, "a", 4.125)
        m.advance(1.0)  # expired: a.dead; a has nothing unfinished


@_open("join_not_answered", "new: a timer or a lost connection ends the last task")
def test_a_join_is_answered_when_a_lost_connection_dead_letters_the_last_task() -> None:
    with _scenario("memory", "batch", "join_not_answered") as m:
        m.declare("a", None, None, 1, None)
        m.send_put(0, "a", 1, {}, None)
        m.get(2, "a", 1, 0.0, True, None)
        m.join(1, "a", None)
        m.lose_connection(2)  # its delivery was the last allowed: a.dead


@_open("move_leaves_puts_parked", "new: MOVE frees room and admits no parked put")
def test_a_move_admits_the_puts_waiting_for_room_in_its_source() -> None:
    with _scenario("memory", "batch", "move_leaves_puts_parked") as m:
        m.declare("a", 1, None, None, None)
        m.send_put(0, "a", 1, {}, None)
        m.send_put(1, "a", 1, {}, None, wait=1.125)  # full: it waits for room
        m.move(("a", "b"), None)


@_open("cancelled_put_blocks", "new: a cancelled parked PUT stays in the line of putters")
def test_a_cancelled_put_leaves_room_for_the_next_put() -> None:
    with _scenario("memory", "batch", "cancelled_put_blocks") as m:
        m.declare("a", 2, None, None, None)
        m.send_put(0, "a", 1, {}, None)
        m.send_put(1, "a", 2, {}, None, wait=1.125)  # two do not fit in one place: it waits
        m.cancel(1, _Drawn(m.req))
        m.send_put(0, "a", 1, {}, None)  # fits


def test_a_batch_repeating_an_id_with_no_dedup_window_counts_every_payload_for_maxsize() -> None:
    # dedup_window 0 remembers nothing: both payloads are stored, so both count for
    # maxsize (found against main after the round-4 fixes: counting distinct ids let the
    # batch in, and the queue held 2 with maxsize 1).
    with _scenario("memory", "batch") as m:
        m.declare("a", 1, None, None, 0.0)
        m.send_put(0, "a", 2, {}, ["x", "x"])


@_open("peek_order", "suspected in FINDINGS-broker.md: PEEK's order within a priority")
def test_peek_lists_a_queue_in_the_order_get_takes_it() -> None:
    with _scenario("memory", "batch", "peek_order") as m:
        m.send_put(0, "a", 1, {}, None)
        m.send_put(0, "a", 1, {"delay": 0.25}, None)
        m.advance(0.25)  # the second is given back: PEEK showed it first


@pytest.mark.parametrize("crash", ["kill", "power", "stop"])
@pytest.mark.parametrize(
    ("kind", "fsync"),
    [("log", "batch"), ("log", "always"), ("sqlite", "batch"), ("sqlite", "always")],
)
def test_tasks_taken_and_not_yet_done_survive_a_crash(kind: str, fsync: str, crash: str) -> None:
    # Round 6, FINDINGS-nemesis.md #2: a restart kept only the messages, so unfinished
    # became what the store held - join() returned at once, the next task_done() raised.
    with _scenario(kind, fsync) as m:
        m.send_put(0, "a", 4, {}, None)
        m.get(1, "a", 2, 0.0, False, None)  # two taken, auto-acked
        m.get(1, "a", 1, 0.0, True, None)
        m.send_ack(1, "a", [m.held[1][0][1]])  # a third, acked
        m.task_done("a", 1)  # 3 unfinished: 1 held, 2 taken and not yet done
        m.send_put(0, "b", 2, {}, None)
        m.task_done("b", 1)  # done before it was taken: 1 unfinished, 2 held
        m.disk_catches_up()
        m.crash(crash, 0.0, 0.25)  # (power: --fsync batch promises kill -9 only)
        m.same_queues()
        m.join(2, "a", 0.0)  # 3 unfinished: timeout
        m.task_done("a", 3)
        m.crash(crash, 0.0, 0.25)


def test_what_expired_while_the_broker_was_down_goes_in_the_order_its_ttls_ran_out() -> None:
    # Found by the long runs once tasks taken outlived a restart: a.dead's count below
    # what it holds is clamped when its own message expires, not when a's arrives, so
    # the order of the two at the first tick shows (the model went queue by queue).
    with _scenario("log", "batch") as m:
        m.send_put(0, "a.dead", 1, {"ttl": 8.0}, None)
        m.task_done("a.dead", 1)  # done before it was taken: 0 unfinished, 1 held
        m.send_put(0, "a", 1, {"ttl": 2.0}, None)  # runs out first: to a.dead
        m.crash("kill", 0.0, 600.0)  # both ran out while the broker was down


@pytest.mark.parametrize("crash", ["kill", "power", "stop"])
@pytest.mark.parametrize("fsync", ["batch", "always"])
def test_a_full_disk_punches_out_what_acks_freed_and_a_crash_keeps_the_rest(
    fsync: str, crash: str
) -> None:
    # Review 7b #2: on a full disk the dead prefix of the oldest segment is punched out of
    # the file (its header notes where records begin); a crash after it must find every
    # message still live, once, and none of those acked.
    with _scenario("log", fsync) as m:
        for _ in range(3):  # segment 1: a's first three, a record each
            m.send_put(0, "a", 1, {}, None, size=1500)
        m.send_put(0, "a", 2, {}, None, size=300)  # segment 2
        m.disk_catches_up()
        m.disk_fills()
        m.disk_stays_full(True)
        m.get(1, "a", 2, 0.0, True, None)  # the reserve let go for the DELIVERED
        m.send_ack(1, "a", [did for _, did in m.held[1]])  # the first two acked
        m.loop_turn()
        assert isinstance(m.store, LogStore)
        assert m.store.disk_full is not None
        assert m.store._holes[min(m.store._sizes)] > FILE_HEADER_SIZE  # punched
        m.get(1, "a", 1, 0.0, True, None)
        m.crash(crash, 0.5, 0.25)
        m.same_queues()
        m.get(2, "a", 3, 0.0, False, None)  # the three left, in order
        m.disk_stays_full(False)
        m.crash(crash, 0.5, 0.25)


@pytest.fixture(scope="module", autouse=True)
def _report_crash_points() -> Any:
    yield
    if COUNTS:
        print("\ncrash points reached (a crash counts once per condition it met):")
        for label, n in sorted(COUNTS.items()):
            print(f"  {n:5d}  {label}")
