"""A stateful model of the local queue's shared ring, with processes killed at any point.

Hypothesis drives one local queue through several handles of this process and through
forked child processes, with every option a put takes (delay, ttl, dedup_id(s), priority,
headers), maxsize, get/get_many/get_message with ack, nack and nack with a delay,
task_done, shutdown (immediate or not) and a clock that moves. After every step the ring
as the next lock holder sees it - each record in ring order with its deliveries, priority,
due time, expiry and headers - the unfinished-task count, the shutdown flags, the live
dedup ids and qsize() must equal a plain reference model's (``Model``).

A child process runs one operation and is SIGKILLed at the n-th point of the local queue's
code where CPython could run a signal handler (``_local_faults.Fault``), or right after
the operation (killed between two operations), or exits. Its operation must then be
complete or invisible (a dedup put may also leave its item stored with its ids forgotten;
a get_message whose nack did not happen took its item with it), and the model adopts the
outcome the ring shows. The run ends by draining the queue through a fresh handle and
putting and getting once more: the queue never wedges.

The clock is the model's: ``host_clock`` is replaced by a number the ``advance`` rule
moves, so delays, ttls and the dedup window are exact.

A new option, request kind or recovery step of the local queue is not done until it has
its rules here (docs/local.md).
"""

from __future__ import annotations

import collections
import contextlib
import copy
import os
import pickle
import signal
import sqlite3
import struct
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    initialize,
    invariant,
    multiple,
    precondition,
    rule,
    run_state_machine_as_test,
)

import pigeon
from pigeon.backends.local import LocalQueue, ring
from pigeon.backends.local import queue as local_queue
from pigeon.backends.local.codec import unwrap
from pigeon.backends.local.layout import IMMEDIATE, K_HEADERS, K_OPTIONS, K_TAKEN, OPTS, SHUTDOWN
from tests.backends._local_faults import Fault, use_path

WINDOW = 3.0  # the queue's dedup window, in the model's seconds
# what a run did, printed at its end (pytest -s): steps, child operations and their
# outcomes, and where the children died ("op in module.py:function")
STATS: collections.Counter[str] = collections.Counter()
KILLS: collections.Counter[str] = collections.Counter()


# --- the reference model -------------------------------------------------------------


@dataclass
class Rec:
    body: Any
    deliveries: int = 1
    priority: int = 0
    due: float = 0.0
    expires: float = 0.0
    headers: dict[str, str] = field(default_factory=dict)

    def view(self) -> tuple[Any, ...]:
        return (self.body, self.deliveries, self.priority, self.due, self.expires, self.headers)


@dataclass
class Opts:
    delay: float | None = None
    ttl: float | None = None
    priority: int | None = None
    headers: dict[str, str] | None = None

    def kwargs(self) -> dict[str, Any]:
        names = ("delay", "ttl", "priority", "headers")
        return {k: getattr(self, k) for k in names if getattr(self, k) is not None}


class Refused(Exception):
    """What the model says a call raises (the exception type the queue must raise)."""

    def __init__(self, kind: type[BaseException]) -> None:
        self.kind = kind


@dataclass
class Model:
    maxsize: int
    now: float = 1000.0
    items: list[Rec] = field(default_factory=list)  # in ring order, expired ones until dropped
    unfinished: int = 0
    flags: int = 0
    ids: dict[str, float] = field(default_factory=dict)  # dedup id -> remembered until

    def copy(self) -> Model:
        return copy.deepcopy(self)

    def view(self) -> tuple[Any, ...]:
        live = {k: v for k, v in self.ids.items() if v > self.now}
        return [r.view() for r in self.items], self.unfinished, self.flags, live

    # a put: the record as LocalQueue._records / codec.with_options make it
    def record(self, body: Any, o: Opts) -> Rec:
        if o.priority or o.delay or o.ttl:
            due = self.now + o.delay if o.delay else 0.0
            expires = (due or self.now) + o.ttl if o.ttl else 0.0
            return Rec(body, 1, o.priority or 0, due, expires, dict(o.headers or {}))
        return Rec(body, headers=dict(o.headers or {}))

    def put(self, bodies: list[Any], o: Opts, ids: list[str] | None, many: bool) -> None:
        if many and self.maxsize and len(bodies) > self.maxsize:
            raise Refused(ValueError)  # it could never fit
        if self.flags & SHUTDOWN:
            raise Refused(pigeon.ShutDown)
        fresh = bodies
        if ids is not None:
            known = {k for k, until in self.ids.items() if until > self.now}
            fresh = []
            for body, d in zip(bodies, ids, strict=True):
                if d not in known:
                    fresh.append(body)
                    known.add(d)
        if self.maxsize and len(self.items) + len(fresh) > self.maxsize:
            raise Refused(pigeon.Full)
        if ids is not None:
            self.ids = {k: v for k, v in self.ids.items() if v > self.now}
            for d in ids:
                self.ids.setdefault(d, self.now + WINDOW)
        self.items += [self.record(b, o) for b in fresh]
        self.unfinished += len(fresh)

    def take(self, n: int) -> list[Rec]:
        expired = [r for r in self.items if 0 < r.expires <= self.now]
        self.items = [r for r in self.items if r not in expired]
        self.unfinished = max(0, self.unfinished - len(expired))
        ready = [(-r.priority, i) for i, r in enumerate(self.items) if not r.due > self.now]
        if not ready:
            if self.flags & SHUTDOWN and not self.items:
                raise Refused(pigeon.ShutDown)
            raise Refused(pigeon.Empty)
        chosen = [self.items[i] for _, i in sorted(ready)[:n]]
        self.items = [r for r in self.items if all(r is not c for c in chosen)]
        return chosen

    def nack(self, r: Rec, requeue: bool, delay: float) -> None:
        if not requeue:
            return
        if self.flags & IMMEDIATE:
            raise Refused(pigeon.ShutDown)
        due = self.now + delay if delay else 0.0
        self.items.append(Rec(r.body, r.deliveries + 1, r.priority, due, 0.0, r.headers))

    def task_done(self) -> None:
        if self.unfinished <= 0:
            raise Refused(ValueError)
        self.unfinished -= 1

    def shutdown(self, immediate: bool) -> None:
        self.flags |= SHUTDOWN | (IMMEDIATE if immediate else 0)
        if immediate:
            self.unfinished = max(0, self.unfinished - len(self.items))
            self.items = []


def apply(model: Model, op: tuple[Any, ...]) -> tuple[Model, Any]:
    """``op`` applied to a copy of ``model``: the new model and what the call returns (a
    ``Refused`` for what it raises)."""
    m = model.copy()
    name = op[0]
    try:
        if name == "put":
            m.put([op[1]], op[2], None if op[3] is None else [op[3]], many=False)
            out: Any = None
        elif name == "put_many":
            m.put(op[1], op[2], op[3], many=True)
            out = None
        elif name == "get":
            out = [r.body for r in m.take(1)]
        elif name == "get_many":
            out = [r.body for r in m.take(op[1])]
        elif name == "get_message":  # then ack, or nack with op[1]: (requeue, delay)
            (r,) = m.take(1)
            out = (r.body, r.deliveries, r.headers)
            if op[1] is not None:
                m.nack(r, *op[1])
        elif name == "task_done":
            m.task_done()
            out = None
        elif name == "shutdown":
            m.shutdown(op[1])
            out = None
        else:
            raise AssertionError(name)
    except Refused as exc:
        return m, exc
    return m, out


# --- what the queue shows -----------------------------------------------------------------


def observe(q: LocalQueue[Any], now: float) -> tuple[Any, ...]:
    """The ring as the next lock holder sees it (taking the lock completes what a dead
    holder published), with the counts the model keeps."""
    q._lock()
    try:
        st = q._state()
        data = q._data
        if data is None or st.capacity != q._cap:
            data = q._map_data(st.capacity)
        walk = ring.RingState(st.head, st.tail, st.count, st.capacity)
        records = []
        while walk.count:
            kind, deliveries, at, length = ring.next_record(data, walk)
            if kind == K_TAKEN:
                continue
            payload = bytes(data[at : at + length])
            due = expires = 0.0
            if kind == K_OPTIONS:
                _, _, _, due, expires = OPTS.unpack_from(data, at)
            headers: dict[str, str] = {}
            priority = 0
            if kind in (K_HEADERS, K_OPTIONS):
                kind, payload, headers, priority = unwrap(kind, payload)
            body = q._decode(kind, payload)
            records.append((body, deliveries, priority, due, expires, headers))
        flags, unfinished = st.flags, st.unfinished
        assert q.qsize() == len(records) == st.count - st.tombs
    finally:
        q._unlock()
    return records, unfinished, flags, live_ids(q, now)


def live_ids(q: LocalQueue[Any], now: float) -> dict[str, float]:
    path = q._path + ".dedup"
    if not os.path.exists(path):
        return {}
    db = sqlite3.connect(path, isolation_level=None)  # rolls back a dead put's journal
    try:
        if not db.execute("SELECT 1 FROM sqlite_master WHERE name = 'ids'").fetchall():
            return {}  # a put that made the file died before the table
        return dict(db.execute("SELECT id, until FROM ids WHERE until > ?", (now,)).fetchall())
    finally:
        db.close()


# --- the machine ---------------------------------------------------------------------------


@st.composite
def _bodies(draw: st.DrawFn) -> Any:
    """bytes (the C path's own kind) or a pickled tuple, up to 9 KB: a ring of 4 KiB
    wraps, and grows at several sizes, wrapped or not."""
    n = draw(st.integers(0, 10**6))
    pad = b"." * draw(st.sampled_from([0, 10, 700, 1500, 3000, 9000]))
    return b"%d" % n + pad if draw(st.booleans()) else ("item", n, pad)


bodies = _bodies()
opts = st.builds(
    Opts,
    delay=st.none() | st.sampled_from([0.0, 1.0, 2.5]),
    ttl=st.none() | st.sampled_from([1.5, 4.0]),
    priority=st.none() | st.integers(0, 9),
    headers=st.none() | st.just({"k": "v"}) | st.just({"trace": "t", "x": "y"}),
)
dedup_ids = st.sampled_from(["a", "b", "c"])
handles = st.integers(0, 2)
# The lock-held steps where a change is written and published (a kill at the k-th point
# of one of them hits the windows between the writes and the commits that matter most).
CRITICAL = frozenset(
    {"_commit", "_write_state", "_apply_marks", "_grow", "_fill", "write",
     "_put_fast", "_get_fast", "transaction", "_requeue", "shutdown", "task_done"}
)  # fmt: skip
# None: no kill; n: at the n-th point anywhere; (n, CRITICAL): at the n-th point of those
kill_points = st.one_of(
    st.none(),
    st.integers(1, 300),
    st.tuples(st.integers(1, 40), st.just(CRITICAL)),
)
nacks = st.none() | st.tuples(st.booleans(), st.sampled_from([0.0, 1.0]))


def _weighted(*choices: tuple[int, st.SearchStrategy[Any]]) -> st.SearchStrategy[Any]:
    return st.sampled_from([s for w, s in choices for _ in range(w)]).flatmap(lambda s: s)


put_op = st.tuples(st.just("put"), bodies, opts, st.none() | dedup_ids)
put_many_op = st.tuples(
    st.just("put_many"),
    st.lists(bodies, min_size=1, max_size=4),
    opts,
    st.none() | st.just(["a", "b", "c", "a"]),  # a repeat inside the batch, too
)
get_op = st.tuples(st.just("get"))
get_many_op = st.tuples(st.just("get_many"), st.integers(1, 5))
# what this process does (taking a message is a rule of its own: the message is held)
advance_op = st.tuples(st.just("advance"), st.sampled_from([0.5, 1.0, 2.0, 5.0]))
parent_ops = _weighted(
    (5, put_op), (3, put_many_op), (2, get_op), (2, get_many_op), (2, advance_op)
)
# what a child does, killed somewhere in it
child_ops = _weighted(
    (4, put_op),
    (3, put_many_op),
    (2, get_op),
    (2, get_many_op),
    (3, st.tuples(st.just("get_message"), nacks)),
    (1, st.tuples(st.just("task_done"))),
)
late_ops = st.tuples(st.just("shutdown"), st.booleans())  # once the queue has had a life


def _run(q: LocalQueue[Any], op: tuple[Any, ...]) -> Any:
    """Run ``op`` on ``q`` as the model describes it; what it returns."""
    name = op[0]
    if name == "put":
        q.put(op[1], block=False, dedup_id=op[3], **op[2].kwargs())
        return None
    if name == "put_many":
        ids = None if op[3] is None else op[3][: len(op[1])]
        q.put_many(op[1], block=False, dedup_ids=ids, **op[2].kwargs())
        return None
    if name == "get":
        return [q.get_nowait()]
    if name == "get_many":
        return q.get_many(op[1], block=False)
    if name == "get_message":
        msg = q.get_message(timeout=0)
        out = (msg.body, msg.delivery_count, msg.headers)
        if op[1] is None:
            msg.ack()
        else:
            msg.nack(requeue=op[1][0], delay=op[1][1])
        return out
    if name == "task_done":
        q.task_done()
        return None
    if name == "shutdown":
        q.shutdown(immediate=op[1])
        return None
    raise AssertionError(name)


def _normalize(op: tuple[Any, ...]) -> tuple[Any, ...]:
    if op[0] == "put_many" and op[3] is not None:
        return (*op[:3], op[3][: len(op[1])])
    return op


class LocalRing(RuleBasedStateMachine):
    messages = Bundle("messages")

    def __init__(self) -> None:
        super().__init__()
        self.clock = [1000.0]
        setattr(local_queue, "host_clock", lambda: self.clock[0])  # noqa: B010
        self.handles: list[LocalQueue[Any]] = []
        self.steps = 0

    @initialize(maxsize=st.sampled_from([0, 0, 3, 6]))
    def make(self, maxsize: int) -> None:
        STATS["examples"] += 1
        q: LocalQueue[Any] = pigeon.Queue(  # type: ignore[assignment]
            maxsize=maxsize, capacity=4096, dedup_window=WINDOW
        )
        self.handles = [q] + [pickle.loads(pickle.dumps(q)) for _ in range(2)]
        self.model = Model(maxsize)

    def teardown(self) -> None:
        try:
            if self.handles:
                self._check_never_wedged()
        finally:
            for h in reversed(self.handles):
                h.close()
            setattr(local_queue, "host_clock", _HOST_CLOCK)  # noqa: B010

    def _check_never_wedged(self) -> None:
        """A fresh handle drains what the model holds (everything due, the expired ones
        dropped), then puts and gets once more."""
        fresh: LocalQueue[Any] = pickle.loads(pickle.dumps(self.handles[0]))
        try:
            self.clock[0] += 100.0
            self.model.now = self.clock[0]
            want: list[Any] = []
            m = self.model.copy()
            while True:
                try:
                    want += [r.body for r in m.take(1000)]
                except Refused:
                    break
            got: list[Any] = []
            while True:
                try:
                    got += fresh.get_many(1000, block=False)
                except (pigeon.Empty, pigeon.ShutDown):
                    break
            assert got == want
            if self.model.flags & SHUTDOWN:
                with pytest.raises(pigeon.ShutDown):
                    fresh.put("after", block=False)
            else:
                fresh.put("after", block=False)
                assert fresh.get(timeout=5) == "after"
        finally:
            fresh.close()

    def _check(self, q: LocalQueue[Any], op: tuple[Any, ...]) -> None:
        """Run ``op`` here, on handle ``q``, and check it against the model."""
        model, want = apply(self.model, op)
        if isinstance(want, Refused):
            with pytest.raises(want.kind):
                _run(q, op)
        else:
            assert _run(q, op) == want
        self.model = model

    @invariant()
    def the_ring_is_the_models(self) -> None:
        self.steps += 1
        STATS["steps"] += 1
        if self.handles:
            assert observe(self.handles[1], self.model.now) == self.model.view()

    @rule(h=handles, op=parent_ops)
    def act(self, h: int, op: tuple[Any, ...]) -> None:
        if op[0] == "advance":  # the clock moves, for every process
            self.clock[0] += op[1]
            self.model.now = self.clock[0]
        else:
            self._check(self.handles[h], _normalize(op))

    @precondition(lambda self: self.model.items)
    @rule(target=messages, h=handles)
    def get_message(self, h: int) -> Any:
        model, want = apply(self.model, ("get_message", None))
        if isinstance(want, Refused):
            with pytest.raises(want.kind):
                self.handles[h].get_message(timeout=0)
            self.model = model
            return multiple()
        msg = self.handles[h].get_message(timeout=0)
        assert (msg.body, msg.delivery_count, msg.headers) == want
        self.model = model
        rec = Rec(msg.body, msg.delivery_count, msg._priority, headers=msg.headers)
        return msg, rec

    @rule(held=consumes(messages), how=nacks)
    def settle(self, held: tuple[Any, Rec], how: tuple[bool, float] | None) -> None:
        msg, rec = held
        if how is None:
            msg.ack()
            return
        m = self.model.copy()
        try:
            m.nack(rec, *how)
        except Refused as exc:
            with pytest.raises(exc.kind):
                msg.nack(requeue=how[0], delay=how[1])
        else:
            msg.nack(requeue=how[0], delay=how[1])
        self.model = m

    @precondition(lambda self: self.model.unfinished)
    @rule(h=handles)
    def task_done(self, h: int) -> None:
        self._check(self.handles[h], ("task_done",))

    @precondition(lambda self: not self.model.flags and self.steps > 20)
    @rule(h=handles, op=late_ops, in_a_child=st.booleans(), kill_at=kill_points)
    def shutdown(self, h: int, op: tuple[Any, ...], in_a_child: bool, kill_at: Any) -> None:
        if in_a_child:
            self.in_a_child(h, op, kill_at, then_kill=False)
        else:
            self._check(self.handles[h], op)

    @rule(h=handles, op=child_ops, kill_at=kill_points, then_kill=st.booleans())
    def child(self, h: int, op: tuple[Any, ...], kill_at: Any, then_kill: bool) -> None:
        self.in_a_child(h, op, kill_at, then_kill)

    def in_a_child(self, h: int, op: tuple[Any, ...], kill_at: Any, then_kill: bool) -> None:
        """A forked child runs ``op`` on its copy of handle ``h``, and is SIGKILLed at the
        ``kill_at``-th point of it, or right after it (``then_kill``), or exits."""
        op = _normalize(op)
        outcome = _in_child(self.handles[h], op, kill_at, then_kill)
        before = self.model
        after, want = apply(before, op)
        candidates = [("complete", after), ("invisible", before)]
        if op[0] in ("put", "put_many") and op[-1] is not None:
            stored = after.copy()
            stored.ids = before.ids  # stored, its ids not remembered (at-least-once)
            candidates.append(("stored, ids forgotten", stored))
        if op[0] == "get_message" and op[1] is not None:
            taken, _ = apply(before, ("get_message", None))  # taken, never given back
            candidates.append(("taken, not given back", taken))
        seen = observe(self.handles[1], before.now)
        matches = [name for name, m in candidates if m.view() == seen]
        assert matches, (
            f"{op[0]} killed at {outcome[1] or 'its end'}: the ring shows {seen}, "
            f"neither complete {after.view()} nor invisible {before.view()}"
        )
        self.model = dict(candidates)[matches[0]]
        if outcome[0] == "returned":
            assert "complete" in matches
            assert outcome[1] == (want.kind.__name__ if isinstance(want, Refused) else want)
        event(f"child {op[0]}: {outcome[0]}, {matches[0]}")
        STATS[f"child {outcome[0]}: {matches[0]}"] += 1


def _in_child(
    q: LocalQueue[Any], op: tuple[Any, ...], kill_at: Any, then_kill: bool
) -> tuple[str, Any]:
    """Fork, run ``op`` on ``q`` in the child; ("returned", what it returned or the name of
    what it raised), or ("killed", where)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        os.close(r)
        code = 0
        try:
            n, within = kill_at if isinstance(kill_at, tuple) else (kill_at or 0, None)
            fault = Fault(n, lambda: _die(w, fault.where), within)
            with fault if kill_at else contextlib.nullcontext():
                try:
                    result: Any = _run(q, op)
                except Exception as exc:
                    result = type(exc).__name__
            report = pickle.dumps(("returned", result))
            os.write(w, struct.pack("<I", len(report)) + report)
            if then_kill:
                os.kill(os.getpid(), signal.SIGKILL)
        except BaseException:
            code = 3
        os._exit(code)
    os.close(w)
    chunks = []
    while chunk := os.read(r, 1 << 16):
        chunks.append(chunk)
    os.close(r)
    _, status = os.waitpid(pid, 0)
    raw = b"".join(chunks)
    assert not (os.WIFEXITED(status) and os.WEXITSTATUS(status)), "the child failed"
    (n,) = struct.unpack_from("<I", raw)
    kind, value = pickle.loads(raw[4 : 4 + n])
    if kind == "killed":
        KILLS[f"{op[0]} in {value}"] += 1
        event(f"killed in {value}")
    return kind, value


def _die(w: int, where: str) -> None:  # pragma: no cover - in the child
    report = pickle.dumps(("killed", where))
    os.write(w, struct.pack("<I", len(report)) + report)
    os.kill(os.getpid(), signal.SIGKILL)


_HOST_CLOCK = local_queue.host_clock


@pytest.mark.parametrize("path", ["c", "pure"])
def test_the_local_ring_matches_its_model_with_processes_killed_anywhere(
    path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    use_path(path, monkeypatch)
    monkeypatch.setattr(local_queue, "host_clock", _HOST_CLOCK)  # restored after the run
    STATS.clear()
    KILLS.clear()
    run_state_machine_as_test(
        LocalRing,
        settings=settings(
            max_examples=int(os.environ.get("PIGEON_MODEL_EXAMPLES", "60")),
            stateful_step_count=30,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
        ),
    )
    print(f"\n{path} path: {dict(STATS)}")
    places = collections.Counter(k.split(" in ")[1] for k in KILLS.elements())
    print(f"killed in {len(places)} functions: {dict(places.most_common())}")
