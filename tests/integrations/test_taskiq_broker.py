"""pigeon.integrations.taskiq.PigeonBroker in-process, against a broker thread: kick,
listen, ack and the lease keeper, without taskiq's worker (test_taskiq.py runs that)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

import pigeon
from pigeon.testing.broker import BrokerThread
from tests._services import free_port, queue_name
from tests.integrations._support import require

require("taskiq", "taskiq")

from taskiq import AckableMessage, BrokerMessage, TaskiqMessage  # noqa: E402

from pigeon.integrations.taskiq import PigeonBroker  # noqa: E402


@pytest.fixture(scope="module")
def server() -> Iterator[BrokerThread]:
    with BrokerThread() as b:
        yield b


def body(n: int) -> bytes:
    """The bytes taskiq's formatter makes of task ``t`` called with ``n``."""
    msg = TaskiqMessage(task_id=f"id{n}", task_name="t", labels={}, args=[n], kwargs={})
    return msg.model_dump_json().encode()


def message(n: int, **labels: Any) -> BrokerMessage:
    return BrokerMessage(task_id=f"id{n}", task_name="t", message=body(n), labels=labels)


def worker_broker(url: str, **kwargs: Any) -> PigeonBroker:
    """A broker as a worker has it: task ``t`` registered."""
    broker = PigeonBroker(url, **kwargs)
    broker.register_task(lambda n: n, task_name="t")
    return broker


async def take(gen: AsyncIterator[AckableMessage], timeout: float = 10.0) -> AckableMessage:
    return await asyncio.wait_for(anext(gen), timeout)


def info(url: str) -> dict[str, Any]:
    with pigeon.Queue(url) as q:
        name = url.rsplit("/", 1)[1]
        stats: dict[str, Any] = q.stats()["queues"].get(name, {})
    return stats


def test_listen_yields_the_kicked_bytes_and_its_ack_is_the_pigeon_ack(
    server: BrokerThread,
) -> None:
    url = server.url(queue_name())

    async def run() -> None:
        broker = worker_broker(url)
        await broker.startup()
        await broker.kick(message(1))
        gen = broker.listen()
        m = await take(gen)
        assert m.data == body(1)
        assert info(url)["in_flight"] == 1
        await m.ack()
        assert info(url)["in_flight"] == 0
        await gen.aclose()
        await broker.shutdown()

    asyncio.run(run())
    assert (info(url)["depth"], info(url)["acked_total"]) == (0, 1)


def test_a_task_not_acked_goes_back_when_the_worker_closes(server: BrokerThread) -> None:
    url = server.url(queue_name())

    async def run() -> None:
        worker = worker_broker(url)
        await worker.kick(message(1))  # before startup: the handle opens on first use
        gen = worker.listen()
        await take(gen)
        await gen.aclose()
        await worker.shutdown()  # its connection closes with the task in hand

    asyncio.run(run())
    with pigeon.Queue(url, serializer="raw") as q, q.get_message(timeout=5) as msg:
        assert (msg.body, msg.delivery_count) == (body(1), 2)


def test_the_keeper_holds_a_task_past_many_leases(server: BrokerThread) -> None:
    url = server.url(queue_name())

    async def run() -> None:
        worker = worker_broker(url, lease=0.4)
        other = pigeon.AsyncQueue(url, serializer="raw")
        await worker.kick(message(1))
        gen = worker.listen()
        m = await take(gen)
        with pytest.raises(pigeon.Empty):  # five leases: never given to another worker
            await other.get_message(timeout=2.0)
        await m.ack()
        await other.aclose()
        await gen.aclose()
        await worker.shutdown()

    asyncio.run(run())
    assert (info(url)["redelivered_total"], info(url)["acked_total"]) == (0, 1)


def test_without_the_keeper_the_lease_would_run_out(server: BrokerThread) -> None:
    # the same hold as above, taken without PigeonBroker: the broker gives it away
    url = server.url(queue_name())

    async def run() -> None:
        q = pigeon.AsyncQueue(url, serializer="raw")
        await q.put(b"m1")
        await q.get_message(lease=0.4)
        other = pigeon.AsyncQueue(url, serializer="raw")
        m = await other.get_message(timeout=5.0)
        assert m.delivery_count == 2
        await m.ack()
        await other.aclose()
        await q.aclose()

    asyncio.run(run())


def test_listen_ends_when_the_queue_is_shut_down_and_drained(server: BrokerThread) -> None:
    url = server.url(queue_name())

    async def run() -> list[bytes]:
        worker = worker_broker(url)
        await worker.kick(message(1))
        await worker.kick(message(2))
        with pigeon.Queue(url) as q:
            q.shutdown()
        got = []
        async for m in worker.listen():
            got.append(m.data)
            await m.ack()
        await worker.shutdown()
        return got

    assert asyncio.run(asyncio.wait_for(run(), 20)) == [body(1), body(2)]


def test_startup_fails_when_no_broker_listens() -> None:
    url = f"pigeon://127.0.0.1:{free_port()}/taskiq"

    async def run() -> None:
        await PigeonBroker(url, reconnect_timeout=0).startup()

    with pytest.raises(pigeon.BrokenResourceError, match=r"cannot connect to 127\.0\.0\.1"):
        asyncio.run(run())


def test_a_url_without_a_queue_uses_the_taskiq_queue() -> None:
    assert PigeonBroker("pigeon://127.0.0.1:7878").url == "pigeon://127.0.0.1:7878/taskiq"
    assert PigeonBroker("pigeon://h:1/jobs?lease=5").queue_name == "jobs"


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(TypeError, match="carries taskiq's bytes as they are"):
        PigeonBroker("pigeon://127.0.0.1:7878/q", serializer="json")
    with pytest.raises(pigeon.InvalidURL, match="needs a networked queue URL"):
        PigeonBroker("jobs")
    with pytest.raises(ValueError, match="lease must be a number of seconds more than 0"):
        PigeonBroker("pigeon://127.0.0.1:7878/q", lease=0)


def test_a_message_that_does_not_parse_is_dead_lettered_not_yielded(
    server: BrokerThread,
) -> None:
    url = server.url(queue_name())

    async def run() -> bytes:
        worker = worker_broker(url)
        async with pigeon.AsyncQueue(url, serializer="raw") as q:
            await q.put(b"garbage")
        await worker.kick(message(1))
        gen = worker.listen()
        m = await take(gen)
        await m.ack()
        await gen.aclose()
        await worker.shutdown()
        return m.data

    assert asyncio.run(run()) == body(1)
    with pigeon.Queue(url + ".dead", serializer="raw") as dead:
        (shown,) = dead.peek(10)
    assert shown["payload"] == b"garbage"
    assert shown["reason"].startswith("undecodable: ")
    assert info(url)["in_flight"] == 0


def test_a_task_this_worker_does_not_know_goes_back_for_a_worker_that_does(
    server: BrokerThread,
) -> None:
    url = server.url(queue_name())
    unknown = BrokerMessage(task_id="x", task_name="newtask", message=TaskiqMessage(
        task_id="x", task_name="newtask", labels={}, args=[], kwargs={}
    ).model_dump_json().encode(), labels={})  # fmt: skip

    async def run() -> int:
        old = worker_broker(url, unknown_task_delay=0.5)
        new = PigeonBroker(url)
        new.register_task(lambda: None, task_name="newtask")
        await old.kick(unknown)
        old_gen = old.listen()
        with pytest.raises(TimeoutError):  # skipped, not yielded
            await take(old_gen, timeout=1.0)
        assert len(old._keeper) == 0  # nothing held for it
        new_gen = new.listen()
        m = await take(new_gen)
        await m.ack()
        for gen in (old_gen, new_gen):
            await gen.aclose()
        await old.shutdown()
        await new.shutdown()
        return info(url)["in_flight"]

    assert asyncio.run(run()) == 0


def test_a_message_taskiq_drops_without_an_ack_is_no_longer_held(server: BrokerThread) -> None:
    url = server.url(queue_name())

    async def run() -> int:
        worker = worker_broker(url, lease=0.4)
        await worker.kick(message(1))
        gen = worker.listen()
        m = await take(gen)
        assert len(worker._keeper) == 1
        del m  # what taskiq's receiver does with a message it will not run
        await asyncio.sleep(0.2)
        assert len(worker._keeper) == 0  # not extended for ever
        again = await take(gen)  # given back at once, not after its lease
        await again.ack()
        await gen.aclose()
        await worker.shutdown()
        return info(url)["redelivered_total"]

    assert asyncio.run(run()) == 1


def test_an_ack_the_broker_refuses_is_logged_not_raised_into_taskiq(
    server: BrokerThread, caplog: pytest.LogCaptureFixture
) -> None:
    # The lease ran out (the keeper stopped, a paused worker) and another worker holds the
    # task now: the broker refuses the late ack. taskiq's receiver awaits the ack after
    # the task ran; an exception there escaped as an unhandled error of the worker.
    url = server.url(queue_name())

    async def run() -> None:
        broker = worker_broker(url, lease=0.5)
        await broker.startup()
        await broker.kick(message(1))
        gen = broker.listen()
        m = await take(gen)
        for h, _ in list(broker._keeper._held.values()):
            broker._keeper.release(h)  # as a worker paused past its lease
        other = pigeon.AsyncQueue(url, serializer="raw")
        again = await other.get_message(timeout=5.0)  # the lease ran out: delivered again
        assert again.delivery_count == 2
        await m.ack()  # refused by the broker: logged, the task runs again elsewhere
        await again.ack()
        await other.aclose()
        await gen.aclose()
        await broker.shutdown()

    with caplog.at_level("WARNING", logger="pigeon.integrations.taskiq"):
        asyncio.run(run())
    assert any("could not ack" in r.getMessage() for r in caplog.records), caplog.text
    assert (info(url)["depth"], info(url)["in_flight"]) == (0, 0)
