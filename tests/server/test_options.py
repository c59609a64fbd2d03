"""Message options in the broker's rules (delay, ttl, dedup id, priority, headers), time
by hand, and across a restart on both durable stores."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import msgspec
import pytest

from pigeon.protocol import (
    Ack,
    Declare,
    Deliver,
    Delivery,
    Error,
    Get,
    Move,
    Nack,
    Ok,
    Peek,
    Purge,
    Put,
    PutBatch,
    PutOptions,
)
from pigeon.protocol.messages import Confirmed, Welcome
from pigeon.server.core import Broker, Store
from pigeon.server.limits import Limits
from pigeon.server.store import Durable, LogStore, SQLiteStore

A, B = 1, 2
STORES: dict[str, type[Durable]] = {"log": LogStore, "sqlite": SQLiteStore}


class Clock:
    """The broker's monotonic clock and the wall clock, moved together by hand."""

    def __init__(self) -> None:
        self.mono = 100.0
        self.wall = 1_800_000_000.0

    def advance(self, seconds: float) -> None:
        self.mono += seconds
        self.wall += seconds


def make(store: Store | None = None, clock: Clock | None = None) -> tuple[Broker, Clock]:
    clock = clock or Clock()
    b = Broker(store, clock=lambda: clock.mono, wall_clock=lambda: clock.wall)
    b.connection_made(A)
    b.connection_made(B)
    return b, clock


def opts(**kw: Any) -> PutOptions:
    return PutOptions(**kw)


def taken(
    b: Broker, clock: Clock, n: int = 10, manual: bool = False, queue: str = "q"
) -> list[Any]:
    out = b.handle(B, Get(9, queue, n, 0, manual), clock.mono)
    (reply,) = [m for c, m in out if c == B]
    if isinstance(reply, Error):
        assert reply.code == "empty", reply
        return []
    assert isinstance(reply, Deliver)
    return list(reply.messages)


def bodies(ds: list[Delivery]) -> list[bytes]:
    return [d.payload for d in ds]


def test_priorities_higher_first_fifo_within_and_kept_on_redelivery() -> None:
    b, clock = make()
    b.handle(A, Put(1, "q", b"a0"))
    b.handle(A, Put(2, "q", b"b5", 0.0, opts(priority=5)))
    b.handle(A, PutBatch(3, "q", [b"c9", b"d9"], 0.0, opts(priority=9)))
    b.handle(A, Put(4, "q", b"e5", 0.0, opts(priority=5)))
    b.handle(A, Put(5, "q", b"f0"))
    first = taken(b, clock, 3, manual=True)
    assert bodies(first) == [b"c9", b"d9", b"b5"]
    b.handle(B, Nack(6, "q", [first[2].id]))  # b5 comes back ahead of e5, behind nothing
    assert bodies(taken(b, clock, 10)) == [b"b5", b"e5", b"a0", b"f0"]


def test_a_delayed_put_is_invisible_until_due_and_counted_apart() -> None:
    b, clock = make()
    b.handle(A, Put(1, "q", b"later", 0.0, opts(delay=60)), clock.mono)
    b.handle(A, Put(2, "q", b"now"), clock.mono)
    info = b.queues["q"].info()
    assert info["depth"] == 2 and info["delayed"] == 1
    assert bodies(taken(b, clock)) == [b"now"]
    assert taken(b, clock) == []
    assert b.next_deadline() == clock.mono + 60
    clock.advance(59.9)
    b.tick(clock.mono)
    assert taken(b, clock) == []
    clock.advance(0.2)
    b.tick(clock.mono)
    assert bodies(taken(b, clock)) == [b"later"]


def test_a_parked_get_is_served_when_a_delay_ends() -> None:
    b, clock = make()
    b.handle(A, Put(1, "q", b"x", 0.0, opts(delay=5)), clock.mono)
    assert b.handle(B, Get(7, "q", 1, None), clock.mono) == []  # parks
    clock.advance(5)
    out = b.tick(clock.mono)
    assert [(c, bodies(m.messages)) for c, m in out if isinstance(m, Deliver)] == [(B, [b"x"])]


def test_a_delay_longer_than_the_lease_delivers_once() -> None:
    """The delay is not a lease: a consumer waiting all along gets the message once."""
    b, clock = make()
    b.handle(A, Declare(1, "q", lease=5.0))
    b.handle(A, Put(2, "q", b"once", 0.0, opts(delay=60)), clock.mono)
    got: list[bytes] = []
    for _ in range(70):
        clock.advance(1)
        b.tick(clock.mono)
        ds = taken(b, clock, manual=True)
        for d in ds:
            got.append(d.payload)
            b.handle(B, Ack(3, "q", [d.id]), clock.mono)
    assert got == [b"once"]


def test_an_expired_message_moves_to_dead_letters_with_reason_expired() -> None:
    b, clock = make()
    b.handle(A, Put(1, "q", b"stale", 0.0, opts(ttl=10, headers={"k": "v"}, priority=4)))
    b.handle(A, Put(2, "q", b"late", 0.0, opts(ttl=10, delay=30)))  # ttl counts after delay
    b.handle(A, Put(3, "q", b"plain"))
    clock.advance(10)
    b.tick(clock.mono)
    assert b.queues["q"].depth == 2
    assert b.queues["q"].dead_total == 1
    (shown,) = b.handle(A, Peek(4, "q.dead", 10))[0][1].value
    assert shown["payload"] == b"stale" and shown["reason"] == "expired"
    assert shown["origin"] == "q" and shown["headers"] == {"k": "v"}
    clock.advance(19)
    b.tick(clock.mono)
    assert bodies(taken(b, clock, manual=False)) == [b"plain"]
    clock.advance(1)
    b.tick(clock.mono)
    assert bodies(taken(b, clock)) == [b"late"]  # due at 30 s, expires at 40 s
    # a dead letter keeps no ttl: it stays
    clock.advance(1000)
    b.tick(clock.mono)
    assert bodies(taken(b, clock, queue="q.dead")) == [b"stale"]


def test_a_message_taken_in_time_does_not_expire_but_expires_when_given_back_late() -> None:
    b, clock = make()
    b.handle(A, Put(1, "q", b"x", 0.0, opts(ttl=10)))
    (d,) = taken(b, clock, manual=True)
    clock.advance(20)
    b.tick(clock.mono)
    assert b.queues["q"].dead_total == 0  # in flight: taken within its ttl
    b.handle(B, Nack(2, "q", [d.id]), clock.mono)  # back, past its expiry
    assert b.queues["q"].dead_total == 1
    assert taken(b, clock) == []


def test_a_repeated_dedup_id_is_confirmed_not_stored_within_the_window() -> None:
    b, clock = make()
    b.handle(A, Declare(1, "q", dedup_window=60))
    assert b.handle(A, Put(2, "q", b"one", 0.0, opts(dedup_id="k")))[0] == (A, Confirmed(2, 1))
    (d,) = taken(b, clock, manual=True)
    b.handle(B, Ack(3, "q", [d.id]))
    assert b.handle(A, Put(4, "q", b"dup", 0.0, opts(dedup_id="k")))[0] == (A, Confirmed(4, 1))
    assert b.queues["q"].depth == 0
    out = b.handle(A, PutBatch(5, "q", [b"a", b"b", b"c"], 0.0, None, ["k", "m", "m"]))
    assert out[0] == (A, Confirmed(5, 3))
    assert bodies(taken(b, clock)) == [b"b"]
    clock.advance(61)
    b.handle(A, Put(6, "q", b"two", 0.0, opts(dedup_id="k")), clock.mono)
    assert bodies(taken(b, clock)) == [b"two"]


def test_headers_travel_through_nack_dead_letters_and_move() -> None:
    b, clock = make()
    b.handle(A, Put(1, "q", b"x", 0.0, opts(headers={"trace": "t1"})))
    (d,) = taken(b, clock, manual=True)
    assert d.headers == {"trace": "t1"}
    b.handle(B, Nack(2, "q", [d.id], False, 0.0, "bad"))
    b.handle(A, Move(3, "q.dead", "q"))
    (again,) = taken(b, clock)
    assert again.payload == b"x" and again.headers == {"trace": "t1"}


def test_purge_drops_delayed_and_expiring_messages() -> None:
    b, clock = make()
    b.handle(A, Put(1, "q", b"d", 0.0, opts(delay=5)))
    b.handle(A, Put(2, "q", b"t", 0.0, opts(ttl=5)))
    assert b.handle(A, Purge(3, "q"))[0] == (A, Ok(3, 2))
    clock.advance(10)
    assert b.tick(clock.mono) == []
    assert taken(b, clock) == [] and b.queues["q"].dead_total == 0


@pytest.mark.parametrize(
    ("bad", "word"),
    [
        (opts(delay=-1), "delay"),
        (opts(ttl=-1), "ttl"),
        (opts(priority=10), "priority"),
        (opts(dedup_id="x" * 300), "dedup_id"),
        (opts(headers={f"k{i}": "v" for i in range(100)}), "headers"),
    ],
)
def test_the_broker_refuses_options_out_of_range(bad: PutOptions, word: str) -> None:
    b, _ = make()
    ((_, reply),) = b.handle(A, Put(1, "q", b"x", 0.0, bad))
    assert isinstance(reply, Error) and reply.code == "bad_request" and word in reply.message


def test_plain_messages_are_encoded_as_before_but_for_a_trailing_nil() -> None:
    """Old clients keep decoding a DELIVER: a plain delivery gains one trailing nil, which
    version 1 peers ignore (docs/protocol.md section 2)."""

    class OldDelivery(msgspec.Struct, array_like=True):
        id: int
        delivery_count: int
        payload: bytes

    raw = msgspec.msgpack.encode(Delivery(5, 1, b"p", {"k": "v"}))
    assert msgspec.msgpack.decode(raw, type=OldDelivery) == OldDelivery(5, 1, b"p")
    hello = msgspec.msgpack.encode(Welcome(1, "s", 5.0, 100, ["options"]))
    assert msgspec.msgpack.decode(hello)[-1] == ["options"]


def open_broker(path: Path, kind: str, clock: Clock) -> tuple[Broker, Durable]:
    store = STORES[kind](path, "always")  # type: ignore[call-arg]
    broker, _ = make(store, clock)
    store.start(lambda batch: None)
    return broker, store


@pytest.mark.parametrize("kind", list(STORES))
def test_options_and_dedup_ids_survive_a_restart(tmp_path: Path, kind: str) -> None:
    clock = Clock()
    b, store = open_broker(tmp_path, kind, clock)
    b.handle(A, Put(1, "q", b"delayed", 0.0, opts(delay=100, headers={"h": "1"})), clock.mono)
    b.handle(A, Put(2, "q", b"prio", 0.0, opts(priority=7, ttl=1000)), clock.mono)
    b.handle(A, Put(3, "q", b"plain"), clock.mono)
    b.handle(A, Put(4, "q", b"dedup", 0.0, opts(dedup_id="once")), clock.mono)
    b.handle(A, Put(5, "q", b"expiring", 0.0, opts(ttl=50)), clock.mono)
    (d,) = taken(b, clock, 1, manual=True)
    assert d.payload == b"prio"
    b.handle(B, Ack(6, "q", [d.id]), clock.mono)
    b.handle(B, Nack(7, "q", [taken(b, clock, 1, manual=True)[0].id], False), clock.mono)
    store.close()

    clock.advance(60)  # the expiring message's ttl passed while the broker was down
    clock.mono = 5.0  # a new process: its monotonic clock has nothing to do with the last
    b2, store2 = open_broker(tmp_path, kind, clock)
    assert b2.queues["q"].delayed  # 40 s left
    b2.handle(A, Put(8, "q", b"dedup again", 0.0, opts(dedup_id="once")), clock.mono)
    b2.tick(clock.mono)
    assert bodies(taken(b2, clock)) == [b"dedup"]
    assert b2.queues["q"].dead_total == 1  # "expiring" went to q.dead at the first tick
    dead = taken(b2, clock, queue="q.dead")
    assert sorted(bodies(dead)) == [b"expiring", b"plain"]
    clock.advance(40)
    b2.tick(clock.mono)
    (late,) = taken(b2, clock)
    assert late.payload == b"delayed" and late.headers == {"h": "1"}
    store2.close()


@pytest.mark.parametrize("kind", list(STORES))
def test_the_dedup_ids_of_a_deleted_queue_are_forgotten(tmp_path: Path, kind: str) -> None:
    from pigeon.protocol import Delete

    clock = Clock()
    b, store = open_broker(tmp_path, kind, clock)
    b.handle(A, Put(1, "q", b"x", 0.0, opts(dedup_id="k")))
    b.handle(A, Delete(2, "q"))
    store.close()
    b2, store2 = open_broker(tmp_path, kind, clock)
    b2.handle(A, Put(3, "q", b"y", 0.0, opts(dedup_id="k")))
    assert bodies(taken(b2, clock)) == [b"y"]
    store2.close()


def test_the_log_keeps_dedup_ids_when_old_segments_are_dropped(tmp_path: Path) -> None:
    """Compaction writes a remembered dedup id forward before it drops the segment where
    the id was written: it is not forgotten."""
    clock = Clock()
    store = LogStore(tmp_path, "always", segment_bytes=4096)
    b, _ = make(store, clock)
    started = threading.Event()
    store.start(lambda batch: started.set())
    b.handle(A, Put(1, "q", b"x", 0.0, opts(dedup_id="remember-me")))
    (d,) = taken(b, clock, manual=True)
    b.handle(B, Ack(2, "q", [d.id]))
    for i in range(300):  # fill and drop segments
        b.handle(A, Put(10 + i, "q", b"y" * 200))
        (d,) = taken(b, clock, manual=True)
        b.handle(B, Ack(2, "q", [d.id]))
        store._maintain()
    assert min(store._sizes) > 1  # the first segment is gone
    store.close()
    b2, store2 = open_broker(tmp_path, "log", clock)
    b2.handle(A, Put(3, "q", b"again", 0.0, opts(dedup_id="remember-me")))
    assert taken(b2, clock) == []
    store2.close()


@pytest.mark.parametrize("kind", list(STORES))
def test_a_nacks_delay_survives_a_restart(tmp_path: Path, kind: str) -> None:
    clock = Clock()
    b, store = open_broker(tmp_path, kind, clock)
    b.handle(A, Put(1, "q", b"flaky job"), clock.mono)
    b.handle(A, Put(2, "q", b"with options", 0.0, opts(priority=3, headers={"h": "v"})))
    for d in taken(b, clock, 2, manual=True):
        b.handle(B, Nack(3, "q", [d.id], True, 300.0), clock.mono)
    assert b.queues["q"].info()["delayed"] == 2
    store.close()

    clock.advance(100)
    clock.mono = 5.0  # a new process
    b2, store2 = open_broker(tmp_path, kind, clock)
    assert b2.queues["q"].info()["delayed"] == 2  # 200 s left, not delivered at once
    assert taken(b2, clock) == []
    clock.advance(200)
    b2.tick(clock.mono)
    got = taken(b2, clock)
    assert [(d.payload, d.delivery_count) for d in got] == [
        (b"with options", 2), (b"flaky job", 2)
    ]  # fmt: skip
    assert got[0].headers == {"h": "v"}
    store2.close()


def test_a_nack_reason_longer_than_the_clients_limit_is_refused() -> None:
    b, clock = make()
    b.handle(A, Put(1, "q", b"x"))
    (d,) = taken(b, clock, manual=True)
    (reply,) = [m for _, m in b.handle(B, Nack(2, "q", [d.id], False, 0.0, "r" * 501))]
    assert isinstance(reply, Error) and reply.code == "bad_request"
    assert reply.message == "reason must be at most 500 characters, not 501"
    (ok, *_) = [m for _, m in b.handle(B, Nack(3, "q", [d.id], False, 0.0, "r" * 500))]
    assert isinstance(ok, Ok) and ok.value["settled"] == 1


@pytest.mark.parametrize("kind", list(STORES))
def test_what_a_request_shares_is_stored_once_not_once_per_message(
    tmp_path: Path, kind: str
) -> None:
    # One PUT_BATCH's headers (up to 16 KiB) for 2,000 payloads, and one NACK's reason
    # for 2,000 deliveries: written once, not 2,000 times, and shared again after a
    # restart (one object, not a copy per message).
    clock = Clock()
    b, store = open_broker(tmp_path, kind, clock)
    headers = {f"h{i:02d}": "v" * 247 for i in range(64)}  # 16,000 bytes
    before = store.disk_bytes  # type: ignore[attr-defined]
    b.handle(A, PutBatch(1, "q", [b""] * 2000, 0.0, opts(headers=headers, priority=2)))
    got: list[Any] = []
    while len(got) < 2000:  # headers count in a reply's size: about a thousand a GET
        got += taken(b, clock, 2000, manual=True)
    b.handle(B, Nack(2, "q", [d.id for d in got], False, 0.0, "why " * 125), clock.mono)
    store.close()
    assert store.disk_bytes - before < 400_000  # type: ignore[attr-defined]  # not 32 MB

    b2, store2 = open_broker(tmp_path, kind, clock)
    dead = list(b2.queues["q.dead"].ready)
    assert len(dead) == 2000 and dead[0].extra is not None and dead[0].extra.headers == headers
    assert len({id(m.extra.headers) for m in dead if m.extra is not None}) == 1
    assert len({id(m.reason) for m in dead}) == 1 and dead[0].reason == "why " * 125
    assert {(m.origin, m.priority) for m in dead} == {("q", 2)}
    got = []
    while len(got) < 2000:
        got += taken(b2, clock, 2000, manual=True, queue="q.dead")
    b2.handle(B, Ack(3, "q.dead", [d.id for d in got]), clock.mono)
    store2.close()
    if kind == "sqlite":  # what the messages shared went with the last of them
        import sqlite3

        db = sqlite3.connect(tmp_path / "pigeon.sqlite3")
        assert db.execute("SELECT count(*) FROM shared").fetchone() == (0,)
        db.close()


def test_dedup_ids_beyond_the_brokers_limit_are_refused_until_older_windows_pass() -> None:
    # Each id costs memory and a live entry in the store for its whole window: their
    # number is bounded across all queues, and a put beyond it stores nothing (its id
    # is never forgotten early: a repeat within the window still stores nothing).
    clock = Clock()
    b = Broker(
        None, clock=lambda: clock.mono, wall_clock=lambda: clock.wall,
        limits=Limits(max_dedup_ids=3),
    )  # fmt: skip
    b.connection_made(A)
    b.handle(A, Declare(1, "short", dedup_window=10.0), clock.mono)
    b.handle(A, Put(2, "short", b"a", 0.0, opts(dedup_id="a")), clock.mono)
    b.handle(A, PutBatch(3, "long", [b"b", b"c"], 0.0, None, ["b", "c"]), clock.mono)
    (refused,) = [
        m for _, m in b.handle(A, Put(4, "long", b"d", 0.0, opts(dedup_id="d")), clock.mono)
    ]
    assert isinstance(refused, Error) and refused.code == "limit"
    assert refused.message.startswith("this broker remembers 3 dedup ids (max_dedup_ids=3)")
    (repeat,) = [
        m for _, m in b.handle(A, Put(5, "long", b"c", 0.0, opts(dedup_id="c")), clock.mono)
    ]
    assert isinstance(repeat, Confirmed) and b.queues["long"].depth == 2
    clock.advance(11)  # "a" is forgotten: room for one
    (ok, *_) = [
        m for _, m in b.handle(A, Put(6, "long", b"d", 0.0, opts(dedup_id="d")), clock.mono)
    ]
    assert isinstance(ok, Confirmed) and b.queues["long"].depth == 3 and b.dedup_ids == 3
    from pigeon.protocol import Delete

    b.handle(A, Delete(7, "long"), clock.mono)
    assert b.dedup_ids == 0


@pytest.mark.parametrize("kind", list(STORES))
def test_a_delayed_nack_that_expires_is_a_ready_dead_letter_after_a_restart(
    tmp_path: Path, kind: str
) -> None:
    # SQLite's move kept the NACK's due time: after a restart the dead letter hid as
    # "delayed" for the rest of that delay (an hour here).
    clock = Clock()
    b, store = open_broker(tmp_path, kind, clock)
    b.handle(A, Put(1, "q", b"short-lived", 0.0, opts(ttl=10.0)), clock.mono)
    (d,) = taken(b, clock, 1, manual=True)
    b.handle(B, Nack(2, "q", [d.id], True, 3600.0), clock.mono)
    clock.advance(20)
    b.tick(clock.mono)  # expired while delayed: a dead letter
    store.close()
    b2, store2 = open_broker(tmp_path, kind, clock)
    info = b2.queues["q.dead"].info()
    assert info["depth"] == 1 and info["delayed"] == 0
    assert [d.payload for d in taken(b2, clock, queue="q.dead")] == [b"short-lived"]
    store2.close()


def test_a_dead_letter_put_with_a_ttl_expires_once_even_when_a_get_finds_it_first() -> None:
    # A GET that met it after its ttl dropped it but left it in the expiry index: the
    # timer then "withdrew" it again from a queue that no longer held it (its length -1,
    # a ValueError in tick, INFO closing connections, later puts hidden).
    b, clock = make()
    b.handle(A, Put(1, "q.dead", b"parked by hand", 0.0, opts(ttl=1.0)), clock.mono)
    clock.advance(2)
    assert taken(b, clock, queue="q.dead") == []  # expired: dropped, not delivered
    b.tick(clock.mono)
    assert len(b.queues["q.dead"].ready) == 0
    b.handle(A, Put(2, "q.dead", b"next"), clock.mono)
    assert [d.payload for d in taken(b, clock, queue="q.dead")] == [b"next"]


def test_a_get_that_dead_letters_an_expired_message_serves_the_gets_waiting_there() -> None:
    b, clock = make()
    b.handle(A, Put(1, "jobs", b"stale", 0.0, opts(ttl=1.0)), clock.mono)
    assert b.handle(B, Get(5, "jobs.dead", 1, 30.0), clock.mono) == []  # waits there
    clock.advance(2)
    outs = b.handle(A, Get(6, "jobs", 1, 0.0), clock.mono)  # meets it before the timer
    (served,) = [m for c, m in outs if c == B]
    assert isinstance(served, Deliver) and served.messages[0].payload == b"stale"


def test_the_new_dedup_ids_of_parked_puts_count_for_max_dedup_ids() -> None:
    from pigeon.protocol import Declare

    b = Broker(limits=Limits(max_dedup_ids=10))
    b.connection_made(A)
    b.handle(A, Declare(1, "q", maxsize=4))
    b.handle(A, Put(2, "q", b"fills it"))
    ids = [[f"{k}-{i}" for i in range(4)] for k in range(3)]
    assert b.handle(A, PutBatch(3, "q", [b"x"] * 4, 5.0, dedup_ids=ids[0])) == []  # parked
    assert b.handle(A, PutBatch(4, "q", [b"x"] * 4, 5.0, dedup_ids=ids[1])) == []
    ((_, refused),) = b.handle(A, PutBatch(5, "q", [b"x"] * 4, 5.0, dedup_ids=ids[2]))
    assert isinstance(refused, Error) and refused.code == "limit"
