"""The asyncio client of pigeon:// on uvloop, the loop pigeon depends on and task frameworks
pick when it is installed (taskiq's worker does)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest
import uvloop

import pigeon
from tests._services import free_port, start_broker


@pytest.fixture(scope="module")
def url() -> Iterator[str]:
    port = free_port()
    proc = start_broker(port, "--memory")
    try:
        yield f"pigeon://127.0.0.1:{port}/loops"
    finally:
        proc.terminate()
        proc.wait(10)


def test_first_call_on_uvloop_gets_the_reply_that_arrives_with_the_connection(url: str) -> None:
    # uvloop may hand the broker's WELCOME and its answer to the DECLARE to the protocol
    # before create_connection returns: a client that registered its wait for the DECLARE
    # only afterwards dropped that answer, and the first call of a new handle waited out
    # connect_timeout (10 s; in one run of twenty, about seven handles).
    async def open_twenty() -> list[int]:
        sizes = []
        for _ in range(20):
            q: pigeon.AsyncQueue[int] = pigeon.AsyncQueue(
                url, connect_timeout=2.0, reconnect_timeout=0
            )
            try:
                sizes.append(await q.qsize())
            finally:
                await q.aclose()
        return sizes

    assert uvloop.run(open_twenty()) == [0] * 20
    assert asyncio.run(open_twenty()) == [0] * 20
