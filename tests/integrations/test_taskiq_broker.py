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

from taskiq import AckableMessage, BrokerMessage  # noqa: E402

from pigeon.integrations.taskiq import PigeonBroker  # noqa: E402


@pytest.fixture(scope="module")
def server() -> Iterator[BrokerThread]:
    with BrokerThread() as b:
        yield b


def message(n: int, **labels: Any) -> BrokerMessage:
    return BrokerMessage(task_id=f"id{n}", task_name="t", message=b"m%d" % n, labels=labels)


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
        broker = PigeonBroker(url)
        await broker.startup()
        await broker.kick(message(1))
        gen = broker.listen()
        m = await take(gen)
        assert m.data == b"m1"
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
        worker = PigeonBroker(url)
        await worker.kick(message(1))  # before startup: the handle opens on first use
        gen = worker.listen()
        await take(gen)
        await gen.aclose()
        await worker.shutdown()  # its connection closes with the task in hand

    asyncio.run(run())
    with pigeon.Queue(url, serializer="raw") as q, q.get_message(timeout=5) as msg:
        assert (msg.body, msg.delivery_count) == (b"m1", 2)


def test_the_keeper_holds_a_task_past_many_leases(server: BrokerThread) -> None:
    url = server.url(queue_name())

    async def run() -> None:
        worker = PigeonBroker(url, lease=0.4)
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
        worker = PigeonBroker(url)
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

    assert asyncio.run(asyncio.wait_for(run(), 20)) == [b"m1", b"m2"]


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
