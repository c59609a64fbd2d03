"""redis:// message options (issue 34): priorities, delays and ttls on Redis Streams, under
concurrent consumers, against a reference model, and the cost of waiting for them."""

from __future__ import annotations

import multiprocessing as mp
import os
import threading
import time
from typing import Any

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

import pigeon
from pigeon.backends.redis import SLICE, key_names
from tests._clusters import ScratchRedis
from tests._services import queue_name, require_service

LONG = 10.0


def raw() -> Any:
    import redis

    return redis.Redis(host="127.0.0.1", port=6379, socket_timeout=10)


def dead_letters(url: str) -> list[dict[bytes, bytes]]:
    """The entries of NAME.dead's streams (every priority) as Redis holds them."""
    name = url.rsplit("/", 1)[1].split("?")[0]
    dead = key_names(name, hash_tags=False)[1]
    r = raw()
    try:
        keys = [dead] + [f"{dead}:p{p}" for p in range(1, 10)]
        return [fields for k in keys for _, fields in r.xrange(k)]
    finally:
        r.close()


# --- priority -----------------------------------------------------------------------------


def test_get_many_returns_the_higher_priorities_first_in_one_call(redis_url: str) -> None:
    with pigeon.Queue(redis_url) as q:
        q.put_many(["a0", "b0"])
        q.put_many(["c7", "d7"], priority=7)
        q.put("e2", priority=2)
        q.put("f9", priority=9)
        assert q.get_many(4, timeout=LONG) == ["f9", "c7", "d7", "e2"]
        assert q.get_many(10, timeout=LONG) == ["a0", "b0"]


def test_a_nacked_message_keeps_its_priority_ahead_of_newer_lower_ones(redis_url: str) -> None:
    with pigeon.Queue(redis_url) as q:
        q.put("high", priority=5)
        msg = q.get_message(timeout=LONG)
        q.put("low-after")
        q.put("high-after", priority=5)
        msg.nack()
        again = q.get_message(timeout=LONG)
        assert (again.body, again.delivery_count) == ("high", 2)
        again.ack()
        assert [q.get(timeout=LONG) for _ in range(2)] == ["high-after", "low-after"]


def test_dead_letters_keep_their_priority(redis_url: str) -> None:
    with pigeon.Queue(redis_url) as q, pigeon.Queue(redis_url + ".dead") as dead:
        q.put("plain")
        q.put("urgent", priority=8)
        for _ in range(2):
            q.get_message(timeout=LONG).nack(requeue=False, reason="bad")
        assert [dead.get(timeout=LONG) for _ in range(2)] == ["urgent", "plain"]


def test_a_blocked_get_wakes_for_a_put_at_any_priority_in_use(redis_url: str) -> None:
    with pigeon.Queue(redis_url) as q:
        q.put("make level 4", priority=4)
        assert q.get(timeout=LONG) == "make level 4"
        threading.Timer(SLICE / 2, lambda: q.put("late", priority=4)).start()
        assert q.get(timeout=LONG) == "late"


def test_entries_a_blocked_read_took_beyond_what_was_asked_are_given_back_unharmed(
    redis_url: str,
) -> None:
    """One XREADGROUP over several priorities may return an entry of each: the caller
    keeps the highest, the others go back with their delivery count untouched."""
    import asyncio

    from pigeon.backends.redis import AsyncRedisQueue

    async def run() -> list[tuple[Any, int]]:
        q: AsyncRedisQueue[Any] = AsyncRedisQueue(redis_url)
        try:
            await q.put("make level 6", priority=6)
            assert await q.get() == "make level 6"
            await q.put("low")
            await q.put("high", priority=6)
            got = await q._wait_new(1, False, None, [6, 0], 100, None)
            assert [(g[2], g[1]) for g in got] == [(q._ser.dumps("high"), 1)]
            first = await q.get_message(timeout=LONG)
            return [(first.body, first.delivery_count)]
        finally:
            await q.aclose()

    assert asyncio.run(run()) == [("low", 1)]


def test_an_entry_a_reader_read_but_never_recorded_comes_back_after_the_lease(
    redis_url: str,
) -> None:
    """A blocked reader that dies between its XREADGROUP and the script after it leaves
    an entry without a lease record, at any priority: it comes back after the lease."""
    with pigeon.Queue(redis_url + "?lease=1") as q:
        q.put("made", priority=3)
        assert q.get(timeout=LONG) == "made"
        q.put("orphan", priority=3)
        stream = key_names(redis_url.rsplit("/", 1)[1], hash_tags=False)[0] + ":p3"
        r = raw()
        try:  # what the dead reader did, and no more
            assert r.xreadgroup("pigeon", "died", {stream: ">"}, count=1)
        finally:
            r.close()
        with pytest.raises(pigeon.Empty):
            q.get_message(timeout=0.3)  # held (idle for less than the lease)
        msg = q.get_message(timeout=LONG)
        assert (msg.body, msg.delivery_count) == ("orphan", 2)
        msg.ack()


# --- delay --------------------------------------------------------------------------------


def test_a_delayed_message_is_counted_but_never_taken_nor_leased_early(redis_url: str) -> None:
    with pigeon.Queue(redis_url) as q:
        started = time.monotonic()
        q.put("later", delay=1.0, priority=3)
        assert q.qsize() == 1 and not q.empty()
        with pytest.raises(pigeon.Empty):
            q.get_message(timeout=0.3)
        msg = q.get_message(timeout=LONG)
        assert time.monotonic() - started >= 1.0
        assert (msg.body, msg.delivery_count) == ("later", 1)  # never leased before
        msg.ack()
        assert q.qsize() == 0


def test_a_blocked_get_wakes_when_a_delayed_message_comes_due(redis_url: str) -> None:
    with pigeon.Queue(redis_url) as q:
        q.put("due", delay=0.8)
        started = time.monotonic()
        assert q.get(timeout=LONG) == "due"
        assert time.monotonic() - started >= 0.7


def test_delayed_messages_come_due_in_put_order_with_their_options(redis_url: str) -> None:
    with pigeon.Queue(redis_url) as q:
        q.put_many(["a", "b", "c"], delay=0.3, headers={"k": "v"}, priority=2)
        got = [q.get_message(timeout=LONG) for _ in range(3)]
        assert [(m.body, m.headers) for m in got] == [(x, {"k": "v"}) for x in "abc"]
        for m in got:
            m.ack()


def test_maxsize_counts_delayed_messages(redis_url: str) -> None:
    with pigeon.Queue(redis_url, maxsize=2) as q:
        q.put("a", delay=30)
        q.put("b", priority=9)
        assert q.full()
        with pytest.raises(pigeon.Full):
            q.put_nowait("c")


def test_shutdown_waits_for_delayed_messages_and_immediate_drops_them(redis_url: str) -> None:
    with pigeon.Queue(redis_url) as q:
        q.put("later", delay=0.5)
        q.shutdown()
        assert q.get(timeout=LONG) == "later"
        with pytest.raises(pigeon.ShutDown):
            q.get(timeout=LONG)
    with pigeon.Queue(redis_url + "-2") as q:
        q.put("later", delay=30)
        q.put("now", priority=1)
        q.shutdown(immediate=True)
        assert q.qsize() == 0
        with pytest.raises(pigeon.ShutDown):
            q.get_nowait()


# --- ttl ----------------------------------------------------------------------------------


def test_an_expired_message_goes_to_the_dead_letters_with_reason_expired(redis_url: str) -> None:
    with pigeon.Queue(redis_url) as q:
        q.put("stale", ttl=0.2, headers={"k": "v"}, priority=4)
        time.sleep(0.4)
        assert q.qsize() == 0  # counting collects it
        name = redis_url.rsplit("/", 1)[1].encode()
        assert dead_letters(redis_url) == [
            {b"d": _msgpack("stale"), b"origin": name, b"reason": b"expired",
             b"h": _msgpack({"k": "v"})}
        ]  # fmt: skip


def _msgpack(value: Any) -> bytes:
    import msgspec

    return msgspec.msgpack.encode(value)


def test_a_ttl_counts_after_the_delay(redis_url: str) -> None:
    with pigeon.Queue(redis_url) as q:
        q.put("kept", delay=0.5, ttl=0.4)
        time.sleep(0.7)  # past delay + ... not past delay + ttl
        assert q.get(timeout=LONG) == "kept"


def test_a_message_given_back_past_its_ttl_expires(redis_url: str) -> None:
    with pigeon.Queue(redis_url) as q:
        q.put("job", ttl=0.5)
        msg = q.get_message(timeout=LONG)
        time.sleep(0.7)  # in flight: it does not expire while it is
        msg.nack(delay=0.2)
        with pytest.raises(pigeon.Empty):
            q.get(timeout=0.6)
        assert [d[b"reason"] for d in dead_letters(redis_url)] == [b"expired"]


def test_a_message_held_past_its_ttl_is_still_acked(redis_url: str) -> None:
    with pigeon.Queue(redis_url) as q:
        q.put("job", ttl=0.3)
        msg = q.get_message(timeout=LONG)
        time.sleep(0.5)
        assert q.qsize() == 0
        msg.ack()
        assert dead_letters(redis_url) == []


def test_reading_the_dead_letters_collects_the_expired_messages_of_their_queue(
    redis_url: str,
) -> None:
    """No consumer on NAME: its expired messages still reach a reader of NAME.dead."""
    with pigeon.Queue(redis_url) as q:
        q.put("stale", ttl=0.3)
        q.put("later-stale", delay=0.2, ttl=0.2)
    with pigeon.Queue(redis_url + ".dead") as dead:
        got = [dead.get_message(timeout=LONG) for _ in range(2)]
        assert sorted(m.body for m in got) == ["later-stale", "stale"]
        for m in got:
            m.ack()


def test_a_message_put_into_a_dead_letter_queue_with_a_ttl_is_dropped_when_it_ends(
    redis_url: str,
) -> None:
    with pigeon.Queue(redis_url + ".dead") as dead:
        dead.put("by hand", ttl=0.2)
        time.sleep(0.4)
        with pytest.raises(pigeon.Empty):
            dead.get(timeout=0.3)
        assert dead.qsize() == 0


# --- concurrency, restart, idle cost ------------------------------------------------------


def _consume(url: str, out: Any, stop_after: float) -> None:
    got = []
    with pigeon.Queue(url) as q:
        deadline = time.monotonic() + stop_after
        while time.monotonic() < deadline:
            try:
                msg = q.get_message(timeout=0.5)
            except pigeon.Empty:
                continue
            got.append((msg.body, msg.delivery_count, time.time()))
            msg.ack()
    out.put(got)


def test_consumers_in_several_processes_take_each_message_once_never_early(
    redis_url: str,
) -> None:
    ctx = mp.get_context("spawn")
    out = ctx.SimpleQueue()
    procs = [ctx.Process(target=_consume, args=(redis_url, out, 6.0)) for _ in range(3)]
    for p in procs:
        p.start()
    due: dict[str, float] = {}
    with pigeon.Queue(redis_url) as q:
        for i in range(60):
            body, delay = f"m{i}", (i % 4) * 0.5
            due[body] = time.time() + delay
            q.put(body, delay=delay or None, priority=i % 10)
    got = [m for _ in procs for m in out.get()]
    for p in procs:
        p.join(LONG)
    assert sorted(b for b, _, _ in got) == sorted(due)
    assert all(n == 1 for _, n, _ in got)
    assert all(at >= due[b] - 0.05 for b, _, at in got)  # a clock read, not a race


def test_delays_ttls_and_priorities_survive_a_crash_of_redis_with_aof(
    scratch_redis: ScratchRedis,
) -> None:
    DELAY = 4.0  # the delayed ones are not due before the first get
    port, crash_and_restart = scratch_redis.port, scratch_redis.restart
    url = f"redis://127.0.0.1:{port}/options"
    with pigeon.Queue(url, reconnect_timeout=30) as q:
        started = time.monotonic()
        q.put("low")
        q.put("high", priority=9)
        q.put("delayed", delay=DELAY)
        q.put("stale", ttl=1.0)
        q.put("fresh", ttl=60)
        msg = q.get_message(timeout=LONG)
        assert msg.body == "high"
        msg.nack(delay=DELAY)
        crash_and_restart()
        time.sleep(max(0.0, 1.2 - (time.monotonic() - started)))
        assert q.qsize() == 4  # "stale" went to the dead letters
        early = q.get_many(10, timeout=LONG)
        if time.monotonic() - started < DELAY - 0.5:  # (a loaded machine can take longer)
            assert early == ["low", "fresh"]
        assert {"low", "fresh"} <= set(early)
        rest = [b for b in early if b not in ("low", "fresh")]
        while len(rest) < 2:
            rest += q.get_many(10, timeout=LONG)
        assert sorted(rest) == ["delayed", "high"]
    with pigeon.Queue(url + ".dead") as dead:
        assert dead.get(timeout=LONG) == "stale"


def test_a_blocked_get_costs_a_bounded_number_of_commands_while_idle(
    scratch_redis: ScratchRedis,
) -> None:
    """No busy polling: waiting 2 s on an empty queue (with a delayed message far
    ahead) costs a take and a blocked read per slice, not a loop."""
    import redis

    port = scratch_redis.port

    def scripts_run(r: Any) -> int:
        return int(r.info("commandstats").get("cmdstat_evalsha", {}).get("calls", 0))

    with pigeon.Queue(f"redis://127.0.0.1:{port}/idle") as q:
        q.put("far", delay=3600)
        q.put("p5", priority=5)
        assert q.get(timeout=LONG) == "p5"
        r = redis.Redis(port=port)
        before = scripts_run(r)
        with pytest.raises(pigeon.Empty):
            q.get(timeout=2.0)
        takes = scripts_run(r) - before
        r.close()
    assert takes <= 2.0 / SLICE + 3, f"{takes} take scripts in 2 s of waiting"


# --- a reference model: priorities, nacks and acks in any order ---------------------------


class PriorityModel(RuleBasedStateMachine):
    """redis:// against a plain model: per priority, messages given back (in the order
    they were given back) before new ones (in put order); the highest priority first."""

    def __init__(self) -> None:
        super().__init__()
        self.q: pigeon.Queue[Any] = pigeon.Queue(f"redis://127.0.0.1:6379/{queue_name()}")
        self.new: dict[int, list[int]] = {p: [] for p in range(10)}
        self.back: dict[int, list[int]] = {p: [] for p in range(10)}
        self.held: list[tuple[Any, int, int]] = []
        self.n = 0

    def teardown(self) -> None:
        self.q.close()

    def expected(self) -> tuple[int, set[int]] | None:
        """The priority of the next delivery and what it may be: any message of it given
        back (their order is the order their leases were set, to the millisecond), else
        the oldest new one."""
        for p in range(9, -1, -1):
            if self.back[p]:
                return p, set(self.back[p])
            if self.new[p]:
                return p, {self.new[p][0]}
        return None

    @rule(priority=st.integers(0, 9), count=st.integers(1, 3))
    def put(self, priority: int, count: int) -> None:
        items = list(range(self.n, self.n + count))
        self.n += count
        self.q.put_many(items, priority=priority)
        self.new[priority] += items

    @precondition(lambda self: self.expected() is not None)
    @rule()
    def take(self) -> None:
        want = self.expected()
        assert want is not None
        p, bodies = want
        msg = self.q.get_message(timeout=LONG)
        assert msg.body in bodies
        body = msg.body
        (self.back[p] if body in self.back[p] else self.new[p]).remove(body)
        self.held.append((msg, p, body))

    @precondition(lambda self: self.held)
    @rule(i=st.integers(0, 10), requeue=st.booleans())
    def settle(self, i: int, requeue: bool) -> None:
        msg, p, body = self.held.pop(i % len(self.held))
        if requeue:
            msg.nack()
            self.back[p].append(body)
        else:
            msg.ack()

    @invariant()
    def counted(self) -> None:
        waiting = sum(len(v) for v in self.new.values()) + sum(len(v) for v in self.back.values())
        assert self.q.qsize() == waiting


def test_priorities_and_nacks_follow_the_reference_model() -> None:
    require_service("Redis", 6379)
    run = PriorityModel.TestCase
    run.settings = settings(max_examples=int(os.environ.get("PIGEON_MODEL_EXAMPLES", "25")),
                            stateful_step_count=25, deadline=None)  # fmt: skip
    run().runTest()


@pytest.mark.parametrize("how", ["get", "get_message"])
def test_an_empty_payload_reaches_a_blocked_reader(redis_url: str, how: str) -> None:
    with pigeon.Queue(redis_url, serializer="raw") as q:
        threading.Timer(SLICE / 2, lambda: q.put(b"")).start()
        if how == "get":
            assert q.get(timeout=LONG) == b""
        else:
            msg = q.get_message(timeout=LONG)
            assert msg.body == b""
            msg.ack()
        assert q.qsize() == 0


def test_a_get_many_of_any_size_takes_a_bounded_batch(redis_url: str) -> None:
    from pigeon.backends.redis import MAX_TAKE

    with pigeon.Queue(redis_url, serializer="raw") as q:
        q.put_many([b"x"] * (MAX_TAKE + 5))
        assert len(q.get_many(10**9, timeout=LONG)) == MAX_TAKE
        assert len(q.get_many(10**9, timeout=LONG)) == 5


def test_a_message_whose_lease_ends_past_its_ttl_expires_instead_of_coming_back(
    redis_url: str,
) -> None:
    with pigeon.Queue(redis_url) as q, pigeon.Queue(redis_url + ".dead") as dead:
        q.put("job", ttl=0.3)
        q.get_message(timeout=LONG, lease=0.6)  # its consumer dies: never settled
        time.sleep(0.4)
        assert q.qsize() == 0  # held: it does not expire while it is
        time.sleep(0.4)
        assert dead.get(timeout=LONG) == "job"  # the lease ended past the ttl: expired
        assert q.qsize() == 0
        with pytest.raises(pigeon.Empty):
            q.get(timeout=0.3)


def test_an_ack_whose_reply_was_lost_is_indeterminate_not_claimed_by_another(
    redis_url: str,
) -> None:
    """The SETTLE script ran and the connection broke before its reply: the ack is sent
    again and finds the entry no longer pending. It was this ack that settled it, so the
    call says the outcome is unknown, not that another consumer took the entry."""
    import asyncio

    import redis.exceptions as rex

    from pigeon.backends.redis import AsyncRedisQueue

    async def run() -> None:
        q: AsyncRedisQueue[Any] = AsyncRedisQueue(redis_url)
        try:
            await q.put("once")
            msg = await q.get_message(timeout=LONG)
            real, calls = q._scripts["SETTLE"], []

            async def reply_lost(*args: Any, **kwargs: Any) -> Any:
                result = await real(*args, **kwargs)  # applied ...
                calls.append(result)
                if len(calls) == 1:  # ... and its reply lost
                    raise rex.ConnectionError("connection reset by peer (test)")
                return result

            q._scripts["SETTLE"] = reply_lost
            with pytest.raises(pigeon.Indeterminate, match="the first ack settled it"):
                await msg.ack()
            assert calls == [1, 0]
            with pytest.raises(pigeon.Empty):
                await q.get(timeout=0.3)
        finally:
            await q.aclose()

    asyncio.run(run())


# --- a settle only counts for the delivery that holds the message -------------------------


def _redelivered(a: Any, b: Any) -> tuple[Any, Any]:
    """``a`` takes the message with a short lease and lets it run out; ``b`` then gets
    the redelivery. (first delivery, second delivery)"""
    first = a.get_message(timeout=LONG, lease=0.3)
    assert first.delivery_count == 1
    time.sleep(0.5)  # the lease ran out
    second = b.get_message(timeout=LONG)
    assert (second.body, second.delivery_count) == (first.body, 2)
    return first, second


def test_an_ack_after_the_lease_ran_out_and_another_consumer_got_it_is_refused(
    redis_url: str,
) -> None:
    with pigeon.Queue(redis_url) as a, pigeon.Queue(redis_url) as b:
        a.put("job")
        first, second = _redelivered(a, b)
        with pytest.raises(pigeon.LocalProtocolError, match="lease ran out"):
            first.ack()  # stale: it must not settle b's delivery
        second.ack()  # the holder's ack settles it
        assert a.qsize() == 0
        with pytest.raises(pigeon.Empty):
            b.get_message(timeout=0.5)  # gone, once
        assert dead_letters(redis_url) == []


@pytest.mark.parametrize("what", ["extend", "nack", "reject"])
def test_a_stale_nack_or_extend_is_refused_and_leaves_the_new_delivery_alone(
    redis_url: str, what: str
) -> None:
    stale = {
        "extend": lambda m: m.extend(0.0),  # would make b's delivery claimable at once
        "nack": lambda m: m.nack(requeue=True),  # the same
        "reject": lambda m: m.nack(requeue=False),  # would dead-letter b's delivery
    }[what]
    with pigeon.Queue(redis_url) as a, pigeon.Queue(redis_url) as b:
        a.put("job")
        first, second = _redelivered(a, b)
        call = "nack" if what == "reject" else what
        with pytest.raises(pigeon.LocalProtocolError, match=f"cannot {call} .*lease ran out"):
            stale(first)
        with pytest.raises(pigeon.Empty):
            a.get_message(timeout=0.5)  # still held by b
        assert dead_letters(redis_url) == []
        second.ack()
        assert a.qsize() == 0


def test_the_same_handle_cannot_settle_its_earlier_delivery_of_a_message(
    redis_url: str,
) -> None:
    """The holder is the delivery, not the handle: one handle that got the message again
    after the lease of its first delivery ran out can settle only the second one."""
    with pigeon.Queue(redis_url) as q:
        q.put("job")
        first, second = _redelivered(q, q)
        with pytest.raises(pigeon.LocalProtocolError, match="lease ran out"):
            first.ack()
        second.ack()
        with pytest.raises(pigeon.Empty):
            q.get_message(timeout=0.3)


def test_an_ack_after_the_lease_ran_out_before_anyone_took_it_again_settles_it(
    redis_url: str,
) -> None:
    """No other delivery happened: the late holder is still the only one, and its ack
    settles the message (nothing is done twice)."""
    with pigeon.Queue(redis_url) as q:
        q.put("job")
        msg = q.get_message(timeout=LONG, lease=0.2)
        time.sleep(0.4)
        msg.ack()
        with pytest.raises(pigeon.Empty):
            q.get_message(timeout=0.3)
